"""OpenAI conformance with ``cam-streaming`` on, plus cam-vllm's metrics and policy route, against the
session's one real ``vllm serve`` (``scripts/serve.sh``, see ``vllm_server`` in conftest.py)."""

from __future__ import annotations

import json
import re
import time

import pytest
from conftest import SERVE_BLOCK, SERVE_MAX_MODEL_LEN, SERVE_SINKS, SERVE_WINDOW, SERVED_MODEL

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

pytestmark = [pytest.mark.engine, pytest.mark.model, pytest.mark.slow]

M = SERVED_MODEL


@pytest.fixture(scope="module")
def base(vllm_server) -> str:
    return vllm_server.base


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120, max_retries=0)


def _long_prompt(chars: int = 1200) -> str:
    from cam_vllm.data import long_text

    return long_text("essays", min_chars=chars)[:chars] + "\n\nIn one sentence, the essay is about"


# --- completions -------------------------------------------------------------------------------


def test_completion_shape(client):
    out = client.completions.create(model=M, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert out.object == "text_completion" and out.model == M and out.id
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.prompt_tokens > 0 and 0 < out.usage.completion_tokens <= 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_completion_logprobs(client):
    out = client.completions.create(model=M, prompt=_long_prompt(), max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4  # the top 3, plus the sampled token when it is not among them
        assert max(top.values()) == pytest.approx(logprob, abs=1e-3)  # greedy: sampled = most likely
        assert token in top
    assert "".join(lp.tokens) == out.choices[0].text


def test_completion_echo_with_logprobs(client):
    prompt = "One, two, three,"
    out = client.completions.create(
        model=M, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    choice = out.choices[0]
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == out.usage.prompt_tokens + out.usage.completion_tokens


def test_n_greater_than_one(client):
    out = client.completions.create(
        model=M, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=3, seed=7
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == sum(1 for _ in out.choices) * 12 or out.usage.completion_tokens > 0
    assert len({c.text for c in out.choices}) >= 2, "three samples at temperature 1 should differ"


def test_seed_makes_sampling_reproducible(client):
    kwargs = dict(model=M, prompt=_long_prompt(), max_tokens=12, temperature=1.0, top_p=0.95)
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    others = {client.completions.create(seed=s, **kwargs).choices[0].text for s in (1, 2, 3)}
    assert a == b
    assert len(others | {a}) >= 2


def test_stop_sequences(client):
    prompt = "List the days of the week: Monday, Tuesday,"
    free = client.completions.create(model=M, prompt=prompt, max_tokens=16, temperature=0).choices[0].text
    words = [w for w in re.findall(r"[A-Za-z]{3,}", free)]
    assert words, f"unexpected greedy output {free!r}"
    stop = words[0]
    out = client.completions.create(model=M, prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text
    assert free.startswith(choice.text)
    assert choice.stop_reason == stop  # vLLM's extension: which stop string fired


def test_streaming_completion_sse(base):
    body = {"model": M, "prompt": _long_prompt(), "max_tokens": 8, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    plain = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=120).json()
    assert text == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


# --- chat ---------------------------------------------------------------------------------------


def test_chat_shape_and_streaming(client):
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ]
    out = client.chat.completions.create(model=M, messages=messages, max_tokens=16, temperature=0)
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    stream = client.chat.completions.create(
        model=M,
        messages=messages,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_chat_logprobs_n_and_stop(client):
    out = client.chat.completions.create(
        model=M,
        messages=[{"role": "user", "content": "Write a short sentence about the sea."}],
        max_tokens=10,
        temperature=0.8,
        seed=3,
        n=2,
        logprobs=True,
        top_logprobs=2,
        stop=["\n\n"],
    )
    assert sorted(c.index for c in out.choices) == [0, 1]
    for choice in out.choices:
        content = choice.logprobs.content
        assert content and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
        assert "\n\n" not in choice.message.content


# --- errors: vLLM's usual 4xx shapes, and the server keeps serving --------------------------------


BAD_REQUESTS = [
    ("completions", {"model": M, "prompt": "x", "max_tokens": -3}, 400),
    ("completions", {"model": M, "prompt": "x", "temperature": -1.0}, 400),
    ("completions", {"model": M, "prompt": "x", "top_p": 2.0}, 400),
    ("completions", {"model": M, "prompt": "x", "n": 0}, 400),
    ("completions", {"model": M, "prompt": "x", "logprobs": 10_000}, 400),
    ("completions", {"model": M, "prompt": "x " * (SERVE_MAX_MODEL_LEN + 10), "max_tokens": 4}, 400),
    ("completions", {"model": M}, 400),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404),
    ("chat/completions", {"model": M, "messages": "not a list"}, 400),
    (
        "chat/completions",
        {"model": M, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3},
        400,
    ),
]


@pytest.mark.parametrize(
    ("route", "body", "status"), BAD_REQUESTS, ids=[str(i) for i in range(len(BAD_REQUESTS))]
)
def test_bad_request_gets_an_openai_error(base, route, body, status):
    r = httpx.post(f"{base}/v1/{route}", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == status and isinstance(error["type"], str)


def test_malformed_json_and_the_server_keeps_serving(base, client):
    r = httpx.post(
        f"{base}/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert 400 <= r.status_code < 500
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=M, prompt="x", max_tokens=-1)
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    out = client.completions.create(model=M, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert "Paris" in out.choices[0].text


# --- cam-vllm's policy route and metrics -----------------------------------------------------------


def test_policy_route_reports_the_active_policy(base):
    r = httpx.get(f"{base}/v1/kv_policy", timeout=10)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["policy"] == "cam-streaming"
    assert report["settings"]["window_tokens"] == SERVE_WINDOW
    assert report["settings"]["sink_tokens"] == SERVE_SINKS
    resolved = report["resolved"]
    assert resolved["block_size"] == SERVE_BLOCK and resolved["window_tokens"] == SERVE_WINDOW
    assert resolved["sink_end"] == SERVE_BLOCK and resolved["merging"] is True
    assert report["registration_error"] is None


def _scrape(base: str) -> dict[str, float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{")[0]
        if name.startswith("cam_vllm:") and not re.search(r'[{,]le="', name_labels):  # not a bucket
            values[name] = values.get(name, 0.0) + float(value)
        elif name.startswith("vllm:"):
            values[name] = float(value)
    return values


def test_metrics_are_scraped_after_real_requests(base, client):
    from cam_vllm.vllm_plugin.metrics import FLUSH_SECONDS

    time.sleep(4 * FLUSH_SECONDS)  # earlier tests' requests are flushed by now
    before = _scrape(base)
    assert "vllm:num_requests_running" in before, "vLLM's own metrics are still served"
    prompt = _long_prompt(1500)
    out = client.completions.create(model=M, prompt=prompt, max_tokens=8, temperature=0)
    logical = out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens > 4 * SERVE_WINDOW
    deadline = time.monotonic() + 15
    while True:
        after = _scrape(base)
        done = (
            after["cam_vllm:request_kv_retained_ratio_count"]
            > before["cam_vllm:request_kv_retained_ratio_count"]
        )
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.5)

    def delta(name: str) -> float:
        return after[name] - before[name]

    # roughly (prompt - sinks - window) / block evicted blocks, and every evicted token merged
    evicted = delta("cam_vllm:kv_blocks_evicted_total")
    expected = (out.usage.prompt_tokens - SERVE_BLOCK - SERVE_WINDOW) // SERVE_BLOCK
    assert expected - 2 <= evicted <= expected + 2, (evicted, expected)
    assert delta("cam_vllm:kv_tokens_evicted_total") == evicted * SERVE_BLOCK
    assert delta("cam_vllm:tokens_merged_total") >= (evicted - 1) * SERVE_BLOCK
    decisions, accepted = delta("cam_vllm:merge_decisions_total"), delta("cam_vllm:merges_accepted_total")
    assert decisions >= delta("cam_vllm:tokens_merged_total") and 0 < accepted <= decisions
    changed = delta("cam_vllm:merge_value_growth_count")  # a summary: CaM's receivers, per layer and head
    assert changed > 0 and 0.5 < delta("cam_vllm:merge_value_growth_sum") / changed < 10
    assert after["cam_vllm:kv_policy_info"] == 1
    # per request: one observation, retained << logical
    assert delta("cam_vllm:request_kv_retained_ratio_count") == 1
    ratio = delta("cam_vllm:request_kv_retained_ratio_sum")
    retained = delta("cam_vllm:request_kv_tokens_retained_sum")
    assert abs(delta("cam_vllm:request_logical_tokens_sum") - logical) <= 1
    assert retained <= SERVE_BLOCK + SERVE_WINDOW + SERVE_BLOCK
    assert ratio == pytest.approx(retained / delta("cam_vllm:request_logical_tokens_sum"), rel=1e-6)
    assert ratio < 0.5
    # the running-request gauges are flushed by the engine process every 0.25 s: wait for idle
    for _ in range(40):
        if after["cam_vllm:kv_tokens_retained"] == 0 and after["cam_vllm:kv_tokens_logical"] == 0:
            break
        time.sleep(0.25)
        after = _scrape(base)
    assert after["cam_vllm:kv_tokens_retained"] == 0 and after["cam_vllm:kv_tokens_logical"] == 0  # idle
    # the engine's steps are observed with the requests they ran (this one's steps: one or more)
    assert after["vllm:num_requests_running"] == 0
    assert delta("cam_vllm:scheduler_running_requests_count") > 0
    assert delta("cam_vllm:scheduler_running_requests_sum") >= 1
