"""Per-request KV policy: one request may ask for the full cache on a server that evicts, its own
smaller window (plain ``streaming``), or to have its prompt read before anything is chosen.

A request sends ``vllm_xargs={"kv_policy": "none"}`` (vLLM's per-request extension field, stored
in ``SamplingParams.extra_args``), e.g. a request whose answer needs every token of a long
document. Three processes must agree on it, and each reads the same field of the same request:

* API server (:func:`wrap_process_inputs`): after vLLM's own input processing
  (``InputProcessor.process_inputs``, where the prompt is tokenized and ``max_tokens`` resolved),
  :func:`check_request` accepts the field or raises vLLM's ``VLLMValidationError``, which the
  OpenAI server answers with HTTP 400 naming the problem;
* engine core (:func:`wrap_allocate_slots`, ``kv_manager.PolicyKVCacheManager``): such a request
  is registered in ``process_state.ENGINE.full_cache_requests`` whenever the scheduler
  allocates for it (also after a preemption), and its blocks are never freed nor capped at
  admission; the entry goes when its blocks do;
* workers (``step_requests``, ``step_plan.StepTokens.full``): its rows keep every token, so its
  queries attend to the whole prefix and nothing of it leaves, merges or moves to a heavy region.

A request on a score-driven server (h2o, tova, scissorhands, corm) may ask for the prompt hold,
``vllm_xargs={"kv_prompt_hold": true}`` (or decline the server's own whole-prompt hold with
``false``; snapkv always holds): it keeps every prompt token until the prompt has been read, and
the heavy region is chosen then, by what the whole prompt attends to. The scheduler registers it
in ``ENGINE.request_holds`` as it does full-cache requests, and the workers read the same field.

The server decides what it allows: ``allow_full_cache_requests`` (``--kv-allow-full-cache-requests
true``) must be set for the full cache and for a prompt hold the server does not make itself,
since one such request can hold as much of the pool as a full-cache vLLM would (a held prompt
until it has been read). A full-cache request must fit in the pool as a whole (prompt +
``max_tokens``), or it could never finish (a held prompt: the prompt and one more block); the
check uses the pool size the engine reported to the API server at start-up.
Asking for the server's own policy is accepted (it changes nothing); any other policy, and any
other per-request ``kv_*`` setting, gets a 400: policies differ per layer and step in the
workers' plan, and a different window would need its own block arithmetic in the scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cam_vllm.vllm_plugin.process_state import ENGINE

logger = logging.getLogger("cam_vllm")

XARG_POLICY = "kv_policy"
XARG_WINDOW = "kv_window_tokens"
XARG_HOLD = "kv_prompt_hold"
FULL_CACHE = "none"
# The one policy whose window a request may shrink: plain eviction plans nothing between the
# blocks of a chunk (no waves, no scores, no merges), so a per-row window is all it needs.
WINDOW_POLICY = "streaming"
# Per-request keys that look like ours but are not supported (the flags' names, as a user would try them).
_UNSUPPORTED = (
    "kv_window",
    "kv_budget",
    "kv_sinks",
    "kv_sink_tokens",
    "kv_heavy_tokens",
    "kv_merge",
    "kv_merge_targets",
    "kv_seed",
)

# The engine core's settings (set at start-up, :func:`configure_engine`) and its running requests'
# own choices live in ``process_state.ENGINE``. The scheduler and the workers each read the
# settings from their own copy of the config, never from the API server, so the two agree even
# where an API server's check did not run.


def allows_full(vllm_config: Any) -> bool:
    """Whether ``vllm_config``'s KV policy lets requests keep the full cache."""
    from cam_vllm.vllm_plugin.settings import policy_config_from_additional

    try:
        config = policy_config_from_additional(getattr(vllm_config, "additional_config", None))
    except ValueError:
        return False
    return bool(config is not None and config.evicts and config.allow_full_cache_requests)


def configure_engine(vllm_config: Any) -> None:
    from cam_vllm.vllm_plugin.settings import policy_from_vllm_config

    ENGINE.allows_full = allows_full(vllm_config)
    ENGINE.block_size = int(vllm_config.cache_config.block_size)
    policy = policy_from_vllm_config(vllm_config)
    if policy is not None:
        ENGINE.policy = (policy.name, int(getattr(policy.eviction, "window_tokens", 0) or 0))
        ENGINE.hold = _hold_options(policy)


def pool_tokens(num_gpu_blocks: int | None, block_size: int, engines: int = 1) -> int | None:
    """Tokens one engine's KV pool holds (vLLM keeps one block as its null block; the API
    server's ``num_gpu_blocks`` is the sum over data-parallel engines)."""
    if not num_gpu_blocks:
        return None
    return (num_gpu_blocks // max(engines, 1) - 1) * block_size


def requested_policy(params: Any) -> Any:
    """The request's ``vllm_xargs["kv_policy"]`` (None when absent)."""
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, Mapping):
        return None
    return extra.get(XARG_POLICY)


def wants_full_cache(params: Any) -> bool:
    return requested_policy(params) == FULL_CACHE


def request_window(params: Any, policy_name: str, window_tokens: int, block_size: int) -> int:
    """The request's own smaller window (``vllm_xargs["kv_window_tokens"]``), 0 for none.

    The scheduler and the workers both call this on the same request fields with the same engine
    settings, so they agree on every request, also one whose value the API server did not check:
    anything :func:`check_request` would refuse counts as no window of its own here.
    """
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, Mapping) or policy_name != WINDOW_POLICY or extra.get(XARG_POLICY) == FULL_CACHE:
        return 0
    value = extra.get(XARG_WINDOW)
    if value is None or _window_problem(value, window_tokens, block_size):
        return 0
    return 0 if value == window_tokens else value


def request_hold(params: Any, options: tuple[bool, bool, bool], allow: bool) -> bool | None:
    """Whether the request holds its prompt where it asked for other than the server's policy
    (``vllm_xargs["kv_prompt_hold"]``); None: the server's policy decides.

    As for windows, the scheduler and the workers call this on the same request fields with the
    same engine settings (``options``: :func:`hold_options`; ``allow``: the server allows requests
    to keep more than the policy), so anything :func:`check_request` would refuse counts as None.
    """
    extra = getattr(params, "extra_args", None)
    if not isinstance(extra, Mapping) or XARG_HOLD not in extra or extra.get(XARG_POLICY) == FULL_CACHE:
        return None
    value = _as_bool(extra[XARG_HOLD])
    choosable, holds, _ = options
    if value is None or not choosable or value == holds or (value and not allow):
        return None
    return value


def _as_bool(value: Any) -> bool | None:
    """A yes/no field of ``vllm_xargs``: vLLM's request schema has no booleans, so JSON ``true``
    arrives as 1; True/False and 1/0 are accepted (None: anything else)."""
    if isinstance(value, int) and value in (0, 1):  # bool is an int
        return bool(value)
    return None


def _window_problem(value: Any, window: int, block: int) -> str | None:
    """What is wrong with a requested window (None: it can be honoured)."""
    if isinstance(value, bool) or not isinstance(value, int):
        return f"must be an integer, got {value!r}"
    if value % block or not block <= value <= window:
        return (
            f"={value}: must be a multiple of the block size {block} between {block} and the "
            f"server's window {window} (a request may only keep less)"
        )
    return None


def check_request(
    extra_args: Mapping[str, Any] | None,
    *,
    server_policy: str,
    allow_full: bool,
    aliases: tuple[str, ...] = (),
    num_tokens: int,
    pool_tokens: int | None,
    window_tokens: int = 0,
    block_size: int = 1,
    token_exact: bool = False,
    hold: tuple[bool, bool, bool] = (False, False, False),
    prompt_tokens: int = 0,
) -> bool:
    """Accept the request's per-request KV fields or raise ValueError naming the problem.

    ``server_policy``: the server's policy by its canonical name (``cam-h2o``), ``aliases`` the
    names it was configured with (``h2o`` with ``--kv-merge cam``); ``num_tokens``: prompt +
    ``max_tokens``; ``pool_tokens``: the KV pool in tokens (None: not known yet). Returns True
    when the request keeps the full cache. ``window_tokens`` / ``block_size``: the server's window
    and block, for a request's own smaller window (plain ``streaming`` servers only, not
    token-exact ones: ``token_exact``). ``hold``: the server's :func:`hold_options`, and
    ``prompt_tokens`` the prompt's length, for a request's own prompt hold.
    """
    if not extra_args:
        return False
    if XARG_HOLD in extra_args:
        _check_hold(extra_args, server_policy, hold, allow_full, prompt_tokens, pool_tokens, block_size)
    if XARG_WINDOW in extra_args:
        if token_exact:
            raise ValueError(
                "vllm_xargs kv_window_tokens: this server's window is token-exact (--kv-token-exact); "
                "a request's own window is planned in whole blocks and cannot be combined with it"
            )
        _check_window(extra_args, server_policy, window_tokens, block_size)
    unsupported = sorted(k for k in extra_args if k in _UNSUPPORTED)
    if unsupported:
        raise ValueError(
            f"vllm_xargs {unsupported} cannot be set per request; this server's KV policy is "
            f"{server_policy!r}. Per request: 'kv_policy' ('none' for the full cache), "
            "'kv_window_tokens' (a smaller window, on a 'streaming' server), 'kv_prompt_hold' (read the "
            "prompt before choosing, on a score-driven server) and 'seed' (keys the merge draws)"
        )
    if XARG_POLICY not in extra_args:
        return False
    asked = extra_args[XARG_POLICY]
    if asked == server_policy or asked in aliases:
        return False
    if asked != FULL_CACHE:
        raise ValueError(
            f"vllm_xargs kv_policy={asked!r} is not available per request: this server runs "
            f"{server_policy!r}; a request may ask for {server_policy!r} or 'none' (the full cache)"
        )
    if not allow_full:
        raise ValueError(
            "vllm_xargs kv_policy='none' (the full KV cache for this request) is not allowed by this "
            "server; its operator can allow it with --kv-allow-full-cache-requests"
        )
    if pool_tokens is not None and num_tokens > pool_tokens:
        raise ValueError(
            f"vllm_xargs kv_policy='none': the prompt and max_tokens need {num_tokens} KV tokens with "
            f"the full cache, but the server's KV pool holds {pool_tokens}; lower max_tokens or the "
            "prompt, or let the server's policy evict"
        )
    return True


def _check_hold(
    extra_args: Mapping[str, Any],
    server_policy: str,
    hold: tuple[bool, bool, bool],
    allow: bool,
    prompt_tokens: int,
    pool: int | None,
    block: int,
) -> None:
    value = _as_bool(extra_args[XARG_HOLD])
    choosable, holds, bounded = hold
    if value is None:
        raise ValueError(f"vllm_xargs kv_prompt_hold must be true or false, got {extra_args[XARG_HOLD]!r}")
    if extra_args.get(XARG_POLICY) == FULL_CACHE:
        raise ValueError("vllm_xargs: kv_prompt_hold and kv_policy='none' contradict each other")
    if value == holds:
        return  # what the server does anyway
    if not choosable:
        if bounded:
            why = "its prompt hold is bounded (--kv-prompt-hold-tokens), the same for every request"
        elif holds:
            why = "its score is taken from the prompt's last queries, which needs the whole prompt read"
        else:
            why = "it chooses no heavy region (a request's hold applies to h2o, tova, scissorhands, corm)"
        raise ValueError(
            f"vllm_xargs kv_prompt_hold={str(value).lower()} is not available on this server "
            f"({server_policy!r}): {why}"
        )
    if value and not allow:
        raise ValueError(
            "vllm_xargs kv_prompt_hold=true (hold the whole prompt until it has been read) is not allowed "
            "by this server; its operator can allow it with --kv-allow-full-cache-requests"
        )
    need = prompt_tokens + block  # the held prompt and the first token after it
    if value and pool is not None and need > pool:
        raise ValueError(
            f"vllm_xargs kv_prompt_hold=true: the held prompt needs {need} KV tokens, but the server's "
            f"KV pool holds {pool}; drop kv_prompt_hold or shorten the prompt"
        )


def _check_window(extra_args: Mapping[str, Any], server_policy: str, window: int, block: int) -> None:
    value = extra_args[XARG_WINDOW]
    if server_policy != WINDOW_POLICY:
        raise ValueError(
            f"vllm_xargs kv_window_tokens: a request may choose its own window on a {WINDOW_POLICY!r} "
            f"server only; this server runs {server_policy!r} (its window is planned with scores or "
            "merges across the whole batch)"
        )
    if extra_args.get(XARG_POLICY) == FULL_CACHE:
        raise ValueError("vllm_xargs: kv_window_tokens and kv_policy='none' contradict each other")
    problem = _window_problem(value, window, block)
    if problem:
        raise ValueError(f"vllm_xargs kv_window_tokens{'' if problem.startswith('=') else ' '}{problem}")


# --------------------------------------------------------------------------------------------
# API server: the 400
# --------------------------------------------------------------------------------------------


def wrap_process_inputs(original: Any) -> Any:
    """``InputProcessor.process_inputs``: check the per-request KV fields after vLLM's own input
    processing; a refusal is vLLM's ``VLLMValidationError``, an HTTP 400 (``patches.py``)."""
    from vllm.exceptions import VLLMValidationError

    def process_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        request = original(self, *args, **kwargs)
        if getattr(getattr(request, "sampling_params", None), "extra_args", None):
            server = self.__dict__.get("_cam_vllm_policy")
            if server is None:  # resolved once per input processor, not per request
                server = self.__dict__["_cam_vllm_policy"] = _server_policy(self.vllm_config)
            _check_engine_request(self.vllm_config, server, request, VLLMValidationError)
        return request

    return process_inputs


def _server_policy(vllm_config: Any) -> tuple[Any, Any]:
    """(settings, resolved policy) of an API server's config (None, None: no policy)."""
    from cam_vllm.vllm_plugin.settings import policy_config_from_additional, policy_from_vllm_config

    config = policy_config_from_additional(getattr(vllm_config, "additional_config", None))
    if config is None or not config.evicts:
        return config, None
    return config, policy_from_vllm_config(vllm_config)


def _hold_options(policy: Any) -> tuple[bool, bool, bool]:
    from cam_vllm.policies import hold_options  # torch: not on the API server's import path

    return hold_options(policy)


def _check_engine_request(
    vllm_config: Any, server: tuple[Any, Any], request: Any, error: type[Exception]
) -> None:
    params = getattr(request, "sampling_params", None)
    extra = getattr(params, "extra_args", None)
    if not extra:
        return
    from cam_vllm.vllm_plugin import metrics

    config, policy = server
    if policy is None:
        return  # no policy: plain vLLM, which ignores these fields
    cache = vllm_config.cache_config
    engines = getattr(getattr(vllm_config, "parallel_config", None), "data_parallel_size", 1) or 1
    pool = pool_tokens(cache.num_gpu_blocks, cache.block_size, engines)
    prompt = len(getattr(request, "prompt_token_ids", None) or ())
    num_tokens = prompt + int(getattr(params, "max_tokens", None) or 0)
    try:
        full = check_request(
            extra,
            server_policy=policy.name,
            aliases=(config.policy,),
            allow_full=config.allow_full_cache_requests,
            num_tokens=num_tokens,
            pool_tokens=pool,
            window_tokens=int(getattr(policy.eviction, "window_tokens", 0) or 0),
            block_size=cache.block_size,
            token_exact=policy.token_exact,
            hold=_hold_options(policy),
            prompt_tokens=prompt,
        )
    except ValueError as exc:
        raise error(str(exc), parameter="vllm_xargs") from None
    if full:
        metrics.STATS.add("requests_full_cache", 1)


# --------------------------------------------------------------------------------------------
# Engine core: the scheduler registers full-cache requests before it allocates for them
# --------------------------------------------------------------------------------------------


def wrap_allocate_slots(original: Any) -> Any:
    """``KVCacheManager.allocate_slots``: register the request's own settings first.

    ``allocate_slots`` is the scheduler's one way to give a request blocks, and it calls
    ``remove_skipped_blocks`` (where the policy frees) before it allocates, so the registration
    is in place before any block of the request could be freed (``patches.py``).
    """

    def allocate_slots(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        if ENGINE.policy[0]:
            on_allocate(self, request)
        return original(self, request, *args, **kwargs)

    return allocate_slots


def on_allocate(manager: Any, request: Any) -> None:
    """Before the scheduler allocates for ``request``: register it if it keeps the full cache, a
    smaller window of its own, or holds its prompt where the server's policy does not (or the
    other way round)."""
    params = getattr(request, "sampling_params", None)
    window = request_window(params, *ENGINE.policy, ENGINE.block_size)
    if window:
        ENGINE.request_windows[request.request_id] = window
    hold = request_hold(params, ENGINE.hold, ENGINE.allows_full)
    if hold is not None and request.request_id not in ENGINE.request_holds:
        if hold and not _fits(manager, request, int(request.num_prompt_tokens) + ENGINE.block_size):
            params.extra_args = {k: v for k, v in params.extra_args.items() if k != XARG_HOLD}
        else:
            ENGINE.request_holds[request.request_id] = hold
    if not (ENGINE.allows_full and wants_full_cache(params)):
        return
    if _fits(manager, request):
        register_full(request.request_id)
    else:  # the workers read the same field from the request's first scheduling: drop it there
        params = request.sampling_params
        params.extra_args = {k: v for k, v in params.extra_args.items() if k != XARG_POLICY}


def _fits(manager: Any, request: Any, need: int | None = None) -> bool:
    """Whether the whole request fits this engine's pool; the API server refuses a request that
    does not (HTTP 400), but a server whose check did not run (an API server without the policy in
    its config) must not admit a request that could never finish: it is served by the policy (the
    field is dropped before the request's first scheduling, so the workers, which read it from
    the scheduler's output, plan it as the scheduler does)."""
    pool = pool_tokens(manager.block_pool.num_gpu_blocks, ENGINE.block_size)
    full = need is None
    if full:
        need = int(request.num_prompt_tokens) + int(getattr(request, "max_tokens", 0) or 0)
    if pool is None or need <= pool:
        return True
    logger.warning(
        "request %s asked for %s but needs %d tokens and the pool holds %d; "
        "it is served with the server's policy",
        request.request_id,
        "the full KV cache" if full else "its prompt held until read",
        need,
        pool,
    )
    return False


def register_full(request_id: str) -> None:
    if request_id not in ENGINE.full_cache_requests:
        ENGINE.full_cache_requests.add(request_id)
        _report()


def release_full(request_id: str) -> None:
    ENGINE.request_windows.pop(request_id, None)
    ENGINE.request_holds.pop(request_id, None)
    if request_id in ENGINE.full_cache_requests:
        ENGINE.full_cache_requests.discard(request_id)
        _report()


def _report() -> None:
    from cam_vllm.vllm_plugin import metrics

    metrics.STATS.set_gauge("requests_full_cache_running", 0, len(ENGINE.full_cache_requests))
