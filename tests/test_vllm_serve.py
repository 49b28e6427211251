"""The README's main command, for real: ``scripts/serve.sh`` serves the prepared SmolLM2 with
``cam-streaming`` through ``vllm serve``, driven here by the ``openai`` client."""

from __future__ import annotations

import pytest
from conftest import SERVE_WINDOW

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.engine, pytest.mark.model, pytest.mark.slow]

WINDOW = SERVE_WINDOW  # small, so that ordinary prompts are evicted from and merged


@pytest.fixture(scope="module")
def server(vllm_server):
    """The session's shared `scripts/serve.sh` server (tests/conftest.py): (base URL, log path)."""
    return vllm_server.base, vllm_server.log


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=120)


def _long_prompt() -> str:
    from cam_vllm.data import long_text

    return long_text("essays", min_chars=1500)[:1500] + "\n\nIn one sentence, the essay is about"


def test_policy_is_active_in_the_served_engine(server):
    log = server[1].read_text()
    assert (
        f"cam-vllm KV policy active: policy cam-streaming; block size 32; sinks 4 (kept: 32), window {WINDOW}"
        in log
    )


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
    bad = httpx.post(
        f"{server[0]}/v1/completions", json={"model": "smollm2", "prompt": "x", "max_tokens": -3}
    )
    assert bad.status_code == 400
    out = client.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert "Paris" in out.choices[0].text
