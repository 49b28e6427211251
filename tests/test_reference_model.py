"""The reference engine on the real model (SmolLM2-135M-Instruct) and a real long text."""

from __future__ import annotations

import pytest
import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.data import long_text
from cam_vllm.reference.engine import ReferenceEngine

pytestmark = [pytest.mark.model, pytest.mark.slow]

NUM_TOKENS = 512
SINKS, WINDOW = 4, 60  # a budget of 64 tokens, 12.5% of the text


@pytest.fixture(scope="module")
def smollm2(prepared_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(max(torch.get_num_threads(), 2))
    model = AutoModelForCausalLM.from_pretrained(prepared_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(prepared_model)


def test_long_text_perplexity_full_beats_streaming_and_cam(smollm2):
    model, tok = smollm2
    ids = tok(long_text("essays", min_chars=6 * NUM_TOKENS))["input_ids"][:NUM_TOKENS]
    assert len(ids) == NUM_TOKENS
    results = {}
    # streaming attends per query exactly as token by token (tests/test_reference.py), so it may
    # be fed in chunks; CaM merges at the end of each step, so it runs token by token (the paper)
    for name, chunk in (("none", NUM_TOKENS), ("streaming", 64), ("cam-streaming", 1)):
        cfg = KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=None if name == "none" else WINDOW)
        eng = ReferenceEngine(model, cfg, seed=0)
        results[name] = eng.perplexity(ids, chunk_size=chunk)
        if name == "cam-streaming":
            merge_rate = eng.cache.stats.merge_rate
    print(
        f"\nperplexity of {NUM_TOKENS} essay tokens, SmolLM2-135M, sinks {SINKS} + window {WINDOW}: "
        + ", ".join(f"{k} {v:.3f}" for k, v in results.items())
        + f"; CaM merge rate {merge_rate:.3f}"
    )
    assert results["none"] <= results["streaming"]
    assert results["none"] <= results["cam-streaming"]
    assert 0.0 < merge_rate <= 1.0
    assert results["none"] < 40, "the prepared model should model English text well"
