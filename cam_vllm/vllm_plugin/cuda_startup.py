"""Start-up rules of cam-vllm's CUDA path, importable without vLLM's CUDA modules.

The engine-args hook (``cli.prepare_engine_args``) calls :func:`prepare_cuda_engine_args` for every
engine with a KV policy; it does nothing unless ``vllm.platforms.current_platform`` is CUDA. There
it selects the ``FLASH_ATTN`` backend (which cam-vllm replaces, see ``attention_cuda.py``) when the
user chose none, so ``vllm serve MODEL --kv-policy ...`` needs no ``--attention-backend``, and it
forces or refuses what the CUDA path does not support. No vLLM import at module level.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("cam_vllm")

BACKEND_NAME = "FLASH_ATTN"


def platform_is_cuda() -> bool:
    """Whether this process runs on vLLM's CUDA platform (resolves ``current_platform``)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cuda())


def _backend_name(value: Any) -> str | None:
    if value is None:
        return None
    return str(getattr(value, "name", value)).upper()


def cuda_engine_args_fixes(engine_args: Any, policy_name: str) -> tuple[list[str], list[str]]:
    """Adjust ``engine_args`` for a policy on CUDA; returns (problems, changes made).

    Pure apart from setting fields of ``engine_args`` (testable without CUDA):
    * attention backend: ``FLASH_ATTN`` is selected when none was chosen; any other is refused;
    * CUDA graphs: ``enforce_eager`` is forced on (pseudo-request counts vary per step);
    * async scheduling: forced off when unset, refused when requested explicitly;
    * FP8 (or any quantized) KV cache: refused.
    """
    problems: list[str] = []
    changes: list[str] = []
    attention_config = getattr(engine_args, "attention_config", None)
    if isinstance(attention_config, dict):
        config_backend = _backend_name(attention_config.get("backend"))
    else:
        config_backend = _backend_name(getattr(attention_config, "backend", None))
    flag_backend = _backend_name(getattr(engine_args, "attention_backend", None))
    chosen = flag_backend or config_backend
    if chosen in (None, "AUTO") and config_backend in (None, "AUTO"):
        if config_backend is None:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            engine_args.attention_backend = AttentionBackendEnum.FLASH_ATTN
            changes.append(f"attention backend {BACKEND_NAME}")
        else:  # "auto" inside --attention-config: we cannot set the flag next to it
            problems.append(
                f"the attention backend must be {BACKEND_NAME}. Fix: --attention-backend {BACKEND_NAME}"
            )
    elif chosen != BACKEND_NAME:
        problems.append(
            f"attention backend {chosen} is not supported (cam-vllm's CUDA path runs on "
            f"{BACKEND_NAME}). Fix: drop --attention-backend or use --attention-backend {BACKEND_NAME}"
        )
    if not getattr(engine_args, "enforce_eager", False):
        engine_args.enforce_eager = True
        changes.append("enforce_eager (no CUDA graphs)")
    async_scheduling = getattr(engine_args, "async_scheduling", None)
    if async_scheduling:
        problems.append("--async-scheduling is not supported. Fix: drop --async-scheduling")
    elif async_scheduling is None:
        engine_args.async_scheduling = False
        changes.append("synchronous scheduling")
    kv_dtype = str(getattr(engine_args, "kv_cache_dtype", "auto") or "auto")
    from vllm.utils.torch_utils import is_quantized_kv_cache

    if kv_dtype != "auto" and is_quantized_kv_cache(kv_dtype):
        problems.append(f"a quantized KV cache ({kv_dtype}) is not supported. Fix: drop --kv-cache-dtype")
    del policy_name
    return problems, changes


def prepare_cuda_engine_args(engine_args: Any, policy_name: str) -> Any:
    """Engine-args hook for CUDA platforms (no-op elsewhere): see :func:`cuda_engine_args_fixes`."""
    if not platform_is_cuda():
        return engine_args
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

    problems, changes = cuda_engine_args_fixes(engine_args, policy_name)
    if problems:
        raise KVPolicyStartupError(f"KV policy {policy_name!r} on CUDA: " + "; ".join(problems) + ".")
    if changes:
        logger.warning(
            "cam-vllm: KV policy %r on CUDA runs with %s (the number of pseudo-requests per step "
            "varies, so CUDA graphs cannot be captured).",
            policy_name,
            ", ".join(changes),
        )
    return engine_args
