"""``cam-vllm eval --engine vllm``: the harness on a real vLLM engine with the plugin, checked
against the block-granular token-by-token oracle (the parallel engine with the same block size)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from cam_vllm.config import KVPolicyConfig  # noqa: E402
from cam_vllm.errors import CamVllmError  # noqa: E402
from cam_vllm.eval.engines import ScoreRequest  # noqa: E402
from cam_vllm.eval.vllm_engine import CPU_BLOCK_SIZE, VllmBackend  # noqa: E402

LENGTH = 300


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vllm_helpers import make_peaky_model

    return make_peaky_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def ids():
    from vllm_helpers import token_prompts

    return token_prompts(1, LENGTH, seed=3)[0]


def test_zero_shot_and_foreign_block_sizes_are_refused_before_any_engine_starts(tmp_path):
    backend = VllmBackend(tmp_path)
    with pytest.raises(CamVllmError, match="fraction of each request"):
        backend.loglikelihoods([ScoreRequest((1, 2), (3,))], KVPolicyConfig(), 0)
    with pytest.raises(CamVllmError, match="blocks of 32"):
        backend.token_nlls([1] * 64, KVPolicyConfig(policy="streaming", budget=0.5, block_size=16), 0)
    with pytest.raises(CamVllmError, match="chunk"):
        VllmBackend(tmp_path, chunk=0)
    assert backend._llm is None


@pytest.mark.engine
@pytest.mark.slow
def test_vllm_perplexity_equals_the_block_granular_oracle(tiny, ids):
    """Chunks of 16 divide the 32-token blocks, so evictions and merges fall on the same tokens
    as in the per-token oracle with blocks of 32: the NLLs agree to float error."""
    from transformers import AutoModelForCausalLM

    from cam_vllm.eval.parallel import ParallelBackend

    oracle = ParallelBackend(AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval())
    backend = VllmBackend(tiny, chunk=16, max_model_len=1024)
    try:
        for policy in ("streaming", "cam-streaming", "weighted-streaming", "kvmerger-streaming"):
            cfg = KVPolicyConfig(policy=policy, budget=0.3, seed=5, merge_similarity=0.0)
            merged_before = (backend.stats.merged, oracle.stats.merged)
            growth_before = (backend.stats.growth_sum, oracle.stats.growth_sum)
            got = backend.token_nlls(ids, cfg, seed=5)
            want = oracle.token_nlls(ids, cfg.model_copy(update={"block_size": CPU_BLOCK_SIZE}), seed=5)
            assert got.shape == want.shape == (LENGTH - 1,)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=1e-3)
            # the same merges: vLLM's worker counts them in the engine core, the oracle in-process
            merged = backend.stats.merged - merged_before[0], oracle.stats.merged - merged_before[1]
            assert merged[0] == merged[1] and (merged[0] > 0) == (policy != "streaming"), (policy, merged)
            # and the same value growth where the oracle measures it (its CaM closed form does not)
            growth = backend.stats.growth_sum - growth_before[0], oracle.stats.growth_sum - growth_before[1]
            if policy in ("weighted-streaming", "kvmerger-streaming"):
                assert growth[0] == pytest.approx(growth[1], rel=1e-3) and growth[0] > 0, (policy, growth)
            assert (growth[0] > 0) == (policy != "streaming"), (policy, growth)
        # the cache really evicted and merged, counted by the plugin's metrics in the engine core
        assert backend.stats.evicted > 0
        assert 0 < backend.stats.merged <= backend.stats.merge_decisions
        assert 0.2 < backend.stats.mean_budget < 0.5
        full = backend.token_nlls(ids, KVPolicyConfig(), seed=0)
        assert not torch.allclose(full.float(), got.float(), atol=1e-2), "eviction changes the NLLs"
    finally:
        backend.close()


@pytest.mark.engine
@pytest.mark.slow
def test_token_exact_vllm_equals_the_per_token_oracle(tiny, ids):
    """``token_exact``: vLLM frees whole blocks of 32 but every query sees exactly the per-token
    sinks and window (the plugin computes the output, masking inside held blocks), and CaM merges
    a token at every step: the NLLs are the per-token (block size 1) oracle's, which the
    block-granular policy's are not."""
    from transformers import AutoModelForCausalLM

    from cam_vllm.eval.parallel import ParallelBackend

    oracle = ParallelBackend(AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval())
    backend = VllmBackend(tiny, chunk=16, max_model_len=1024)
    try:
        for policy in ("cam-streaming", "streaming"):
            # budget 0.3 of 300 tokens: 4 sinks + a window of 86, not whole blocks
            cfg = KVPolicyConfig(policy=policy, budget=0.3, seed=5, token_exact=True)
            merged_before = (backend.stats.merged, oracle.stats.merged)
            got = backend.token_nlls(ids, cfg, seed=5)
            per_token = cfg.model_copy(update={"token_exact": False, "block_size": 1})
            want = oracle.token_nlls(ids, per_token, seed=5)
            torch.testing.assert_close(got.float(), want.float(), atol=2e-3, rtol=1e-3)
            merged = backend.stats.merged - merged_before[0], oracle.stats.merged - merged_before[1]
            if policy == "streaming":
                assert merged == (0, 0)
            else:  # the same merges; vLLM also merges the token leaving after the last query
                assert merged[1] > 0 and 0 <= merged[0] - merged[1] <= 0.01 * merged[1], merged
            blocks = oracle.token_nlls(
                ids, per_token.model_copy(update={"block_size": CPU_BLOCK_SIZE}), seed=5
            )
            assert not torch.allclose(blocks.float(), want.float(), atol=1e-2), (
                "blocks of 32 attend differently"
            )
        # the engine of token-exact streaming refuses a request's own (block-planned) window by name
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, extra_args={"kv_window_tokens": 32})
        with pytest.raises(Exception, match="token-exact"):
            backend._llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=False)
    finally:
        backend.close()
