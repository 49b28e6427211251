"""The README's main command, for real: ``scripts/serve.sh`` serves the prepared SmolLM2 with
``cam-streaming`` through ``vllm serve``, driven here by the ``openai`` client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.engine, pytest.mark.model, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
WINDOW = 64  # small, so that ordinary prompts are evicted from and merged


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(prepared_model, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, PORT=str(port), KV_WINDOW_TOKENS=str(WINDOW), VLLM_CPU_KVCACHE_SPACE="1")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", "scripts/serve.sh", "--block-size", "32", "--enforce-eager", "--max-model-len", "2048"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                pytest.fail(f"scripts/serve.sh exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server did not become healthy:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield base, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=120)


def _long_prompt() -> str:
    from cam_vllm.data import long_text

    return long_text("essays", min_chars=1500)[:1500] + "\n\nIn one sentence, the essay is about"


def test_policy_is_active_in_the_served_engine(server):
    log = server[1].read_text()
    assert "kv_policy" in log and "cam-streaming" in log


def test_completion_of_a_prompt_longer_than_the_window(client):
    out = client.completions.create(model="smollm2", prompt=_long_prompt(), max_tokens=24, temperature=0)
    assert out.usage.prompt_tokens > 4 * WINDOW, "the prompt must be evicted from and merged"
    assert out.choices[0].finish_reason in ("length", "stop")
    assert len(out.choices[0].text.strip()) > 0
    again = client.completions.create(model="smollm2", prompt=_long_prompt(), max_tokens=24, temperature=0)
    assert again.choices[0].text == out.choices[0].text, "greedy with seeded merges is reproducible"


def test_chat_completion_answers(client):
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in out.choices[0].message.content


def test_streaming_equals_the_plain_response(client):
    kwargs = dict(model="smollm2", prompt=_long_prompt(), max_tokens=16, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    pieces = [c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert len(pieces) > 1 and "".join(pieces) == plain


def test_malformed_request_is_a_400_and_the_server_keeps_serving(server, client):
    bad = httpx.post(f"{server[0]}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": -3})
    assert bad.status_code == 400
    out = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in out.choices[0].text
