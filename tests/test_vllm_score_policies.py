"""Score-driven policies (h2o, tova, scissorhands, corm, snapkv; plain and cam-) in a real vLLM CPU engine.

One engine per policy (the matrix), each run through start-up, the oracle (greedy tokens and
logprobs equal to the block-granular reference engine, same prefill chunks), the memory bound
(blocks held per request from vLLM's own accounting: at most sinks + heavy + window + 1 block)
and isolation (a request's output alone equals its output beside others). The engine-free test
in ``test_vllm_worker.py`` covers odd chunkings, every merge rule and per-head state.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("vllm")

from vllm_helpers import make_llm, run_sampled, running, token_prompts  # noqa: E402

from cam_vllm.config import KVPolicyConfig  # noqa: E402
from cam_vllm.policies import SCORES, build_policy  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(900)]

BLOCK = 32
SINKS, HEAVY, WINDOW = 4, 64, 64
STEP = 32  # prefill chunks of one block: the reference is fed the same chunks
POOL = 64  # blocks incl. the null block
NEW_TOKENS = 16
BOUND = 1 + HEAVY // BLOCK + WINDOW // BLOCK + 1  # sink block + heavy + window + one block
HOLD = 256  # a bounded prompt hold (``name@tokens``): the policy keeps 160, prompts compress at 256
MATRIX = [name for base in SCORES for name in (base, f"cam-{base}")] + [f"cam-snapkv@{HOLD}"]


def settings(name: str) -> dict:
    name, _, hold = name.partition("@")
    heavy = {} if name.endswith("streaming") else {"heavy_tokens": HEAVY}
    bounded = {"prompt_hold_tokens": int(hold)} if hold else {}
    return {"policy": name, "sink_tokens": SINKS, "window_tokens": WINDOW, **heavy, **bounded}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from vllm_helpers import make_peaky_model

    return make_peaky_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def prompts():
    return [token_prompts(1, n, seed=i)[0] for i, n in enumerate((300, 77, 190))]


def reference(model_path, name: str, prompt: list[int], max_tokens: int = NEW_TOKENS):
    """Greedy tokens, logprobs and cache of the reference engine, prompt fed in STEP-token chunks."""
    from vllm_helpers import reference_greedy

    policy = build_policy(KVPolicyConfig(**settings(name), block_size=BLOCK))
    return reference_greedy(model_path, policy, prompt, max_tokens, chunk=STEP)


def _params(n: int, logprobs: bool = False):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0 if logprobs else None)


@contextlib.contextmanager
def _pooled_engine(
    model, name: str, seed: int, pool: int, max_num_seqs: int, chunk: int, max_model_len: int = 2048, **extra
):
    """An engine of policy ``name`` on a pool of ``pool`` blocks with prefill chunks of ``chunk``
    tokens (the batching and preemption tests), shut down afterwards."""
    llm = make_llm(
        model,
        block_size=BLOCK,
        max_model_len=max_model_len,
        enable_prefix_caching=False,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=chunk,
        num_gpu_blocks_override=pool,
        additional_config={"kv_policy": {**settings(name), "seed": seed}},
        **extra,
    )
    with running(llm):
        yield llm


def _generate(llm, prompts, n=NEW_TOKENS):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(n, True), use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    lps = [
        [s[t].logprob for s, t in zip(o.outputs[0].logprobs, tok, strict=True)]
        for o, tok in zip(outs, tokens, strict=True)
    ]
    return tokens, lps


@pytest.mark.parametrize("name", MATRIX)
def test_policy_in_vllm_equals_its_oracle_and_bounds_memory(model, prompts, name):
    ev = build_policy(KVPolicyConfig(**settings(name), block_size=BLOCK)).eviction
    held, bounded = ev.holds_prompt, ev.hold_span > 0
    llm = make_llm(
        model,
        block_size=BLOCK,
        # a prompt held whole, of max_model_len tokens, must fit the pool at once (vLLM checks it)
        max_model_len=(POOL - 1) * BLOCK if held and not bounded else 2048,
        enable_prefix_caching=False,
        max_num_batched_tokens=STEP,
        max_num_seqs=1,  # one request per step: vLLM's chunks are exactly STEP tokens
        num_gpu_blocks_override=POOL,
        additional_config={"kv_policy": settings(name)},
    )
    try:
        got, lps = _generate(llm, prompts)
        for prompt, tokens, logprobs in zip(prompts, got, lps, strict=True):
            ref_tokens, ref_lps, _ = reference(model, name, prompt)
            assert tokens == ref_tokens, f"{name}: vLLM differs from the oracle"
            torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_lps), atol=2e-4, rtol=1e-4)

        # memory: a request far longer than its budget keeps at most sinks + heavy + window + 1
        # block; a held prompt (snapkv) occupies its whole size until it has been read (a bounded
        # hold: its size, + the block being written), then the same
        samples = run_sampled(llm, token_prompts(1, 1500, seed=7), _params(400), POOL)
        if held:
            read = -(-1500 // STEP)  # steps that read the prompt (the usage gauge lags a step)
            reading = max(s["blocks"] for s in samples[: read + 1])
            if bounded:
                assert HOLD // BLOCK <= reading <= HOLD // BLOCK + 1, f"{name}: {reading} blocks held"
            else:
                assert reading == -(-1500 // BLOCK), f"{name}: prompt not held"
            samples = samples[read + 1 :]
        peak = max(s["blocks"] for s in samples)
        assert BOUND - 1 <= peak <= BOUND, f"{name}: peak {peak} blocks, bound {BOUND}"
        assert samples[-1]["blocks"] == 0

        # isolation: the first prompt beside others equals its own run
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], _params(NEW_TOKENS), use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] == got
    finally:
        import contextlib
        import gc

        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def test_heavy_region_differs_per_kv_head_and_from_streaming(model, prompts):
    """On the tiny model (whose heads attend differently), the oracle's heavy slots hold tokens
    from beyond the region, chosen differently by the two KV heads; the output differs from
    StreamingLLM with the same memory."""
    _, _, cache = reference(model, "h2o", prompts[0])
    ev = build_policy(KVPolicyConfig(**settings("h2o"), block_size=BLOCK)).eviction
    for st in cache.layers.values():
        heavy = (st.positions >= ev.heavy_start) & (st.positions < ev.prefix_end)
        pos = st.state["pos"][heavy]
        assert (pos >= ev.prefix_end).any()
        assert not torch.equal(pos[:, 0], pos[:, 1])
        assert (pos < len(prompts[0]) + NEW_TOKENS - WINDOW).all(), "heavy tokens are older than the window"


def test_vllm_serve_with_a_score_policy(model, tmp_path):
    """`vllm serve` with `--kv-policy h2o --kv-merge cam`: a completion longer than the budget, the
    policy route and the metrics label name cam-h2o."""
    httpx = pytest.importorskip("httpx")
    from vllm_helpers import served

    flags = [
        *("--enforce-eager", "--dtype", "float32", "--block-size", "32", "--max-model-len", "2048"),
        *("--kv-policy", "h2o", "--kv-merge", "cam", "--kv-heavy-tokens", "64", "--kv-window-tokens", "64"),
    ]
    with served(model, tmp_path / "serve.log", *flags) as base:
        prompt = token_prompts(1, 600, seed=3)[0]
        body = {"model": str(model), "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 20
        resolved = httpx.get(f"{base}/v1/kv_policy", timeout=10).json()["resolved"]
        assert (resolved["name"], resolved["score"], resolved["heavy_tokens"]) == ("cam-h2o", "h2o", 64)
        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        assert 'policy="cam-h2o"' in metrics


def test_continuous_batching_and_aborts_do_not_change_a_request(model):
    """cam-h2o, 8 requests of mixed lengths in flight (chunked prefill of 256 tokens), one aborted
    midway: every finished request equals its run alone, and the pool empties."""
    from vllm_helpers import blocks_in_use

    pool = 64
    with _pooled_engine(model, "cam-h2o", seed=5, pool=pool, max_num_seqs=8, chunk=256) as llm:
        lengths = (900, 700, 500, 1000, 300, 800, 600, 400)
        prompts = [token_prompts(1, n, seed=n)[0] for n in lengths]
        engine = llm.llm_engine
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, _params(40 + 10 * i))
        out, step = {}, 0
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = list(o.outputs[0].token_ids)
            step += 1
            if step == 30:
                engine.abort_request(["r3"])
        assert "r3" not in out or len(out["r3"]) < 70 and set(out) >= {f"r{i}" for i in range(8) if i != 3}
        assert blocks_in_use(llm, pool) == 0
        for i in (0, 4, 7):
            alone = llm.generate([{"prompt_token_ids": prompts[i]}], _params(40 + 10 * i), use_tqdm=False)
            assert list(alone[0].outputs[0].token_ids) == out[f"r{i}"], f"r{i} changed beside others"


@pytest.mark.parametrize(
    ("name", "pool", "max_model_len"),
    [
        ("h2o", 16, 2048),
        ("cam-h2o", 16, 2048),
        ("cam-streaming", 16, 2048),
        ("snapkv", 32, 31 * BLOCK),  # one held prompt of max_model_len fits the pool, six do not
    ],
)
def test_preempted_requests_equal_their_runs_alone(model, name, pool, max_model_len):
    """Preemption by recompute: admission checks only the first chunk (scheduler_reserve_full_isl
    off) and the pool holds ~2 requests at their bound, so vLLM preempts running requests and
    recomputes them by prefill of prompt + generated tokens. The recompute is chunked differently
    from the first run; waves make the heavy region and the merges independent of chunking (and
    CaM's draws are keyed by position), so every request's greedy output equals its run alone,
    cam-streaming's too. snapkv holds every prompt whole until read: a recomputed request reads its
    prompt again and chooses the same tokens."""
    from vllm_helpers import blocks_in_use, metric_values

    with _pooled_engine(
        model,
        name,
        seed=3,
        pool=pool,
        max_num_seqs=6,
        chunk=64,
        max_model_len=max_model_len,
        scheduler_reserve_full_isl=False,
    ) as llm:
        lengths = (420, 610, 350, 700, 500, 290)
        prompts = [token_prompts(1, n, seed=n + 1)[0] for n in lengths]
        engine = llm.llm_engine
        for i, p in enumerate(prompts):
            engine.add_request(f"p{i}", {"prompt_token_ids": p}, _params(48))
        out = {}
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = list(o.outputs[0].token_ids)
        assert metric_values(llm).get("vllm:num_preemptions", 0) > 0, "the pool did not force a preemption"
        assert blocks_in_use(llm, pool) == 0
        for i, p in enumerate(prompts):
            alone = llm.generate([{"prompt_token_ids": p}], _params(48), use_tqdm=False)
            assert list(alone[0].outputs[0].token_ids) == out[f"p{i}"], f"p{i} changed by preemption"
