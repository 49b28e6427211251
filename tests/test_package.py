"""Packaging: entry points, the console script, and cheap imports."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import cam_vllm
from cam_vllm import plugin

ROOT = Path(__file__).resolve().parents[1]


def test_version_matches_distribution():
    assert importlib.metadata.version("cam-vllm") == cam_vllm.__version__


def test_vllm_plugin_entry_point_is_registered():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    ours = [ep for ep in eps if ep.name == "cam_vllm"]
    assert len(ours) == 1
    assert ours[0].value == "cam_vllm.plugin:register"
    assert ours[0].load() is plugin.register


def test_plugin_register_is_idempotent():
    pytest.importorskip("vllm", reason="vLLM is not installed (setup.sh --no-vllm)")
    plugin.register()
    plugin.register()


def test_importing_the_package_and_plugin_does_not_import_vllm_or_torch():
    code = (
        "import sys, cam_vllm, cam_vllm.plugin, cam_vllm.cli, cam_vllm.models; "
        "heavy = [m for m in ('vllm', 'torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_console_script_runs():
    script = Path(sys.executable).parent / "cam-vllm"
    assert script.exists(), "the cam-vllm console script is not installed (pip install -e .)"
    out = subprocess.run([str(script), "--help"], check=True, capture_output=True, text=True).stdout
    assert "prepare-model" in out
    version = subprocess.run([str(script), "--version"], check=True, capture_output=True, text=True).stdout
    assert version.strip() == f"cam-vllm {cam_vllm.__version__}"


def _fake_wheel(folder, name: str, version: str) -> None:
    """A minimal valid wheel (metadata only): enough for pip to resolve ``name==version`` offline."""
    import zipfile

    dist = f"{name}-{version}.dist-info"
    files = {
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{dist}/RECORD"] = "".join(f"{p},,\n" for p in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)


@pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the set-up's venv")
def test_setup_names_where_the_cpu_torch_comes_from(tmp_path):
    """Without a package source that has torch 2.13.0+cpu (no local wheel folder, no PyTorch index
    configured), the set-up names PyTorch's CPU wheel index instead of failing on something else or
    taking PyPI's CUDA torch; with a source that has it, it uses that. Offline: pip only reads a
    local folder and an index that does not exist."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k not in ("CI", "VIRTUAL_ENV")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(tmp_path / "no-index").as_uri())

    def source(**extra: str) -> str:
        r = subprocess.run(
            ["bash", "scripts/setup.sh", "--torch-source"],
            cwd=ROOT,
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    missing = source()
    assert "in none of the configured package sources" in missing
    assert "https://download.pytorch.org/whl/cpu" in missing
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _fake_wheel(wheels, "torch", "2.13.0+cpu")
    assert "found in the configured package sources" in source(PIP_FIND_LINKS=str(wheels))


def _import_graph() -> dict[str, set[str]]:
    """Our modules -> the modules of ours they import, at module level or inside functions
    (not under ``if TYPE_CHECKING:``, which never runs)."""
    import ast

    def nodes(tree):  # noqa: ANN001, ANN202
        for node in ast.iter_child_nodes(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                continue
            yield node
            yield from nodes(node)

    root = Path(__file__).resolve().parents[1] / "cam_vllm"
    mods = {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in nodes(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[mod] |= {n for n in names if n in mods and n != mod}
    return graph


# The plugin's entry point imports every part of it to register them; paths through it are not
# dependencies of one part on another.
_REGISTRAR = "cam_vllm.vllm_plugin"


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = {_REGISTRAR}, [start]
    while todo:
        m = todo.pop()
        if m == goal:
            return True
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return False


@pytest.mark.parametrize(
    ("user", "used"),
    [
        ("cam_vllm.config", "cam_vllm.policies"),
        ("cam_vllm.vllm_plugin.kv_manager", "cam_vllm.vllm_plugin.startup"),
    ],
)
def test_no_import_cycle_between_settings_and_registry_or_manager_and_checks(user, used):
    """One direction only, counting imports inside functions too (they hid the cycles before)."""
    graph = _import_graph()
    assert _reaches(graph, user, used)
    assert not _reaches(graph, used, user), f"{used} imports {user} (directly or through others)"


def test_no_import_cycles_anywhere():
    """No module of ours reaches itself through the modules it imports (inside functions too),
    except through the plugin's registrar, which imports its parts to register them."""
    graph = _import_graph()
    graph = {m: uses - {_REGISTRAR} for m, uses in graph.items() if m != _REGISTRAR}
    cycles = []
    for start in graph:  # a cycle through `start`: a path from one of its imports back to it
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            if m == start:
                cycles.append(start)
                break
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
    assert cycles == [], f"modules on an import cycle: {sorted(cycles)}"


# docs/architecture.md's layers: what each may import of ours (besides itself)
_LAYERS = {
    "cam_vllm.core": set(),
    "cam_vllm.policies": {"cam_vllm.core"},
    "cam_vllm.config": {"cam_vllm.core", "cam_vllm.policies"},
    "cam_vllm.reference": {"cam_vllm.core", "cam_vllm.policies", "cam_vllm.config"},
    "cam_vllm.vllm_plugin": {"cam_vllm.core", "cam_vllm.policies", "cam_vllm.config", "cam_vllm.errors"},
}


def test_no_import_goes_up_the_layers():
    """Each layer of docs/architecture.md imports only the layers below it (imports inside
    functions included): the math, the policies, the settings and the reference engine never
    reach the vLLM glue (the tools, above them all, may)."""
    graph = _import_graph()

    def layer(mod: str) -> str | None:
        return next((name for name in _LAYERS if mod == name or mod.startswith(name + ".")), None)

    up = []
    for mod, uses in graph.items():
        own = layer(mod)
        for used in uses:
            there = layer(used)
            if own is not None and there not in (own, None) and there not in _LAYERS[own]:
                up.append(f"{mod} -> {used}")
    assert up == []


def test_the_plugins_process_state_lives_in_one_module():
    """No module of the vLLM glue rebinds a module global (``global``): what a process remembers
    between vLLM's calls is in ``process_state`` (registrations, the engine's request settings,
    the workers' step), where a test can see and reset it."""
    import ast

    offenders = []
    for path in sorted((ROOT / "cam_vllm" / "vllm_plugin").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Global):
                offenders.append(f"{path.name}:{node.lineno} global {', '.join(node.names)}")
    assert offenders == []


def test_process_state_reset_puts_a_record_back_in_place():
    from cam_vllm.vllm_plugin import process_state as ps

    record = ps.EngineState()
    held = record.request_holds
    record.request_holds["a"] = True
    record.block_size = 32
    ps.reset(record)
    assert record.block_size == 0 and record.request_holds == {} and held == {"a": True}


def test_cuda_builds_of_torchvision_next_to_cpu_torch_are_named_with_the_fix():
    import importlib.metadata as md

    from _cam_vllm_startup import companion_problem

    def lookup(installed: dict[str, str]):
        def version(name: str) -> str:
            if name not in installed:
                raise md.PackageNotFoundError(name)
            return installed[name]

        return version

    # what `pip install "cam-vllm[cpu]"` brings from PyPI next to PyTorch's CPU torch
    problem = companion_problem(
        lookup({"torch": "2.13.0+cpu", "torchvision": "0.28.0", "torchaudio": "2.13.0"})
    )
    assert problem and "torchvision 0.28.0, torchaudio 2.13.0" in problem
    assert "Fix: pip uninstall -y torchvision torchaudio torchcodec" in problem
    # fine: none of them, their CPU builds, or a CUDA torch with its own companions
    assert companion_problem(lookup({"torch": "2.13.0+cpu"})) is None
    assert companion_problem(lookup({"torch": "2.13.0+cpu", "torchvision": "0.28.0+cpu"})) is None
    assert companion_problem(lookup({"torch": "2.13.0", "torchvision": "0.28.0"})) is None
    assert companion_problem(lookup({})) is None
