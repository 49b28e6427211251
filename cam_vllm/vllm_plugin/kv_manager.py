"""Scheduler side of a KV policy: the KV-cache spec that carries it and the manager that frees blocks.

Worker and scheduler never talk about evictions: both derive the retained set from the same
positional rule, the policy's :class:`~cam_vllm.policies.layout.BlockLayout`, which the spec carries.
Here, in the engine core, a request's block is
freed (and replaced by vLLM's null block, as ``RSWAManager`` does) exactly when none of its
positions is retained for ``n = processed + 1``, where ``processed`` counts the tokens whose forward
has completed. The next query (position ``processed``) no longer sees the block, and the worker
merged (CaM) its values at the end of the step that last read it.

Score-driven policies (H2O, ...) look the same from here: their heavy region is part of the kept
prefix (``sink_end`` = sinks + heavy); which tokens it holds is the workers' business. With the
prompt hold (SnapKV, ``--kv-prompt-hold``) nothing is freed while the next query is inside the
prompt (vLLM passes the prompt length here), or with a bounded hold (``--kv-prompt-hold-tokens``)
the window start moves in steps of the hold's span; from the first query after it, the same rule.

For a StreamingLLM policy with block size ``B`` the retained blocks are the sink blocks
``[0, sink_end / B)`` plus the last ``W / B`` blocks of ``n`` tokens, so the freed range is
``[sink_end / B, window_start(n) / B)``; both ends are block-aligned. A token-exact policy
(``StreamingPolicy.token_exact``) is served with its block-level numbers (``block_prefix_end``,
``block_window_tokens``): the blocks held always cover the tokens its queries see.

The spec (:class:`PolicyAttentionSpec`) is a :class:`FullAttentionSpec` with the policy fields. The
worker-side attention backend turns each layer's spec into it with :func:`policy_kv_spec` (from its
``customize_spec``); the spec then travels, pickled, to the engine core, which picks
:class:`PolicyKVCacheManager` for it through vLLM's ``KVCacheSpecRegistry``.

This module imports vLLM at import time (it subclasses vLLM classes); import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec, replace_as
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from cam_vllm.policies.layout import BlockLayout
from cam_vllm.vllm_plugin import metrics
from cam_vllm.vllm_plugin.process_state import ENGINE, PLUGIN
from cam_vllm.vllm_plugin.request_policy import release_full
from cam_vllm.vllm_plugin.startup import KVPolicyStartupError, check_spec_against_config

# --------------------------------------------------------------------------------------------
# Spec
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PolicyAttentionSpec(FullAttentionSpec):
    """Full attention whose KV cache keeps only a policy's retained blocks (sinks + window).

    ``sink_end`` and ``window_tokens`` are in tokens and multiples of ``block_size``. ``sink_end``
    is the end of the kept prefix: the sink blocks, plus the heavy region of a score-driven
    policy (whose contents the workers choose; to the scheduler it is just kept).
    ``exact_window``: a token-exact policy's own window (``window_tokens`` then bounds the blocks
    held). ``step_tokens`` bounds the tokens a request can add before its old blocks are freed
    (vLLM's ``max_in_flight_tokens``: one ``max_num_batched_tokens`` chunk per in-flight batch);
    it sizes the per-request admission cap, which must agree with :meth:`max_memory_usage_bytes`.
    """

    policy_name: str
    sink_end: int
    window_tokens: int
    step_tokens: int
    exact_window: int = 0  # a token-exact policy's window (``layout``); 0: block-granular
    prompt_hold: bool = False  # every prompt block is kept until the prompt has been read
    hold_span: int = 0  # a bounded hold: its window start moves in steps of this many tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        b = self.block_size
        if self.sink_end % b or self.window_tokens % b or self.window_tokens < b:
            raise ValueError(
                f"{type(self).__name__}: sink_end ({self.sink_end}) and window_tokens "
                f"({self.window_tokens}) must be whole blocks of {b} tokens (window >= 1 block)"
            )
        if self.sliding_window is not None or self.attention_chunk_size is not None:
            raise ValueError(
                f"{type(self).__name__} cannot wrap a layer that already has a sliding window or "
                "chunked local attention"
            )

    @property
    def prefix_cacheable(self) -> bool:
        # CaM merges values into retained blocks in place: such blocks must never be hashed,
        # found by another request, or shared.
        return False

    @property
    def policy_fields(self) -> dict[str, Any]:
        return {
            "policy_name": self.policy_name,
            "sink_end": self.sink_end,
            "window_tokens": self.window_tokens,
            "step_tokens": self.step_tokens,
            "exact_window": self.exact_window,
            "prompt_hold": self.prompt_hold,
            "hold_span": self.hold_span,
        }

    @property
    def layout(self) -> BlockLayout:
        """The policy's block layout as the scheduler runs it (a token-exact window's prefix in
        whole blocks: the blocks it frees are the same)."""
        exact = self.exact_window > 0
        window = self.exact_window if exact else self.window_tokens
        return BlockLayout(self.sink_end, window, self.block_size, exact, self.hold_span)

    @property
    def holds_whole_prompts(self) -> bool:
        """A prompt is held whole until read: a request may hold ``max_model_len`` tokens."""
        return self.prompt_hold and not self.hold_span

    def max_blocks(self, max_model_len: int, step_tokens: int | None = None) -> int:
        if self.holds_whole_prompts:  # a prompt of max_model_len - 1 tokens is held until it is read
            return cdiv(max_model_len, self.block_size)
        step = self.step_tokens if step_tokens is None else step_tokens
        return self.layout.max_blocks(step, max_model_len)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        # Called in the engine core by the start-up capacity check, before the scheduler
        # exists: the first place there that sees both this spec and the whole config.
        check_spec_against_config(self, vllm_config)
        blocks = self.max_blocks(
            vllm_config.model_config.max_model_len,
            max(self.step_tokens, vllm_config.max_in_flight_tokens),
        )
        return blocks * self.page_size_bytes

    @classmethod
    def merge(cls, specs: list[PolicyAttentionSpec]) -> PolicyAttentionSpec:  # type: ignore[override]
        # AssertionError (not ValueError) is what vLLM's grouping expects from a failed merge.
        assert all(isinstance(s, PolicyAttentionSpec) for s in specs), (
            "All layers of a KV cache group must use the KV policy spec."
        )
        policies = {tuple(sorted(s.policy_fields.items())) for s in specs}
        assert len(policies) == 1, f"All layers must share one KV policy, got {policies}"
        base = FullAttentionSpec.merge(specs)  # type: ignore[arg-type]
        return replace_as(base, cls, **specs[0].policy_fields)


def policy_kv_spec(spec: Any, policy: Any, vllm_config: Any = None) -> Any:
    """The KV-cache spec a layer gets under ``policy`` (for the backend's ``customize_spec``).

    ``spec`` is the layer's spec as vLLM built it, ``policy`` a :class:`cam_vllm.policies.KVPolicy`
    (or None: no policy, ``spec`` is returned unchanged). ``vllm_config`` provides
    ``max_in_flight_tokens``; without it the current vLLM config is used if one is set, else 0.
    Either way the engine core replaces it with its own config's value before the scheduler is
    built (``startup.set_step_tokens``), and the start-up bound reads the config directly.

    Anything but a plain full-attention spec is refused: a policy must never silently leave a
    layer on full attention.
    """
    if policy is None:
        return spec
    if isinstance(spec, PolicyAttentionSpec):
        return spec
    eviction = policy.eviction
    name = getattr(policy, "name", type(eviction).__name__)
    if type(spec) is not FullAttentionSpec or spec.sliding_window or spec.attention_chunk_size:
        raise KVPolicyStartupError(
            f"KV policy {name!r} needs every attention layer to be plain full attention, but a "
            f"layer has a {type(spec).__name__} (sliding_window={getattr(spec, 'sliding_window', None)}). "
            "Fix: serve a decoder-only full-attention model (Llama, Qwen2, Mistral without sliding "
            "window) or drop --kv-policy."
        )
    if eviction.block_size != spec.block_size:
        raise KVPolicyStartupError(
            f"KV policy {name!r} was resolved for block size {eviction.block_size} but the layer "
            f"uses {spec.block_size}; build the policy with policy_from_vllm_config()"
        )
    # sinks (+ the heavy region): never freed; token-exact policies hold their tokens in whole blocks
    sink_end = getattr(eviction, "block_prefix_end", None)
    window_tokens = getattr(eviction, "block_window_tokens", None)
    if sink_end is None or window_tokens is None:
        raise KVPolicyStartupError(
            f"KV policy {name!r} ({type(eviction).__name__}) is not a sinks + window policy; the "
            "vLLM block manager supports sinks + window policies only"
        )
    if vllm_config is None:
        from vllm.config import get_current_vllm_config_or_none

        vllm_config = get_current_vllm_config_or_none()
    step_tokens = vllm_config.max_in_flight_tokens if vllm_config is not None else 0
    return replace_as(
        spec,
        PolicyAttentionSpec,
        policy_name=name,
        sink_end=sink_end,
        window_tokens=window_tokens,
        step_tokens=step_tokens,
        exact_window=eviction.window_tokens if getattr(eviction, "token_exact", False) else 0,
        prompt_hold=eviction.holds_prompt,
        hold_span=eviction.hold_span,
    )


# --------------------------------------------------------------------------------------------
# Manager
# --------------------------------------------------------------------------------------------


class PolicyKVCacheManager(FullAttentionManager):
    """Full-attention bookkeeping that frees the blocks a sinks + window policy drops.

    Allocation is unchanged (every token gets a slot in its block when written); at the start of
    each scheduling of a request (``remove_skipped_blocks``, called by ``allocate_slots`` before it
    allocates) blocks outside ``retained(., processed + 1)`` go back to the pool and their table
    entries become the null block. Prefix caching is off for this spec (never hashed, never hit).
    """

    def __init__(self, kv_cache_spec: PolicyAttentionSpec, **kwargs: Any) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.layout = kv_cache_spec.layout
        self.prompt_hold = kv_cache_spec.prompt_hold
        if self.dcp_world_size != 1 or self.pcp_world_size != 1:
            raise ValueError("KV policies do not support decode/prefill context parallelism")
        if (
            self.max_admission_blocks_per_request is None
            and kv_cache_spec.step_tokens > 0
            and not kv_cache_spec.holds_whole_prompts  # all of a held prompt's blocks at once: no cap
        ):
            # Admission (scheduler_reserve_full_isl) must reserve what a request really holds,
            # not its full length, or a request longer than the pool would wait forever. Same
            # number as the start-up bound (max_memory_usage_bytes), as vLLM does for SWA.
            self.max_admission_blocks_per_request = self.layout.max_blocks(kv_cache_spec.step_tokens, 1 << 62)

    def remove_skipped_blocks(
        self,
        request_id: str,
        processed_computed_tokens: int,
        num_prompt_tokens: int | None = None,
    ) -> None:
        holds = ENGINE.request_holds.get(request_id, self.prompt_hold)  # the request's, or the policy's
        hold_end = (num_prompt_tokens or 0) if holds else 0  # the prompt hold's end
        if request_id in ENGINE.full_cache_requests:  # the request asked for the full cache
            if self.kv_cache_group_id == 0:
                metrics.STATS.request_step(request_id, 0, 0)
            return
        window = ENGINE.request_windows.get(request_id)  # a request's own smaller window
        first, last = self.layout.freeable(processed_computed_tokens, hold_end, window)
        free_before = self.block_pool.get_num_free_blocks()
        self._remove_blocks_in_range(request_id, first, last)
        freed = self.block_pool.get_num_free_blocks() - free_before  # evicted blocks are never shared
        if freed > 0:
            metrics.STATS.add("kv_blocks_evicted", freed)
            metrics.STATS.add("kv_tokens_evicted", freed * self.block_size)
        if self.kv_cache_group_id == 0:
            metrics.STATS.request_step(request_id, 0, max(freed, 0) * self.block_size)

    def get_num_blocks_to_allocate(self, request_id: str, *args: Any, **kwargs: Any) -> int:
        if request_id not in ENGINE.full_cache_requests and not ENGINE.request_holds.get(request_id, False):
            return super().get_num_blocks_to_allocate(request_id, *args, **kwargs)
        cap, self.max_admission_blocks_per_request = self.max_admission_blocks_per_request, None
        try:  # a full-cache request (a held prompt) holds all of it: admit it only if all of it fits
            return super().get_num_blocks_to_allocate(request_id, *args, **kwargs)
        finally:
            self.max_admission_blocks_per_request = cap

    def allocate_new_blocks(self, request_id: str, num_tokens: int, *args: Any, **kwargs: Any) -> list[Any]:
        if self.kv_cache_group_id == 0:  # per-request lengths for the metrics, from one group
            metrics.STATS.request_step(request_id, num_tokens, 0)
        return super().allocate_new_blocks(request_id, num_tokens, *args, **kwargs)

    def pop_blocks_for_free(self, request_id: str) -> list[Any]:
        # Both ways a request's blocks leave go through here: ``free`` and the scheduler's
        # deferred free (KV connectors), which pops the blocks without calling ``free``.
        if self.kv_cache_group_id == 0:
            metrics.STATS.request_finished(request_id)
        release_full(request_id)  # registered again if the scheduler allocates for it after a preemption
        return super().pop_blocks_for_free(request_id)

    def cache_blocks(self, request: Any, num_tokens: int, *args: Any, **kwargs: Any) -> None:
        # Never hash or share blocks: merged values make them request-private.
        return None

    @classmethod
    def find_longest_cache_hit(
        cls, block_hashes: Any, max_length: int, kv_cache_group_ids: list[int], *args: Any, **kwargs: Any
    ) -> tuple[tuple[list[Any], ...], int]:
        return tuple([] for _ in kv_cache_group_ids), 0


def register_kv_spec() -> None:
    """Map :class:`PolicyAttentionSpec` to :class:`PolicyKVCacheManager` (idempotent).

    vLLM's registry fills in its built-in specs only while it is empty
    (``KVCacheSpecRegistry._ensure_registered``); registering first would leave it non-empty and
    the built-ins missing, so the built-ins are registered before ours.
    """
    if "kv_spec" in PLUGIN.registered:
        return
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(
        PolicyAttentionSpec, PolicyKVCacheManager, uniform_type_base_spec=PolicyAttentionSpec
    )
    PLUGIN.registered.add("kv_spec")
