"""cam-vllm's vLLM integration. :func:`register` is what vLLM's general-plugin hook runs.

vLLM loads general plugins once in every process it starts (API server or the user's process,
engine core, each worker), so :func:`register` is idempotent and cheap, and never raises: if the
installed vLLM does not match what cam-vllm relies on (``internals.py``), the problem is logged
and remembered (:func:`registration_error`), vLLM runs unchanged, and an engine configured with
a KV policy refuses to start with that message instead of silently running full attention.

Scheduler side (this package): KV spec + manager (``kv_manager.py``), ``--kv-*`` flags and the
engine-args hooks (``cli.py``), start-up validation (``startup.py``). Worker side: the attention
backend in ``attention_cpu.py`` registers itself through ``register_attention()``, called here if
that module is installed. Every wrapper of vLLM's own functions is listed and installed by
``patches.py``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from cam_vllm.vllm_plugin.process_state import PLUGIN

logger = logging.getLogger("cam_vllm")

WORKER_MODULE = "cam_vllm.vllm_plugin.attention_cpu"
CUDA_WORKER_MODULE = "cam_vllm.vllm_plugin.attention_cuda"


def registration_error() -> str | None:
    """Why cam-vllm could not hook into this vLLM process (None: everything is in place)."""
    return "\n".join(PLUGIN.errors) if PLUGIN.errors else None


def _step(what: str, fn) -> bool:  # noqa: ANN001
    try:
        fn()
    except Exception as exc:  # never break vLLM itself; a configured policy fails loudly later
        PLUGIN.errors.append(f"{what}: {type(exc).__name__}: {exc}")
        logger.error("cam-vllm: %s failed: %s", what, exc, exc_info=True)
        return False
    return True


def _register_worker_side() -> None:
    """Call ``attention_cpu.register_attention()`` if the worker-side module is installed.

    Found with ``find_spec`` first, so a missing module is fine (scheduler side only) while a
    module that exists but fails to import is an error, not something to skip.
    """
    if importlib.util.find_spec(WORKER_MODULE) is None:
        logger.debug("cam-vllm: %s not installed; worker side not registered", WORKER_MODULE)
        return
    module = importlib.import_module(WORKER_MODULE)
    module.register_attention()


def _register_cuda_worker_side() -> None:
    """On CUDA platforms only, re-point ``FLASH_ATTN`` at ``attention_cuda``'s backend.

    Elsewhere (CPU, ROCm, XPU, ...) the CUDA module is not even imported, so CUDA backends stay
    stock.
    """
    from cam_vllm.vllm_plugin.cuda_startup import platform_is_cuda

    if not platform_is_cuda():
        return
    module = importlib.import_module(CUDA_WORKER_MODULE)
    module.register_cuda_attention()


def register() -> None:
    """Register cam-vllm with vLLM (idempotent, never raises)."""
    if "plugin" in PLUGIN.registered:
        return
    PLUGIN.registered.add("plugin")
    from cam_vllm.vllm_plugin import internals

    problems = internals.check_vllm_internals(raise_on_error=False)
    if problems:
        try:
            internals.check_vllm_internals()
        except internals.VLLMInternalsChanged as exc:
            PLUGIN.errors.append(str(exc))
            logger.error("%s\nKV policies are disabled in this process.", exc)
        return

    def kv_spec() -> None:
        from cam_vllm.vllm_plugin.kv_manager import register_kv_spec

        register_kv_spec()

    def metrics_dir() -> None:
        from cam_vllm.vllm_plugin.metrics import setup_metrics_dir

        setup_metrics_dir()

    _step("setting up the metrics directory (metrics.py)", metrics_dir)
    _step("registering the KV policy spec", kv_spec)
    _step(f"registering the worker side ({WORKER_MODULE})", _register_worker_side)
    _step(f"registering the CUDA worker side ({CUDA_WORKER_MODULE})", _register_cuda_worker_side)
    from cam_vllm.vllm_plugin import patches

    for patch in patches.PATCHES:  # every change to vLLM's code: patches.py
        _step(f"wrapping {patch.target} ({patch.purpose})", lambda p=patch: patches.install(p))


__all__ = ["register", "registration_error"]
