"""The worker side of cam-vllm on CPU: vLLM's ``CPU_ATTN`` backend, taught a KV policy.

:func:`register_attention` points vLLM's ``CPU_ATTN`` registry entry at
:class:`PolicyCPUAttentionBackend` (the CPU platform ignores ``--attention-backend CUSTOM``, and
re-pointing the registry entry is vLLM's supported override). The backend therefore replaces the
stock one whenever the plugin is loaded, so with no policy configured (or for layers a policy does
not apply to) every method defers to the stock class unchanged.

With a policy (see docs/vllm-worker.md):

* the builder (once per step) rewrites the batch so the fused kernel attends exactly to the
  retained blocks (:func:`~cam_vllm.vllm_plugin.step_plan.compact_for_kernel`), then calls the
  stock ``build``;
* for merging policies it also plans the scores and merges of the step
  (:func:`~cam_vllm.vllm_plugin.step_plan.plan_scores`);
* a token-exact policy (``--kv-token-exact``) skips the kernel: the impl computes every query's
  output from the score packs, whose masks hide the tokens of held blocks that the per-token
  policy no longer shows;
* the impl runs the stock kernel, then (merging policies only) scores this step's queries with
  ``attention_with_probs`` over the gathered cached tokens, accumulates ``Abar`` in a per-layer
  side tensor indexed by physical slot, and merges the tokens that leave the retained set into
  their targets' values in the KV cache, in place, with ``cam_merge``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from vllm.config import VllmConfig
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin import step_requests
from cam_vllm.vllm_plugin.impl_common import (
    NO_BATCH_CACHES,
    PolicyImplMixin,
    WavePart,
    policy_spec,
    wave_common_metadata,
)
from cam_vllm.vllm_plugin.paged import PagedKV, probe_layout
from cam_vllm.vllm_plugin.query_stash import (
    StashPlanner,
    deferred_scoring_enabled,
    ensure_rows,
    stash_for_wave,
)
from cam_vllm.vllm_plugin.request_policy import allows_full, own_windows
from cam_vllm.vllm_plugin.scoring import new_score_state, reset_slots, score_and_merge
from cam_vllm.vllm_plugin.settings import policy_from_vllm_config
from cam_vllm.vllm_plugin.step_plan import (
    StashStep,
    StepPlan,
    StepTokens,
    compact_for_kernel,
    plan_scores,
    split_waves,
)

logger = init_logger(__name__)

BACKEND_PATH = f"{__name__}.PolicyCPUAttentionBackend"


def register_attention() -> None:
    """Make vLLM's ``CPU_ATTN`` resolve to our backend. Idempotent; imports nothing heavy."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.CPU_ATTN.get_path() != BACKEND_PATH:
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


class PolicyCPUAttentionBackend(CPUAttentionBackend):
    """``CPU_ATTN`` with a KV policy; identical to the stock backend when none is configured."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"  # vLLM looks the name up in AttentionBackendEnum

    @staticmethod
    def get_impl_cls() -> type[PolicyCPUAttentionBackendImpl]:
        return PolicyCPUAttentionBackendImpl

    @staticmethod
    def get_builder_cls() -> type[PolicyCPUAttentionMetadataBuilder]:
        return PolicyCPUAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """With a policy, the scheduler side's spec (see :func:`impl_common.policy_spec`)."""
        return policy_spec(super().customize_spec(spec))


@dataclass
class PolicyCPUAttentionMetadata(CPUAttentionMetadata):
    """Stock metadata (built from the compacted batch) plus this step's score/merge plan, and for
    a score-driven policy whose chunk crosses a window block the step's waves (run one by one)."""

    cam_plan: StepPlan | None = None
    cam_waves: list[WavePart] | None = None


def _unsupported(vllm_config: VllmConfig, policy: KVPolicy, spec: AttentionSpec) -> str | None:
    """Why the policy cannot run on this KV-cache group (None: it can)."""
    if policy.eviction.block_size != spec.block_size:
        return f"policy block size {policy.eviction.block_size} != KV-cache block size {spec.block_size}"
    if getattr(spec, "sliding_window", None) is not None:
        return "the model has sliding-window layers"
    if (
        policy.tracks_scores
        and vllm_config.cache_config.enable_prefix_caching
        and getattr(spec, "prefix_cacheable", True)
    ):
        return (
            "CaM merging writes into cached blocks, which prefix caching may share with other "
            "requests; disable prefix caching (--no-enable-prefix-caching)"
        )
    return None


class PolicyCPUAttentionMetadataBuilder(CPUAttentionMetadataBuilder):
    """Per step: compact the batch to the retained blocks, and plan scores and merges."""

    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        policy = policy_from_vllm_config(vllm_config)
        if policy is not None and (self.is_cross_attention or self.is_encoder_only_attention):
            policy = None  # policies govern the decoder's self-attention cache only
        if policy is not None:
            reason = _unsupported(vllm_config, policy, kv_cache_spec)
            if reason:
                raise ValueError(f"KV policy {policy.name!r} cannot run: {reason}")
        self.policy = policy
        self.allow_full = allows_full(vllm_config)  # per-request full cache (request_policy.py)
        # deferred scoring of decode queries (accumulated scores; docs/vllm-worker.md)
        self.stash_planner = None
        self.defer_decodes = deferred_scoring_enabled()
        if (
            self.defer_decodes
            and policy is not None
            and policy.tracks_scores
            and policy.score_mode == "accumulated"
            and not policy.token_exact  # every query is attended by the plugin in its own step
            and not (policy.score is not None and policy.score.observation_window is not None)
        ):  # an observation-window score (SnapKV) scores no decode at all
            self.stash_planner = StashPlanner(self.block_size)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> CPUAttentionMetadata:
        if self.policy is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal or cm.mm_req_doc_ranges:
            raise NotImplementedError("KV policies support causal decoder attention only")
        step = step_requests.current(cm.num_reqs, cm.seq_lens)
        full = step_requests.full_of(step) if self.allow_full else None  # rows keeping the full cache
        window, cut = own_windows(self.policy, step)  # rows with a smaller window of their own
        hold = step_requests.holds_of(step, self.policy)  # rows whose prompt is held until read
        held = self.policy.eviction.held if self.policy.eviction.hold_span else None  # a bounded hold
        tokens = StepTokens.from_batch(
            cm.query_start_loc, cm.seq_lens, cm.num_reqs, full, window, cut, hold, held
        )
        seeds = step_requests.seeds_of(step) if self.policy.merge is not None else None
        stash = None
        if step is not None and self.stash_planner is not None:
            stash = self.stash_planner.plan(tokens.query_lens.tolist(), tokens.context_lens.tolist(), step)
        waves = split_waves(self.policy, tokens)
        if len(waves) == 1:
            meta, plan = self._build_one(common_prefix_len, cm, tokens, fast_build, seeds, stash)
            parts = None
        else:  # the heavy region is chosen (or the leaving block merged) between waves
            meta, plan = self._build_one(common_prefix_len, cm, tokens, fast_build, plan=False)
            parts = [
                WavePart(
                    w.rows,
                    *self._build_one(
                        common_prefix_len,
                        wave_common_metadata(cm, w),
                        w.tokens,
                        fast_build,
                        None if seeds is None else [seeds[i] for i in w.requests.tolist()],
                        stash_for_wave(stash, w) if i == 0 else None,  # every request starts in wave 0
                    ),
                )
                for i, w in enumerate(waves)
            ]
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
        return PolicyCPUAttentionMetadata(**fields, cam_plan=plan, cam_waves=parts)

    def _build_one(
        self,
        common_prefix_len: int,
        cm: CommonAttentionMetadata,
        tokens: StepTokens,
        fast_build: bool,
        seeds: list[int | None] | None = None,
        stash: StashStep | None = None,
        plan: bool = True,
    ) -> tuple[CPUAttentionMetadata, StepPlan | None]:
        """Stock metadata of the batch compacted to the retained blocks, and the score plan."""
        assert self.policy is not None
        block_table = cm.block_table_tensor
        kernel = compact_for_kernel(self.policy.eviction.block_retained, tokens, block_table, self.block_size)
        kernel_cm = cm
        if kernel is not None:
            g = kernel.request
            kernel_cm = cm.replace(
                query_start_loc=kernel.query_start_loc,
                query_start_loc_cpu=kernel.query_start_loc,
                seq_lens=kernel.seq_lens,
                seq_lens_cpu_upper_bound=kernel.seq_lens,
                num_reqs=int(g.numel()),
                max_query_len=kernel.max_query_len,
                max_seq_len=kernel.max_seq_len,
                block_table_tensor=kernel.block_table,
                is_prefilling=None if cm.is_prefilling is None else cm.is_prefilling[g],
                positions=cm.positions,
                **NO_BATCH_CACHES,
            )
        meta = super().build(common_prefix_len, kernel_cm, fast_build)
        if not (plan and self.policy.tracks_scores):
            return meta, None
        return meta, plan_scores(
            self.policy,
            tokens,
            block_table,
            cm.slot_mapping,
            self.block_size,
            seeds=seeds,
            stash=stash,
            defer_decodes=self.defer_decodes,
        )


class PolicyCPUAttentionBackendImpl(PolicyImplMixin, CPUAttentionBackendImpl):
    """The stock kernel, plus accumulated attention and CaM merging for merging policies."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_policy(self._unsupported_features)

    def _unsupported_features(self, policy: KVPolicy) -> list[str]:
        problems = []
        if self.alibi_slopes is not None:
            problems.append("ALiBi (positions are compacted)")
        if self.sliding_window != -1:
            problems.append("sliding-window attention")
        if policy.tracks_scores and (self.logits_soft_cap or self.sinks is not None):
            problems.append("logit soft-capping or learned sinks with score tracking")
        if self.is_fp8_kv_cache and policy.tracks_scores:
            problems.append("an fp8 KV cache with merging")
        return problems

    def _bind(self, layer, kv_cache: torch.Tensor) -> None:
        """Per-layer state, (re)made when the KV cache tensor is first seen or replaced."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape))
        if key == self._cache_key:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        layout = probe_layout(layer.isa, kv_cache.dtype, block_size, self.head_size)
        self._paged = PagedKV(kv_cache, layout)
        self._abar = torch.zeros(num_blocks * block_size, num_kv_heads, dtype=torch.float32)
        assert self.policy is not None
        self._state = new_score_state(self.policy, num_blocks * block_size, num_kv_heads)
        self._bind_heads(layer, num_kv_heads)
        self._cache_key = key

    def _score_and_merge(
        self,
        layer,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: StepPlan,
        output: torch.Tensor | None = None,
    ) -> None:
        self._bind(layer, kv_cache)
        paged, abar, policy = self._paged, self._abar, self.policy
        assert paged is not None and abar is not None and policy is not None
        stash = None
        if plan.stash is not None:  # this step's decode queries wait in the stash (query_stash.py)
            self._stash = ensure_rows(self._stash, plan.stash, query)
            write_q = plan.stash.write_q
            if write_q.numel():
                rows = query[: write_q.numel()] if plan.stash.writes_first_rows else query[write_q]
                self._stash.index_copy_(0, plan.stash.write_at, rows)
            if plan.idle:  # decodes only, none ends a block: nothing else to do in this layer
                return
            stash = self._stash.view(-1, plan.stash.length, *query.shape[1:])
        reset_slots(abar, self._state, plan.reset_slots, plan.reset_positions)
        score_and_merge(
            paged=paged,
            abar=abar,
            query=query,
            packs=plan.packs,
            merges=plan.merges,
            policy=policy,
            scale=self.scale,
            num_kv_heads=self.num_kv_heads,
            layer_index=self._layer_index,
            heads=self._heads,
            count_tokens=self._counts_tokens,
            state=self._state,
            heavy=plan.heavy,
            decode=plan.decode,
            stash=stash,
            output=output,
        )
