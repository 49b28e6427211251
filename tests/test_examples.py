"""The README's examples (``examples/``) run against the session's real ``vllm serve``
(``cam-streaming``, full-cache requests not allowed) and one ``vllm.LLM``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytest.importorskip("openai")

pytestmark = [pytest.mark.engine, pytest.mark.model, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(*cmd: str, timeout: float = 300) -> str:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    env.pop("MODEL", None)  # the examples ask the server for its model
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_example(vllm_server):
    out = _run("bash", str(EXAMPLES / "curl.sh"), vllm_server.base)
    assert '"object":"text_completion"' in out.replace(" ", "")
    assert '"object":"chat.completion"' in out.replace(" ", "")
    assert '"policy":"cam-streaming"' in out.replace(" ", "")
    assert "cam_vllm:kv_blocks_evicted_total" in out


def test_chat_example_streams_an_answer(vllm_server):
    out = _run(sys.executable, str(EXAMPLES / "chat.py"), vllm_server.base)
    assert out.strip()


def test_per_request_example_shows_answers_and_refusals(vllm_server):
    lines = _run(sys.executable, str(EXAMPLES / "per_request.py"), vllm_server.base).splitlines()
    assert lines[0].startswith("server policy: ok:")
    # this server does not allow the full cache, and a per-request window needs a 'streaming' one
    assert "refused (HTTP 400)" in lines[1] and "--kv-allow-full-cache-requests" in lines[1]
    assert "refused (HTTP 400)" in lines[2] and "kv_window_tokens" in lines[2]


def test_offline_example(prepared_model):
    out = _run(sys.executable, str(EXAMPLES / "offline.py"), str(prepared_model), timeout=600)
    assert out.strip()
