"""The reference engine: PolicyCache on its own, and inside a (tiny, random) transformers Llama."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.rng import merge_uniforms
from cam_vllm.policies import build_policy
from cam_vllm.reference.cache import PolicyCache
from cam_vllm.reference.engine import ReferenceEngine


def naive_authors_path(q, k, v, sinks, window, m, seed, layer=0):
    """The authors' per-token perplexity path, written as plainly as possible.

    After each step the cache keeps the sinks and the newest ``window - 1`` tokens (the next
    query makes it ``window``); the one token that leaves is merged into the ``m`` oldest
    window tokens with p = clamp(Abar_i / mean(Abar_targets), 0, 1), one draw per KV head.
    """
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv
    keys, vals, abar, kept, outs = {}, {}, {}, [], []
    for t in range(q.shape[0]):
        keys[t], vals[t], abar[t] = (
            k[t].double(),
            v[t].double().clone(),
            torch.zeros(hkv, dtype=torch.float64),
        )
        kept.append(t)
        kk = torch.stack([keys[j] for j in kept])  # [N, Hkv, D]
        vv = torch.stack([vals[j] for j in kept])
        out = torch.zeros(hq, q.shape[2], dtype=torch.float64)
        for h in range(hq):
            w = torch.softmax((kk[:, h // g] @ q[t, h].double()) * q.shape[2] ** -0.5, dim=0)
            out[h] = w @ vv[:, h // g]
            for n, j in enumerate(kept):
                abar[j][h // g] += w[n] / g
        outs.append(out)
        if len(kept) > sinks + window - 1:
            i = kept[sinks]
            kept.remove(i)
            targets = kept[sinks : sinks + m]
            ref = torch.stack([abar[j] for j in targets]).mean(0)
            p = torch.nan_to_num(abar[i] / ref, nan=0.0, posinf=1.0).clamp(0, 1)
            u = merge_uniforms(seed, layer, torch.tensor([i]), hkv)[0].double()
            mask = (u < p).double()
            for j in targets:
                vals[j] = vals[j] + mask[:, None] * vals[i] / len(targets)
    return torch.stack(outs)


@pytest.mark.parametrize("m", [1, 3, 16])
def test_per_token_mode_is_exactly_the_authors_path(m):
    torch.manual_seed(0)
    steps, hq, hkv, d = 40, 6, 2, 8
    q, k, v = torch.randn(steps, hq, d), torch.randn(steps, hkv, d), torch.randn(steps, hkv, d)
    cfg = KVPolicyConfig(policy="cam-streaming", sink_tokens=2, window_tokens=7, merge_targets=m, seed=5)
    cache = PolicyCache(build_policy(cfg))
    ours = torch.cat(
        [cache.attend(0, q[t : t + 1], k[t : t + 1], v[t : t + 1], d**-0.5) for t in range(steps)]
    )
    oracle = naive_authors_path(q, k, v, sinks=2, window=7, m=m, seed=5)
    torch.testing.assert_close(ours.double(), oracle, atol=2e-5, rtol=1e-5)
    assert cache.stats.merged > 0 and cache.stats.evicted_tokens == steps - 2 - 7 + 1


# ---------------------------------------------------------------- model-level (tiny Llama)


@pytest.fixture(scope="module")
def tiny_llama():
    from hf_helpers import tiny_hf_llama

    # GQA as in SmolLM2: 9 query heads over 3 KV heads
    return tiny_hf_llama(
        vocab_size=256,
        hidden_size=144,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=16,
        max_position_embeddings=1024,
    )


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1)).tolist()


def run(model, cfg, ids, chunk=1, seed=None):
    eng = ReferenceEngine(model, cfg, seed=seed)
    eng.start(len(ids))
    logits = torch.cat([eng.feed(ids[s : s + chunk]) for s in range(0, len(ids), chunk)])
    return logits, eng.cache


def test_full_policy_matches_transformers_own_attention(tiny_llama, ids):
    ours, _ = run(tiny_llama, KVPolicyConfig(), ids, chunk=96)
    tiny_llama.set_attn_implementation("sdpa")
    with torch.inference_mode():
        native = tiny_llama(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, native, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["streaming", "cam-streaming"])
@pytest.mark.parametrize("block", [1, 16])
def test_window_covering_the_sequence_equals_full_cache(tiny_llama, ids, policy, block):
    full, _ = run(tiny_llama, KVPolicyConfig(), ids)
    cfg = KVPolicyConfig(policy=policy, sink_tokens=4, window_tokens=96, block_size=block)
    windowed, cache = run(tiny_llama, cfg, ids)
    assert torch.equal(full, windowed)
    assert cache.stats.evicted_tokens == 0


@pytest.mark.parametrize("block", [1, 16])
def test_cam_with_zero_merge_probability_equals_streaming(tiny_llama, ids, block):
    base = dict(sink_tokens=4, window_tokens=32, block_size=block)
    stream, _ = run(tiny_llama, KVPolicyConfig(policy="streaming", **base), ids)
    never, cache = run(
        tiny_llama, KVPolicyConfig(policy="cam-streaming", merge_clamp=(0.0, 0.0), **base), ids
    )
    assert torch.equal(stream, never)
    assert cache.stats.merge_decisions > 0 and cache.stats.merged == 0
    merged, cache = run(tiny_llama, KVPolicyConfig(policy="cam-streaming", **base), ids)
    assert cache.stats.merged > 0 and not torch.equal(stream, merged)


@pytest.mark.parametrize(("block", "chunk"), [(1, 1), (16, 1), (16, 7)])
def test_retained_cache_never_exceeds_sinks_plus_window(tiny_llama, ids, block, chunk):
    cfg = KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=32, block_size=block)
    _, cache = run(tiny_llama, cfg, ids, chunk=chunk)
    sink_end = cache.policy.eviction.sink_end
    # a step of C tokens is written before the tokens it pushes out leave: + C - 1
    assert cache.stats.max_retained <= sink_end + 32 + chunk - 1
    for st in cache.layers.values():  # between steps, what the next query will see is all that is left
        assert st.positions.numel() <= sink_end + 32 - 1


def test_streaming_chunked_prefill_attends_like_token_by_token(tiny_llama, ids):
    cfg = KVPolicyConfig(policy="streaming", sink_tokens=4, window_tokens=32, block_size=16)
    one, _ = run(tiny_llama, cfg, ids, chunk=1)
    for chunk in (5, 16, 96):
        chunked, _ = run(tiny_llama, cfg, ids, chunk=chunk)
        torch.testing.assert_close(one, chunked, atol=1e-4, rtol=1e-4)


def test_keys_never_change_sinks_never_receive_merges(tiny_llama, ids):
    """Layer 0's k/v depend only on the tokens, so they can be compared with the full cache."""
    cfg = KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=32, merge_clamp=(1.0, 1.0))
    _, full = run(tiny_llama, KVPolicyConfig(), ids)
    _, cam = run(tiny_llama, cfg, ids)
    f0, c0 = full.layers[0], cam.layers[0]
    pos = c0.positions
    assert torch.equal(c0.k, f0.k[pos]), "keys are never merged"
    assert torch.equal(c0.v[:4], f0.v[:4]), "sink values never change"
    assert not torch.equal(c0.v[4:], f0.v[pos[4:]]), "window values received merges"
    assert cam.stats.merged == cam.stats.merge_decisions > 0


def test_same_seed_same_merges_other_seed_other_merges(tiny_llama, ids):
    # clamp to [0, 0.5] so draws matter: in a random model older tokens hold more accumulated
    # attention than the window, and p would almost always be 1
    cfg = KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=16, merge_clamp=(0.0, 0.5))
    a, ca = run(tiny_llama, cfg, ids, seed=1)
    b, cb = run(tiny_llama, cfg, ids, seed=1)
    c, cc = run(tiny_llama, cfg, ids, seed=2)
    assert torch.equal(a, b) and ca.stats == cb.stats
    assert not torch.equal(a, c)
    assert 0.3 < ca.stats.merge_rate < 0.6 and ca.stats.merged != cc.stats.merged


def test_greedy_runs_and_is_deterministic(tiny_llama, ids):
    cfg = KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=32, block_size=16)
    eng = ReferenceEngine(tiny_llama, cfg)
    out1 = eng.greedy(ids[:64], 20, prefill_chunk=16)
    out2 = eng.greedy(ids[:64], 20, prefill_chunk=16)
    assert out1 == out2 and len(out1) == 20


@pytest.mark.parametrize(
    "cfg",
    [
        KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=16, merge_clamp=(0.0, 0.5)),
        KVPolicyConfig(policy="cam-h2o", sink_tokens=4, heavy_tokens=8, window_tokens=8),
        KVPolicyConfig(policy="scissorhands", sink_tokens=4, heavy_tokens=16, window_tokens=16, block_size=4),
    ],
    ids=["cam-streaming", "cam-h2o", "scissorhands-block4"],
)
def test_steps_in_one_forward_equal_one_call_per_step(tiny_llama, ids, cfg):
    """``feed(..., steps=)`` runs each layer's steps before the next layer: same outputs, same
    merges and the same final cache as one ``feed`` per step (the eval's fast per-token path)."""
    steps = [20] + [1] * 30 + [7, 5] + [1] * 34
    one, _ = run(tiny_llama, cfg, ids, seed=3)
    eng_a = ReferenceEngine(tiny_llama, cfg, seed=3)
    eng_a.start(len(ids))
    a, starts = 0, []
    for n in steps:
        starts.append(eng_a.feed(ids[a : a + n]))
        a += n
    per_step = torch.cat(starts)
    eng_b = ReferenceEngine(tiny_llama, cfg, seed=3)
    eng_b.start(len(ids))
    cut = sum(steps[:33])
    layer_major = torch.cat(
        [eng_b.feed(ids[:cut], steps=steps[:33]), eng_b.feed(ids[cut:], steps=steps[33:])]
    )
    torch.testing.assert_close(layer_major, per_step, atol=1e-4, rtol=1e-4)
    a, b = eng_a.cache.stats, eng_b.cache.stats  # the same merges; growth sums to float error
    assert replace(a, growth_sum=0.0) == replace(b, growth_sum=0.0) and b.evicted_tokens > 0
    assert a.growth_sum == pytest.approx(b.growth_sum, rel=1e-6)
    if cfg.policy.startswith("cam"):
        assert eng_b.cache.stats.merged > 0
    for layer, st in eng_a.cache.layers.items():
        other = eng_b.cache.layers[layer]
        assert torch.equal(st.positions, other.positions)
        for name, t in st.state.items():
            assert torch.equal(t, other.state[name]), name
        torch.testing.assert_close(st.v, other.v, atol=1e-4, rtol=1e-4)
    if not cfg.policy.startswith("cam"):
        torch.testing.assert_close(one[: len(per_step)], per_step, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="do not split"):
        eng_b.feed(ids[:3], steps=[1, 1])


def test_batch_larger_than_one_is_refused(tiny_llama):
    eng = ReferenceEngine(tiny_llama)
    eng.start()
    with pytest.raises(ValueError, match="one sequence at a time"), eng._active():
        tiny_llama(input_ids=torch.zeros(2, 3, dtype=torch.long), use_cache=False)
