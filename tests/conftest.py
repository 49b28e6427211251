"""Shared pytest set-up: marker handling and the prepared real model.

Markers (declared in pyproject.toml): ``engine`` (starts a vLLM engine), ``slow``, ``gpu`` (needs CUDA),
``model`` (needs the prepared SmolLM2). The default run selects all of them; ``gpu`` tests are skipped
where CUDA is unavailable and ``engine`` tests where vLLM is not installed (``setup.sh --no-vllm``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if gpu_items:
        import torch

        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
            for item in gpu_items:
                item.add_marker(skip)
    if importlib.util.find_spec("vllm") is None:
        skip = pytest.mark.skip(reason="vLLM is not installed (set up without --no-vllm to run it)")
        for item in items:
            if "engine" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def prepared_model() -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint in the default cache (converted once)."""
    from cam_vllm.models import prepare_model

    return prepare_model()


# --------------------------------------------------------------------------------------------
# One real `vllm serve` (the README's scripts/serve.sh) for the whole session
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SERVE_WINDOW = 64  # small, so that ordinary prompts are evicted from and merged
SERVE_SINKS = 4
SERVE_BLOCK = 32
SERVE_MAX_MODEL_LEN = 2048
SERVED_MODEL = "smollm2"


class ServeProcess:
    """``bash scripts/serve.sh`` on a free port, with its log; :meth:`stop` is idempotent."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = None
        self.base = ""

    def start(self, timeout: float = 420) -> None:
        import os
        import socket
        import subprocess

        from cam_vllm.launch import wait_healthy

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(
            os.environ,
            PORT=str(port),
            VLLM_CPU_KVCACHE_SPACE="1",
        )
        env.pop("VLLM_PLUGINS", None)  # serve.sh's default (cam_vllm) enables the endpoint plugin
        args = [
            *("--kv-policy", "cam-streaming"),  # not serve.sh's default (streaming): tests check merging too
            *("--kv-sink-tokens", str(SERVE_SINKS), "--kv-window-tokens", str(SERVE_WINDOW)),
            "--block-size",
            str(SERVE_BLOCK),
            "--enforce-eager",
            "--max-model-len",
            str(SERVE_MAX_MODEL_LEN),
        ]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                ["bash", "scripts/serve.sh", *args],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.base = f"http://127.0.0.1:{port}"
        problem = wait_healthy(self.proc, self.base, timeout)
        if problem:
            self.stop()
            pytest.fail(f"scripts/serve.sh {problem}:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text()[-chars:]

    def stop(self) -> None:
        from cam_vllm.launch import stop_group

        if self.proc is not None:
            stop_group(self.proc)


_serve: ServeProcess | None = None
_last_serve_user: str | None = None


@pytest.fixture(scope="session")
def vllm_server(prepared_model, tmp_path_factory) -> ServeProcess:
    """The session's one `vllm serve` (cam-streaming, window 64, block 32), started on first use and
    stopped right after the last test that uses it (not at session end: it would sit idle next to
    the engine tests that follow)."""
    global _serve
    pytest.importorskip("vllm")
    pytest.importorskip("httpx")
    _serve = ServeProcess(tmp_path_factory.mktemp("serve") / "serve.log")
    _serve.start()
    yield _serve
    _serve.stop()


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    global _last_serve_user
    users = [item.nodeid for item in session.items if "vllm_server" in getattr(item, "fixturenames", ())]
    _last_serve_user = users[-1] if users else None


def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> None:
    if _serve is not None and item.nodeid == _last_serve_user:
        _serve.stop()
