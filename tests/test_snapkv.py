"""SnapKV and the prompt hold: the pure rules, and the reference cache against a direct computation.

The vLLM worker's side is checked against the same reference cache engine-free in
``test_vllm_worker.py`` (prompt-hold cases) and in a real engine in ``test_vllm_score_policies.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.attention import attention_with_probs, reduce_to_kv_heads
from cam_vllm.policies import build_policy
from cam_vllm.policies.snapkv import SnapKVScore, pool_by_position
from cam_vllm.reference.cache import PolicyCache


def snapkv(block: int = 1, heavy: int = 8, window: int = 8, sinks: int = 2, **extra) -> object:
    extra.setdefault("observation_window", min(8, window))
    cfg = KVPolicyConfig(
        policy=extra.pop("policy", "snapkv"),
        sink_tokens=sinks,
        heavy_tokens=heavy,
        window_tokens=window,
        block_size=block,
        **extra,
    )
    return build_policy(cfg)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), heads=st.integers(1, 3), kernel=st.sampled_from([1, 3, 5, 7, 15]))
def test_pooling_of_contiguous_positions_is_a_zero_padded_mean(n, heads, kernel):
    score = torch.rand(n, heads)
    got = pool_by_position(score, torch.arange(n)[:, None].expand(n, heads), kernel)
    want = torch.nn.functional.avg_pool1d(
        score.T[:, None], kernel, stride=1, padding=kernel // 2, count_include_pad=True
    )[:, 0].T
    torch.testing.assert_close(got, want)


def test_pooling_follows_positions_not_order_and_skips_gaps():
    # head 0 holds positions 0, 1, 10 (shuffled), head 1 positions 5, 6, 7
    pos = torch.tensor([[10, 6], [0, 5], [1, 7]])
    score = torch.tensor([[3.0, 1.0], [1.0, 2.0], [2.0, 4.0]])
    got = pool_by_position(score, pos, 3)
    assert got[:, 0].tolist() == pytest.approx([3.0 / 3, 3.0 / 3, 3.0 / 3])  # 10 alone; 0 and 1 together
    assert got[:, 1].tolist() == pytest.approx([7.0 / 3, 3.0 / 3, 5.0 / 3])


def test_settings_refused_with_the_fix():
    with pytest.raises(ValueError, match="longer than the window"):
        snapkv(window=16, observation_window=32)
    with pytest.raises(ValueError, match="odd"):
        KVPolicyConfig(policy="snapkv", window_tokens=64, pooling_kernel=8)
    with pytest.raises(ValueError, match="always holds the prompt"):
        KVPolicyConfig(policy="snapkv", window_tokens=64, prompt_hold=False)
    with pytest.raises(ValueError, match="score-driven"):
        KVPolicyConfig(policy="cam-streaming", window_tokens=64, prompt_hold=True)
    with pytest.raises(ValueError):
        KVPolicyConfig(policy="snapkv", window_tokens=64, pooling_kernel=257)
    with pytest.raises(ValueError, match="observation window"):
        SnapKVScore(window=0)


def test_hold_is_on_for_snapkv_and_opt_in_for_the_others():
    assert snapkv().eviction.holds_prompt
    assert not snapkv(policy="h2o").eviction.holds_prompt
    assert snapkv(policy="cam-h2o", prompt_hold=True).eviction.holds_prompt
    assert "after its prompt" in snapkv().describe()
    bounded = snapkv(block=16, heavy=32, window=48, prompt_hold_tokens=256)
    assert "holds at most 256 tokens" in bounded.describe()


@settings(max_examples=80, deadline=None)
@given(block=st.sampled_from([1, 4, 16]), prompt=st.integers(1, 200), n=st.integers(1, 260))
def test_a_held_prompt_keeps_everything_until_read_then_the_policy_rule(block, prompt, n):
    ev = snapkv(block=block, heavy=2 * block, window=2 * block).eviction
    pos = torch.arange(n)
    kept = ev.kept(pos, n, prompt)
    if n <= prompt:
        assert kept.all()
    else:
        assert torch.equal(kept, ev.retained(pos, n))
    # waves: the held queries share one wave, the first query past the prompt starts a new one
    waves = ev.waves(pos, hold_end=prompt)
    held = pos + 1 <= prompt
    if held.any():
        assert (waves[held] == 0).all()
    if held.any() and (~held).any():  # a new wave when the prompt's end frees something
        assert int(waves[~held][0]) == int(ev.window_start(prompt + 1) > ev.prefix_end)


@settings(max_examples=80, deadline=None)
@given(block=st.sampled_from([1, 4, 16]), extra=st.integers(1, 6), prompt=st.integers(1, 300))
def test_a_bounded_hold_holds_at_most_its_size_and_compresses_when_it_is_reached(block, extra, prompt):
    """Held blocks never exceed ``prompt_hold_tokens``; they reach it when the prompt is long
    enough; the hold keeps a superset of the policy's rule, becomes the rule past the prompt; the
    queries of a wave see one held set; the observed queries are the ``w`` before each choice."""
    size = 6 * block + extra * block  # the policy keeps sinks (1 block) + heavy 2 + window 3 blocks
    ev = snapkv(block=block, heavy=2 * block, window=3 * block, sinks=1, prompt_hold_tokens=size).eviction
    assert ev.hold_span == (extra + 1) * block and ev.max_held_tokens() == size
    peak = 0
    for n in range(1, prompt + 3):
        pos = torch.arange(n)
        kept = ev.kept(pos, n, prompt)
        assert (kept | ~ev.retained(pos, n)).all()
        if n > prompt:
            assert torch.equal(kept, ev.retained(pos, n))
        held = torch.unique(pos[kept] // block).numel()  # blocks holding a kept token
        peak = max(peak, held * block)
    assert peak <= size
    if prompt >= size:
        assert peak == size
    pos = torch.arange(prompt + 2)
    waves = ev.waves(pos, hold_end=prompt)
    starts = torch.where(pos + 1 <= prompt, ev.held_window_start(pos + 1), ev.window_start(pos + 1))
    new = torch.nonzero(waves[1:] != waves[:-1]).flatten() + 1  # first query of each later wave
    assert torch.equal(new, torch.nonzero(starts[1:] != starts[:-1]).flatten() + 1)
    w = ev.score.observation_window
    seen = ev.observed(pos, prompt)
    choices = [int(c) for c in new if c <= prompt]
    want = torch.zeros_like(seen)
    for c in [*choices, prompt]:
        want[max(c - w, 0) : c] = True
    assert torch.equal(seen, want & (pos < prompt))


def test_a_bounded_hold_is_refused_below_the_policy_and_off_the_blocks():
    with pytest.raises(ValueError, match=r"above what the policy keeps \(sinks \+ heavy \+ window = 96"):
        snapkv(block=16, heavy=32, window=48, prompt_hold_tokens=96).eviction  # noqa: B018
    with pytest.raises(ValueError, match="multiple of the block size 16.*use 128"):
        snapkv(block=16, heavy=32, window=48, prompt_hold_tokens=120).eviction  # noqa: B018
    with pytest.raises(ValueError, match="holds no prompt"):
        KVPolicyConfig(policy="h2o", window_tokens=64, prompt_hold=False, prompt_hold_tokens=256)
    with pytest.raises(ValueError, match="holds no prompt"):
        KVPolicyConfig(policy="streaming", window_tokens=64, prompt_hold_tokens=256)
    assert snapkv(policy="h2o", block=16, heavy=32, window=48, prompt_hold_tokens=256).eviction.holds_prompt


def _direct_choice(q, k, prompt, window, kernel, heavy_start, heavy_end, heavy, scale):
    """SnapKV computed directly: the last ``window`` prompt queries over the whole causal prompt,
    mean over each KV head's query heads, summed, pooled, the top ``heavy`` per head among the
    positions between the sinks and the recent window."""
    pos = torch.arange(prompt)
    vis = pos[None, :] <= pos[:, None]
    _, probs = attention_with_probs(q, k, k, vis, scale)
    kv = reduce_to_kv_heads(probs, k.shape[1])[prompt - window :].sum(0).T  # [N, H]
    cand = torch.arange(heavy_start, heavy_end)
    pooled = pool_by_position(kv[cand], cand[:, None].expand(-1, k.shape[1]), kernel)
    top = pooled.topk(heavy, dim=0).indices
    return [sorted(cand[top[:, h]].tolist()) for h in range(k.shape[1])]


@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_reference_cache_chooses_what_the_last_queries_attend_at_the_end_of_the_prompt(chunk):
    """Per token (block size 1): at the end of a 60-token prompt the heavy slots hold, per KV head,
    the top tokens by the pooled attention of the last 8 queries, whatever the chunking; nothing
    was evicted before; generated tokens never enter the heavy region."""
    torch.manual_seed(0)
    hq, hkv, d, scale = 4, 2, 16, 0.25
    prompt, window, kernel, heavy = 60, 8, 3, 10
    policy = snapkv(heavy=heavy, window=12, sinks=2, observation_window=window, pooling_kernel=kernel)
    ev = policy.eviction
    q, k, v = torch.randn(prompt + 5, hq, d), torch.randn(prompt + 5, hkv, d), torch.randn(prompt + 5, hkv, d)
    cache = PolicyCache(policy, prompt_len=prompt)
    step = chunk or prompt
    for s in range(0, prompt, step):
        e = min(s + step, prompt)
        cache.attend(0, q[s:e], k[s:e], v[s:e], scale)
        if e < prompt:
            assert cache.layers[0].positions.numel() == e, "nothing leaves while the prompt is read"
            assert cache.stats.evicted_tokens == 0
    st_ = cache.layers[0]
    heavy_slots = (st_.positions >= ev.heavy_start) & (st_.positions < ev.prefix_end)
    got = [sorted(st_.state["pos"][heavy_slots][:, h].tolist()) for h in range(hkv)]
    want = _direct_choice(
        q[:prompt],
        k[:prompt],
        prompt,
        window,
        kernel,
        ev.heavy_start,
        int(ev.window_start(prompt + 1)),
        heavy,
        scale,
    )
    assert got == want
    assert got[0] != got[1], "the two KV heads choose differently"
    assert st_.positions.numel() == ev.prefix_end + (prompt + 1 - int(ev.window_start(prompt + 1))) - 1
    for t in range(prompt, prompt + 5):  # decoding: generated tokens score 0, the choice stays
        cache.attend(0, q[t : t + 1], k[t : t + 1], v[t : t + 1], scale)
    st_ = cache.layers[0]
    heavy_slots = (st_.positions >= ev.heavy_start) & (st_.positions < ev.prefix_end)
    assert (st_.state["pos"][heavy_slots] < prompt).all()


def _direct_bounded(q, k, ev, prompt, scale):
    """SnapKV with a bounded hold computed directly, per KV head and query by query: each query
    attends to what its head keeps; before the query at each compression point the heavy tokens
    and the tokens leaving compete on the pooled attention of the observation queries since the
    previous compression (the last ``w`` at most), and the scores start afresh."""
    w, kernel, cap = ev.score.observation_window, ev.score.kernel, ev.heavy_tokens
    hq, hkv = q.shape[1], k.shape[1]
    g = hq // hkv

    def start_at(c: int) -> int:  # the window start query c sees
        return int(ev.held_window_start(c + 1) if c < prompt else ev.window_start(c + 1))

    points = [c for c in range(1, prompt + 1) if start_at(c) != start_at(c - 1)]
    scored = {x for p in points for x in range(max(p - w, 0), p)}
    out = []
    for h in range(hkv):
        heavy = list(range(ev.heavy_start, ev.prefix_end))
        start, score = ev.prefix_end, torch.zeros(prompt)
        for c in range(prompt + 1):
            new = start_at(c)
            if new != start:  # a compression before query c attends
                cand = torch.tensor(heavy + list(range(start, new)))
                pooled = pool_by_position(score[cand][:, None], cand[:, None], kernel)[:, 0]
                top = pooled.topk(cap).indices
                heavy, start = sorted(cand[top].tolist()), new
                score = torch.zeros(prompt)
            if c == prompt:
                break
            keys = torch.tensor(list(range(ev.sink_end)) + heavy + list(range(start, c + 1)))
            logits = (q[c, h * g : (h + 1) * g] @ k[keys, h].T) * scale  # [G, N]
            if c in scored:
                score[keys] += logits.softmax(-1).mean(0)
        out.append(heavy)
    return out


@pytest.mark.parametrize("chunk", [None, 7, 1])
def test_reference_cache_with_a_bounded_hold_chooses_at_each_compression_as_computed_directly(chunk):
    """Per token (block size 1), a 60-token prompt under a 40-token hold (the policy keeps 24):
    compressions before queries 40 and 57 and at the end; the heavy tokens per KV head equal a
    direct computation whatever the chunking, and the cache never holds more than 40 tokens."""
    torch.manual_seed(1)
    hq, hkv, d, scale, prompt = 4, 2, 16, 0.25, 60
    policy = snapkv(
        heavy=10, window=12, sinks=2, observation_window=8, pooling_kernel=3, prompt_hold_tokens=40
    )
    ev = policy.eviction
    q, k, v = torch.randn(prompt, hq, d), torch.randn(prompt, hkv, d), torch.randn(prompt, hkv, d)
    cache = PolicyCache(policy, prompt_len=prompt)
    step = chunk or prompt
    for s in range(0, prompt, step):
        e = min(s + step, prompt)
        cache.attend(0, q[s:e], k[s:e], v[s:e], scale)
    st_ = cache.layers[0]
    heavy_slots = (st_.positions >= ev.heavy_start) & (st_.positions < ev.prefix_end)
    got = [sorted(st_.state["pos"][heavy_slots][:, h].tolist()) for h in range(hkv)]
    assert got == _direct_bounded(q, k, ev, prompt, scale)
    assert cache.stats.max_retained == 40
    assert len(ev.waves(torch.arange(prompt + 1), hold_end=prompt).unique()) == 4  # 3 compressions
    assert max(max(h) for h in got) >= 40, "the last compression kept a token read after the first"


def test_h2o_with_the_hold_chooses_once_at_the_end_of_the_prompt():
    """h2o with ``prompt_hold``: the prompt is read whole (every query attends to all of it), the
    first choice is at its end by the attention all prompt queries gave; without the hold a
    chunked prompt evicts while it is read."""
    torch.manual_seed(1)
    hq, hkv, d, scale = 4, 2, 16, 0.25
    prompt = 50
    q, k, v = torch.randn(prompt, hq, d), torch.randn(prompt, hkv, d), torch.randn(prompt, hkv, d)
    held = PolicyCache(snapkv(policy="h2o", prompt_hold=True, heavy=8, window=8), prompt_len=prompt)
    plain = PolicyCache(snapkv(policy="h2o", heavy=8, window=8), prompt_len=prompt)
    for s in range(0, prompt, 10):
        held.attend(0, q[s : s + 10], k[s : s + 10], v[s : s + 10], scale)
        plain.attend(0, q[s : s + 10], k[s : s + 10], v[s : s + 10], scale)
        if s + 10 < prompt:
            assert held.stats.evicted_tokens == 0
    assert held.stats.max_retained == prompt > plain.stats.max_retained, "the held prompt was whole"
    assert held.stats.evicted_tokens > 0
    assert held.layers[0].positions.numel() == plain.layers[0].positions.numel()
    # the held choice is H2O's over the whole prompt read at once: top accumulated attention
    ev = held.policy.eviction
    pos = torch.arange(prompt)
    _, probs = attention_with_probs(q, k, k, pos[None, :] <= pos[:, None], scale)
    abar = reduce_to_kv_heads(probs, hkv).sum(0).T
    cand = torch.arange(ev.heavy_start, int(ev.window_start(prompt + 1)))
    top = abar[cand].topk(8, dim=0).indices
    st_ = held.layers[0]
    heavy_slots = (st_.positions >= ev.heavy_start) & (st_.positions < ev.prefix_end)
    for h in range(hkv):
        assert sorted(st_.state["pos"][heavy_slots][:, h].tolist()) == sorted(cand[top[:, h]].tolist())
