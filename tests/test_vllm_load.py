"""Under load and faults, for real: `vllm serve` on the tiny model with a pool small enough to force
preemptions, driven by ``cam-vllm load-test`` (streaming completions, a third dropped mid-stream),
then checked for leaks. The full-size run (200 requests, 48 in flight, SmolLM2) is in
docs/reliability.md; this is its scaled-down CI version."""

from __future__ import annotations

import concurrent.futures
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("vllm")
httpx = pytest.importorskip("httpx")

from vllm_helpers import make_peaky_model, served, token_prompts  # noqa: E402

from cam_vllm.loadtest import StormConfig, parse_metrics, run_storm  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]

# 40 blocks of 32 tokens; up to 16 requests running with 128-token steps, admission checking only
# the first chunk: running requests outgrow the pool and vLLM preempts them.
FLAGS = (
    *("--enforce-eager", "--dtype", "float32", "--block-size", "32"),
    *("--num-gpu-blocks-override", "40", "--no-scheduler-reserve-full-isl"),
    *("--max-num-seqs", "16", "--max-num-batched-tokens", "128", "--kv-window-tokens", "64"),
    *("--kv-allow-full-cache-requests", "true"),  # requests may ask for the full cache (vllm_xargs)
    *("--chat-template", "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"),  # the tiny one has none
)
POLICIES = {
    "cam-streaming": ("--kv-policy", "cam-streaming", "--max-model-len", "2048"),
    "cam-h2o": ("--kv-policy", "h2o", "--kv-merge", "cam", "--max-model-len", "2048"),
    # every prompt held whole until read: one prompt of max_model_len fits the 39 usable blocks,
    # sixteen of up to 600 tokens do not
    "cam-snapkv": ("--kv-policy", "snapkv", "--kv-merge", "cam", "--max-model-len", "1248"),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_peaky_model(tmp_path_factory.mktemp("peaky"))


@pytest.fixture(scope="module", params=list(POLICIES))
def server(request, model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with served(model, log, *FLAGS, *POLICIES[request.param]) as base:
        yield base


def test_storm_of_streams_with_aborts_and_preemptions_leaves_nothing_behind(server):
    config = StormConfig(
        requests=60,
        concurrency=16,
        prompt_tokens=(32, 600),
        max_tokens=(8, 64),
        seed=1,
        full_cache_fraction=0.2,
    )
    report = run_storm(server, config, progress=False)
    summary = report.summary()
    assert report.errors == [], summary
    assert report.aborted >= 10 and report.completed >= 30, summary
    assert report.preemptions > 0, f"the pool must run full: {summary}"
    assert report.requests_tracked_peak > 0, "the plugin's per-request state is visible while it exists"
    resolved = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()["resolved"]
    if resolved["observation_window"] is None:  # snapkv scores no decode: nothing is stashed
        assert report.worker_stashed_peak > 0, "decode queries wait in the workers' stash (deferred scoring)"
    assert report.worker_stashed == 0
    assert report.full_cache_requests >= 5, "some requests keep the full cache in the same batches"
    assert report.full_cache_running == 0
    assert report.healthy
    assert report.leaks == [], summary
    assert report.probe_after == report.probe_before != ""
    assert report.ok


def _complete(base: str, model_name: str, prompt: list[int], **fields) -> dict:
    """One 12-token completion of ``prompt`` (status 200 required); its first choice."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": 12, **fields}
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("server", ["cam-h2o"], indirect=True)
def test_seeded_sampling_does_not_depend_on_how_the_prompt_was_chunked(server):
    """A seeded request whose prompt is chunked (vLLM samples and discards a token per partial
    chunk) crashed vLLM's CPU engine (``CPU Generator does not use offset``); cpu_seed_fix rewinds
    the generator by state. Alone, the 300-token prompt runs in chunks of 128/128/44; behind a
    500-token prompt it is cut differently (e.g. 12/128/128/32: one more discarded draw), and
    the tokens must still be the same. On cam-h2o (any merging policy's cache is independent of
    chunking; one server suffices)."""

    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    prompt, other = token_prompts(1, 300, seed=5)[0], token_prompts(1, 500, seed=6)[0]

    def complete(p: list[int], seed: int) -> str:
        return _complete(server, model_name, p, temperature=1.0, seed=seed, ignore_eos=True)["text"]

    alone = complete(prompt, 7)
    assert complete(prompt, 7) == alone
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(complete, other, 8)
        time.sleep(0.05)  # the long prompt is scheduled first
        behind = pool.submit(complete, prompt, 7)
        first.result()
        assert behind.result() == alone
    assert complete(prompt, 9) != alone, "the seed must matter"


# --------------------------------------------------------------------------------------------
# Malformed requests, fuzzed: a valid body with up to two fields replaced by odd values
# --------------------------------------------------------------------------------------------

ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([-(2**63), -1, 0, 1, 2, 7, 2047, 2048, 4096, 2**31, 2**63, 10**30]),
    st.sampled_from([-1.5, 0.0, 1e-9, 0.5, 1.0, 2.0, 1e9, float("inf"), float("nan")]),
    st.text(max_size=8),
    st.lists(st.integers(-5, 10**6), max_size=5),
    st.dictionaries(st.text(max_size=4), st.integers(-3, 3), max_size=2),
)
FIELDS = [
    "max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p", "n", "seed", "logprobs",
    "prompt_logprobs", "stop", "stop_token_ids", "presence_penalty", "repetition_penalty", "ignore_eos",
    "stream", "echo", "logit_bias", "truncate_prompt_tokens", "vllm_xargs", "priority", "prompt",
    "messages", "kv_policy", "skip_special_tokens", "bad_words", "allowed_token_ids", "stream_options",
]  # fmt: skip
VALID_PROMPT = st.lists(st.integers(3, 800), min_size=1, max_size=400)
PROMPTS = st.one_of(
    VALID_PROMPT,
    VALID_PROMPT,
    VALID_PROMPT,
    VALID_PROMPT,
    st.just([]),
    st.just(""),
    st.lists(st.integers(0, 900), min_size=1, max_size=40),
    st.just(list(range(3, 2300))),  # longer than max_model_len
    st.just([5, 10**7]),  # not in the vocabulary
    st.lists(st.lists(st.integers(3, 800), min_size=1, max_size=4), min_size=1, max_size=2),
)


@pytest.mark.parametrize("server", ["cam-h2o"], indirect=True)
def test_malformed_requests_get_a_4xx_never_a_5xx(server):
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    probe = {
        "model": model_name,
        "prompt": token_prompts(1, 300, seed=9)[0],
        "max_tokens": 10,
        "temperature": 0,
    }
    before = httpx.post(f"{server}/v1/completions", json=probe, timeout=120).json()["choices"][0]["text"]
    seen: dict[int, int] = {}

    @settings(max_examples=120, deadline=None, database=None, derandomize=True)
    @given(
        chat=st.booleans(),
        changes=st.dictionaries(st.sampled_from(FIELDS), ODD, max_size=2),
        prompt=PROMPTS,
    )
    def case(chat, changes, prompt):
        body = {"model": model_name, "max_tokens": 6}
        if chat:
            body["messages"] = [{"role": "user", "content": "Say something."}]
        else:
            body["prompt"] = prompt
        body.update(changes)
        for name in ("max_tokens", "min_tokens", "n"):  # keep accepted cases quick
            if isinstance(body.get(name), int) and 16 < body[name] < 10**6:
                body[name] = 16
        url = f"{server}/v1/chat/completions" if chat else f"{server}/v1/completions"
        content = json.dumps(body, allow_nan=True)  # NaN and Infinity too: not JSON, must be a 4xx
        with httpx.stream(
            "POST", url, content=content, headers={"content-type": "application/json"}, timeout=120
        ) as r:
            text = r.read().decode(errors="replace")
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, f"{r.status_code} for {content[:400]}: {text[:400]}"
        assert '"code":500' not in text.replace(" ", ""), f"error event for {content[:400]}: {text[:400]}"

    case()
    assert seen.get(200, 0) > 10 and sum(v for k, v in seen.items() if 400 <= k < 500) > 10, seen
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    after = httpx.post(f"{server}/v1/completions", json=probe, timeout=120).json()["choices"][0]["text"]
    assert after == before, "a malformed request changed another request's output"


@pytest.mark.parametrize("server", ["cam-h2o"], indirect=True)
def test_openapi_fuzz_finds_no_server_error(server, tmp_path):
    """Schemathesis against the server's own OpenAPI document (the generation endpoints, tokenize,
    models, the policy route), with its coverage and fuzzing phases, bounded: no 5xx, then the
    server is healthy and idle. ``schemathesis_hooks.py`` names the served model in bodies."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("schemathesis")
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    here = Path(__file__).parent
    env = dict(os.environ, SCHEMATHESIS_HOOKS="schemathesis_hooks", FUZZ_MODEL=model_name)
    env["PYTHONPATH"] = os.pathsep.join([str(here), env.get("PYTHONPATH", "")])
    paths = "^/(v1/completions|v1/chat/completions|tokenize|detokenize|v1/kv_policy|v1/models|health)$"
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", f"{server}/openapi.json"]
    cmd += ["--checks", "not_a_server_error", "--include-path-regex", paths, "--phases", "coverage,fuzzing"]
    cmd += ["-n", "10", "--seed", "1", "--request-timeout", "120", "--continue-on-failure"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout.split("SUMMARY")[-1], run.stdout[-3000:]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    metrics = parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)
    assert metrics["vllm:num_requests_running"] == 0


# --------------------------------------------------------------------------------------------
# Per-request seed of the merge draws
# --------------------------------------------------------------------------------------------


def _greedy(base: str, model_name: str, prompt: list[int], seed: int | None) -> tuple[list[int], list[float]]:
    fields = {"temperature": 0, "logprobs": 0, "ignore_eos": True, "return_token_ids": True}
    if seed is not None:
        fields["seed"] = seed
    choice = _complete(base, model_name, prompt, **fields)
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def test_a_requests_seed_keys_its_merge_draws(server):
    """Without a seed a request uses --kv-seed (0 here), with one its own: seed 0 equals no seed,
    another seed merges differently (other logprobs), and the same seed again gives the same."""
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    prompt = token_prompts(1, 400, seed=11)[0]
    default = _greedy(server, model_name, prompt, None)
    assert _greedy(server, model_name, prompt, 0) == default
    other = _greedy(server, model_name, prompt, 5)
    assert other[1] != default[1], "a request's seed must change its CaM draws"
    assert _greedy(server, model_name, prompt, 5) == other


@pytest.mark.parametrize("server", ["cam-h2o"], indirect=True)
def test_a_requests_seed_gives_the_oracles_output_for_that_seed(server, model):
    """The served request with seed 7 equals the reference engine built with seed 7 (cam-h2o's
    cache does not depend on chunking, so the reference runs the prompt in one piece)."""
    from vllm_helpers import reference_greedy

    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy

    report = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()
    config = KVPolicyConfig(
        **{**report["settings"], "seed": 7, "block_size": report["resolved"]["block_size"]}
    )
    policy = build_policy(config, report["resolved"]["max_model_len"])
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    prompt = token_prompts(1, 400, seed=11)[0]
    tokens, logprobs = _greedy(server, model_name, prompt, 7)
    ref_tokens, ref_logprobs, _ = reference_greedy(model, policy, prompt, len(tokens))
    assert tokens == ref_tokens
    assert logprobs == pytest.approx(ref_logprobs, abs=2e-3)
    assert _greedy(server, model_name, prompt, None)[1] != pytest.approx(ref_logprobs, abs=2e-3)


def test_data_parallel_engine_cores_each_run_the_policy(model, tmp_path):
    """`--data-parallel-size 2` on the CPU build: two engine cores, each with the policy, and two
    API servers (vLLM's default for DP), whose /v1/kv_policy must name the policy too and which
    must refuse per-request fields the policy cannot honour with a 400 (vLLM spawns them with the
    parsed arguments; cam-vllm registers in each before it builds its config). Outputs do not
    depend on which core served them."""
    log = tmp_path / "serve.log"
    flags = ("--enforce-eager", "--dtype", "float32", "--block-size", "32", "--max-model-len", "2048")
    flags += ("--kv-policy", "cam-streaming", "--kv-window-tokens", "64", "--data-parallel-size", "2")
    with served(model, log, *flags) as base:
        model_name = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        prompts = token_prompts(6, 400, seed=21)

        def complete(p: list[int]) -> list[int]:
            return _complete(base, model_name, p, temperature=0, return_token_ids=True)["token_ids"]

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            together = list(pool.map(complete, prompts))
        assert [complete(p) for p in prompts] == together
        for _ in range(4):  # each API server answers some of these
            report = httpx.get(f"{base}/v1/kv_policy", timeout=10).json()
            assert report["policy"] == "cam-streaming" and report["resolved"]["name"] == "cam-streaming"
        bad = {
            "model": model_name,
            "prompt": prompts[0][:50],
            "max_tokens": 4,
            "vllm_xargs": {"kv_budget": 0.1},
        }
        for _ in range(6):  # a new connection each: both API servers answer some
            r = httpx.post(f"{base}/v1/completions", json=bad, timeout=60)
            assert r.status_code == 400, r.text
            assert "cannot be set per request" in r.json()["error"]["message"]
        metrics = parse_metrics(httpx.get(f"{base}/metrics", timeout=10).text)
        assert metrics["vllm:kv_cache_usage_perc"] == 0
    assert log.read_text().count("cam-vllm KV policy active: policy cam-streaming") == 2


def test_a_fault_in_the_policy_step_fails_its_requests_and_the_server_exits(model, tmp_path, monkeypatch):
    """An exception inside the plugin's step (injected by the test hook in ``impl_common``) takes
    vLLM's own path for a dead engine: the requests in flight end with an error (a 5xx, or an
    error event in the stream), the server exits by itself, and nothing hangs."""
    monkeypatch.setenv("CAM_VLLM_INJECT_FAULT", "4")
    log = tmp_path / "serve.log"
    flags = ("--enforce-eager", "--dtype", "float32", "--block-size", "32", "--max-model-len", "2048")
    with served(model, log, *flags, "--kv-policy", "cam-streaming", "--kv-window-tokens", "64") as base:
        name = httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]
        body = {
            "model": name,
            "prompt": token_prompts(1, 300, seed=5)[0],
            "max_tokens": 32,
            "ignore_eos": True,
        }

        def plain() -> httpx.Response:
            return httpx.post(f"{base}/v1/completions", json=body, timeout=120)

        def streamed() -> str:
            with httpx.stream(
                "POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120
            ) as r:
                return f"{r.status_code} " + "".join(r.iter_text())

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got_plain, got_stream = pool.submit(plain), pool.submit(streamed)
            response, stream = got_plain.result(timeout=180), got_stream.result(timeout=180)
        assert response.status_code >= 500, response.text
        assert stream.startswith("5") or '"error"' in stream, stream[-2000:]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # vLLM's API server shuts down once its engine is dead
            try:
                httpx.get(f"{base}/health", timeout=5)
            except httpx.HTTPError:
                break
            time.sleep(2)
        else:
            pytest.fail("the server still answers 120 s after its engine died")
    text = log.read_text()
    assert "cam-vllm: fault injected by CAM_VLLM_INJECT_FAULT=4" in text, text[-3000:]


# --------------------------------------------------------------------------------------------
# Per-request full cache (vllm_xargs {"kv_policy": "none"})
# --------------------------------------------------------------------------------------------


def _greedy_with(
    base: str, model_name: str, prompt: list[int], xargs: dict | None
) -> tuple[list[int], list[float]]:
    fields = {"temperature": 0, "logprobs": 0, "ignore_eos": True, "return_token_ids": True}
    if xargs is not None:
        fields["vllm_xargs"] = xargs
    choice = _complete(base, model_name, prompt, **fields)
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def _two_beside_two(server, model_name, model, prompt, xargs, oracle, other) -> list[float]:
    """Two requests of ``prompt`` with ``xargs`` sent together with two of ``other`` without:
    the first equal the reference engine under ``oracle``, the others their output alone.
    Returns the oracle's logprobs."""
    from vllm_helpers import reference_greedy

    alone = _greedy_with(server, model_name, other, None)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        asked = [pool.submit(_greedy_with, server, model_name, prompt, xargs) for _ in range(2)]
        others = [pool.submit(_greedy_with, server, model_name, other, None) for _ in range(2)]
        asked_results = [f.result() for f in asked]
        other_results = [f.result() for f in others]
    ref_tokens, ref_logprobs, _ = reference_greedy(model, oracle, prompt, 12)
    for tokens, logprobs in asked_results:
        assert tokens == ref_tokens
        assert logprobs == pytest.approx(ref_logprobs, abs=2e-3)
    for tokens, logprobs in other_results:
        assert tokens == alone[0]
        assert logprobs == pytest.approx(alone[1], abs=2e-3)
    return ref_logprobs


def test_a_request_can_ask_for_the_full_cache(server, model):
    """A 400-token prompt (window 64) with kv_policy none equals the full-cache oracle, while an
    evicting request runs in the same batches and gets what it gets alone; the route and the
    metrics show it, and nothing is left registered afterwards."""

    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy

    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    report = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()
    assert "none" in report["per_request"]["vllm_xargs"]["kv_policy"]
    prompt, other = token_prompts(2, 400, seed=13)
    before = parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)
    oracle = build_policy(KVPolicyConfig(policy="none"))
    ref_logprobs = _two_beside_two(server, model_name, model, prompt, {"kv_policy": "none"}, oracle, other)
    evicted = _greedy_with(server, model_name, prompt, None)
    assert evicted[1] != pytest.approx(ref_logprobs, abs=2e-3), "the policy must matter for this prompt"
    for own in {report["policy"], report["resolved"]["name"]}:  # e.g. h2o (--kv-merge cam) and cam-h2o
        assert _greedy_with(server, model_name, prompt, {"kv_policy": own}) == evicted
    time.sleep(1.0)  # cam-vllm's gauges are flushed every 0.25 s
    after = parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)
    name = "cam_vllm:requests_full_cache_total"
    assert after[name] - before.get(name, 0.0) == 2
    assert after["cam_vllm:requests_full_cache_running"] == 0
    assert after["cam_vllm:requests_tracked"] == 0


@pytest.mark.parametrize(
    "xargs, prompt_len, max_tokens, message",
    [
        ({"kv_policy": "tova"}, 50, 8, "is not available per request"),
        ({"kv_policy": 3}, 50, 8, "is not available per request"),
        ({"kv_window_tokens": 32}, 50, 8, "own window on a 'streaming' server only"),
        ({"kv_budget": 0.1}, 50, 8, "cannot be set per request"),
        ({"kv_policy": "none"}, 1200, 200, "pool holds 1248"),  # 40 blocks of 32, one is the null block
    ],
)
def test_a_per_request_kv_field_the_server_cannot_honour_is_a_400(
    server, xargs, prompt_len, max_tokens, message
):
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    resolved = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()["resolved"]
    body = {
        "model": model_name,
        "prompt": token_prompts(1, prompt_len, seed=3)[0],
        "max_tokens": max_tokens,
        "vllm_xargs": xargs,
    }
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    if "pool holds" in message and resolved["max_model_len"] <= 1248:
        # a held-prompt server's max_model_len fits the pool: vLLM caps the output at
        # max_model_len, so the full-cache request fits and is served, not refused
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["total_tokens"] <= resolved["max_model_len"]
        return
    assert r.status_code == 400, r.text
    assert message in r.json()["error"]["message"]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_a_request_can_ask_to_have_its_prompt_read_before_the_choice(server, model):
    """On the h2o server (no hold of its own), a 400-token prompt with kv_prompt_hold true equals
    the oracle with the prompt hold, next to requests without it that get what they get alone;
    the route offers it; the other servers refuse it with a 400 naming why."""
    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy

    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    report = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()
    prompt, other = token_prompts(2, 400, seed=17)
    if report["resolved"]["score"] != "h2o":  # streaming chooses nothing; snapkv always holds
        body = {"model": model_name, "prompt": prompt[:50], "max_tokens": 4}
        bad = not report["resolved"]["prompt_hold"]
        r = httpx.post(
            f"{server}/v1/completions", json={**body, "vllm_xargs": {"kv_prompt_hold": bad}}, timeout=60
        )
        assert r.status_code == 400 and "kv_prompt_hold" in r.json()["error"]["message"], r.text
        assert "kv_prompt_hold" not in report["per_request"]["vllm_xargs"]
        return
    assert report["per_request"]["vllm_xargs"]["kv_prompt_hold"] == [True]
    config = KVPolicyConfig(
        **{**report["settings"], "prompt_hold": True, "block_size": report["resolved"]["block_size"]}
    )
    oracle = build_policy(config, report["resolved"]["max_model_len"])
    ref_logprobs = _two_beside_two(server, model_name, model, prompt, {"kv_prompt_hold": True}, oracle, other)
    assert _greedy_with(server, model_name, prompt, None)[1] != pytest.approx(ref_logprobs, abs=2e-3)
    r = httpx.post(
        f"{server}/v1/completions",
        json={
            "model": model_name,
            "prompt": prompt[:50],
            "max_tokens": 4,
            "vllm_xargs": {"kv_prompt_hold": 2},
        },
        timeout=60,
    )
    assert r.status_code == 400 and "true or false" in r.json()["error"]["message"], r.text
    time.sleep(1.0)
    after = parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)
    assert after["cam_vllm:requests_tracked"] == 0


# --------------------------------------------------------------------------------------------
# Per-request smaller window (vllm_xargs {"kv_window_tokens": N}, plain streaming servers)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def streaming_server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-streaming") / "serve.log"
    with served(model, log, *FLAGS, "--kv-policy", "streaming") as base:
        yield base


def test_a_request_can_keep_a_smaller_window_on_a_streaming_server(streaming_server, model):
    """A 400-token prompt with its own 32-token window (the server keeps 64) equals the oracle
    with a 32-token window, next to a request with the server's window that gets what it gets
    alone; values the server cannot honour are 400s; the scheduler frees the smaller window's
    blocks (fewer tokens retained) and keeps no state afterwards."""

    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy

    server = streaming_server
    model_name = httpx.get(f"{server}/v1/models", timeout=10).json()["data"][0]["id"]
    report = httpx.get(f"{server}/v1/kv_policy", timeout=10).json()
    assert report["per_request"]["vllm_xargs"]["kv_window_tokens"] == {
        "multiple_of": 32,
        "min": 32,
        "max": 64,
    }
    prompt, other = token_prompts(2, 400, seed=21)
    oracle = build_policy(KVPolicyConfig(policy="streaming", sink_tokens=4, window_tokens=32, block_size=32))
    ref_logprobs = _two_beside_two(server, model_name, model, prompt, {"kv_window_tokens": 32}, oracle, other)
    assert _greedy_with(server, model_name, prompt, None)[1] != pytest.approx(ref_logprobs, abs=2e-3)
    for bad in (48, 96, "32"):
        body = {
            "model": model_name,
            "prompt": prompt[:50],
            "max_tokens": 4,
            "vllm_xargs": {"kv_window_tokens": bad},
        }
        r = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400 and "kv_window_tokens" in r.json()["error"]["message"], r.text
    time.sleep(1.0)
    after = parse_metrics(httpx.get(f"{server}/metrics", timeout=10).text)
    assert after["cam_vllm:requests_tracked"] == 0
