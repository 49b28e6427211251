"""The per-layer score and merge step shared by the CPU and CUDA attention impls.

Layout access (``paged``: ``gather_k`` / ``gather_v`` / ``scatter_v`` by physical slot) and the
step plan (``packs`` of queries and the slots they score, ``merges`` leaving the window) come
from the caller; the math is ``cam_vllm.core``'s, as in the reference ``PolicyCache``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from cam_vllm.core.attention import (
    accumulate_attention,
    attention_totals,
    attention_with_probs,
    reduce_to_kv_heads,
)
from cam_vllm.core.rules import merge_leaving, merge_rule
from cam_vllm.core.selection import Tokens, choose_heavy, merge_evicted
from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin.metrics import record_merge
from cam_vllm.vllm_plugin.process_state import WORKER


def global_kv_heads(num_local: int, total: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global indices of this tensor-parallel rank's KV heads: CaM draws are keyed by them, so
    every rank makes the decisions a single worker would."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no distributed state (unit tests): one rank
        rank, world = 0, 1
    total = num_local * world if total is None else total
    if total >= world:
        heads = rank * num_local + torch.arange(num_local)
    else:
        heads = torch.full((num_local,), rank * total // world)  # heads replicated over ranks
    return heads.to(device)


def new_score_state(
    policy: KVPolicy, num_slots: int, num_kv_heads: int, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """Per-slot state of a score-driven policy (``pos`` and the score's fields); {} otherwise."""
    score = policy.score
    if score is None:
        return {}
    fields = {"pos": torch.int32, **score.fields}
    return {n: torch.zeros(num_slots, num_kv_heads, dtype=dt, device=device) for n, dt in fields.items()}


def slot_state_bytes(policy: KVPolicy) -> int:
    """Worker bytes per KV slot and KV head besides the KV itself (what ``_bind`` allocates):
    ``Abar`` (float32) for a policy that tracks scores, plus a score-driven policy's ``pos`` and
    score fields. Plain eviction keeps none."""
    if not policy.tracks_scores:
        return 0
    return 4 + sum(t.element_size() for t in new_score_state(policy, 1, 1).values())


def reset_slots(
    abar: torch.Tensor, state: dict[str, torch.Tensor], slots: torch.Tensor, positions: torch.Tensor | None
) -> None:
    """Slots written this step hold new tokens: no score yet, and (per head) their own position."""
    if not slots.numel():  # a step of deferred decodes: their slots are reset when scored
        return
    abar[slots] = 0.0
    for name, t in state.items():
        if name == "pos":
            assert positions is not None
            t[slots] = positions.to(t.dtype)[:, None]
        else:
            t[slots] = 0


def score_and_merge(
    *,
    paged: Any,
    abar: torch.Tensor,
    query: torch.Tensor,
    packs: Iterable[Any],
    merges: Iterable[Any],
    policy: KVPolicy,
    scale: float,
    num_kv_heads: int,
    layer_index: int,
    heads: torch.Tensor,
    count_tokens: bool,
    state: dict[str, torch.Tensor] | None = None,
    heavy: Iterable[Any] = (),
    decode: Any = None,
    stash: torch.Tensor | None = None,
    output: torch.Tensor | None = None,
) -> None:
    """Accumulate this step's attention into ``abar`` (and the score state, per slot), then merge
    each leaving chain, or choose each heavy region (score-driven policies). ``stash``: the
    layer's deferred decode queries ``[rows, length, Hq, D]`` (``query_stash``), this step's
    already written. ``output`` (token-exact policies, whose packs hold every query): the
    attention output of each query is written into it (the stock kernel did not run)."""
    score = policy.score
    state = state or {}
    if decode is not None:
        if output is not None:
            raise ValueError("a token-exact step scores its decodes in packs (plan_scores)")
        _score_decodes(paged, abar, state, query, decode, score, scale, num_kv_heads, stash)
    fields = score is not None and bool(score.fields)
    scoring = policy.merge is not None or score is not None  # token-exact streaming: output only
    for pack in packs:
        k = paged.gather_k(pack.kv_slots, pack.memo)
        if output is not None:
            v = paged.gather_v(pack.kv_slots, pack.memo)
            q = query[pack.q_rows]
            out, probs = attention_with_probs(q, k, v, pack.visible, scale, hidden=pack.hidden)
            output[pack.q_rows] = out.reshape(out.shape[0], *output.shape[1:])
            if not scoring:
                continue
        elif policy.score_mode == "accumulated" and not fields:  # the totals suffice (attention_totals)
            mask = pack.totals_mask(query.shape[1])
            abar[pack.kv_slots] += attention_totals(query[pack.q_rows], k, pack.visible, scale, mask)
            continue
        else:
            # only the probabilities are used (the output is the kernel's), so the values passed
            # are a 1-wide zero tensor: the unused output costs nothing and V is not gathered
            v = k.new_zeros(k.shape[0], k.shape[1], 1)
            _, probs = attention_with_probs(query[pack.q_rows], k, v, pack.visible, scale, hidden=pack.hidden)
        probs_kv = reduce_to_kv_heads(probs, num_kv_heads)
        abar[pack.kv_slots] = accumulate_attention(abar[pack.kv_slots], probs_kv, policy.score_mode)
        if fields:
            got = {n: state[n][pack.kv_slots] for n in score.fields}
            for n, t in score.update(got, probs_kv, pack.visible).items():
                state[n][pack.kv_slots] = t
    if score is not None:
        events = list(heavy)
        if events:
            _choose_heavy(paged, abar, state, events, policy, layer_index, heads, count_tokens)
        return
    if policy.merge is None:
        return
    rule = merge_rule(policy.merge.rule)
    num_heads = abar.shape[1]
    for event in merges:  # each: Ev chains of one shape, merged in one call (heads side by side)
        ev, flat = event.num_events, event.slots.flatten()
        n = event.leaving.numel()
        chains, written = event.memo.setdefault("chains", {}), event.memo.setdefault("written", {})
        res = merge_leaving(
            values=_side_by_side(paged.gather_v(flat, chains), ev),
            keys=_side_by_side(paged.gather_k(flat, chains), ev) if rule.needs_keys else None,
            abar=_side_by_side(abar[flat], ev),
            leaving=event.leaving,
            positions=event.positions.T[:, :, None].expand(n, ev, num_heads).reshape(n, ev * num_heads),
            layer=layer_index,
            config=policy.merge,
            seed=event.seed,
            heads=heads.repeat(ev),
        )
        stays = ~event.leaving  # a leaving token's slot is freed after this step: skip the write
        kept = event.slots[:, stays].flatten()
        paged.scatter_v(kept, _per_event(res.values[stays], ev), written)
        abar[kept] = _per_event(res.abar[stays], ev).to(abar.dtype)
        if res.keys is not None:
            paged.scatter_k(kept, _per_event(res.keys[stays], ev), written)
        record_merge(int((res.decisions.num_targets > 0).sum()) * ev, res.decisions, count_tokens)


def use_triton_kernels(available: Callable[[torch.Tensor], bool] | None, decode_scores=None) -> None:  # noqa: ANN001
    """Score decodes with ``decode_scores`` (``kernels.triton_ops``) where ``available`` says it
    runs; None: never."""
    WORKER.decode_kernel = None if available is None else (available, decode_scores)


def _decode_kernel_for(t: torch.Tensor) -> Callable[..., None] | None:
    k = WORKER.decode_kernel  # set by the CUDA worker side or a test
    return k[1] if k is not None and k[0](t) else None


# The scores' field updates (TOVA, Scissorhands, CORM) of decoding requests run block-diagonally
# over groups of requests, expanded to at most about this many (query, key) pairs per call.
DECODE_UPDATE_PAIRS = 1 << 16


def _score_decodes(
    paged: Any,
    abar: torch.Tensor,
    state: dict[str, torch.Tensor],
    query: torch.Tensor,
    decode: Any,
    score: Any,
    scale: float,
    num_kv_heads: int,
    stash: torch.Tensor | None = None,
) -> None:
    """Accumulated attention of decode queries, batched over their requests
    (``step_plan.DecodeBatch``): the same probabilities as ``attention_with_probs`` over each
    query's retained tokens, with padding masked out. A request's queries are the step's one, or
    its stash row (``stash`` ``[rows, length, Hq, D]``). On a device with the Triton kernels
    (``kernels.triton_ops.decode_scores``, CUDA) and without score fields: one launch."""
    kernel = _decode_kernel_for(query if stash is None else stash)
    if kernel is not None and not (score is not None and score.fields):
        sq = decode.num_queries
        q = stash[decode.stash_rows, :sq] if decode.stash_rows is not None else query[decode.q_rows][:, None]
        kernel(q, paged.key_view, decode.blocks, decode.valid, decode.slots, abar, scale)
        return
    kt = paged.gather_block_kt(decode.blocks).float()  # [R, nb, H, D, B]
    r, nb, h, d, bs = kt.shape
    n, sq = nb * bs, decode.num_queries
    if decode.stash_rows is not None:
        assert stash is not None
        q = stash[decode.stash_rows, :sq].float()  # [R, S, Hq, D]
    else:
        q = query[decode.q_rows].float()[:, None]  # [R, 1, Hq, D]
    g = q.shape[2] // h
    # [R, 1, H, S * G, D]: each KV head's queries (S steps x G query heads) in one matrix
    q = q.view(r, sq, h, g, d).transpose(1, 2).reshape(r, 1, h, sq * g, d)
    # block by block (the gathered keys stay as stored), then one [R, H, S, G, N] row per query;
    # bias + scale * logits is the masked scaled logits exactly (0 + x == x, -inf stays -inf)
    logits = torch.matmul(q.expand(r, nb, h, sq * g, d), kt)  # [R, nb, H, S * G, B]
    logits = logits.permute(0, 2, 3, 1, 4).reshape(r, h, sq, g, n)
    logits = torch.add(decode.bias, logits, alpha=scale)
    probs = torch.softmax(logits, dim=-1).mean(dim=3)  # [R, H, S, N]: mean over each KV head's queries
    if decode.query_mask is not None:
        probs = probs * decode.query_mask  # padding queries (rows of fewer queries) add nothing
    total = probs[:, :, 0] if sq == 1 else probs.sum(dim=2)  # [R, H, N]
    # padding reads the null block's slots and adds 0 there (accumulate: duplicates are summed)
    abar.index_put_((decode.slots.flatten(),), total.transpose(1, 2).reshape(r * n, h), accumulate=True)
    if score is not None and score.fields:
        # the scores' updates take one call's queries against its keys: block-diagonal, in groups
        # of requests so the expansion stays small (size ~ group^2 * S * N, not R^2 * S * N)
        group = max(1, int((DECODE_UPDATE_PAIRS / (sq * n)) ** 0.5))
        for a in range(0, r, group):
            e = min(a + group, r)
            m = e - a
            eye = torch.eye(m, dtype=torch.bool, device=probs.device)
            visible = (eye[:, None, :, None] & decode.valid[a:e, :, None, :]).reshape(m * sq, m * n)
            pm = probs[a:e].transpose(1, 2)[:, :, :, None, :]  # [m, S, H, 1, N]
            probs_kv = (eye[:, None, None, :, None].to(probs.dtype) * pm).reshape(m * sq, h, m * n)
            sl = decode.slots[a:e].flatten()
            got = {name: state[name][sl] for name in score.fields}
            for name, t in score.update(got, probs_kv, visible).items():
                state[name][sl] = t


def _side_by_side(t: torch.Tensor, events: int) -> torch.Tensor:
    """[Ev * C, H, ...] gathered by event -> [C, Ev * H, ...]: events side by side on the head axis."""
    c = t.shape[0] // events
    t = t.view(events, c, *t.shape[1:]).transpose(0, 1)
    return t.reshape(c, events * t.shape[2], *t.shape[3:])


def _per_event(t: torch.Tensor, events: int) -> torch.Tensor:
    """The inverse: [C, Ev * H, ...] -> [Ev * C, H, ...] (rows in event order)."""
    c, eh = t.shape[:2]
    t = t.view(c, events, eh // events, *t.shape[2:]).transpose(0, 1)
    return t.reshape(events * c, eh // events, *t.shape[3:])


def _gather_side_by_side(
    paged: Any,
    abar: torch.Tensor,
    state: dict[str, torch.Tensor],
    slots: torch.Tensor,
    memo: dict | None = None,
) -> Tokens:
    """Tokens of ``slots`` [Ev, C] with the events side by side on the head axis (``memo``: see
    ``PagedKV._where``)."""
    ev, flat = slots.shape[0], slots.flatten()
    return Tokens(
        _side_by_side(paged.gather_k(flat, memo), ev),
        _side_by_side(paged.gather_v(flat, memo), ev),
        _side_by_side(abar[flat], ev),
        {n: _side_by_side(t[flat], ev) for n, t in state.items()},
    )


def _choose_heavy(
    paged: Any,
    abar: torch.Tensor,
    state: dict[str, torch.Tensor],
    events: list[Any],
    policy: KVPolicy,
    layer_index: int,
    heads: torch.Tensor,
    count_tokens: bool,
) -> None:
    """The step's heavy-region choices (``core.selection.choose_heavy``, as ``heavy_step`` makes
    them): candidates compete by their scores; only the heavy slots that change hands are
    rewritten (their new tokens' keys, values and scores, per KV head), and with a merge rule the
    evicted are merged into the receivers. Keys and values are read only for the tokens that
    move or merge, not the whole region. Events with the same numbers of candidates and receivers
    run as one call (side by side)."""
    score = policy.score
    assert score is not None
    merging = policy.merge is not None
    shapes: dict[tuple[int, int, int, int | None], list[Any]] = {}
    for e in events:  # one call per shape and seed (a request's own seed keys its draws)
        num_recv = e.receivers.numel() if merging else 0
        key = (e.heavy_slots.numel(), e.leaving_slots.numel(), num_recv, e.seed if merging else None)
        shapes.setdefault(key, []).append(e)
    num_heads = abar.shape[1]
    for (capacity, num_leaving, num_recv, seed), group in shapes.items():
        ev = len(group)
        heavy_slots = torch.stack([e.heavy_slots for e in group])  # [Ev, capacity]
        cand = torch.cat([heavy_slots, torch.stack([e.leaving_slots for e in group])], dim=1)
        flat = cand.flatten()
        cand_abar = _side_by_side(abar[flat], ev)
        cand_state = {n: _side_by_side(t[flat], ev) for n, t in state.items()}
        dev = abar.device
        num_tokens = torch.tensor([e.num_tokens for e in group], device=dev).repeat_interleave(num_heads)
        choice = choose_heavy(cand_state, cand_abar, capacity, score, num_tokens, group=num_heads)
        # candidates whose keys and values are read: the heavy slots that change hands in some
        # head, what enters them, and what merges
        stay = torch.arange(capacity, device=dev)[:, None]
        changed = torch.nonzero((choice.fill != stay).any(dim=1)).flatten()
        merges_now = merging and num_recv > 0 and choice.evicted.shape[0] > 0
        if not (changed.numel() or merges_now):
            continue
        parts = [choice.fill[changed].flatten()]
        if merges_now:
            parts.append(choice.evicted.flatten())
        need = torch.unique(torch.cat(parts))
        where = torch.full((capacity + num_leaving,), -1, dtype=torch.int64, device=dev)
        where[need] = torch.arange(need.numel(), device=dev)
        sub_slots = cand[:, need].flatten()
        sub = Tokens(
            _side_by_side(paged.gather_k(sub_slots), ev),
            _side_by_side(paged.gather_v(sub_slots), ev),
            cand_abar[need],
            {n: t[need] for n, t in cand_state.items()},
        )
        if changed.numel():
            new = sub.take(where[choice.fill[changed]])
            hs = heavy_slots[:, changed].flatten()
            paged.scatter_k(hs, _per_event(new.k, ev))
            paged.scatter_v(hs, _per_event(new.v, ev))
            abar[hs] = _per_event(new.abar, ev)
            for name, t in new.state.items():
                state[name][hs] = _per_event(t, ev)
        if not merges_now:
            continue
        recv_slots = torch.stack([e.receivers for e in group])
        # the group is the same in every layer of the step: its first event keeps the indices
        recv_memo = group[0].memo.setdefault(("receivers", ev), {})
        assert policy.merge is not None
        v, k, r_abar, decisions = merge_evicted(
            sub.take(where[choice.evicted]),
            _gather_side_by_side(paged, abar, state, recv_slots, recv_memo),
            policy.merge,
            layer_index,
            seed=seed,
            heads=heads.repeat(ev),
        )
        rs = recv_slots.flatten()
        paged.scatter_v(rs, _per_event(v, ev), recv_memo)
        abar[rs] = _per_event(r_abar, ev).to(abar.dtype)
        if k is not None:
            paged.scatter_k(rs, _per_event(k, ev), recv_memo)
        record_merge(int((decisions.num_targets > 0).sum()) * ev, decisions, count_tokens)
    for e in events:  # a bounded hold's next observation window scores afresh
        if e.restart is not None:
            abar[e.restart] = 0.0
