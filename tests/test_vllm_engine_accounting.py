"""KV accounting of a real vLLM CPU engine under a policy (scheduler side; outputs not asserted).

Blocks in use are read from vLLM's own accounting (``vllm:kv_cache_usage_perc``, i.e. the block
pool's free count) after every engine step. Two engines for the whole module: one with the
``streaming`` policy and one with the full cache, both on the same small pool.
"""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm_helpers import make_llm, make_tiny_model, run_sampled, token_prompts  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(600)]

BLOCK = 32
SINKS, WINDOW = 4, 64
SINK_BLOCKS, WINDOW_BLOCKS = 1, WINDOW // BLOCK
POOL = 32  # blocks, incl. vLLM's null block: 31 usable = 992 tokens
STEP = 32  # max_num_batched_tokens: prefill chunks of one block
POLICY = {"policy": "streaming", "sink_tokens": SINKS, "window_tokens": WINDOW}
COMMON = dict(block_size=BLOCK, num_gpu_blocks_override=POOL, max_num_batched_tokens=STEP, max_num_seqs=8)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def policy_llm(model):
    # max_model_len 2048 > the 992-token pool: only the policy's bound lets this start
    llm = make_llm(model, max_model_len=2048, additional_config={"kv_policy": POLICY}, **COMMON)
    yield llm
    del llm


def _params(n: int):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0)


def test_long_request_holds_at_most_sinks_plus_window_plus_one(policy_llm) -> None:
    samples = run_sampled(policy_llm, token_prompts(1, 700), _params(900), POOL)
    peak = max(s["blocks"] for s in samples)
    print(f"\nlong request (700 + 900 tokens = {1600 // BLOCK} blocks of full cache): peak {peak} blocks")
    assert len(samples) > 900
    assert peak <= SINK_BLOCKS + WINDOW_BLOCKS + 1
    assert peak >= SINK_BLOCKS + WINDOW_BLOCKS  # it did hold its window
    assert samples[-1]["blocks"] == 0  # everything back once it finished


def test_pool_empties_after_abort(policy_llm) -> None:
    engine = policy_llm.llm_engine
    aborted = []

    def abort_midway(step: int, sample: dict) -> None:
        if step == 40:
            engine.abort_request(["r0", "r1"])
            aborted.append(sample["blocks"])

    samples = run_sampled(policy_llm, token_prompts(3, 200, seed=5), _params(200), POOL, on_step=abort_midway)
    assert aborted and aborted[0] > 0
    assert max(s["blocks"] for s in samples) <= 3 * (SINK_BLOCKS + WINDOW_BLOCKS + 1)
    assert samples[-1]["blocks"] == 0


def _max_concurrency(llm) -> tuple[int, int]:
    samples = run_sampled(llm, token_prompts(8, 300, seed=2), _params(200), POOL)
    return max(s["running"] for s in samples), max(s["blocks"] for s in samples)


def test_more_requests_run_concurrently_under_the_policy(policy_llm, model) -> None:
    with_policy, blocks_policy = _max_concurrency(policy_llm)
    del policy_llm  # the full-cache engine below is the module's second and last
    full = make_llm(model, max_model_len=(POOL - 1) * BLOCK, **COMMON)
    try:
        without, blocks_full = _max_concurrency(full)
    finally:
        del full
    print(
        f"\n8 requests of 300 + 200 tokens on a {POOL}-block pool: {with_policy} concurrent with "
        f"streaming (peak {blocks_policy} blocks) vs {without} with the full cache "
        f"(peak {blocks_full} blocks)"
    )
    assert with_policy > without
    assert with_policy == 8
