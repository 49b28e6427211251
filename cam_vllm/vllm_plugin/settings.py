"""Where the KV policy settings live inside a vLLM config, and how they are read back.

vLLM has no plugin hook for new engine flags, so every route (``--kv-policy`` flags, the
supported ``--additional-config '{"kv_policy": {...}}'``, ``vllm.LLM(additional_config=...)``)
ends up as one dict under ``vllm_config.additional_config["kv_policy"]``. That dict is pickled to
the engine core and the workers with the config, so every process reads the same settings.
"""

from __future__ import annotations

from typing import Any

from cam_vllm.config import KVPolicyConfig
from cam_vllm.policies import KVPolicy, build_policy

ADDITIONAL_CONFIG_KEY = "kv_policy"


def policy_config_from_additional(additional: Any) -> KVPolicyConfig | None:
    """The :class:`KVPolicyConfig` in vLLM's ``additional_config`` (None when no policy is set).

    Accepts ``{"kv_policy": "cam-streaming", ...}`` (flat, name under the key and settings as
    siblings prefixed ``kv_``) and ``{"kv_policy": {"policy": "cam-streaming", ...}}`` (nested).
    Raises ValueError naming the problem for anything malformed.
    """
    if not additional or not isinstance(additional, dict) or ADDITIONAL_CONFIG_KEY not in additional:
        return None
    value = additional[ADDITIONAL_CONFIG_KEY]
    if isinstance(value, str):
        fields = {"policy": value}
        for key, item in additional.items():
            if key.startswith("kv_") and key != ADDITIONAL_CONFIG_KEY:
                fields[key.removeprefix("kv_")] = item
    elif isinstance(value, dict):
        fields = dict(value)
    else:
        raise ValueError(
            f"additional_config[{ADDITIONAL_CONFIG_KEY!r}] must be a policy name or a dict, "
            f"got {type(value).__name__}"
        )
    try:
        return KVPolicyConfig(**fields)
    except Exception as exc:  # pydantic's message names the field; keep it, add where it came from
        raise ValueError(f"invalid KV policy settings in --additional-config: {exc}") from exc


def policy_from_vllm_config(vllm_config: Any) -> KVPolicy | None:
    """The policy in force for this engine, resolved against its block size and max_model_len.

    None when no policy is configured or the policy is ``none`` (vLLM runs unchanged).
    """
    config = policy_config_from_additional(getattr(vllm_config, "additional_config", None))
    if config is None or not config.evicts:
        return None
    block_size = vllm_config.cache_config.block_size
    config = config.model_copy(update={"block_size": block_size})
    return build_policy(config, vllm_config.model_config.max_model_len)
