"""Packaging: entry points, the console script, and cheap imports."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import cam_vllm
from cam_vllm import plugin


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
