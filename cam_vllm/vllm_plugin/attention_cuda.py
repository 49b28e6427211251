"""The worker side of cam-vllm on CUDA: vLLM's ``FLASH_ATTN`` backend, taught a KV policy.

Not run on a GPU yet. What runs here is the code the CPU path runs:
the metadata builder's sequence (``builder.PolicyBuilderMixin``: the kernel batch compacted on a
table of logical blocks, the score plan made on virtual block ids, both translated on the device in
one gather), and the impl's score-and-merge step (``impl_common.PolicyImplMixin``: torch ops on the
device, the project's own math). CI runs this builder against the reference engine on CPU
(``tests/test_vllm_cuda.py``, with a torch model of FlashAttention's paged varlen call). What is
CUDA's own is below: the registry entry, the stock classes it extends, the paged layout FlashAttention
writes (``paged.NHDPagedKV``), the Triton kernels (``kernels.triton_ops``; checked against the
torch code by ``scripts/gpu_check.py`` on a GPU, and under Triton's interpreter in CI), and the engine
settings it needs:

* :func:`register_cuda_attention` (called from ``register()`` only when
  ``vllm.platforms.current_platform.is_cuda()``) points vLLM's ``FLASH_ATTN`` registry entry at
  :class:`PolicyFlashAttentionBackend`, exactly as the CPU path re-points ``CPU_ATTN``. Without a
  policy every method defers to the stock FlashAttention classes unchanged. With a policy,
  ``cuda_startup.prepare_cuda_engine_args`` (called from the engine-args hook) selects
  ``FLASH_ATTN`` unless the user chose it, so ``vllm serve MODEL --kv-policy ...`` needs no
  ``--attention-backend``, forces eager execution (no CUDA graphs: the number of pseudo-requests
  varies per step) and synchronous scheduling, and refuses FP8 KV caches and other backends.
* FlashAttention's causal mask is bottom-right aligned for varlen + ``seqused_k``
  (``flash_attn_varlen_func`` docstring, vllm/vllm_flash_attn/flash_attn_interface.py), like the
  CPU kernel's, so each pseudo-request of the compacted batch sees exactly its retained causal keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.attention.backends.flash_attn import (
    FlashAttentionBackend,
    FlashAttentionImpl,
    FlashAttentionMetadata,
    FlashAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin.builder import PolicyBackendMixin, PolicyBuilderMixin
from cam_vllm.vllm_plugin.cuda_startup import BACKEND_NAME, platform_is_cuda
from cam_vllm.vllm_plugin.impl_common import PolicyImplMixin, WavePart, policy_spec
from cam_vllm.vllm_plugin.paged import NHDPagedKV
from cam_vllm.vllm_plugin.step_plan import StepPlan

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
# Backend, metadata, builder, impl
# ------------------------------------------------------------------------------------------------


class PolicyFlashAttentionBackend(PolicyBackendMixin, FlashAttentionBackend):
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

    @classmethod
    def block_size_problem(cls, policy_block: int, kernel_block: int) -> str | None:
        """FlashAttention may page in smaller blocks than the KV manager's; the policy's must be
        whole kernel blocks."""
        if policy_block % kernel_block:
            return (
                f"policy block size {policy_block} is not a multiple of the attention kernel's "
                f"block size {kernel_block}"
            )
        return None

    @classmethod
    def engine_problems(cls, vllm_config: Any) -> list[str]:
        """Second line of defence behind ``cuda_startup.prepare_cuda_engine_args``, for configs
        built without the engine-args hook."""
        problems = []
        mode = getattr(getattr(vllm_config, "compilation_config", None), "cudagraph_mode", None)
        if mode is not None and getattr(mode, "name", str(mode)) != "NONE":
            name = getattr(mode, "name", mode)
            problems.append(f"CUDA graphs (cudagraph_mode={name}); use --enforce-eager")
        if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
            problems.append("async scheduling; use --no-async-scheduling")
        dtype = str(getattr(getattr(vllm_config, "cache_config", None), "cache_dtype", "auto") or "auto")
        if dtype.startswith("fp8") or dtype.startswith("nvfp4") or dtype.endswith("per_token_head"):
            problems.append(f"a quantized KV cache ({dtype})")
        return problems

    @classmethod
    def layer_problems(cls, impl: Any, policy: KVPolicy) -> list[str]:
        from vllm.utils.torch_utils import is_quantized_kv_cache

        problems = []
        if impl.alibi_slopes is not None:
            problems.append("ALiBi (positions are compacted)")
        if tuple(impl.sliding_window) != (-1, -1):
            problems.append("sliding-window attention")
        if impl.sinks is not None:
            problems.append("learned attention sinks")
        if policy.tracks_scores and impl.logits_soft_cap:
            problems.append("logit soft-capping with score tracking")
        if is_quantized_kv_cache(str(impl.kv_cache_dtype)):
            problems.append(f"a quantized ({impl.kv_cache_dtype}) KV cache")
        return problems


@dataclass
class PolicyFlashAttentionMetadata(FlashAttentionMetadata):
    """Stock metadata (built from the compacted batch) plus this step's score/merge plan."""

    cam_plan: StepPlan | None = None
    cam_waves: list[WavePart] | None = None  # a merging policy's chunk across window blocks


class PolicyFlashAttentionMetadataBuilder(PolicyBuilderMixin, FlashAttentionMetadataBuilder):
    """Per step: compact the batch to the retained blocks, and plan scores and merges
    (``builder.PolicyBuilderMixin``, the sequence the CPU builder runs too)."""

    backend = PolicyFlashAttentionBackend
    metadata_cls = PolicyFlashAttentionMetadata


class PolicyFlashAttentionImpl(PolicyImplMixin, FlashAttentionImpl):
    """The stock FlashAttention kernel, plus accumulated attention and CaM merging."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_policy(PolicyFlashAttentionBackend, where=" on CUDA")

    def _paged_view(self, layer, kv_cache: torch.Tensor) -> NHDPagedKV:
        """The layer's cache as FlashAttention reads it (the K and V halves of the last axis)."""
        return NHDPagedKV(kv_cache, self.head_size)
