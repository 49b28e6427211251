"""The heavy-region choice of the score-driven policies, and the merge of what it evicts.

Both engines call :func:`heavy_step` with the same thing, gathered from their own storage: the
*candidates* (the heavy region's tokens followed by the tokens leaving the window now) and the
*receivers* (the retained window tokens after them, in position order, as many as the merge rule
reaches). Per KV head (per layer when the score is not per-head) the best ``capacity`` candidates
by the score's rank stay, in position order; the others are evicted and, with a merge rule,
merged into the receivers by ``core.rules.merge_leaving`` on a per-head chain (the head's evicted
tokens in position order, then the receivers; one call for all heads, positions per head),
exactly as a leaving block is merged under StreamingLLM. Ties in rank keep the newer token.
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

    heavy: Tokens  # [capacity, H, ...], position order per head
    receiver_v: torch.Tensor | None  # [R, H, D] (None: nothing merged)
    receiver_k: torch.Tensor | None  # [R, H, D] when the rule merges keys
    receiver_abar: torch.Tensor | None
    decisions: list[MergeDecisions]
    evicted: torch.Tensor  # [C - capacity, H] candidate indices evicted per head


def select_heavy(
    rank: torch.Tensor, pos: torch.Tensor, capacity: int, per_head: bool, group: int | None = None
) -> torch.Tensor:
    """[C, H] ranks -> [C, H] candidate indices per head: the kept ``capacity`` first (by position),
    then the evicted (by position). Ties keep the newer token. ``per_head`` False: one choice per
    layer from the mean rank of each ``group`` of consecutive heads (default: all), and that
    group's first head's positions."""
    if not per_head:
        c, h = rank.shape
        g = group or h
        mean = rank.view(c, h // g, g).mean(dim=2, keepdim=True)
        rank = mean.expand(c, h // g, g).reshape(c, h)
        pos = pos.view(c, h // g, g)[:, :, :1].expand(c, h // g, g).reshape(c, h)
    by_new = torch.argsort(pos, dim=0, descending=True, stable=True)
    order = torch.argsort(rank.gather(0, by_new), dim=0, descending=True, stable=True)
    best = by_new.gather(0, order)  # [C, H] best first
    kept, gone = best[:capacity], best[capacity:]
    kept = kept.gather(0, torch.argsort(pos.gather(0, kept), dim=0, stable=True))
    gone = gone.gather(0, torch.argsort(pos.gather(0, gone), dim=0, stable=True))
    return torch.cat([kept, gone])


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

    ``num_tokens``: the sequence length at the end of this step (a token at position p has been
    seen by ``num_tokens - p`` queries). ``heads``: global KV-head indices (the CaM draws' keys).

    Several sequences' events can run as one: their heads side by side on the head axis
    (``group`` heads per sequence, ``num_tokens`` [H] per column, ``heads`` repeated), when they
    have the same numbers of candidates and receivers.
    """
    num_heads = candidates.k.shape[1]
    seen = num_tokens - candidates.pos
    rank = score.rank(candidates.state, candidates.abar, seen)
    order = select_heavy(rank, candidates.pos, capacity, type(score).per_head, group)
    heavy = candidates.take(order[:capacity])
    evicted = order[capacity:]
    if merge is None or receivers is None or evicted.shape[0] == 0 or receivers.k.shape[0] == 0:
        return HeavyResult(heavy, None, None, None, [], evicted)

    gone = candidates.take(evicted)
    head_ids = heads if heads is not None else torch.arange(num_heads, device=candidates.k.device)
    e, r = evicted.shape[0], receivers.k.shape[0]
    # every head's chain has the same shape (its e evicted tokens in position order, then the
    # receivers), so one call merges all heads; positions are per head
    leaving = torch.cat([torch.ones(e, dtype=torch.bool), torch.zeros(r, dtype=torch.bool)])
    res = merge_leaving(
        values=torch.cat([gone.v, receivers.v]),
        keys=torch.cat([gone.k, receivers.k]),
        abar=torch.cat([gone.abar, receivers.abar]),
        leaving=leaving.to(candidates.k.device),
        positions=torch.cat([gone.pos, receivers.pos]),
        layer=layer,
        config=merge,
        seed=seed,
        heads=head_ids,
    )
    new_k = None if res.keys is None else res.keys[e:]
    return HeavyResult(
        heavy, res.values[e:], new_k, res.abar[e:].to(receivers.abar.dtype), [res.decisions], evicted
    )
