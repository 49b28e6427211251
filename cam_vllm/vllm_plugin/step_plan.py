"""Per-step bookkeeping of the vLLM worker path, independent of the KV layout and of vLLM.

Given one step's batch (``query_start_loc``, ``seq_lens``, block tables, slot mapping) and the
positional policy, this module computes, once per step for all layers:

* :func:`compact_for_kernel`: the batch the fused attention kernel must see so that every query
  attends exactly to the tokens ``EvictionPolicy.visible`` allows: each request's query chunk is
  split into *pseudo-requests* at the block boundaries where the retained set changes, and each
  pseudo-request gets a block-table row holding only its retained blocks, oldest first
  ([sink blocks | window blocks]). The kernel's causal mask is bottom-right aligned, so a
  pseudo-request whose ``seq_len`` counts the retained tokens up to its last query gives every
  query of it exactly its retained, causal keys. Blocks outside the row (evicted, possibly
  freed and already reused by another request) are never read.
* :func:`plan_scores`: for merging policies, which cached tokens every query scores (the
  retained set of the step's first query plus the step's own tokens, as in the reference
  ``PolicyCache``), packed into a few dense ``attention_with_probs`` calls, and the merge events
  at the end of the step (tokens leaving the retained set, and their merge targets).

Everything is vectorised over requests and tokens except for the list of merge events (a
request only has one in the step its oldest window block leaves) and the greedy packing.
Decisions are block-granular: the policy's ``block_size`` must equal the kernel block size. A
token-exact policy (``StreamingPolicy.token_exact``) frees whole blocks but hides tokens inside
them: the kernel batch holds every block with a retained token (``block_retained``), every
query is in a score pack (whose ``visible`` is exact per token, and from which the engine
computes the output), and tokens leave, and merge, at every step.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cam_vllm.core.attention import TotalsMask, additive_mask, totals_mask
from cam_vllm.core.merge import build_chain
from cam_vllm.core.rules import merge_rule
from cam_vllm.policies import HeavyPolicy, KVPolicy
from cam_vllm.policies.layout import BlockLayout, in_held_prompt

Retained = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Requests are scored together (one attention_with_probs call with a block-diagonal visibility
# mask) while the pack's Nq * Nk stays below this. A pack computes every query against every
# key of the pack, so the waste grows with its size; on a 2-core EPYC (9 query heads, head_dim
# 64) one call costs ~0.06 ms + ~0.08 us per (query, key) pair, so packing pays off up to a few
# thousand pairs (4 decodes of 152 keys: 0.19 ms packed vs 0.24 ms one by one; 8: 0.78 vs 0.48).
DEFAULT_PACK_ELEMENTS = 2560
# A single request's long prefill chunk is scored in query slices of at most this many
# (query, key) pairs (memory: ~3 float32 tensors of Hq * pairs). Exact: Abar sums over queries,
# and in "current" mode the slice holding the last query is written last.
MAX_PAIRS_PER_CALL = 1 << 20


@dataclass(frozen=True)
class StepTokens:
    """The queries of one step, flattened: request index and position of every query token."""

    query_start_loc: torch.Tensor  # [R + 1] int64
    seq_lens: torch.Tensor  # [R] int64, computed + this step's tokens
    context_lens: torch.Tensor  # [R] int64, tokens cached before this step
    token_req: torch.Tensor  # [T] int64
    token_pos: torch.Tensor  # [T] int64
    # [R] bool: the request asked for the full cache (``vllm_xargs={"kv_policy": "none"}``): it
    # keeps every token, so nothing of it leaves, is scored for a decision, or merges. None: no such row.
    full: torch.Tensor | None = None
    # [R] int64: a request's own smaller window (0: the policy's), plain streaming only
    # (``vllm_xargs={"kv_window_tokens": N}``); ``layout``: the policy's, which places it.
    window: torch.Tensor | None = None
    layout: BlockLayout | None = None
    # [R] int64: the prompt length of each row whose policy holds its prompt (0: no hold;
    # ``EvictionPolicy.kept``); None: no row holds one
    hold: torch.Tensor | None = None
    # what a held prompt keeps (``EvictionPolicy.held``: a bounded hold's rule); None: everything
    held: Retained | None = None

    @staticmethod
    def from_batch(
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        num_reqs: int,
        full: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
        layout: BlockLayout | None = None,
        hold: torch.Tensor | None = None,
        held: Retained | None = None,
    ) -> StepTokens:
        qsl = query_start_loc[: num_reqs + 1].to(torch.int64)
        lens = seq_lens[:num_reqs].to(torch.int64)
        qlens = qsl[1:] - qsl[:-1]
        ctx = lens - qlens
        total = int(qsl[-1])
        req = torch.repeat_interleave(torch.arange(num_reqs), qlens, output_size=total)
        pos = ctx[req] + torch.arange(total) - qsl[:-1][req]
        return StepTokens(qsl, lens, ctx, req, pos, full, window, layout, hold, held)

    @property
    def query_hold(self) -> torch.Tensor | int:
        """Each query's hold end (its request's, ``hold``), or 0 when no row holds its prompt."""
        return 0 if self.hold is None else self.hold[self.token_req]

    def kept(
        self, retained: Retained, positions: torch.Tensor, num_tokens: torch.Tensor, req: torch.Tensor
    ) -> torch.Tensor:
        """``retained(positions, num_tokens)``, and everything for full-cache requests (``req``
        gives each row's request, shaped to broadcast like ``num_tokens``)."""
        out = retained(positions, num_tokens)
        if self.window is not None and self.layout is not None:  # what a request's own window dropped
            own = self.window[req]
            start = self.layout.window_start(num_tokens, own)
            out = out & ~((own > 0) & (positions >= self.layout.prefix_end) & (positions < start))
        if self.hold is not None:  # a held prompt: what the hold keeps stays until it has been read
            inside = in_held_prompt(num_tokens, self.hold[req])
            out = out | (inside if self.held is None else inside & self.held(positions, num_tokens))
        if self.full is not None:
            out = out | self.full[req]
        return out

    @property
    def query_lens(self) -> torch.Tensor:
        return self.query_start_loc[1:] - self.query_start_loc[:-1]


@dataclass(frozen=True)
class Wave:
    """Some queries of a step that attend together (``KVPolicy.runs_in_waves``)."""

    rows: torch.Tensor  # [Tw] rows of the step's query / key / value tensors, in order
    requests: torch.Tensor  # [Rw] the step's request index of each of the wave's requests
    tokens: StepTokens  # the wave's queries as a step of their own (requests renumbered 0..Rw-1)


def split_waves(policy: KVPolicy, tokens: StepTokens) -> list[Wave]:
    """The waves of a step: one (every query) unless a score-driven or merging policy's chunk
    crosses a point where a block leaves the window; then the heavy region is chosen, or the
    leaving block merged, between the waves (``KVPolicy.runs_in_waves``)."""
    ev = policy.eviction
    wave = None
    if policy.runs_in_waves and tokens.token_pos.numel() > tokens.seq_lens.numel():  # a request has a chunk
        wave = ev.waves(tokens.token_pos, tokens.token_req, tokens.query_hold)
    if wave is None or int(wave.max()) == 0:
        return [Wave(torch.arange(tokens.token_pos.numel()), torch.arange(tokens.seq_lens.numel()), tokens)]
    out = []
    for w in range(int(wave.max()) + 1):
        rows = torch.nonzero(wave == w).flatten()
        req, pos = tokens.token_req[rows], tokens.token_pos[rows]
        reqs, counts = torch.unique_consecutive(req, return_counts=True)
        qsl = torch.zeros(reqs.numel() + 1, dtype=torch.int64)
        qsl[1:] = counts.cumsum(0)
        last = pos[qsl[1:] - 1]
        local = torch.repeat_interleave(torch.arange(reqs.numel()), counts)
        full = None if tokens.full is None else tokens.full[reqs]
        window = None if tokens.window is None else tokens.window[reqs]
        hold = None if tokens.hold is None else tokens.hold[reqs]
        step = StepTokens(
            qsl, last + 1, pos[qsl[:-1]], local, pos, full, window, tokens.layout, hold, tokens.held
        )
        out.append(Wave(rows, reqs, step))
    return out


@dataclass(frozen=True)
class KernelBatch:
    """The compacted batch handed to the fused kernel (pseudo-requests, in token order)."""

    query_start_loc: torch.Tensor  # [G + 1] int32
    seq_lens: torch.Tensor  # [G] int32, retained tokens up to the pseudo-request's last query
    block_table: torch.Tensor  # [G, nblk] int32: retained blocks first, then the null block 0
    request: torch.Tensor  # [G] int64, the original request of each pseudo-request
    max_query_len: int
    max_seq_len: int


def compact_for_kernel(
    retained: Retained, tokens: StepTokens, block_table: torch.Tensor, block_size: int
) -> KernelBatch | None:
    """Pseudo-requests with compacted block-table rows; None when nothing is evicted yet.

    A *segment* is the queries of one request inside one block; they share one retained set
    (block-granular policies change it only at block boundaries). Consecutive segments of a
    request are merged into one pseudo-request as long as no block visible to the earlier one
    left the retained set, so a request that evicts nothing during the step stays one row.
    """
    b = block_size
    num_tokens = tokens.token_pos.numel()
    if num_tokens == 0:
        return None
    req, pos = tokens.token_req, tokens.token_pos
    blk = pos // b
    new_seg = torch.ones(num_tokens, dtype=torch.bool)
    new_seg[1:] = (req[1:] != req[:-1]) | (blk[1:] != blk[:-1])
    seg_first = torch.nonzero(new_seg).flatten()
    seg_last = torch.cat([seg_first[1:] - 1, torch.tensor([num_tokens - 1])])
    seg_req, seg_q = req[seg_last], pos[seg_last]  # the segment's last query decides its row
    seg_qb = seg_q // b

    nblk = int(seg_qb.max()) + 1
    j = torch.arange(nblk)
    # vis[s, j]: block j holds keys the queries of segment s see (retained and not in the future)
    vis = tokens.kept(retained, j[None, :] * b, seg_q[:, None] + 1, seg_req[:, None]) & (
        j[None, :] <= seg_qb[:, None]
    )
    causal = j[None, :] <= seg_qb[:, None]
    if bool((vis == causal).all()):
        return None  # every query sees its whole causal prefix: the stock batch is exact

    # segment s+1 may share s's row iff they agree on every block up to s's own block
    agree = ((vis[:-1] == vis[1:]) | (j[None, :] > seg_qb[:-1, None])).all(dim=1)
    joins_prev = torch.zeros_like(seg_req, dtype=torch.bool)
    joins_prev[1:] = agree & (seg_req[1:] == seg_req[:-1])
    group_first_seg = torch.nonzero(~joins_prev).flatten()
    group_last_seg = torch.cat([group_first_seg[1:] - 1, torch.tensor([seg_req.numel() - 1])])

    g_vis = vis[group_last_seg]  # [G, nblk]
    g_req = seg_req[group_last_seg]
    g_q = seg_q[group_last_seg]
    count = g_vis.sum(dim=1)
    # retained blocks before the query's block are full; the query's block counts up to the query
    g_seq = (count - 1) * b + (g_q % b) + 1
    order = torch.argsort((~g_vis).to(torch.int8), dim=1, stable=True)  # retained blocks first
    rows = block_table[g_req, :nblk].to(torch.int64)
    compact = torch.gather(rows, 1, order)
    compact = torch.where(j[None, :] < count[:, None], compact, torch.zeros_like(compact))

    starts = seg_first[group_first_seg]
    qsl = torch.cat([starts, torch.tensor([num_tokens])])
    qlens = qsl[1:] - qsl[:-1]
    return KernelBatch(
        query_start_loc=qsl.to(torch.int32),
        seq_lens=g_seq.to(torch.int32),
        block_table=compact.to(block_table.dtype).contiguous(),
        request=g_req,
        max_query_len=int(qlens.max()),
        max_seq_len=int(g_seq.max()),
    )


@dataclass(frozen=True)
class ScorePack:
    """One ``attention_with_probs`` call: some requests' queries against their cached tokens."""

    q_rows: slice  # rows of the step's query tensor
    kv_slots: torch.Tensor  # [Nk] physical slots of the scored tokens
    visible: torch.Tensor  # [Nq, Nk] bool (policy visibility within the same request)
    _masks: dict[int, TotalsMask] = dataclasses.field(default_factory=dict, compare=False, repr=False)
    # the element indices of ``kv_slots`` in the paged cache, made by the step's first layer
    memo: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    @functools.cached_property
    def hidden(self) -> torch.Tensor:
        """``core.attention.additive_mask`` of ``visible``, made by the step's first layer, then reused."""
        return additive_mask(self.visible)

    def totals_mask(self, num_q_heads: int) -> TotalsMask:
        """``core.attention.totals_mask`` of ``visible``, made by the step's first layer, then reused."""
        mask = self._masks.get(num_q_heads)
        if mask is None:
            mask = self._masks[num_q_heads] = totals_mask(self.visible, num_q_heads, self.hidden)
        return mask


@dataclass(frozen=True)
class DecodeBatch:
    """Decode queries of a step, scored in one batched call over their requests' retained blocks.

    Every request has ``S`` query slots: one (the step's decoding query, ``q_rows``), or the
    queries of its stash row (``stash_rows``, deferred scoring: the decode queries of one block,
    ``query_stash``). All of a request's queries lie in one block, so they see the same retained
    blocks, and of their own block the tokens up to themselves. Keys are read block by block
    (``PagedKV.gather_block_kt``: ``[R, nb, H, D, B]``); ``valid`` masks the padding, unwritten
    tails, later positions and anything the policy hides. No query is scored against another
    request's keys (the packs' block-diagonal waste)."""

    q_rows: torch.Tensor | None  # [R] rows of the step's query tensor (one query per request)
    blocks: torch.Tensor  # [R, nb] retained blocks, oldest first, padded with the null block 0
    valid: torch.Tensor  # [R, S, nb * B] bool: query s of request r sees key n
    slots: torch.Tensor  # [R, nb * B] physical slots (padding: the null block's)
    stash_rows: torch.Tensor | None = None  # [R] stash rows holding the queries (instead of q_rows)
    bias: torch.Tensor | None = None  # [R, 1, S, 1, nb * B] float32: 0 where valid, -inf elsewhere
    query_mask: torch.Tensor | None = None  # [R, 1, S, 1] float32: 1 for real queries (None: all are)

    def __post_init__(self) -> None:
        if self.bias is None:  # made once per step, shared by every layer
            valid = self.valid
            real = valid.any(dim=2, keepdim=True)  # padding queries see nothing: keep them finite
            bias = torch.zeros(valid.shape, dtype=torch.float32).masked_fill_(~valid & real, float("-inf"))
            object.__setattr__(self, "bias", bias[:, None, :, None, :])
            if not bool(real.all()):
                object.__setattr__(self, "query_mask", real.to(torch.float32)[:, None, :, :])

    @property
    def num_queries(self) -> int:
        return self.valid.shape[1]


def plan_decodes(
    retained: Retained,
    tokens: StepTokens,
    block_table: torch.Tensor,
    block_size: int,
    reqs: torch.Tensor,
    first: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    stash_rows: torch.Tensor | None = None,
    block_retained: Retained | None = None,
) -> DecodeBatch:
    """The :class:`DecodeBatch` of requests ``reqs``: their newest token's query (the default),
    or ``count`` stashed queries at positions ``first, first + 1, ...`` (``stash_rows``).
    ``block_retained`` as in :func:`_cached_tokens`."""
    b = block_size
    block_retained = block_retained or retained
    if count is None:
        lens = tokens.seq_lens[reqs]
        first, count = lens - 1, torch.ones_like(lens)
    else:
        assert first is not None
        lens = first + count  # keys up to the last query
    nblk = (lens + b - 1) // b
    j = torch.arange(int(nblk.max()))
    vis = tokens.kept(block_retained, j[None, :] * b, lens[:, None], reqs[:, None]) & (
        j[None, :] < nblk[:, None]
    )
    kept_blocks = vis.sum(dim=1)
    order = torch.argsort((~vis).to(torch.int8), dim=1, stable=True)[:, : int(kept_blocks.max())]
    width = order.shape[1]
    kept = torch.arange(width)[None, :] < kept_blocks[:, None]
    rows = block_table[reqs, : j.numel()].to(torch.int64)
    blocks = torch.where(kept, torch.gather(rows, 1, order), torch.zeros_like(order))
    offs = torch.arange(b)
    pos = ((order * b)[:, :, None] + offs).flatten(1)  # [R, N] key positions
    keys = kept[:, :, None].expand(-1, -1, b).flatten(1) & tokens.kept(
        retained, pos, lens[:, None], reqs[:, None]
    )
    qpos = first[:, None] + torch.arange(int(count.max()))  # [R, S]
    real = torch.arange(qpos.shape[1])[None, :] < count[:, None]
    valid = keys[:, None, :] & (pos[:, None, :] <= qpos[:, :, None]) & real[:, :, None]
    slots = (blocks[:, :, None] * b + offs).flatten(1)
    q_rows = None if stash_rows is not None else tokens.query_start_loc[reqs]
    return DecodeBatch(q_rows, blocks, valid, slots, stash_rows)


@dataclass(frozen=True)
class MergeEvent:
    """The merge chains (``core.merge.build_chain``) of ``Ev`` requests at the end of this step.

    Requests whose chains have the same shape (length, which entries leave) and seed are merged
    in one call, their heads side by side (decodes crossing a block boundary together)."""

    slots: torch.Tensor  # [Ev, N] physical slots of each chain, in position order
    positions: torch.Tensor  # [Ev, N] (a leaving token's position keys its CaM draws)
    leaving: torch.Tensor  # [N] bool: leaves the retained set now (else a receiver that stays)
    seed: int | None = None  # the requests' own seed of the merge draws (None: the policy's)
    # the paged cache's element indices of the chains and of the slots written back, per name,
    # made by the step's first layer (``PagedKV._where``)
    memo: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)

    @property
    def num_events(self) -> int:
        return self.slots.shape[0]


def group_merges(
    chains: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]],
) -> list[MergeEvent]:
    """One :class:`MergeEvent` per shape and seed of the chains (slots, positions, leaving, seed)."""
    groups: dict[tuple, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int | None]]] = {}
    for chain in chains:
        leaving = chain[2]
        groups.setdefault((leaving.numel(), leaving.numpy().tobytes(), chain[3]), []).append(chain)
    return [
        MergeEvent(torch.stack([c[0] for c in g]), torch.stack([c[1] for c in g]), g[0][2], g[0][3])
        for g in groups.values()
    ]


@dataclass(frozen=True)
class HeavyEvent:
    """One request's heavy-region choice at the end of this step (``core.selection.heavy_step``).

    The candidates are ``heavy_slots`` (the heavy region, in position order) then
    ``leaving_slots`` (the tokens leaving the window now); ``receivers`` are the retained window
    slots after them, in position order, as far as the merge rule reaches (empty: no merging).
    """

    heavy_slots: torch.Tensor  # [capacity]
    leaving_slots: torch.Tensor  # [L]
    receivers: torch.Tensor  # [R]
    num_tokens: int  # the request's length at the end of the step
    seed: int | None = None  # the request's own seed of the merge draws (None: the policy's)
    # slots whose accumulated attention restarts at 0 after the choice (a bounded hold's
    # compression inside the prompt, ``HeavyPolicy.restarts_scores``); None: none
    restart: torch.Tensor | None = None
    # the paged cache's element indices of this event's (and its group's) receivers, made by the
    # step's first layer (``PagedKV._where``)
    memo: dict = dataclasses.field(default_factory=dict, init=False, compare=False, repr=False)


@dataclass(frozen=True)
class StashStep:
    """One step's deferred-scoring work (``query_stash.StashPlanner``), the same in every layer."""

    write_q: torch.Tensor  # [W] rows of the step's query tensor to stash
    write_at: torch.Tensor  # [W] flat stash index: row * length + offset
    flush_req: torch.Tensor  # [F] the step's request index of each row scored now
    flush_row: torch.Tensor  # [F] stash rows scored now
    flush_first: torch.Tensor  # [F] position of each row's first query
    flush_count: torch.Tensor  # [F] queries in each row (this step's write included)
    deferred: torch.Tensor  # [R] bool: the request's query was stashed (its slot is reset when scored)
    rows: int  # stash rows the layers must hold
    length: int

    @functools.cached_property
    def writes_first_rows(self) -> bool:
        """``write_q`` is ``0, 1, ..., W - 1`` (the query rows can be read as a slice)."""
        w = self.write_q
        return bool(w.numel() == 0 or int(w[-1]) == w.numel() - 1)


@dataclass(frozen=True)
class StepPlan:
    """What a scoring policy does in every layer this step (layer-independent)."""

    reset_slots: torch.Tensor  # slots written this step: their Abar (and score state) starts at 0
    packs: list[ScorePack]
    merges: list[MergeEvent]
    reset_positions: torch.Tensor | None = None  # positions of the tokens in reset_slots
    heavy: list[HeavyEvent] = dataclasses.field(default_factory=list)
    decode: DecodeBatch | None = None  # decode requests scored apart from the packs
    stash: StashStep | None = None  # deferred scoring: queries to stash (``decode`` scores stash rows)

    @functools.cached_property
    def idle(self) -> bool:
        """Nothing to reset, score or merge (a step of deferred decodes, none ending a block)."""
        return (
            self.decode is None and not self.packs and not self.merges and not self.heavy
            and not self.reset_slots.numel()
        )  # fmt: skip


def _cached_tokens(
    retained: Retained,
    tokens: StepTokens,
    block_table: torch.Tensor,
    block_size: int,
    active: torch.Tensor | None = None,
    block_retained: Retained | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(request, position, slot) of every token the reference cache holds during this step.

    That is the retained set of the step's first query (position = context length) plus the
    step's own tokens, ordered by request, then position; of the ``active`` requests only.
    ``block_retained``: whether a block (by its first position) holds a retained token (default:
    ``retained`` of its first position, block-granular policies).
    """
    block_retained = block_retained or retained
    b = block_size
    ctx, lens = tokens.context_lens, tokens.seq_lens
    nblk = int(((lens + b - 1) // b).max()) if lens.numel() else 0
    j = torch.arange(nblk)
    start = j[None, :] * b
    all_reqs = torch.arange(lens.numel())[:, None]
    blocks = (start < lens[:, None]) & (
        tokens.kept(block_retained, start, ctx[:, None] + 1, all_reqs) | (start + b > ctx[:, None])
    )
    if active is not None:
        blocks &= active[:, None]
    r, jb = torch.nonzero(blocks, as_tuple=True)
    pos = jb[:, None] * b + torch.arange(b)[None, :]  # [P, B]
    rr = r[:, None].expand_as(pos)
    keep = (pos < lens[rr]) & (tokens.kept(retained, pos, ctx[rr] + 1, rr) | (pos >= ctx[rr]))
    slots = block_table[r, jb].to(torch.int64)[:, None] * b + torch.arange(b)[None, :]
    return rr[keep], pos[keep], slots.expand_as(pos)[keep]


@dataclass(frozen=True)
class Selection:
    """Which queries of a step a policy scores, and which requests' cached tokens the plan reads."""

    q_lo: torch.Tensor  # [R] first row of each request's scored queries
    q_hi: torch.Tensor  # [R] end of them (q_lo == q_hi: none)
    in_packs: torch.Tensor  # [R] bool: the request's scored queries go in a score pack
    active: torch.Tensor  # [R] bool: the plan reads its cached tokens (packs, leaving tokens)
    one_per_pack: bool  # one request per pack (else requests share packs, block-diagonally)
    batched: torch.Tensor | None = None  # decoding requests scored in one DecodeBatch now


Planner = Callable[[StepTokens, int, "StashStep | None", bool], Selection]


def _accumulated(tokens: StepTokens, block_size: int, stash: StashStep | None, defer: bool) -> Selection:
    """Accumulated scores (H2O, CaM, ...): every query counts. Prompt chunks go in packs shared by
    requests; decodes are scored together in a DecodeBatch, now or (deferred scoring, ``stash``)
    once per block."""
    del defer
    decoding = stash.deferred if stash is not None else tokens.query_lens == 1
    block_end = tokens.seq_lens % block_size == 0  # a decode that fills its block: tokens may leave
    qsl = tokens.query_start_loc
    batched = torch.nonzero(decoding).flatten() if stash is None and bool(decoding.any()) else None
    return Selection(qsl[:-1], qsl[1:], ~decoding, ~decoding | block_end, False, batched)


def _current(tokens: StepTokens, block_size: int, stash: StashStep | None, defer: bool) -> Selection:
    """Current scores (only the newest query's attention counts): one request per pack, so the
    last query of each is known; ``defer``: a decode is scored only in the step that fills its
    block (the only step whose scores are read)."""
    decoding = tokens.query_lens == 1
    block_end = tokens.seq_lens % block_size == 0
    in_packs = ~decoding | block_end if defer else torch.ones_like(decoding)
    qsl = tokens.query_start_loc
    return Selection(qsl[:-1], qsl[1:], in_packs, in_packs | block_end, True)


def _token_exact(current: bool) -> Planner:
    def select(tokens: StepTokens, block_size: int, stash: StashStep | None, defer: bool) -> Selection:
        """Token-exact windows: the plugin computes every query's output from the packs, and
        tokens leave at every step, so every query is in a pack and every request is active
        (``current`` scores: one request per pack)."""
        if stash is not None:
            raise ValueError("deferred scoring cannot serve a token-exact policy (every query is attended)")
        every = torch.ones(tokens.seq_lens.numel(), dtype=torch.bool)
        qsl = tokens.query_start_loc
        return Selection(qsl[:-1], qsl[1:], every, every, current)

    return select


def _observation(ev: HeavyPolicy) -> Planner:
    def select(tokens: StepTokens, block_size: int, stash: StashStep | None, defer: bool) -> Selection:
        """An observation-window score (SnapKV): only the observed queries (the prompt's last),
        each request's one run in a pack of its own; no decode is scored, and every chunk takes
        part (its tokens may leave the window)."""
        if stash is not None:
            raise ValueError("deferred scoring cannot serve an observation-window score")
        num_tokens, num_reqs = tokens.token_pos.numel(), tokens.seq_lens.numel()
        seen = ev.observed(tokens.token_pos, tokens.query_hold)
        rows = torch.arange(num_tokens)
        q_lo = torch.full((num_reqs,), num_tokens, dtype=torch.int64).scatter_reduce(
            0, tokens.token_req[seen], rows[seen], "amin"
        )
        q_hi = torch.zeros(num_reqs, dtype=torch.int64).scatter_reduce(
            0, tokens.token_req[seen], rows[seen] + 1, "amax"
        )
        in_packs = q_hi > q_lo
        active = in_packs | (tokens.seq_lens % block_size == 0) | (tokens.query_lens != 1)
        return Selection(q_lo, q_hi, in_packs, active, True)

    return select


def planner_for(policy: KVPolicy) -> Planner:
    """The policy's planner (which queries are scored), chosen once per builder."""
    if policy.token_exact:
        return _token_exact(policy.score_mode != "accumulated")
    score = policy.score
    if score is not None and score.observation_window is not None:
        assert isinstance(policy.eviction, HeavyPolicy)
        return _observation(policy.eviction)
    return _accumulated if policy.score_mode == "accumulated" else _current


def plan_scores(
    policy: KVPolicy,
    tokens: StepTokens,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_size: int,
    pack_elements: int = DEFAULT_PACK_ELEMENTS,
    seeds: list[int | None] | None = None,
    stash: StashStep | None = None,
    defer_decodes: bool = False,
    planner: Planner | None = None,
) -> StepPlan:
    """Score packs and merge events (or heavy-region events) of one step of a policy that tracks
    scores.

    ``planner`` (:func:`planner_for`; chosen here when not given): which queries are scored.
    ``seeds``: each request's own seed of the merge draws (``step_requests``), None: the policy's.
    ``stash``: deferred scoring (``query_stash``, accumulated scores): the stashed decode queries
    are scored, and their slots reset, only in the step their row is scored. ``defer_decodes``:
    in ``current`` mode score a decode only in the step that fills its block. Either way scores
    are read only where tokens leave a window, which a decoding request does only in the step
    that fills its newest block."""
    ev = policy.eviction
    sel = (planner or planner_for(policy))(tokens, block_size, stash, defer_decodes)
    num_tokens = tokens.token_pos.numel()
    nq = tokens.query_lens
    num_reqs = tokens.seq_lens.numel()
    q_lo, q_hi, in_packs, one_per_pack = sel.q_lo, sel.q_hi, sel.in_packs, sel.one_per_pack
    written = slot_mapping[:num_tokens].to(torch.int64)
    if stash is not None:
        written = torch.where(stash.deferred[tokens.token_req], -1, written)  # reset when scored
    reset = written[written >= 0]
    reset_pos = tokens.token_pos[: written.numel()][written >= 0]
    kv_req, kv_pos, kv_slot = _cached_tokens(
        ev.retained, tokens, block_table, block_size, sel.active, ev.block_retained
    )

    nk = torch.bincount(kv_req, minlength=num_reqs)
    kv_start = torch.zeros(num_reqs + 1, dtype=torch.int64)
    kv_start[1:] = torch.cumsum(nk, 0)

    packs: list[ScorePack] = []
    decode = None
    if stash is not None and stash.flush_req.numel():
        decode = plan_decodes(
            ev.retained, tokens, block_table, block_size, stash.flush_req,
            stash.flush_first, stash.flush_count, stash.flush_row, ev.block_retained,
        )  # fmt: skip
        scored = torch.arange(stash.flush_count.max())[None, :] < stash.flush_count[:, None]
        spos = (stash.flush_first[:, None] + torch.arange(scored.shape[1]))[scored]
        sreq = stash.flush_req[:, None].expand_as(scored)[scored]
        sslot = block_table[sreq, spos // block_size].to(torch.int64) * block_size + spos % block_size
        reset, reset_pos = torch.cat([reset, sslot]), torch.cat([reset_pos, spos])
    elif sel.batched is not None:
        decode = plan_decodes(
            ev.retained, tokens, block_table, block_size, sel.batched, block_retained=ev.block_retained
        )
    nq_l, nk_l, pack_l = nq.tolist(), nk.tolist(), in_packs.tolist()
    first = 0
    while first < num_reqs:
        if not pack_l[first]:
            first += 1
            continue
        last, sq, sk = first, nq_l[first], nk_l[first]
        while not one_per_pack and last + 1 < num_reqs and pack_l[last + 1]:
            q2, k2 = sq + nq_l[last + 1], sk + nk_l[last + 1]
            if q2 * k2 > pack_elements:
                break
            last, sq, sk = last + 1, q2, k2
        q0, q1 = int(q_lo[first]), int(q_hi[last])
        k0, k1 = int(kv_start[first]), int(kv_start[last + 1])
        step = max(1, MAX_PAIRS_PER_CALL // max(k1 - k0, 1)) if first == last else q1 - q0
        for s0 in range(q0, q1, max(step, 1)):
            s1 = min(s0 + step, q1)
            q_req, q_pos = tokens.token_req[s0:s1], tokens.token_pos[s0:s1]
            kv = kv_pos[None, k0:k1]
            visible = tokens.kept(ev.retained, kv, q_pos[:, None] + 1, q_req[:, None]) & (
                kv <= q_pos[:, None]
            )
            visible &= q_req[:, None] == kv_req[None, k0:k1]
            packs.append(ScorePack(slice(s0, s1), kv_slot[k0:k1], visible))
        first = last + 1

    merges: list[MergeEvent] = []
    if isinstance(ev, HeavyPolicy):
        heavy = _plan_heavy(policy, ev, tokens, kv_req, kv_pos, kv_slot, kv_start, seeds)
        return StepPlan(reset, packs, merges, reset_pos, heavy, decode, stash)
    if policy.merge is not None and kv_req.numel():
        next_n = tokens.seq_lens[kv_req] + 1  # the next query's length, per cached token
        evicted = ~tokens.kept(ev.retained, kv_pos, next_n, kv_req)
        target = ~evicted & (kv_pos >= ev.window_start(next_n))
        reach = merge_rule(policy.merge.rule).reach(policy.merge)
        chains = []
        for r in torch.unique(kv_req[evicted]).tolist():
            k0, k1 = int(kv_start[r]), int(kv_start[r + 1])
            pos = kv_pos[k0:k1]
            idx, leaving = build_chain(pos, evicted[k0:k1], target[k0:k1], reach)
            seed = seeds[r] if seeds is not None else None
            chains.append((kv_slot[k0:k1][idx], pos[idx], leaving, seed))
        merges = group_merges(chains)
    return StepPlan(reset, packs, merges, reset_pos, decode=decode, stash=stash)


def _plan_heavy(
    policy: KVPolicy,
    ev: HeavyPolicy,
    tokens: StepTokens,
    kv_req: torch.Tensor,
    kv_pos: torch.Tensor,
    kv_slot: torch.Tensor,
    kv_start: torch.Tensor,
    seeds: list[int | None] | None = None,
) -> list[HeavyEvent]:
    """The heavy-region events of the requests whose window loses tokens at the end of the step."""
    if not kv_req.numel():
        return []
    next_n = tokens.seq_lens[kv_req] + 1
    evicted = ~tokens.kept(ev.retained, kv_pos, next_n, kv_req)
    reach = None
    if policy.merge is not None:
        reach = merge_rule(policy.merge.rule).reach(policy.merge)
    events = []
    for r in torch.unique(kv_req[evicted]).tolist():
        k0, k1 = int(kv_start[r]), int(kv_start[r + 1])
        pos, slot, gone = kv_pos[k0:k1], kv_slot[k0:k1], evicted[k0:k1]
        heavy = (pos >= ev.heavy_start) & (pos < ev.prefix_end)
        n = int(tokens.seq_lens[r])
        receivers = slot[:0]
        if policy.merge is not None:
            window = ~gone & (pos >= ev.window_start(n + 1))
            receivers = slot[window][torch.argsort(pos[window])]
            receivers = receivers if reach is None else receivers[:reach]
        restart = None
        if tokens.hold is not None and ev.restarts_scores(n + 1, int(tokens.hold[r])):
            restart = slot[~gone]
        events.append(
            HeavyEvent(
                slot[heavy][torch.argsort(pos[heavy])],
                slot[gone][torch.argsort(pos[gone])],
                receivers,
                n,
                seeds[r] if seeds is not None else None,
                restart,
            )
        )
    return events
