"""``GET /v1/kv_policy``: the active KV policy and its settings, through vLLM's endpoint plugins.

vLLM 0.32 loads ``vllm.endpoint_plugins`` entry points in the API server only when they are named in
``VLLM_PLUGINS`` (opt-in: they add HTTP routes). Our entry point is named ``cam_vllm`` like the
general plugin, so ``VLLM_PLUGINS=cam_vllm`` enables both; ``scripts/serve.sh`` and the images set
it. The route reads the engine's config (``EngineClient.vllm_config``), never the engine.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

ROUTE = "/v1/kv_policy"


def policy_report(vllm_config: Any) -> dict[str, Any]:
    """What the route returns: the configured settings and what they resolve to for this engine."""
    from cam_vllm import __version__ as cam_version
    from cam_vllm.vllm_plugin import registration_error
    from cam_vllm.vllm_plugin.internals import vllm_version
    from cam_vllm.vllm_plugin.settings import policy_config_from_additional, policy_from_vllm_config

    report: dict[str, Any] = {
        "object": "kv_policy",
        "cam_vllm_version": cam_version,
        "vllm_version": vllm_version(),
        "registration_error": registration_error(),
        "policy": "none",
        "settings": None,
        "resolved": None,
    }
    if vllm_config is None:
        return report
    config = policy_config_from_additional(getattr(vllm_config, "additional_config", None))
    if config is None:
        return report
    report["policy"] = config.policy
    report["settings"] = config.model_dump(mode="json")
    allowed = [config.policy] + (["none"] if config.evicts and config.allow_full_cache_requests else [])
    report["per_request"] = {"vllm_xargs": {"kv_policy": allowed}, "seed": "keys the merge draws"}
    policy = policy_from_vllm_config(vllm_config)
    if policy is not None and policy.name == "streaming" and not policy.token_exact:  # WINDOW_POLICY
        b = vllm_config.cache_config.block_size
        report["per_request"]["vllm_xargs"]["kv_window_tokens"] = {
            "multiple_of": b,
            "min": b,
            "max": getattr(policy.eviction, "window_tokens", None),
        }
    if policy is not None:
        from cam_vllm.policies import hold_options

        choosable, holds, _ = hold_options(policy)
        if choosable:  # a request may decline the server's whole-prompt hold, or ask for one if allowed
            options = [False] if holds else ([True] if config.allow_full_cache_requests else [])
            if options:
                report["per_request"]["vllm_xargs"]["kv_prompt_hold"] = options
        eviction = policy.eviction
        report["resolved"] = {
            "block_size": vllm_config.cache_config.block_size,
            "max_model_len": vllm_config.model_config.max_model_len,
            "sink_tokens": getattr(eviction, "sink_tokens", None),
            "sink_end": getattr(eviction, "sink_end", None),  # sinks rounded up to whole blocks
            "window_tokens": getattr(eviction, "window_tokens", None),
            "heavy_tokens": getattr(eviction, "heavy_tokens", None),  # score-driven policies
            "score": policy.score.name if policy.score is not None else None,
            # the whole prompt is kept until it has been read (peak memory per request: the prompt)
            "prompt_hold": eviction.holds_prompt,
            # a bounded hold: the most tokens a request holds while its prompt is read (0: all)
            "prompt_hold_tokens": getattr(eviction, "prompt_hold_tokens", 0),
            "observation_window": getattr(policy.score, "observation_window", None),  # snapkv
            "pooling_kernel": getattr(policy.score, "kernel", None),  # snapkv
            "max_retained_tokens": eviction.max_retained_tokens(),
            "token_exact": policy.token_exact,  # queries see the per-token sinks and window
            "max_held_tokens": getattr(eviction, "max_held_tokens", eviction.max_retained_tokens)(),
            "merging": policy.merge is not None,
            "name": policy.name,  # canonical: <merge rule>-<policy>
            "merge_rule": policy.merge.rule if policy.merge is not None else None,
        }
    return report


class KVPolicyEndpoint:
    """``vllm.endpoint_plugins`` entry (``cam_vllm``): adds ``GET /v1/kv_policy``."""

    name = "cam_vllm"
    required_tasks = None  # any server; on the render-only server the report has no policy

    def __init__(self) -> None:
        self._report: dict[str, Any] = policy_report(None)

    def attach_router(self, app: Any) -> None:
        from fastapi import APIRouter

        router = APIRouter()

        @router.get(ROUTE)
        async def kv_policy() -> dict[str, Any]:
            return self._report

        app.include_router(router)

    async def init_state(self, engine_client: Any, state: Any, args: Namespace) -> None:
        # every API server's config carries the policy, extra API servers' included
        # (cli.wrap_api_server_worker_proc registers cam-vllm there before vLLM builds it)
        self._report = policy_report(getattr(engine_client, "vllm_config", None))
