"""The heavy-region choice of the score-driven policies, and the merge of what it evicts.

Both engines call :func:`heavy_step` with the same thing, gathered from their own storage: the
*candidates* (the heavy region's tokens followed by the tokens leaving the window now) and the
*receivers* (the retained window tokens after them, in position order, as many as the merge rule
reaches). Per KV head (per layer when the score is not per-head) the best ``capacity`` candidates
by the score's rank stay (a kept token in its slot, :class:`HeavyChoice`); the others are
evicted and, with a merge rule, merged into the receivers by ``core.rules.merge_leaving`` on a
per-head chain (the head's evicted tokens in position order, then the receivers; one call for
all heads, positions per head), exactly as a leaving block is merged under StreamingLLM. Ties in
rank keep the newer token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cam_vllm.core.merge import MergeConfig, MergeDecisions
from cam_vllm.core.rules import merge_leaving
from cam_vllm.core.scores import State, TokenScore


@dataclass
class Tokens:
    """Some tokens of one sequence and layer: k, v [N, H, D], abar [N, H], state (incl. ``pos``) [N, H]."""

    k: torch.Tensor
    v: torch.Tensor
    abar: torch.Tensor
    state: State

    @property
    def pos(self) -> torch.Tensor:
        return self.state["pos"]

    def take(self, idx: torch.Tensor) -> Tokens:
        """Per-head gather: idx [M, H] -> tokens [M, H, ...] (head h takes rows idx[:, h])."""
        d = idx[:, :, None]
        return Tokens(
            self.k.gather(0, d.expand(-1, -1, self.k.shape[2])),
            self.v.gather(0, d.expand(-1, -1, self.v.shape[2])),
            self.abar.gather(0, idx),
            {name: t.gather(0, idx) for name, t in self.state.items()},
        )


@dataclass(frozen=True)
class HeavyResult:
    """What to write back: the heavy region's new tokens and the receivers' new values."""

    heavy: Tokens  # [capacity, H, ...], per head the token each heavy slot holds (:class:`HeavyChoice`)
    receiver_v: torch.Tensor | None  # [R, H, D] (None: nothing merged)
    receiver_k: torch.Tensor | None  # [R, H, D] when the rule merges keys
    receiver_abar: torch.Tensor | None
    decisions: list[MergeDecisions]
    evicted: torch.Tensor  # [C - capacity, H] candidate indices evicted per head


@dataclass(frozen=True)
class HeavyChoice:
    """Which candidate each heavy slot holds after the choice, per head (``fill`` [capacity, H]),
    and the evicted candidates in position order (``evicted`` [C - capacity, H]).

    A kept heavy token stays in its slot; a token entering from the window takes a slot whose
    token was evicted (the k-th entering token, by position, the k-th such slot). So a choice
    rewrites only the slots that change hands, at most as many per head as tokens left the window,
    instead of re-sorting the whole region. The region's order is therefore not by position;
    attention does not depend on it, and each slot carries its token's position (``pos``)."""

    fill: torch.Tensor
    evicted: torch.Tensor


def _best_first(
    rank: torch.Tensor, pos: torch.Tensor, per_head: bool, group: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[C, H] candidate indices per head, best first (ties: the newer token), and the positions
    the choice goes by (per layer: the group's first head's)."""
    if not per_head:
        c, h = rank.shape
        g = group or h
        mean = rank.view(c, h // g, g).mean(dim=2, keepdim=True)
        rank = mean.expand(c, h // g, g).reshape(c, h)
        pos = pos.view(c, h // g, g)[:, :, :1].expand(c, h // g, g).reshape(c, h)
    by_new = torch.argsort(pos, dim=0, descending=True, stable=True)
    order = torch.argsort(rank.gather(0, by_new), dim=0, descending=True, stable=True)
    return by_new.gather(0, order), pos


def _by_position(idx: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return idx.gather(0, torch.argsort(pos.gather(0, idx), dim=0, stable=True))


def select_heavy(
    rank: torch.Tensor, pos: torch.Tensor, capacity: int, per_head: bool, group: int | None = None
) -> torch.Tensor:
    """[C, H] ranks -> [C, H] candidate indices per head: the kept ``capacity`` first (by position),
    then the evicted (by position). Ties keep the newer token. ``per_head`` False: one choice per
    layer from the mean rank of each ``group`` of consecutive heads (default: all), and that
    group's first head's positions."""
    best, pos = _best_first(rank, pos, per_head, group)
    return torch.cat([_by_position(best[:capacity], pos), _by_position(best[capacity:], pos)])


def choose_heavy(
    state: State,
    abar: torch.Tensor,
    capacity: int,
    score: TokenScore,
    num_tokens: int | torch.Tensor,
    group: int | None = None,
) -> HeavyChoice:
    """The heavy-region choice among candidates (the region's ``capacity`` tokens, then the
    tokens leaving the window) from their scores alone (``state`` incl. ``pos``, ``abar`` [C, H]).

    ``num_tokens``: the sequence length at the end of this step (a token at position p has been
    seen by ``num_tokens - p`` queries); ``group``: heads per sequence when several sequences'
    candidates sit side by side on the head axis (a per-layer score chooses per group)."""
    pos = state["pos"]
    rank = score.rank(state, abar, num_tokens - pos)
    best, by = _best_first(rank, pos, type(score).per_head, group)  # as select_heavy chooses
    c, h = best.shape
    is_kept = torch.zeros(c, h, dtype=torch.bool, device=best.device).scatter_(0, best[:capacity], True)
    stays = is_kept[:capacity]
    # the slots left by evicted heavy tokens, in slot order, then the entering tokens, in candidate
    # (position) order: the k-th entering token goes to the k-th free slot
    free = torch.argsort(stays.to(torch.int8), dim=0, stable=True)
    entering = capacity + torch.argsort((~is_kept[capacity:]).to(torch.int8), dim=0, stable=True)
    m = min(c - capacity, capacity)
    moves = torch.arange(m, device=best.device)[:, None] < (~stays).sum(dim=0)[None, :]
    fill = torch.arange(capacity, device=best.device)[:, None].expand(capacity, h).clone()
    fill.scatter_(0, free[:m], torch.where(moves, entering[:m], free[:m]))
    return HeavyChoice(fill, _by_position(best[capacity:], by))


def merge_evicted(
    gone: Tokens,
    receivers: Tokens,
    merge: MergeConfig,
    layer: int,
    seed: int | None = None,
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, MergeDecisions]:
    """Merge the evicted tokens (``gone`` [E, H], position order per head) into the receivers:
    their new values, keys (rules that merge keys; else None) and ``abar``, and the decisions."""
    e, r = gone.k.shape[0], receivers.k.shape[0]
    head_ids = heads if heads is not None else torch.arange(gone.k.shape[1], device=gone.k.device)
    # every head's chain has the same shape (its e evicted tokens in position order, then the
    # receivers), so one call merges all heads; positions are per head
    leaving = torch.cat([torch.ones(e, dtype=torch.bool), torch.zeros(r, dtype=torch.bool)])
    res = merge_leaving(
        values=torch.cat([gone.v, receivers.v]),
        keys=torch.cat([gone.k, receivers.k]),
        abar=torch.cat([gone.abar, receivers.abar]),
        leaving=leaving.to(gone.k.device),
        positions=torch.cat([gone.pos, receivers.pos]),
        layer=layer,
        config=merge,
        seed=seed,
        heads=head_ids,
    )
    new_k = None if res.keys is None else res.keys[e:]
    return res.values[e:], new_k, res.abar[e:].to(receivers.abar.dtype), res.decisions


def heavy_step(
    candidates: Tokens,
    receivers: Tokens | None,
    capacity: int,
    score: TokenScore,
    num_tokens: int | torch.Tensor,
    merge: MergeConfig | None,
    layer: int,
    seed: int | None = None,
    heads: torch.Tensor | None = None,
    group: int | None = None,
) -> HeavyResult:
    """Choose the heavy region among ``candidates`` and merge the evicted into ``receivers``.

    ``heads``: global KV-head indices (the CaM draws' keys). Several sequences' events can run
    as one: their heads side by side on the head axis (``group`` heads per sequence,
    ``num_tokens`` [H] per column, ``heads`` repeated), when they have the same numbers of
    candidates and receivers. (The vLLM worker makes the same choice with
    :func:`choose_heavy` and reads only the tokens that move.)
    """
    choice = choose_heavy(candidates.state, candidates.abar, capacity, score, num_tokens, group)
    heavy = candidates.take(choice.fill)
    evicted = choice.evicted
    if merge is None or receivers is None or evicted.shape[0] == 0 or receivers.k.shape[0] == 0:
        return HeavyResult(heavy, None, None, None, [], evicted)
    v, k, abar, decisions = merge_evicted(candidates.take(evicted), receivers, merge, layer, seed, heads)
    return HeavyResult(heavy, v, k, abar, [decisions], evicted)
