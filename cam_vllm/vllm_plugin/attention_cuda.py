"""The worker side of cam-vllm on CUDA: vLLM's ``FLASH_ATTN`` backend, taught a KV policy.

NOT RUN ON A GPU YET. Everything below that does not need a GPU is tested on CPU (see
``tests/test_vllm_cuda.py`` and docs/vllm-worker.md, "CUDA path"); the ``gpu``-marked tests that
would run it inside a CUDA engine have not been run.

Same design as the CPU path (``attention_cpu.py``), same per-step planning (``step_plan.py``):

* :func:`register_cuda_attention` (called from ``register()`` only when
  ``vllm.platforms.current_platform.is_cuda()``) points vLLM's ``FLASH_ATTN`` registry entry at
  :class:`PolicyFlashAttentionBackend`, exactly as the CPU path re-points ``CPU_ATTN``. Without a
  policy every method defers to the stock FlashAttention classes unchanged. With a policy,
  :func:`prepare_cuda_engine_args` (called from the engine-args hook) selects ``FLASH_ATTN``
  unless the user chose it, so ``vllm serve MODEL --kv-policy ...`` needs no
  ``--attention-backend``, forces eager execution (no CUDA graphs: the number of pseudo-requests
  varies per step) and synchronous scheduling, and refuses FP8 KV caches and other backends.
* the builder rewrites the batch so FlashAttention attends exactly to the retained blocks:
  :func:`compact_common_metadata` plans the pseudo-requests on the CPU copies the runner already
  has (``query_start_loc_cpu``, ``seq_lens_cpu_upper_bound``; no device-to-host sync) with
  ``step_plan.compact_for_kernel`` run on a table of *logical* block indices, then gathers the
  physical block ids from the device block table on the device. FlashAttention's causal mask is
  bottom-right aligned for varlen + ``seqused_k`` (``flash_attn_varlen_func`` docstring,
  vllm/vllm_flash_attn/flash_attn_interface.py), like the CPU kernel's, so each query sees
  exactly its retained causal keys. Then the stock ``build`` runs on the compacted batch.
* for merging policies the builder also plans scores and merges (``step_plan.plan_scores`` on a
  table of *virtual* block ids, translated to physical slots on the device in one gather), and
  the impl, after the stock kernel, scores the step's queries with ``attention_with_probs`` over
  the gathered retained keys, accumulates ``Abar`` per physical slot and merges with
  ``cam_merge``: all torch ops on the device, the project's own math.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from vllm.config import VllmConfig
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin import step_requests
from cam_vllm.vllm_plugin.cuda_startup import BACKEND_NAME, platform_is_cuda
from cam_vllm.vllm_plugin.impl_common import (
    NO_BATCH_CACHES,
    PolicyImplMixin,
    WavePart,
    policy_spec,
    wave_common_metadata,
)
from cam_vllm.vllm_plugin.paged import NHDPagedKV
from cam_vllm.vllm_plugin.request_policy import allows_full, own_windows
from cam_vllm.vllm_plugin.scoring import score_and_merge
from cam_vllm.vllm_plugin.settings import policy_from_vllm_config
from cam_vllm.vllm_plugin.step_plan import (
    DecodeBatch,
    MergeEvent,
    Retained,
    ScorePack,
    StepTokens,
    compact_for_kernel,
    plan_scores,
    split_waves,
)

BACKEND_PATH = f"{__name__}.PolicyFlashAttentionBackend"


# ------------------------------------------------------------------------------------------------
# Registration (engine arguments: cuda_startup.py)
# ------------------------------------------------------------------------------------------------


def register_cuda_attention(force: bool = False) -> bool:
    """On CUDA platforms, make ``FLASH_ATTN`` resolve to our backend (idempotent).

    Returns whether the entry points at our backend. Elsewhere (CPU, ROCm, ...) nothing is
    touched unless ``force`` (tests).
    """
    if not (force or platform_is_cuda()):
        return False
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.FLASH_ATTN.get_path() != BACKEND_PATH:
        register_backend(AttentionBackendEnum.FLASH_ATTN, BACKEND_PATH)
    install_triton_kernels()
    return True


def install_triton_kernels() -> bool:
    """Score decodes and merge CaM chains with the Triton kernels (``cam_vllm.kernels``) where
    they run (CUDA tensors), unless ``CAM_VLLM_TRITON=0`` or Triton is missing: then torch ops."""
    import logging
    import os

    from cam_vllm.core.merge import use_chain_kernel
    from cam_vllm.vllm_plugin.scoring import use_triton_kernels

    if os.environ.get("CAM_VLLM_TRITON", "1") == "0":
        return False
    try:
        from cam_vllm.kernels import triton_ops
    except ImportError as exc:  # no Triton (or no backend): the torch path, which is the same math
        logging.getLogger("cam_vllm").info(
            "cam-vllm: Triton kernels not used (%s); scoring and merging use torch ops", exc
        )
        return False
    use_chain_kernel(triton_ops.chain_kernel())
    use_triton_kernels(triton_ops.available, triton_ops.decode_scores)
    return True


# ------------------------------------------------------------------------------------------------
# Per-step planning on the host, tensors on the device
# ------------------------------------------------------------------------------------------------


def _host_seq_lens(cm: CommonAttentionMetadata) -> torch.Tensor:
    """Host copy of ``seq_lens``: the runner's upper bound is exact without speculative
    decoding (refused at start-up); without one, fall back to a copy (a device sync)."""
    lens = cm.seq_lens_cpu_upper_bound
    if lens is None:
        lens = cm.seq_lens.cpu()
    return lens[: cm.num_reqs]


def step_tokens(cm: CommonAttentionMetadata, *per_row: Any) -> StepTokens:
    """The step's queries from the host copies of the batch (no device sync); ``per_row``: the
    rows' full-cache flags and own windows, as ``StepTokens.from_batch`` takes them."""
    n = cm.num_reqs
    return StepTokens.from_batch(cm.query_start_loc_cpu[: n + 1], _host_seq_lens(cm), n, *per_row)


def compact_common_metadata(
    retained: Retained, cm: CommonAttentionMetadata, block_size: int, tokens: StepTokens | None = None
) -> CommonAttentionMetadata:
    """The batch FlashAttention must see: pseudo-requests with compacted block-table rows.

    Planned on the host with :func:`~cam_vllm.vllm_plugin.step_plan.compact_for_kernel` over a
    table of logical block indices (row ``r`` = ``0, 1, ..., width - 1``), so its rows say which
    logical blocks each pseudo-request keeps, oldest first. The physical ids are then gathered
    from the device block table on the device; columns past a row's retained blocks hold the null
    block 0 and are never read (``seqused_k`` ends before them). Returns ``cm`` itself when
    nothing is evicted (stock batch, bit-identical to stock vLLM).
    """
    tokens = tokens if tokens is not None else step_tokens(cm)
    n = cm.num_reqs
    table = cm.block_table_tensor
    width = table.shape[1]
    logical = torch.arange(width, dtype=torch.int64).expand(n, width)
    kb = compact_for_kernel(retained, tokens, logical, block_size)
    if kb is None:
        return cm
    device = table.device
    nblk = kb.block_table.shape[1]
    count = (kb.seq_lens.to(torch.int64) + block_size - 1) // block_size
    valid = torch.arange(nblk)[None, :] < count[:, None]
    cols = torch.where(valid, kb.block_table.to(torch.int64), 0)
    rows = table[kb.request.to(device)]  # [G, width] on the device
    phys = torch.gather(rows, 1, cols.to(device))
    phys = phys.masked_fill(~valid.to(device), 0).to(table.dtype).contiguous()
    seq_lens_host = kb.seq_lens
    is_prefilling = cm.is_prefilling
    if is_prefilling is not None:
        is_prefilling = is_prefilling[kb.request.to(is_prefilling.device)]
    return cm.replace(
        query_start_loc=kb.query_start_loc.to(device),
        query_start_loc_cpu=kb.query_start_loc,
        seq_lens=seq_lens_host.to(device),
        seq_lens_cpu_upper_bound=seq_lens_host,
        num_reqs=int(kb.request.numel()),
        max_query_len=kb.max_query_len,
        max_seq_len=kb.max_seq_len,
        block_table_tensor=phys,
        is_prefilling=is_prefilling,
        **NO_BATCH_CACHES,
    )


@dataclass(frozen=True)
class DeviceStepPlan:
    """A merging policy's per-step plan with every tensor on the KV cache's device.

    written_slots: this step's ``slot_mapping`` (may hold -1 for padding): their ``Abar`` is
    reset before scoring. packs / merges: as in ``step_plan.StepPlan``, with physical slots.
    """

    written_slots: torch.Tensor
    packs: list[ScorePack]
    merges: list[MergeEvent]
    decode: DecodeBatch | None = None  # the step's decodes, scored in one call (physical blocks)


def plan_device_scores(
    policy: KVPolicy,
    tokens: StepTokens,
    cm: CommonAttentionMetadata,
    block_size: int,
    seeds: list[int | None] | None = None,
) -> DeviceStepPlan:
    """``plan_scores`` on the host over *virtual* block ids, translated on the device.

    Row ``r`` of the virtual table holds ``r * width + j``, so a virtual slot names (request,
    logical block, offset) uniquely; one device gather of the block table turns all of the
    step's slots into physical ones. The plan is layer-independent: built once per step.
    """
    n = tokens.seq_lens.numel()
    table = cm.block_table_tensor
    device, width, b = table.device, table.shape[1], block_size
    virtual = torch.arange(n, dtype=torch.int64)[:, None] * width + torch.arange(width)[None, :]
    host = plan_scores(policy, tokens, virtual, torch.empty(0, dtype=torch.int64), b, seeds=seeds)

    pieces = [p.kv_slots for p in host.packs]
    for m in host.merges:
        pieces.append(m.slots.flatten())
    sizes = [int(p.numel()) for p in pieces]
    flat = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.int64)
    vslot = flat.to(device)
    vblock = vslot // b
    phys = table[vblock // width, vblock % width].to(torch.int64) * b + vslot % b
    parts = iter(torch.split(phys, sizes)) if sizes else iter(())
    packs = [ScorePack(p.q_rows, next(parts), p.visible.to(device)) for p in host.packs]
    merges = []
    for m in host.merges:
        slots = next(parts).view(m.slots.shape)
        merges.append(MergeEvent(slots, m.positions.to(device), m.leaving.to(device), m.seed))
    num_tokens = int(tokens.token_pos.numel())
    decode = None
    if host.decode is not None:  # virtual blocks -> physical; padding (no valid key) -> the null block
        d = host.decode
        r, nb = d.blocks.shape
        used = d.valid.view(r, d.num_queries, nb, b).any(dim=3).any(dim=1)
        vb = d.blocks.to(device)
        blocks = torch.where(used.to(device), table[vb // width, vb % width].to(torch.int64), 0)
        decode = DecodeBatch(
            d.q_rows.to(device),
            blocks,
            d.valid.to(device),
            (blocks[:, :, None] * b + torch.arange(b, device=device)).flatten(1),
            bias=d.bias.to(device),
            query_mask=None if d.query_mask is None else d.query_mask.to(device),
        )
    return DeviceStepPlan(cm.slot_mapping[:num_tokens], packs, merges, decode)


# ------------------------------------------------------------------------------------------------
# Backend, metadata, builder, impl
# ------------------------------------------------------------------------------------------------


class PolicyFlashAttentionBackend(FlashAttentionBackend):
    """``FLASH_ATTN`` with a KV policy; identical to the stock backend when none is configured."""

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME  # vLLM looks the name up in AttentionBackendEnum

    @staticmethod
    def get_impl_cls() -> type[PolicyFlashAttentionImpl]:
        return PolicyFlashAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[PolicyFlashAttentionMetadataBuilder]:
        return PolicyFlashAttentionMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """With a policy, the scheduler side's spec (see :func:`impl_common.policy_spec`)."""
        return policy_spec(super().customize_spec(spec))


@dataclass
class PolicyFlashAttentionMetadata(FlashAttentionMetadata):
    """Stock metadata (built from the compacted batch) plus this step's score/merge plan."""

    cam_plan: DeviceStepPlan | None = None
    cam_waves: list[WavePart] | None = None  # a merging policy's chunk across window blocks


def engine_config_problems(vllm_config: Any, policy: KVPolicy, spec: AttentionSpec) -> list[str]:
    """What the CUDA path cannot run with (empty: it can). Second line of defence behind
    :func:`prepare_cuda_engine_args`, for configs built without the engine-args hook."""
    problems = []
    if policy.eviction.block_size % spec.block_size:
        problems.append(
            f"policy block size {policy.eviction.block_size} is not a multiple of the attention "
            f"kernel's block size {spec.block_size}"
        )
    if getattr(spec, "sliding_window", None) is not None:
        problems.append("sliding-window layers")
    if policy.score is not None:
        problems.append(
            f"score-driven policies ({policy.score.name}) on CUDA: they run on the CPU build only so "
            "far; use streaming or cam-streaming on CUDA"
        )
    mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
    if mode is not None and getattr(mode, "name", str(mode)) != "NONE":
        problems.append(f"CUDA graphs (cudagraph_mode={getattr(mode, 'name', mode)}); use --enforce-eager")
    if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
        problems.append("async scheduling; use --no-async-scheduling")
    cache = getattr(vllm_config, "cache_config", None)
    dtype = str(getattr(cache, "cache_dtype", "auto") or "auto")
    if dtype.startswith("fp8") or dtype.startswith("nvfp4") or dtype.endswith("per_token_head"):
        problems.append(f"a quantized KV cache ({dtype})")
    if (
        policy.merge is not None
        and getattr(cache, "enable_prefix_caching", False)
        and getattr(spec, "prefix_cacheable", True)
    ):
        problems.append("prefix caching with merging (use --no-enable-prefix-caching)")
    return problems


class PolicyFlashAttentionMetadataBuilder(FlashAttentionMetadataBuilder):
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
        if policy is not None and (
            getattr(self, "is_cross_attention", False) or getattr(self, "is_encoder_only_attention", False)
        ):
            policy = None
        if policy is not None:
            problems = engine_config_problems(vllm_config, policy, kv_cache_spec)
            if problems:
                raise ValueError(f"KV policy {policy.name!r} cannot run on CUDA: {'; '.join(problems)}")
            # metadata cached for another KV-cache group must not be re-used with that group's
            # (uncompacted) block table
            self.supports_update_block_table = False
        self.policy = policy
        self.allow_full = allows_full(vllm_config)  # per-request full cache (request_policy.py)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> FlashAttentionMetadata:
        if self.policy is None:
            return super().build(common_prefix_len, common_attn_metadata, fast_build)
        return build_policy_metadata(self, self.policy, common_prefix_len, common_attn_metadata, fast_build)


def build_policy_metadata(
    builder: FlashAttentionMetadataBuilder,
    policy: KVPolicy,
    common_prefix_len: int,
    cm: CommonAttentionMetadata,
    fast_build: bool = False,
) -> PolicyFlashAttentionMetadata:
    """The policy branch of the builder's ``build`` (a function so tests can call it on a builder
    made without a GPU)."""
    if isinstance(cm.causal, torch.Tensor) or not cm.causal or cm.mm_req_doc_ranges:
        raise NotImplementedError("KV policies support causal decoder attention only")
    step = step_requests.current(cm.num_reqs, cm.seq_lens_cpu_upper_bound)
    full = step_requests.full_of(step) if getattr(builder, "allow_full", False) else None
    window, cut = own_windows(policy, step)  # rows with a smaller window of their own
    tokens = step_tokens(cm, full, window, cut)
    seeds = step_requests.seeds_of(step) if policy.merge is not None else None
    meta, plan = _build_one(builder, policy, common_prefix_len, cm, tokens, fast_build, seeds)
    fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
    waves = split_waves(policy, tokens)
    parts = None
    if len(waves) > 1:  # a merging policy's chunk crosses window blocks: merge between waves
        device = cm.block_table_tensor.device
        parts = []
        for w in waves:
            wave_seeds = None if seeds is None else [seeds[i] for i in w.requests.tolist()]
            wave_cm = wave_common_metadata(cm, w)
            parts.append(
                WavePart(
                    w.rows.to(device),
                    *_build_one(
                        builder, policy, common_prefix_len, wave_cm, w.tokens, fast_build, wave_seeds
                    ),
                )
            )
    return PolicyFlashAttentionMetadata(**fields, cam_plan=plan, cam_waves=parts)


def _build_one(
    builder: FlashAttentionMetadataBuilder,
    policy: KVPolicy,
    common_prefix_len: int,
    cm: CommonAttentionMetadata,
    tokens: StepTokens,
    fast_build: bool,
    seeds: list[int | None] | None,
) -> tuple[FlashAttentionMetadata, DeviceStepPlan | None]:
    """Stock metadata of the batch (or wave) compacted to the retained blocks, and its plan."""
    kernel_cm = compact_common_metadata(policy.eviction.retained, cm, builder.block_size, tokens)
    meta = FlashAttentionMetadataBuilder.build(builder, common_prefix_len, kernel_cm, fast_build)
    plan = None
    if policy.tracks_scores:
        plan = plan_device_scores(policy, tokens, cm, builder.block_size, seeds)
    return meta, plan


class PolicyFlashAttentionImpl(PolicyImplMixin, FlashAttentionImpl):
    """The stock FlashAttention kernel, plus accumulated attention and CaM merging."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_policy(self._unsupported_features, where=" on CUDA")

    def _unsupported_features(self, policy: KVPolicy) -> list[str]:
        from vllm.utils.torch_utils import is_quantized_kv_cache

        problems = []
        if self.alibi_slopes is not None:
            problems.append("ALiBi (positions are compacted)")
        if tuple(self.sliding_window) != (-1, -1):
            problems.append("sliding-window attention")
        if self.sinks is not None:
            problems.append("learned attention sinks")
        if policy.tracks_scores and self.logits_soft_cap:
            problems.append("logit soft-capping with score tracking")
        if is_quantized_kv_cache(str(self.kv_cache_dtype)):
            problems.append(f"a quantized ({self.kv_cache_dtype}) KV cache")
        if policy.token_exact:
            problems.append(
                "token-exact windows (--kv-token-exact; its own attention output runs on CPU only)"
            )
        return problems

    def _bind(self, layer, kv_cache: torch.Tensor) -> None:
        """Per-layer state, (re)made when the KV cache tensor is first seen or replaced."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), tuple(kv_cache.stride()))
        if key == self._cache_key:
            return
        num_blocks, num_kv_heads, block_size, _ = kv_cache.shape
        self._paged = NHDPagedKV(kv_cache, self.head_size)
        # [num_slots + 1, Hkv] float32; the last row absorbs padding
        self._abar = torch.zeros(
            num_blocks * block_size + 1, num_kv_heads, dtype=torch.float32, device=kv_cache.device
        )
        self._bind_heads(layer, num_kv_heads, kv_cache.device)
        self._cache_key = key

    def _score_and_merge(
        self,
        layer,
        query: torch.Tensor,
        kv_cache: torch.Tensor,
        plan: DeviceStepPlan,
        output=None,  # noqa: ANN001
    ) -> None:
        del output  # token-exact policies are refused on CUDA (``_unsupported_features``)
        self._bind(layer, kv_cache)
        paged, abar, policy = self._paged, self._abar, self.policy
        assert paged is not None and abar is not None and policy is not None
        pad = abar.shape[0] - 1
        written = plan.written_slots.to(torch.int64)
        abar.index_fill_(0, torch.where(written >= 0, written, pad), 0.0)
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
            decode=plan.decode,
        )
