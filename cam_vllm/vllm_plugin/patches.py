"""Every change cam-vllm makes to vLLM's code, in one table, installed one way.

A :class:`Patch` wraps one function of a vLLM module or class: :func:`install` replaces it with
``wrapper(original)`` unless the attribute is already a cam-vllm wrapper (it carries
``__cam_vllm_patch__``, the target's name), so installing again, as every process's plugin load
does, changes nothing; :func:`uninstall` puts the original back. The wrappers themselves live with
the code they serve (``cli``, ``startup``, ``request_policy``, ``step_requests``,
``cpu_seed_fix``) and are named here by path, so this module imports none of them until it
installs. Every target is also listed in ``internals.py``, whose check runs first (a test checks
that the two lists agree). Registries vLLM offers for extension (attention backends, KV-cache
specs, plugins' entry points) are used as registries, not patched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from cam_vllm.vllm_plugin.internals import _resolve  # the one reading of "module:Class.attr"

MARK = "__cam_vllm_patch__"


@dataclass(frozen=True)
class Patch:
    target: str  # "module:Class.attribute" or "module:attribute"
    wrapper: str  # "module:function": original -> replacement
    process: Literal["any", "API server", "engine core", "worker"]  # where it does its work
    purpose: str
    kind: Literal["function", "staticmethod", "classmethod"] = "function"
    when: str | None = None  # "module:function" -> bool: install only where it returns True


_PLUGIN = "cam_vllm.vllm_plugin"
PATCHES: tuple[Patch, ...] = (
    Patch(
        "vllm.engine.arg_utils:EngineArgs.add_cli_args",
        f"{_PLUGIN}.cli:wrap_add_cli_args",
        "any",
        "the --kv-* flags on vllm serve",
        kind="staticmethod",
    ),
    Patch(
        "vllm.engine.arg_utils:EngineArgs.from_cli_args",
        f"{_PLUGIN}.cli:wrap_from_cli_args",
        "any",
        "the --kv-* flags into additional_config['kv_policy']",
        kind="classmethod",
    ),
    Patch(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        f"{_PLUGIN}.cli:wrap_create_engine_config",
        "any",
        "engine arguments a policy needs (CUDA: FlashAttention, eager), start-up checks",
    ),
    Patch(
        "vllm.v1.utils:run_api_server_worker_proc",
        f"{_PLUGIN}.cli:wrap_api_server_worker_proc",
        "API server",
        "extra API server processes register cam-vllm before they build their config",
    ),
    Patch(
        "vllm.v1.engine.core:EngineCore._initialize_kv_caches",
        f"{_PLUGIN}.startup:wrap_initialize_kv_caches",
        "engine core",
        "refuse a policy the workers did not apply; per-request settings of this engine",
    ),
    Patch(
        "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
        f"{_PLUGIN}.request_policy:wrap_process_inputs",
        "API server",
        "HTTP 400 for per-request KV fields the server cannot honour",
    ),
    Patch(
        "vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
        f"{_PLUGIN}.request_policy:wrap_allocate_slots",
        "engine core",
        "register per-request full cache, windows and prompt holds before blocks are freed",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
        f"{_PLUGIN}.step_requests:wrap_prepare_inputs",
        "worker",
        "publish each row's request (id, seed, lengths, vllm_xargs) to the metadata builders",
    ),
    Patch(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        f"{_PLUGIN}.step_requests:wrap_update_states",
        "worker",
        "tell the builders which requests finished (their stashed queries go)",
    ),
    Patch(
        "vllm.v1.worker.cpu_model_runner:CPUModelRunner.sample_tokens",
        f"{_PLUGIN}.cpu_seed_fix:wrap_sample_tokens",
        "worker",
        "seeded sampling independent of prefill chunking on CPU",
        when=f"{_PLUGIN}.cpu_seed_fix:needed",
    ),
)


def _load(path: str) -> Any:
    return _resolve(path)[1]


def _owner(target: str) -> tuple[Any, str]:
    owner, _, attr = _resolve(target)
    return owner, attr


def _raw(owner: Any, attr: str) -> Any:
    """The attribute as stored (a staticmethod / classmethod object on a class; inherited ones
    too: the wrapper is then set on ``owner`` only)."""
    return inspect.getattr_static(owner, attr)


def _function(stored: Any) -> Callable[..., Any]:
    return stored.__func__ if isinstance(stored, staticmethod | classmethod) else stored


def installed(patch: Patch) -> bool:
    owner, attr = _owner(patch.target)
    return getattr(_function(_raw(owner, attr)), MARK, None) == patch.target


def install(patch: Patch) -> bool:
    """Install ``patch`` (idempotent); False where its ``when`` says it is not needed."""
    if installed(patch):
        return True
    if patch.when is not None and not _load(patch.when)():
        return False
    owner, attr = _owner(patch.target)
    original = _function(_raw(owner, attr))
    inherited = isinstance(owner, type) and attr not in owner.__dict__
    replacement = _load(patch.wrapper)(original)
    if replacement.__doc__ is None:  # names stay the wrapper's own: a process target is pickled by name
        replacement.__doc__ = original.__doc__
    replacement.__wrapped__ = original
    replacement.__cam_vllm_inherited__ = inherited  # uninstall: delete, do not shadow the base's
    setattr(replacement, MARK, patch.target)
    if patch.kind == "staticmethod":
        replacement = staticmethod(replacement)
    elif patch.kind == "classmethod":
        replacement = classmethod(replacement)
    setattr(owner, attr, replacement)
    return True


def uninstall(patch: Patch) -> None:
    """Put the original back (tests)."""
    if not installed(patch):
        return
    owner, attr = _owner(patch.target)
    replacement = _function(_raw(owner, attr))
    if getattr(replacement, "__cam_vllm_inherited__", False):
        delattr(owner, attr)
        return
    original = replacement.__wrapped__
    if patch.kind == "staticmethod":
        original = staticmethod(original)
    elif patch.kind == "classmethod":
        original = classmethod(original)
    setattr(owner, attr, original)


def install_all() -> list[str]:
    """Install every patch; returns the targets installed (those whose ``when`` held)."""
    return [p.target for p in PATCHES if install(p)]
