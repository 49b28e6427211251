"""What the CPU and CUDA attention impls share: the policy a layer serves, the vLLM config the
layers were built under, and the step that scores and merges after the stock kernel.

Each backend keeps only what differs: its paged-KV layout (``_paged_view``) and the features of
its impl it cannot combine with a policy. The metadata builders share ``builder.py``.
"""

from __future__ import annotations

import importlib.util
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import VllmConfig, get_current_vllm_config_or_none
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin.process_state import WORKER
from cam_vllm.vllm_plugin.query_stash import ensure_rows
from cam_vllm.vllm_plugin.scoring import global_kv_heads, new_score_state, reset_slots, score_and_merge
from cam_vllm.vllm_plugin.settings import policy_from_vllm_config
from cam_vllm.vllm_plugin.step_plan import StepPlan, Wave

_KV_MANAGER_MODULE = "cam_vllm.vllm_plugin.kv_manager"

# Per-request fields of vLLM's common attention metadata that no longer match a batch rewritten
# into pseudo-requests or waves (``CommonAttentionMetadata.replace(..., **NO_BATCH_CACHES)``).
NO_BATCH_CACHES: dict[str, None] = dict(
    req_idx=None,
    dcp_local_seq_lens=None,
    dcp_local_seq_lens_cpu_upper_bound=None,
    rswa_prefix_lens=None,
    replayssm_decode_base_cpu=None,
    _num_computed_tokens_cache=None,
    _token_to_req_indices_cache=None,
)


@dataclass(frozen=True)
class WavePart:
    """One wave of a step: its rows of the step's tensors, stock metadata and score plan."""

    rows: torch.Tensor  # on the device of the step's tensors
    meta: Any
    plan: Any


def wave_common_metadata(cm: CommonAttentionMetadata, wave: Wave) -> CommonAttentionMetadata:
    """The common metadata of one wave: its queries, requests and slots only. Host copies stay on
    the host, device tensors are indexed on their device (CPU: the same tensors)."""
    t, rows, reqs = wave.tokens, wave.rows, wave.requests
    dev = cm.block_table_tensor.device
    n = int(cm.query_start_loc_cpu[cm.num_reqs])
    qlens = t.query_start_loc[1:] - t.query_start_loc[:-1]
    qsl, lens = t.query_start_loc.to(torch.int32), t.seq_lens.to(torch.int32)
    rows_d, reqs_d = rows.to(dev), reqs.to(dev)
    return cm.replace(
        query_start_loc=qsl.to(dev),
        query_start_loc_cpu=qsl,
        seq_lens=lens.to(dev),
        seq_lens_cpu_upper_bound=lens,
        num_reqs=int(reqs.numel()),
        num_actual_tokens=int(rows.numel()),
        max_query_len=int(qlens.max()),
        max_seq_len=int(t.seq_lens.max()),
        block_table_tensor=cm.block_table_tensor[reqs_d],
        slot_mapping=cm.slot_mapping[:n][rows_d],
        is_prefilling=None
        if cm.is_prefilling is None
        else cm.is_prefilling[reqs.to(cm.is_prefilling.device)],
        positions=None if cm.positions is None else cm.positions[:n][rows.to(cm.positions.device)],
        logits_indices_padded=None,
        num_logits_indices=None,
        max_logits_per_req=None,
        **NO_BATCH_CACHES,
    )


# ``WORKER.layers_config``: the vLLM config the attention layers of this process were built
# under. The worker asks for the layers' KV specs (``customize_spec``) outside any
# ``set_current_vllm_config`` context, after the model (and so every impl) was built under it;
# a worker process serves exactly one config.


def layers_config() -> VllmConfig | None:
    """The current vLLM config, else the one this process's attention layers were built under."""
    return get_current_vllm_config_or_none() or WORKER.layers_config


def policy_of(vllm_config: VllmConfig | None) -> KVPolicy | None:
    return None if vllm_config is None else policy_from_vllm_config(vllm_config)


def policy_spec(spec: AttentionSpec) -> AttentionSpec:
    """A backend's ``customize_spec`` tail: with a policy, the scheduler side's ``policy_kv_spec``
    replaces the layer's spec (it refuses specs a policy cannot serve: a layer must never silently
    stay on full attention). Without a config (some front-end callers) or a policy: ``spec``."""
    policy = policy_of(layers_config())
    if policy is None or importlib.util.find_spec(_KV_MANAGER_MODULE) is None:
        return spec
    from cam_vllm.vllm_plugin.kv_manager import policy_kv_spec

    return policy_kv_spec(spec, policy)


def total_kv_heads() -> int | None:
    config = layers_config()
    return config.model_config.get_total_num_kv_heads() if config is not None else None


# Test hook (tests/test_vllm_load.py): an exception in the policy's step, raised by the first layer
# in the N-th step it scores, to check that a fault inside the plugin takes vLLM's own path (the
# requests fail with an error, the server exits) and never hangs. Unset (0): never.
FAULT_ENV = "CAM_VLLM_INJECT_FAULT"
FAULT_AFTER_STEPS = int(os.environ.get(FAULT_ENV, "0") or 0)


class PolicyImplMixin(ABC):
    """Mixed in before a stock attention impl: the policy of this layer, and after the stock
    kernel's ``forward`` the backend's ``_score_and_merge`` for merging policies."""

    policy: KVPolicy | None

    def _setup_policy(self, backend: Any, where: str = "") -> None:
        """Pick this layer's policy (None: stock behaviour) and refuse what it cannot serve
        (``backend.layer_problems``, ``builder.PolicyBackendMixin``).

        Call at the end of the impl's ``__init__`` (the stock attributes must exist). Encoder,
        cross-attention and KV-sharing layers keep stock attention.
        """
        WORKER.layers_config = get_current_vllm_config_or_none()
        policy = policy_of(WORKER.layers_config)
        impl: Any = self
        if policy is not None and (
            impl.attn_type != AttentionType.DECODER or impl.kv_sharing_target_layer_name is not None
        ):
            policy = None
        if policy is not None:
            problems = backend.layer_problems(self, policy)
            if problems:
                raise NotImplementedError(
                    f"KV policy {policy.name!r}{where} does not support {', '.join(problems)}"
                )
        self.policy = policy
        self._abar: torch.Tensor | None = None  # accumulated attention per physical slot
        self._state: dict[str, torch.Tensor] = {}  # score-driven policies: per-slot, per-head state
        self._stash: torch.Tensor | None = None  # deferred decode queries [rows * length, Hq, D]
        self._paged: Any = None
        self._cache_key: tuple | None = None
        self._layer_index: int | None = None
        self._heads: torch.Tensor | None = None
        self._counts_tokens = False

    def _bind_heads(self, layer: Any, num_kv_heads: int, device: torch.device | str = "cpu") -> None:
        """This layer's index and its rank's global KV heads (the keys of the CaM draws)."""
        if self._layer_index is None:
            from vllm.model_executor.models.utils import extract_layer_index

            self._layer_index = extract_layer_index(layer.layer_name)
        self._heads = global_kv_heads(num_kv_heads, total_kv_heads(), device)
        # tokens merged are counted once: by the first layer of the rank holding KV head 0
        self._counts_tokens = self._layer_index == 0 and int(self._heads[0]) == 0

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs):  # noqa: ANN001
        waves = getattr(attn_metadata, "cam_waves", None)
        # token-exact: the plugin computes the output from its score packs (their masks hide the
        # tokens of held blocks the policy no longer shows), so the stock kernel does not run
        exact = self.policy is not None and self.policy.token_exact
        if waves and self.policy is not None:
            # a chunk crossing a point where tokens leave the window: attend wave by wave, choosing
            # the heavy region or merging in between (the KV of the whole step is already cached)
            for part in waves:
                rows = part.rows
                out = output.new_empty((rows.numel(), *output.shape[1:]))
                if not (exact and part.plan is not None):
                    out = super().forward(  # type: ignore[misc]
                        layer, query[rows], key[rows], value[rows], kv_cache, part.meta, out, *args, **kwargs
                    )
                if part.plan is not None:
                    self._scored_step(layer, query[rows], kv_cache, part.plan, out if exact else None)
                output[rows] = out
            return output
        plan = getattr(attn_metadata, "cam_plan", None)
        if not (exact and plan is not None):
            output = super().forward(
                layer, query, key, value, kv_cache, attn_metadata, output, *args, **kwargs
            )  # type: ignore[misc]
        if plan is not None and self.policy is not None:
            self._scored_step(layer, query, kv_cache, plan, output if exact else None)
        return output

    def _scored_step(
        self,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: Any,
        output: torch.Tensor | None = None,
    ) -> None:
        if FAULT_AFTER_STEPS and self._layer_index in (None, 0):
            WORKER.scored_steps += 1
            if WORKER.scored_steps >= FAULT_AFTER_STEPS:
                raise RuntimeError(f"cam-vllm: fault injected by {FAULT_ENV}={FAULT_AFTER_STEPS} (test hook)")
        self._score_and_merge(layer, query, kv_cache, plan, output)

    @abstractmethod
    def _paged_view(self, layer: Any, kv_cache: torch.Tensor) -> Any:
        """The layer's paged cache by physical slot (``gather_k`` / ``gather_v`` / ``scatter_*``),
        in the layout this backend's kernel reads (device-specific)."""

    def _bind(self, layer: Any, kv_cache: torch.Tensor) -> None:
        """Per-layer state, (re)made when the KV cache tensor is first seen or replaced."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), tuple(kv_cache.stride()))
        if key == self._cache_key:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape  # the logical [B, H, N, 2D] view
        assert self.policy is not None
        device = kv_cache.device
        self._paged = self._paged_view(layer, kv_cache)
        num_slots = num_blocks * block_size
        self._abar = torch.zeros(num_slots, num_kv_heads, dtype=torch.float32, device=device)
        self._state = new_score_state(self.policy, num_slots, num_kv_heads, device)
        self._bind_heads(layer, num_kv_heads, device)
        self._cache_key = key

    def _score_and_merge(
        self,
        layer: Any,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: StepPlan,
        output: torch.Tensor | None = None,
    ) -> None:
        """Score this step's queries and merge what leaves the retained set (or choose the heavy
        region); ``output`` (token-exact policies): write every query's attention output into it."""
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
            scale=self.scale,  # type: ignore[attr-defined]
            num_kv_heads=self.num_kv_heads,  # type: ignore[attr-defined]
            layer_index=self._layer_index,
            heads=self._heads,
            count_tokens=self._counts_tokens,
            state=self._state,
            heavy=plan.heavy,
            decode=plan.decode,
            stash=stash,
            output=output,
        )
