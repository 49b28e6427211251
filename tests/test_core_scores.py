"""Score-driven policies: the score state, the heavy-region choice, and the published per-token
algorithms (block size 1) against a plain re-statement of each, written here token by token."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.scores import (
    history_bits,
    last_visible_attention,
    popcount,
    push_history,
    store_bits,
    trailing_zeros,
)
from cam_vllm.core.selection import choose_heavy, select_heavy
from cam_vllm.policies import SCORES, build_policy
from cam_vllm.reference.cache import PolicyCache


@settings(max_examples=60, deadline=None)
@given(nq=st.integers(1, 12), nk=st.integers(1, 10), history=st.integers(1, 62), seed=st.integers(0, 99))
def test_history_of_a_chunk_equals_its_queries_one_by_one(nq, nk, history, seed):
    g = torch.Generator().manual_seed(seed)
    important = torch.rand(nq, 2, nk, generator=g) < 0.5
    # keys become visible from some query on and stop at some later query (a contiguous run)
    start = torch.randint(0, nq, (nk,), generator=g)
    stop = start + torch.randint(0, nq + 1, (nk,), generator=g)
    rows = torch.arange(nq)[:, None]
    visible = (rows >= start) & (rows < stop)
    old = torch.randint(0, 1 << history, (nk, 2), generator=g)
    one_by_one = old.clone()
    for i in range(nq):
        one_by_one = push_history(one_by_one, important[i : i + 1], visible[i : i + 1], history)
    assert torch.equal(push_history(old, important, visible, history), one_by_one)
    probs = torch.rand(nq, 2, nk, generator=g)
    last = torch.zeros(nk, 2)
    for i in range(nq):
        last = last_visible_attention(last, probs[i : i + 1], visible[i : i + 1])
    assert torch.equal(last_visible_attention(torch.zeros(nk, 2), probs, visible), last)


@settings(max_examples=40, deadline=None)
@given(history=st.integers(1, 62), seed=st.integers(0, 99))
def test_history_stored_narrow_updates_like_the_int64_one(history, seed):
    """A history of <= 32 bits is stored in an int32 (bit 31 as its sign); updating the stored
    form gives the same bits, and the same ranks, as computing on the int64 history throughout."""
    from cam_vllm.policies.corm import CORMScore
    from cam_vllm.policies.scissorhands import ScissorhandsScore

    g = torch.Generator().manual_seed(seed)
    wide = torch.randint(0, 1 << history, (16, 2), generator=g)
    wide[0] = (1 << history) - 1  # every bit set, bit 31 included at history 32
    for score in (ScissorhandsScore(history=history), CORMScore(history=history)):
        dtype = score.fields["hist"]
        assert dtype == (torch.int32 if history <= 32 else torch.int64)
        stored = store_bits(wide, dtype)
        assert stored.dtype == dtype and torch.equal(history_bits(stored), wide)
        probs = torch.rand(5, 2, 16, generator=g) / 8
        visible = torch.rand(5, 16, generator=g) < 0.8
        got = score.update({"hist": stored}, probs, visible)["hist"]
        assert got.dtype == dtype
        want = score.update({"hist": wide}, probs, visible)["hist"]
        assert torch.equal(history_bits(got), want)
        seen = torch.full((16, 2), 100)
        assert torch.equal(
            score.rank({"hist": got}, torch.zeros(16, 2), seen),
            score.rank({"hist": want}, torch.zeros(16, 2), seen),
        )


def test_bit_counts():
    bits = torch.tensor([0, 1, 0b1011000, (1 << 62) - 1])
    assert popcount(bits).tolist() == [0, 1, 3, 62]
    assert trailing_zeros(bits, 62).tolist() == [62, 0, 3, 0]


def test_selection_keeps_the_best_per_head_ties_to_the_newer():
    rank = torch.tensor([[3.0, 0.0], [1.0, 5.0], [1.0, 2.0], [0.0, 9.0]])
    pos = torch.tensor([[10, 10], [20, 20], [30, 30], [40, 40]])
    order = select_heavy(rank, pos, 2, per_head=True)
    assert order[:2, 0].tolist() == [0, 2]  # rank 3, then the newer of the two 1.0s
    assert order[:2, 1].tolist() == [1, 3]
    shared = select_heavy(rank, pos, 2, per_head=False)  # means 1.5, 3, 1.5, 4.5
    assert shared[:2, 0].tolist() == shared[:2, 1].tolist() == [1, 3]


@settings(max_examples=60, deadline=None)
@given(
    capacity=st.integers(0, 12),
    leaving=st.integers(0, 10),
    heads=st.integers(1, 4),
    seed=st.integers(0, 2**16),
)
def test_heavy_choice_keeps_stayers_in_their_slots_and_fills_freed_ones(capacity, leaving, heads, seed):
    """The choice holds exactly the best ``capacity`` candidates per head (as ``select_heavy``
    ranks them); a kept heavy token never moves, and entering tokens fill the freed slots in
    position order."""
    g = torch.Generator().manual_seed(seed)
    c = capacity + leaving
    pos = torch.randperm(100, generator=g)[:c].sort().values[:, None].expand(c, heads).contiguous()
    abar = torch.rand(c, heads, generator=g).round(decimals=1)  # ties too
    score = SCORES["h2o"]()
    choice = choose_heavy({"pos": pos}, abar, capacity, score, 200)
    order = select_heavy(score.rank({"pos": pos}, abar, 200 - pos), pos, capacity, per_head=True)
    assert torch.equal(choice.evicted, order[capacity:])
    for h in range(heads):
        fill, kept = choice.fill[:, h].tolist(), set(order[:capacity, h].tolist())
        assert sorted(fill) == sorted(kept)
        assert all(fill[j] == j for j in range(capacity) if j in kept)
        entering = [i for i in fill if i >= capacity]
        assert entering == sorted(entering)


def _naive(name, q, k, v, sinks, heavy, window, history=8, threshold=1.0):
    """The published per-token algorithm, restated: per KV head a list of cached positions; each
    step appends the new token, attends, updates the token's score, and, when more than
    ``heavy`` tokens lie between the sinks and the recent window, drops the worst of them."""
    n_steps, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    cached = [[] for _ in range(hkv)]
    abar = [{} for _ in range(hkv)]
    last = [{} for _ in range(hkv)]
    bits = [{} for _ in range(hkv)]  # position -> importance of every query that saw it
    outs = []
    for t in range(n_steps):
        out = torch.zeros(hq, d)
        for h in range(hkv):
            cached[h].append(t)
            keys, vals = k[cached[h], h], v[cached[h], h]
            probs = torch.softmax((q[t, h * group : (h + 1) * group] @ keys.T) * d**-0.5, dim=-1)
            out[h * group : (h + 1) * group] = probs @ vals
            p = probs.mean(dim=0)
            for i, pos in enumerate(cached[h]):
                abar[h][pos] = abar[h].get(pos, 0.0) + float(p[i])
                last[h][pos] = float(p[i])
                bits[h].setdefault(pos, []).append(float(p[i]) >= threshold / len(cached[h]))
        outs.append(out)
        n = t + 1  # the next query sees sinks, the heavy tokens and positions >= n + 1 - window
        middle = [[pos for pos in cached[h] if sinks <= pos < n + 1 - window] for h in range(hkv)]
        if len(middle[0]) <= heavy:
            continue

        def rank(h, pos):
            b = bits[h][pos][-history:]
            if name == "h2o":
                return abar[h][pos]
            if name == "tova":
                return sum(last[x][pos] for x in range(hkv)) / hkv
            if name == "scissorhands":
                return -(len(b) - sum(b))
            since = next((i for i, imp in enumerate(reversed(b)) if imp), len(b))
            return -min(since, history)  # corm

        for h in range(hkv):
            worst = min(middle[h], key=lambda pos, h=h: (rank(h, pos), pos))
            cached[h].remove(worst)
    return torch.stack(outs), cached


@pytest.mark.parametrize("name", [n for n, score in SCORES.items() if not score.holds_prompt])
def test_per_token_policy_is_the_published_algorithm(name):
    """(SnapKV chooses once, after the prompt: ``test_snapkv.py`` checks it against a direct
    computation.)"""
    torch.manual_seed(1)
    sinks, heavy, window, steps = 2, 5, 6, 60
    hq, hkv, d = 4, 2, 16
    q, k, v = torch.randn(steps, hq, d), torch.randn(steps, hkv, d), torch.randn(steps, hkv, d)
    q[:, :, :4] *= 3.0  # peaky attention: scores differ clearly (no near-ties)
    policy = build_policy(
        KVPolicyConfig(
            policy=name, sink_tokens=sinks, heavy_tokens=heavy, window_tokens=window, score_history=8
        )
    )
    cache = PolicyCache(policy)
    got = torch.cat(
        [cache.attend(0, q[t : t + 1], k[t : t + 1], v[t : t + 1], d**-0.5) for t in range(steps)]
    )
    want, cached = _naive(name, q, k, v, sinks, heavy, window)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pos = cache.layers[0].state["pos"]
    for h in range(hkv):
        assert sorted(pos[:, h].tolist()) == cached[h]
    if name != "tova":
        assert pos[:, 0].tolist() != pos[:, 1].tolist(), "per-head selection keeps different tokens"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"policy": "h2o", "window_tokens": 64, "heavy_tokens": 48, "block_size": 32},
            "multiple of the block",
        ),
        ({"policy": "streaming", "window_tokens": 64, "heavy_tokens": 64}, "heavy_tokens applies to"),
        ({"policy": "corm", "window_tokens": 64, "score_history": 63}, "less than or equal to 62"),
        ({"policy": "scissorhands", "window_tokens": 64, "score_threshold": 0}, "greater than 0"),
        ({"policy": "cam-h2o", "budget": 0.05, "block_size": 32}, "each needs at least one block"),
    ],
)
def test_bad_score_settings_are_refused_naming_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_policy(KVPolicyConfig(**kwargs), length=1024)


def test_budget_split_is_half_heavy_half_recent():
    pol = build_policy(KVPolicyConfig(policy="h2o", budget=0.25, block_size=32), length=1024)
    ev = pol.eviction  # 256 tokens: 4 sinks, heavy 126 -> 96, window 156 -> 128
    assert (ev.heavy_tokens, ev.window_tokens, ev.prefix_end) == (96, 128, 128)
    assert pol.tracks_scores and pol.merge is None
    explicit = build_policy(KVPolicyConfig(policy="cam-tova", window_tokens=64, block_size=32))
    assert explicit.eviction.heavy_tokens == 64 and explicit.merge.rule == "cam"


@pytest.mark.parametrize("name", ["h2o", "cam-tova", "scissorhands", "weighted-corm"])
def test_chunking_does_not_change_a_score_policy(name):
    """Chunks run in waves (the heavy region chosen whenever a block leaves the window), so any
    split of the sequence gives what token-by-token decoding gives."""
    torch.manual_seed(2)
    steps, hq, hkv, d = 150, 4, 2, 16
    q, k, v = torch.randn(steps, hq, d), torch.randn(steps, hkv, d), torch.randn(steps, hkv, d)
    q[:, :, :4] *= 3.0
    cfg = KVPolicyConfig(policy=name, sink_tokens=2, heavy_tokens=16, window_tokens=16, block_size=8)
    policy = build_policy(cfg)

    def run(sizes):
        cache, outs, a = PolicyCache(policy), [], 0
        for n in sizes:
            outs.append(cache.attend(0, q[a : a + n], k[a : a + n], v[a : a + n], d**-0.5))
            a += n
        return torch.cat(outs), cache.layers[0].state["pos"]

    one_by_one, pos = run([1] * steps)
    for sizes in ([150], [37, 1, 1, 60, 51], [64, 64, 22]):
        got, got_pos = run(sizes)
        torch.testing.assert_close(got, one_by_one, atol=1e-5, rtol=1e-5)
        assert torch.equal(got_pos, pos)
