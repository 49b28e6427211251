"""The retained-set rules and the user-facing policy configuration."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_vllm.config import KVPolicyConfig
from cam_vllm.policies import StreamingPolicy, build_policy, policy_names


@st.composite
def streaming_policies(draw):
    block = draw(st.sampled_from([1, 2, 4, 16, 32]))
    window = block * draw(st.integers(1, 12))
    sinks = draw(st.integers(0, window - 1))
    return StreamingPolicy(block_size=block, sink_tokens=sinks, window_tokens=window)


@settings(max_examples=200, deadline=None)
@given(policy=streaming_policies(), n=st.integers(1, 600))
def test_streaming_retained_set_bounds(policy, n):
    pos = torch.arange(n)
    kept = policy.retained(pos, n)
    b, w = policy.block_size, policy.window_tokens
    assert kept[: min(policy.sink_end, n)].all(), "sinks are always retained"
    assert kept[-1], "the newest token is always retained"
    assert int(kept.sum()) <= policy.sink_end + w == policy.max_retained_tokens()
    window = pos[kept & (pos >= policy.sink_end)]
    if n > policy.sink_end + w:
        # window tokens are contiguous, end at the newest token, and number W - B + 1 .. W
        assert w - b + 1 <= window.numel() <= w
        assert window[-1] == n - 1 and window.numel() == int(window[-1] - window[0] + 1)
        assert int(window[0]) % b == 0, "eviction is block-granular"
        assert policy.window_start(n) == window[0]
    else:
        assert kept.all()


@settings(max_examples=100, deadline=None)
@given(policy=streaming_policies(), n=st.integers(1, 300))
def test_retention_is_monotonic_once_evicted_never_back(policy, n):
    pos = torch.arange(n)
    assert not (policy.retained(pos, n + 1) & ~policy.retained(pos, n)).any()


def test_visible_is_causal_and_per_query():
    p = StreamingPolicy(block_size=4, sink_tokens=2, window_tokens=8)
    vis = p.visible(torch.arange(20), torch.arange(20))
    for q in range(20):
        expected = p.retained(torch.arange(20), q + 1) & (torch.arange(20) <= q)
        assert torch.equal(vis[q], expected)
    assert vis.diagonal().all()


def test_per_token_mode_is_sinks_plus_last_w_tokens():
    p = StreamingPolicy(block_size=1, sink_tokens=4, window_tokens=6)
    assert p.retained(torch.arange(20), 20).nonzero().flatten().tolist() == [
        0,
        1,
        2,
        3,
        14,
        15,
        16,
        17,
        18,
        19,
    ]


def test_sinks_round_up_to_blocks():
    p = StreamingPolicy(block_size=32, sink_tokens=4, window_tokens=64)
    assert p.sink_end == 32 and p.max_retained_tokens() == 96


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sink_tokens": 8, "window_tokens": 8}, "fewer than window"),
        ({"sink_tokens": 4, "window_tokens": 16, "block_size": 32}, "smaller than one block"),
        ({"sink_tokens": 4, "window_tokens": 48, "block_size": 32}, "not a multiple"),
    ],
)
def test_bad_streaming_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_policy(KVPolicyConfig(policy="streaming", **kwargs))


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown KV policy 'h3o'.*cam-streaming"):
        KVPolicyConfig(policy="h3o")
    with pytest.raises(ValueError, match="unknown KV policy"):
        KVPolicyConfig(policy="cam-none")
    assert {"none", "streaming", "cam-streaming"} <= set(policy_names())


def test_budget_fraction_resolves_to_whole_blocks():
    cfg = KVPolicyConfig(policy="cam-streaming", budget=0.25, sink_tokens=4, block_size=32)
    pol = build_policy(cfg, length=1000)  # 250 tokens -> 246 after sinks -> 224 (7 blocks)
    assert pol.eviction.window_tokens == 224 and pol.merge is not None
    with pytest.raises(ValueError, match="budget 0.01 of 1000 tokens"):
        build_policy(cfg.model_copy(update={"budget": 0.01}), length=1000)
    with pytest.raises(ValueError, match="either window_tokens or budget"):
        KVPolicyConfig(policy="streaming", budget=0.5, window_tokens=64)
    with pytest.raises(ValueError, match="needs window_tokens or budget"):
        build_policy(KVPolicyConfig(policy="streaming"))


def test_cam_prefix_adds_merge_plain_policy_has_none():
    assert build_policy(KVPolicyConfig(policy="streaming", window_tokens=64)).merge is None
    cam = build_policy(KVPolicyConfig(policy="cam-streaming", window_tokens=64, merge_targets=8, seed=3))
    assert cam.merge.num_targets == 8 and cam.merge.seed == 3 and cam.tracks_scores
    assert build_policy(KVPolicyConfig()).eviction.retained(torch.arange(5), 5).all()


@pytest.mark.parametrize(
    ("policy", "merge", "name", "rule"),
    [
        ("streaming", None, "streaming", None),
        ("cam-streaming", None, "cam-streaming", "cam"),
        ("weighted-streaming", None, "weighted-streaming", "weighted"),
        ("streaming", "weighted", "weighted-streaming", "weighted"),
        ("streaming", "cam", "cam-streaming", "cam"),
        ("cam-streaming", "cam", "cam-streaming", "cam"),
        ("streaming", "none", "streaming", None),
        ("kvmerger-streaming", None, "kvmerger-streaming", "kvmerger"),
    ],
)
def test_merge_rule_is_its_own_axis(policy, merge, name, rule):
    built = build_policy(KVPolicyConfig(policy=policy, merge=merge, window_tokens=64))
    assert built.name == name
    assert (built.merge.rule if built.merge else None) == rule
    assert built.tracks_scores == (rule is not None)
    assert name in policy_names()


@pytest.mark.parametrize(
    ("policy", "merge", "message"),
    [
        ("cam-streaming", "weighted", "already merges with 'cam'.*Fix: give the eviction policy alone"),
        ("cam-streaming", "none", "already merges with 'cam'"),
        ("none", "cam", "needs an evicting policy"),
        (
            "streaming",
            "average",
            "unknown merge rule 'average'; choose one of: none, cam, weighted, kvmerger",
        ),
        ("weighted-none", None, "unknown KV policy 'weighted-none'"),
    ],
)
def test_contradictory_or_unknown_merge_settings_are_refused(policy, merge, message):
    with pytest.raises(ValueError, match=message):
        KVPolicyConfig(policy=policy, merge=merge)


@settings(max_examples=60, deadline=None)
@given(
    sinks=st.integers(0, 40),
    window=st.integers(32, 200),
    block=st.sampled_from([2, 16, 32]),
    n=st.integers(1, 600),
)
def test_token_exact_streaming_shows_what_the_per_token_policy_shows(sinks, window, block, n):
    """Token-exact blocks: the visible set is the per-token policy's, every block holding a
    visible token counts as retained, and the held blocks (``block_prefix_end`` +
    ``block_window_tokens``, freed whole) always cover the visible tokens."""
    if sinks >= window or window < block:
        return
    exact = StreamingPolicy(block_size=block, sink_tokens=sinks, window_tokens=window, token_exact=True)
    per_token = StreamingPolicy(block_size=1, sink_tokens=sinks, window_tokens=window)
    pos = torch.arange(n)
    visible = exact.retained(pos, n)
    assert torch.equal(visible, per_token.retained(pos, n))
    assert exact.window_start(n) == per_token.window_start(n)
    nb = -(-n // block)
    starts = torch.arange(nb) * block
    padded = torch.zeros(nb * block, dtype=torch.bool)
    padded[:n] = visible
    assert torch.equal(exact.block_retained(starts, n), padded.view(nb, block).any(dim=1))
    # what a block-granular policy with the block-level numbers holds covers every visible token
    held = StreamingPolicy(
        block_size=block, sink_tokens=exact.block_prefix_end, window_tokens=exact.block_window_tokens
    )
    assert held.sink_end == exact.block_prefix_end
    assert bool((held.retained(pos, n) | ~visible).all())
    assert exact.max_held_tokens() <= exact.max_retained_tokens() + 3 * (block - 1)


def test_token_exact_settings_are_checked_and_the_window_is_not_rounded():
    cfg = KVPolicyConfig(policy="cam-streaming", budget=0.1, block_size=32, token_exact=True)
    pol = build_policy(cfg, length=1024)  # 102 tokens: 4 sinks + 98, not rounded to 96
    assert pol.eviction.window_tokens == 98 and pol.token_exact and pol.tracks_scores
    assert pol.eviction.block_window_tokens == 160 and pol.eviction.block_prefix_end == 32
    assert "token-exact" in pol.describe()
    plain = build_policy(
        KVPolicyConfig(policy="streaming", window_tokens=98, block_size=32, token_exact=True)
    )
    assert plain.tracks_scores and plain.merge is None and not plain.runs_in_waves
    assert not build_policy(cfg.model_copy(update={"token_exact": False}), length=1024).token_exact
    for bad in ({"policy": "h2o"}, {"policy": "cam-tova"}, {"policy": "none"}):
        with pytest.raises(ValueError, match="token_exact applies to streaming"):
            KVPolicyConfig(token_exact=True, budget=0.2, **bad) if bad[
                "policy"
            ] != "none" else KVPolicyConfig(token_exact=True, **bad)


@settings(max_examples=60, deadline=None)
@given(
    prefix_blocks=st.integers(0, 3),
    window_blocks=st.integers(1, 5),
    block=st.sampled_from([1, 4, 16]),
    span_blocks=st.integers(0, 3),
    exact=st.booleans(),
    own=st.integers(0, 3),
)
def test_block_layout_answers_alike_for_ints_and_tensors(
    prefix_blocks, window_blocks, block, span_blocks, exact, own
):
    """The layout's one rule gives the same window start, held start and kept start for an int
    and per element of a tensor (the scheduler asks with ints, the workers with tensors), and the
    blocks it frees are exactly those holding no kept token."""
    from cam_vllm.policies.layout import BlockLayout

    prefix = prefix_blocks * block - (1 if exact and prefix_blocks else 0)
    window = window_blocks * block + (1 if exact and block > 1 else 0)
    span = (span_blocks + window_blocks) * block if span_blocks and not exact else 0  # as HeavyPolicy's
    layout = BlockLayout(prefix, window, block, exact, span)
    hold = 5 * block + 3
    ns = torch.arange(1, 12 * block)
    own_window = own * block if own and not exact else None
    starts = layout.window_start(ns, own_window)
    kept = layout.kept_start(ns, hold, own_window)
    for i, n in enumerate(ns.tolist()):
        assert int(starts[i]) == layout.window_start(n, own_window)
        assert int(kept[i]) == layout.kept_start(n, hold, own_window)
        assert layout.kept_start(n, hold) <= layout.window_start(n)  # a hold never keeps less
        first, last = layout.freeable(n - 1, hold)
        blocks = -(-n // block)
        pos = torch.arange(blocks * block)
        keep = layout.retained(pos, n, hold).view(blocks, block).any(dim=1)
        assert list(range(first, last)) == [j for j in range(blocks) if not keep[j]], (n, first, last)
        if span or n > hold:  # a whole-prompt hold keeps its prompt: no bound while it lasts
            assert blocks - (last - first) <= layout.max_blocks(1, 1 << 30)
