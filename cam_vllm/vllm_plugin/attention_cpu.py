"""The worker side of cam-vllm on CPU: vLLM's ``CPU_ATTN`` backend, taught a KV policy.

:func:`register_attention` points vLLM's ``CPU_ATTN`` registry entry at
:class:`PolicyCPUAttentionBackend` (the CPU platform ignores ``--attention-backend CUSTOM``, and
re-pointing the registry entry is vLLM's supported override). The backend therefore replaces the
stock one whenever the plugin is loaded, so with no policy configured (or for layers a policy does
not apply to) every method defers to the stock class unchanged.

With a policy (see docs/vllm-worker.md):

* the builder (once per step, ``builder.PolicyBuilderMixin``: the sequence the CUDA builder
  runs too) rewrites the batch so the fused kernel attends exactly to the retained blocks, then
  calls the stock ``build``; for policies that track scores it also plans the step's scores,
  merges and heavy-region choices;
* a token-exact policy (``--kv-token-exact``) skips the kernel: the impl computes every query's
  output from the score packs, whose masks hide the tokens of held blocks that the per-token
  policy no longer shows;
* the impl runs the stock kernel, then (merging policies only) scores this step's queries with
  ``attention_with_probs`` over the gathered cached tokens, accumulates ``Abar`` in a per-layer
  side tensor indexed by physical slot, and merges the tokens that leave the retained set into
  their targets' values in the KV cache, in place, with ``cam_merge``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin.builder import PolicyBackendMixin, PolicyBuilderMixin
from cam_vllm.vllm_plugin.impl_common import PolicyImplMixin, WavePart, policy_spec
from cam_vllm.vllm_plugin.paged import PagedKV, probe_layout
from cam_vllm.vllm_plugin.step_plan import StepPlan

logger = init_logger(__name__)

BACKEND_PATH = f"{__name__}.PolicyCPUAttentionBackend"


def register_attention() -> None:
    """Make vLLM's ``CPU_ATTN`` resolve to our backend. Idempotent; imports nothing heavy."""
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if AttentionBackendEnum.CPU_ATTN.get_path() != BACKEND_PATH:
        register_backend(AttentionBackendEnum.CPU_ATTN, BACKEND_PATH)


class PolicyCPUAttentionBackend(PolicyBackendMixin, CPUAttentionBackend):
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

    @classmethod
    def layer_problems(cls, impl: Any, policy: KVPolicy) -> list[str]:
        problems = []
        if impl.alibi_slopes is not None:
            problems.append("ALiBi (positions are compacted)")
        if impl.sliding_window != -1:
            problems.append("sliding-window attention")
        if policy.tracks_scores and (impl.logits_soft_cap or impl.sinks is not None):
            problems.append("logit soft-capping or learned sinks with score tracking")
        if impl.is_fp8_kv_cache and policy.tracks_scores:
            problems.append("an fp8 KV cache with merging")
        return problems


@dataclass
class PolicyCPUAttentionMetadata(CPUAttentionMetadata):
    """Stock metadata (built from the compacted batch) plus this step's score/merge plan, and for
    a score-driven policy whose chunk crosses a window block the step's waves (run one by one)."""

    cam_plan: StepPlan | None = None
    cam_waves: list[WavePart] | None = None


class PolicyCPUAttentionMetadataBuilder(PolicyBuilderMixin, CPUAttentionMetadataBuilder):
    """Per step: compact the batch to the retained blocks, and plan scores and merges
    (``builder.PolicyBuilderMixin``, the sequence the CUDA builder runs too)."""

    backend = PolicyCPUAttentionBackend
    metadata_cls = PolicyCPUAttentionMetadata


class PolicyCPUAttentionBackendImpl(PolicyImplMixin, CPUAttentionBackendImpl):
    """The stock kernel, plus accumulated attention and CaM merging for merging policies."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._setup_policy(PolicyCPUAttentionBackend)

    def _paged_view(self, layer, kv_cache: torch.Tensor) -> PagedKV:
        """The layer's cache through the layout the CPU kernel writes (probed once per layout)."""
        _, _, block_size, _ = kv_cache.shape
        return PagedKV(kv_cache, probe_layout(layer.isa, kv_cache.dtype, block_size, self.head_size))
