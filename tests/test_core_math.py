"""Unit and property tests of the layout-agnostic CaM math (cam_vllm.core)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cam_vllm.core import attention as core_attention
from cam_vllm.core.attention import (
    accumulate_attention,
    attention_totals,
    attention_with_probs,
    reduce_to_kv_heads,
    totals_mask,
)
from cam_vllm.core.kvmerger import kvmerger_merge, merging_sets
from cam_vllm.core.merge import MergeConfig, cam_merge, merge_probability, merge_values
from cam_vllm.core.rng import merge_uniforms, target_choices
from cam_vllm.core.rules import merge_leaving
from cam_vllm.core.weighted import weighted_merge


def test_attention_with_probs_matches_sdpa_with_gqa():
    torch.manual_seed(0)
    q, k, v = torch.randn(5, 9, 8), torch.randn(12, 3, 8), torch.randn(12, 3, 8)
    visible = torch.rand(5, 12) > 0.3
    visible[:, 0] = True
    out, probs = attention_with_probs(q, k, v, visible, scale=0.3)
    kk = k.repeat_interleave(3, dim=1).transpose(0, 1)  # [9, 12, 8]
    vv = v.repeat_interleave(3, dim=1).transpose(0, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk, vv, attn_mask=visible, scale=0.3
    ).transpose(0, 1)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert probs.shape == (5, 9, 12)
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, 9))
    assert (probs[~visible[:, None, :].expand(5, 9, 12)] == 0).all()


def test_row_without_visible_tokens_gives_zeros_not_nan():
    out, probs = attention_with_probs(
        torch.randn(2, 2, 4),
        torch.randn(3, 1, 4),
        torch.randn(3, 1, 4),
        torch.tensor([[True, False, False], [False, False, False]]),
        1.0,
    )
    assert torch.isfinite(out).all() and (out[1] == 0).all() and (probs[1] == 0).all()


def test_gqa_reduction_is_mean_over_group_9_query_to_3_kv_heads():
    probs = torch.softmax(torch.randn(4, 9, 7), dim=-1)
    red = reduce_to_kv_heads(probs, 3)
    assert red.shape == (4, 3, 7)
    torch.testing.assert_close(red[:, 1], probs[:, 3:6].mean(1))
    torch.testing.assert_close(red.sum(-1), torch.ones(4, 3))  # still a distribution per KV head


@settings(max_examples=60, deadline=None)
@given(
    nq=st.integers(1, 40),
    nk=st.integers(1, 30),
    hkv=st.sampled_from([1, 2, 3]),
    group=st.sampled_from([1, 3]),
    block=st.sampled_from([1, 37, 1 << 17]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_attention_totals_equal_the_summed_probabilities(nq, nk, hkv, group, block, causal, seed):
    """The prefill scoring shortcut adds what the probabilities would, for any visibility
    (rows with nothing visible add nothing), any block of rows, and a chunk's shape (a cached
    prefix, then its own keys causally: blocks of rows skip the keys they cannot see)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(nq, hkv * group, 8, generator=g) * 3
    q[0] *= 40  # logits far below a row's maximum (where torch's exp is slow) still add exactly
    k = torch.randn(nk, hkv, 8, generator=g)
    visible = torch.rand(nq, nk, generator=g) > 0.4
    if causal:  # the chunk's queries are the last of its keys
        pos = torch.arange(nq)[:, None] + max(nk - nq, 0)
        visible = (torch.arange(nk)[None, :] <= pos) & (torch.rand(nq, nk, generator=g) > 0.1)
    old = core_attention.TOTALS_BLOCK_ELEMENTS
    core_attention.TOTALS_BLOCK_ELEMENTS = block
    try:
        got = attention_totals(q, k, visible, 0.35)
        # the mask made once and kept across layers (ScorePack.totals_mask) gives the same numbers
        shared = attention_totals(q, k, visible, 0.35, totals_mask(visible, hkv * group))
    finally:
        core_attention.TOTALS_BLOCK_ELEMENTS = old
    _, probs = attention_with_probs(q, k, torch.zeros(nk, hkv, 1), visible, 0.35)
    want = accumulate_attention(torch.zeros(nk, hkv), reduce_to_kv_heads(probs, hkv))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(shared, got)


def test_totals_mask_trims_a_causal_chunk_to_the_keys_its_rows_see():
    """A 64-query chunk after 32 cached keys, rows in blocks of 16: each block computes only up
    to its last query's key, and adds the mask only over its own diagonal part."""
    nq, prefix, hq = 64, 32, 4
    nk = prefix + nq
    visible = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + prefix
    old = core_attention.TOTALS_BLOCK_ELEMENTS
    core_attention.TOTALS_BLOCK_ELEMENTS = 16 * hq * nk
    try:
        spans = totals_mask(visible, hq).spans
    finally:
        core_attention.TOTALS_BLOCK_ELEMENTS = old
    assert spans == tuple((s, s + 16, 0, prefix + s + 16, prefix + s + 1) for s in range(0, nq, 16))


def test_accumulate_modes():
    abar = torch.ones(3, 2)
    p = torch.rand(4, 2, 3)  # [Nq, Hkv, Nk]
    torch.testing.assert_close(accumulate_attention(abar, p), 1 + p.sum(0).T)
    torch.testing.assert_close(accumulate_attention(abar, p, "current"), p[-1].T)
    with pytest.raises(ValueError):
        accumulate_attention(abar, p, "bogus")  # type: ignore[arg-type]


def test_merge_probability_clamps_and_handles_zero():
    ev = torch.tensor([[0.5, 0.0, 3.0, 0.0]])
    tg = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    p = merge_probability(ev, tg)
    assert p.tolist() == [[0.5, 0.0, 1.0, 0.0]]  # 3/1 clamped to 1; 0/0 -> 0 (no merge)
    assert merge_probability(torch.tensor([[1.0]]), torch.tensor([[0.0]])).item() == 1.0
    assert merge_probability(ev, tg, (0.5, 0.75)).tolist() == [[0.5, 0.5, 0.75, 0.5]]


def test_merge_values_even_spread_is_eq15():
    vt = torch.randn(4, 3, 8)
    ve = torch.randn(2, 3, 8)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    new = merge_values(vt, ve, mask)
    expected = vt + ((ve * mask[..., None]).sum(0) / 4)[None]
    torch.testing.assert_close(new, expected)


def test_merge_values_random_single_target_adds_whole_value_to_one_target():
    vt = torch.zeros(4, 1, 2)
    ve = torch.ones(1, 1, 2)
    new = merge_values(vt, ve, torch.tensor([[True]]), choice=torch.tensor([[2]]))
    assert new[2].tolist() == [[1.0, 1.0]] and new[[0, 1, 3]].abs().sum() == 0


def test_draws_are_reproducible_and_keyed_by_what_is_decided():
    pos = torch.arange(100, 140)
    a = merge_uniforms(7, 3, pos, 4)
    assert torch.equal(a, merge_uniforms(7, 3, pos, 4))
    # the draw for one (position, head) does not depend on which other tokens are drawn with it
    assert torch.equal(a[5:9], merge_uniforms(7, 3, pos[5:9], 4))
    assert torch.equal(a[:, 2:], merge_uniforms(7, 3, pos, torch.tensor([2, 3])))
    assert not torch.equal(a, merge_uniforms(8, 3, pos, 4))
    assert not torch.equal(a, merge_uniforms(7, 4, pos, 4))
    assert ((a >= 0) & (a < 1)).all()


def test_draws_are_uniform_enough_for_bernoulli():
    u = merge_uniforms(0, 0, torch.arange(20000), 5)
    assert abs(u.mean().item() - 0.5) < 0.01
    for p in (0.1, 0.5, 0.9):
        assert abs((u < p).float().mean().item() - p) < 0.01
    c = target_choices(0, 0, torch.arange(20000), 1, 16)
    counts = torch.bincount(c.flatten(), minlength=16).float()
    assert counts.min() > 0.8 * counts.mean()


def _chain(n_leaving=32, n_window=16, h=3, d=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    n = n_leaving + n_window
    values, abar = torch.randn(n, h, d, generator=g), torch.rand(n, h, generator=g)
    leaving = torch.arange(n) < n_leaving
    return values, abar, leaving, torch.arange(50, 50 + n)


def test_cam_merge_same_seed_same_merges_and_forced_probabilities():
    values, abar, leaving, pos = _chain()
    cfg = MergeConfig(seed=11)
    v1, d1 = cam_merge(values, abar, leaving, pos, layer=2, config=cfg)
    v2, d2 = cam_merge(values, abar, leaving, pos, layer=2, config=cfg)
    assert torch.equal(v1, v2) and torch.equal(d1.mask, d2.mask)
    _, d3 = cam_merge(values, abar, leaving, pos, layer=2, config=cfg, seed=12)
    assert not torch.equal(d1.mask, d3.mask)
    never, dn = cam_merge(values, abar, leaving, pos, 2, MergeConfig(clamp=(0.0, 0.0)))
    assert not dn.mask.any() and torch.equal(never, values)
    _, da = cam_merge(values, abar, leaving, pos, 2, MergeConfig(clamp=(1.0, 1.0)))
    assert da.mask.all()


def _sequential_chain(values, abar, leaving, pos, layer, cfg):
    """The chain token by token, as the per-token path would do it: the readable oracle."""
    v = values.double().clone()
    n, h, _ = v.shape
    m = cfg.num_targets
    for i in torch.nonzero(leaving).flatten().tolist():
        targets = list(range(i + 1, min(i + 1 + m, n)))
        if not targets:
            continue
        p = merge_probability(abar[i : i + 1], abar[targets], cfg.clamp)[0]
        u = merge_uniforms(cfg.seed, layer, pos[i : i + 1], h)[0]
        mask = (u < p).double()
        if cfg.targets == "even":
            for j in targets:
                v[j] += mask[:, None] * v[i] / len(targets)
        else:
            choice = target_choices(cfg.seed, layer, pos[i : i + 1], h, len(targets))[0]
            for head in range(h):
                v[targets[int(choice[head])], head] += mask[head] * v[i, head]
    return v


@pytest.mark.parametrize("targets", ["even", "random-single"])
@pytest.mark.parametrize(
    ("n_leaving", "n_window", "m"), [(32, 16, 16), (1, 16, 16), (300, 20, 4), (5, 3, 16)]
)
def test_block_chain_equals_merging_its_tokens_one_by_one(targets, n_leaving, n_window, m):
    """A leaving block merges as if its tokens left one after another (each into the m tokens
    that follow it, passing on what it received); 300 leaving tokens span several solves."""
    values, abar, leaving, pos = _chain(n_leaving, n_window)
    cfg = MergeConfig(num_targets=m, targets=targets, seed=3)
    ours, decided = cam_merge(values, abar, leaving, pos, layer=1, config=cfg)
    oracle = _sequential_chain(values, abar, leaving, pos, 1, cfg)
    torch.testing.assert_close(ours.double(), oracle, atol=1e-4, rtol=1e-4)
    assert decided.mask.any()
    assert decided.num_targets.tolist() == [min(m, n_leaving + n_window - 1 - i) for i in range(n_leaving)]


def test_one_leaving_token_merges_into_the_m_oldest_window_tokens_as_eq_15():
    values, abar, leaving, pos = _chain(n_leaving=1, n_window=20)
    cfg = MergeConfig(num_targets=16, clamp=(1.0, 1.0))
    new, _ = cam_merge(values, abar, leaving, pos, 0, cfg)
    expected = merge_values(values[1:17], values[:1], torch.ones(1, 3, dtype=torch.bool))
    torch.testing.assert_close(new[1:17], expected)
    assert torch.equal(new[17:], values[17:]) and torch.equal(new[:1], values[:1])


def test_merge_config_validation():
    with pytest.raises(ValueError, match="clamp"):
        MergeConfig(clamp=(0.8, 0.2))
    with pytest.raises(ValueError, match="num_targets"):
        MergeConfig(num_targets=0)


@settings(max_examples=300, deadline=None)
@given(
    a_i=st.floats(1e-4, 1.0),
    a_targets=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=16),
    seed=st.integers(0, 2**31 - 1),
)
def test_theorem_3_3_merge_beats_eviction_exactly_when_mean_in_0_2ai(a_i, a_targets, seed):
    """Theorem 3.3, checked through our Eq. 15 implementation.

    A future query gives fixed attention a_i to the evicted token and a_targets to the m merge
    targets. Evicting changes its output by -a_i V_i; merging V_i evenly (mask = 1) changes it
    by (mean(a_targets) - a_i) V_i. Merging is better exactly when 0 < mean < 2 a_i and
    lossless when mean == a_i.
    """
    g = torch.Generator().manual_seed(seed)
    m = len(a_targets)
    d = 8
    v_i = torch.randn(1, 1, d, generator=g, dtype=torch.float64)
    v_t = torch.randn(m, 1, d, generator=g, dtype=torch.float64)
    a_t = torch.tensor(a_targets, dtype=torch.float64)

    full = a_i * v_i[0, 0] + (a_t[:, None] * v_t[:, 0]).sum(0)
    evicted = (a_t[:, None] * v_t[:, 0]).sum(0)
    merged_v = merge_values(v_t, v_i, torch.ones(1, 1, dtype=torch.bool))
    merged = (a_t[:, None] * merged_v[:, 0]).sum(0)

    err_evict = (evicted - full).norm().item()
    err_merge = (merged - full).norm().item()
    mean_t = a_t.mean().item()
    # the perturbations are exactly the theorem's expressions
    assert err_merge == pytest.approx(abs(mean_t - a_i) * v_i.norm().item(), rel=1e-9, abs=1e-12)
    assert err_evict == pytest.approx(a_i * v_i.norm().item(), rel=1e-9)
    margin = 1e-9 * max(1.0, a_i)
    if 0 + margin < mean_t < 2 * a_i - margin:
        assert err_merge < err_evict
    elif mean_t == 0 or mean_t >= 2 * a_i + margin:
        assert err_merge >= err_evict - 1e-12


def test_theorem_3_3_lossless_when_equal():
    v_i = torch.randn(1, 1, 4, dtype=torch.float64)
    v_t = torch.randn(4, 1, 4, dtype=torch.float64)
    a = torch.full((4,), 0.2, dtype=torch.float64)
    full = 0.2 * v_i[0, 0] + (a[:, None] * v_t[:, 0]).sum(0)
    merged = (a[:, None] * merge_values(v_t, v_i, torch.ones(1, 1, dtype=torch.bool))[:, 0]).sum(0)
    torch.testing.assert_close(merged, full)


# --- the weighted (convex) merge rule ---------------------------------------------------------


def _weighted_case(data, n_max=12, h=2, d=4):
    n = data.draw(st.integers(2, n_max))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(n, h, d, generator=g, dtype=torch.float64) * data.draw(st.floats(0.1, 10.0))
    keys = torch.randn(n, h, d, generator=g, dtype=torch.float64)
    abar = torch.rand(n, h, generator=g, dtype=torch.float64) * data.draw(st.floats(0.0, 5.0))
    leaving = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    return values, keys, abar, leaving


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_weighted_merge_is_convex_and_conserves_weighted_mass(data):
    """No value's norm ever exceeds the largest norm among the values merged into it (per head);
    sum(A V) and sum(A) over each receiver and what it absorbed are conserved; keys and the
    leaving entries' own values are untouched; only positive-cosine, positive-weight tokens merge."""
    values, keys, abar, leaving = _weighted_case(data)
    new_v, new_a, decided = weighted_merge(values, keys, abar, leaving)
    src, dst = torch.nonzero(leaving).flatten(), torch.nonzero(~leaving).flatten()
    assert torch.equal(new_v[src], values[src])
    if src.numel() == 0 or dst.numel() == 0:
        assert torch.equal(new_v, values) and not decided.mask.any()
        return
    kn = torch.nn.functional.normalize(keys, dim=-1)
    for h in range(values.shape[1]):
        sims = kn[src, h] @ kn[dst, h].T  # [E, T]
        best = sims.argmax(dim=1)
        for t_i, t in enumerate(dst.tolist()):
            into = [e for e in range(src.numel()) if best[e] == t_i and bool(decided.mask[e, h])]
            inputs = [values[t, h]] + [values[int(src[e]), h] for e in into]
            assert new_v[t, h].norm() <= max(float(x.norm()) for x in inputs) * (1 + 1e-9) + 1e-12
            mass = abar[t, h] * values[t, h] + sum(
                abar[int(src[e]), h] * values[int(src[e]), h] for e in into
            )
            weight = abar[t, h] + sum(abar[int(src[e]), h] for e in into)
            torch.testing.assert_close(new_a[t, h].double(), weight, atol=1e-5, rtol=1e-5)
            if into:
                torch.testing.assert_close(new_a[t, h].double() * new_v[t, h], mass, atol=1e-4, rtol=1e-4)
            else:
                assert torch.equal(new_v[t, h], values[t, h])
        merged = decided.mask[:, h]
        assert bool(((sims.max(dim=1).values > 0) & (abar[src, h] > 0) == merged).all())


def test_weighted_rule_through_the_registry_and_unknown_rules():
    values, keys = torch.randn(6, 1, 4), torch.randn(6, 1, 4)
    keys[4] = keys[0] * 3  # token 0 is most similar to receiver 4
    abar = torch.ones(6, 1)
    leaving = torch.tensor([True, False, False, False, False, False])
    res = merge_leaving(values, keys, abar, leaving, torch.arange(6), 0, MergeConfig(rule="weighted"))
    torch.testing.assert_close(res.values[4], (values[4] + values[0]) / 2)
    assert float(res.abar[4]) == 2.0 and torch.equal(res.values[1:4], values[1:4])
    with pytest.raises(ValueError, match="needs the chain's keys"):
        merge_leaving(values, None, abar, leaving, torch.arange(6), 0, MergeConfig(rule="weighted"))
    with pytest.raises(ValueError, match="unknown merge rule 'avg'.*cam, weighted, kvmerger"):
        merge_leaving(values, keys, abar, leaving, torch.arange(6), 0, MergeConfig(rule="avg"))


def test_value_growth_counts_the_staying_values_a_merge_changed():
    """merge_leaving reports sum / count of ||after|| / ||before|| over staying, changed values."""
    values, keys = torch.randn(6, 2, 4), torch.randn(6, 2, 4)
    keys[4] = keys[0] * 3
    leaving = torch.tensor([True, False, False, False, False, False])
    res = merge_leaving(
        values, keys, torch.ones(6, 2), leaving, torch.arange(6), 0, MergeConfig(rule="weighted")
    )
    changed = [
        (t, h) for t in range(1, 6) for h in range(2) if not torch.equal(res.values[t, h], values[t, h])
    ]
    assert res.decisions.growth_count == len(changed) >= 1  # head 0 merged into receiver 4
    want = sum(float(res.values[t, h].norm() / values[t, h].norm()) for t, h in changed)
    assert res.decisions.growth_sum == pytest.approx(want)
    # CaM always merging (clamp 1, 1): V_0 / 2 into tokens 1 and 2 of each head, norm x 1.5
    cam = merge_leaving(
        torch.ones(6, 2, 4),
        None,
        torch.ones(6, 2),
        leaving,
        torch.arange(6),
        0,
        MergeConfig(rule="cam", num_targets=2, clamp=(1.0, 1.0)),
        seed=0,
    )
    assert cam.decisions.growth_count == 4 and cam.decisions.growth_sum / 4 == pytest.approx(1.5)
    # nothing leaving: nothing counted
    none = merge_leaving(
        values,
        keys,
        torch.ones(6, 2),
        torch.zeros(6, dtype=torch.bool),
        torch.arange(6),
        0,
        MergeConfig(rule="weighted"),
    )
    assert (none.decisions.growth_sum, none.decisions.growth_count) == (0.0, 0)


# --- the kvmerger rule -----------------------------------------------------------------------------


def _kvmerger_loops(values, keys, abar, leaving, similarity):
    """KVMerger on a chain written out per head and per set: the readable oracle."""
    v, k, a = values.double().clone(), keys.double().clone(), abar.double().clone()
    src = torch.nonzero(leaving).flatten().tolist()
    dst = torch.nonzero(~leaving).flatten().tolist()
    cos = torch.nn.functional.cosine_similarity
    for h in range(values.shape[1]):
        sets = []
        for i, s in enumerate(src):
            prev = src[i - 1] if i else None
            if prev is not None and s == prev + 1 and cos(keys[s, h], keys[prev, h], dim=0) >= similarity:
                sets[-1].append(s)
            else:
                sets.append([s])
        for group in (g for g in sets if len(g) >= 2):
            ks, vs = keys[group, h].double(), values[group, h].double()
            ws = abar[group, h].double()
            if float(ws.sum()) <= 0:
                continue
            p = int(torch.argmax(ws))
            d2 = ((ks - ks[p]) ** 2).sum(-1)
            g = torch.exp(-d2 / (2 * d2.mean())) if float(d2.mean()) > 0 else torch.ones_like(d2)
            k_star = (g[:, None] * ks).sum(0) / g.sum()
            v_star = (ws[:, None] * vs).sum(0) / ws.sum()
            sims = torch.stack([cos(k_star, keys[r, h].double(), dim=0) for r in dst])
            if float(sims.max()) <= 0:
                continue
            r = dst[int(torch.argmax(sims))]
            total = a[r, h] + ws.sum()
            k[r, h] = (a[r, h] * k[r, h] + ws.sum() * k_star) / total
            v[r, h] = (a[r, h] * v[r, h] + ws.sum() * v_star) / total
            a[r, h] = total
    return v, k, a


@pytest.mark.parametrize("similarity", [-1.0, 0.0, 0.5, 0.95])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kvmerger_equals_its_per_set_definition(similarity, seed):
    g = torch.Generator().manual_seed(seed)
    n, h, d = 40, 3, 8
    # adjacent keys drift slowly, as the paper observes, so sets of several tokens form
    keys = torch.cumsum(torch.randn(n, h, d, generator=g) * 0.4, dim=0) + torch.randn(1, h, d, generator=g)
    values, abar = torch.randn(n, h, d, generator=g), torch.rand(n, h, generator=g)
    leaving = torch.zeros(n, dtype=torch.bool)
    leaving[:24] = True
    leaving[10] = False  # a retained token between leaving ones breaks a run
    new_v, new_k, new_a, decided = kvmerger_merge(values, keys, abar, leaving, similarity)
    v, k, a = _kvmerger_loops(values, keys, abar, leaving, similarity)
    torch.testing.assert_close(new_v.double(), v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_k.double(), k, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new_a.double(), a, atol=1e-5, rtol=1e-5)
    if similarity <= 0.5:
        assert decided.merged > 0
    if similarity == -1.0:  # every adjacent pair joins: one set per run (the gap at 10 splits it)
        assert torch.equal(
            merging_sets(keys[leaving], torch.nonzero(leaving).flatten(), -1.0)[:, 0][:12],
            torch.tensor([0] * 10 + [1] * 2),
        )


def test_kvmerger_merges_keys_and_is_convex():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(1, 2, 8, generator=g).repeat(12, 1, 1) + 0.01 * torch.randn(12, 2, 8, generator=g)
    values, abar = torch.randn(12, 2, 8, generator=g) * 5, torch.rand(12, 2, generator=g) + 0.1
    leaving = torch.arange(12) < 8
    res = merge_leaving(values, keys, abar, leaving, torch.arange(12), 0, MergeConfig(rule="kvmerger"))
    assert res.keys is not None and not torch.equal(res.keys[8:], keys[8:]), "kvmerger merges keys"
    assert torch.equal(res.keys[:8], keys[:8]) and torch.equal(res.values[:8], values[:8])
    for x_new, x in ((res.values, values), (res.keys, keys)):
        bound = x.norm(dim=-1).max(dim=0).values  # [H]
        assert bool((x_new.norm(dim=-1) <= bound * (1 + 1e-6)).all())
    # attention mass is conserved: what the receivers gained is what the merged sets had
    assert res.decisions.merged > 0
    gained = float(res.abar[8:].sum() - abar[8:].sum())
    assert gained == pytest.approx(float(abar[:8][res.decisions.mask].sum()), rel=1e-5)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), similarity=st.floats(-1.0, 1.0))
def test_kvmerger_is_convex_in_keys_and_values(data, similarity):
    """Every receiver's new key and value is a convex combination of its own and of leaving tokens'
    (so its norm is at most the largest of those), and the total attention mass is conserved."""
    values, keys, abar, leaving = _weighted_case(data)
    new_v, new_k, new_a, decided = kvmerger_merge(values, keys, abar, leaving, similarity)
    src, dst = torch.nonzero(leaving).flatten(), torch.nonzero(~leaving).flatten()
    for new, old in ((new_v, values), (new_k, keys)):
        assert torch.equal(new[src], old[src])
        if src.numel():
            bound = torch.maximum(old[dst].norm(dim=-1), old[src].norm(dim=-1).max(dim=0).values)
            assert bool((new[dst].norm(dim=-1) <= bound * (1 + 1e-9) + 1e-12).all())
    gained = new_a[dst].double().sum(dim=0) - abar[dst].sum(dim=0)
    merged_mass = (abar[src] * decided.mask).sum(dim=0) if src.numel() else gained * 0
    torch.testing.assert_close(gained, merged_mass, atol=1e-5, rtol=1e-5)
