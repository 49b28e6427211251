"""Per-token scores of the score-driven policies (H2O, TOVA, Scissorhands, CORM), layout-agnostic.

A score keeps some state per cached token and KV head (named float32 or int64 tensors ``[N, H]``),
updates it from each step's attention probabilities, and ranks candidates when the policy must
choose which tokens stay (:func:`cam_vllm.core.selection.select_heavy`). Every engine (the reference
cache, the vLLM worker) gathers the state of the tokens it scores into these shapes, calls
:meth:`TokenScore.update`, and scatters the result back, so both engines run this code.

State shared by every score-driven policy (the selection and the merge rules need it):
  * ``pos`` (int32): the token's position. In vLLM a heavy slot holds, per KV head, a token
    copied from elsewhere, so the slot's own position says nothing about its token.
Accumulated attention (``Abar``, H2O's score and CaM's weight) is kept by the engines as before.

Importance (Scissorhands, CORM): a query finds a token important when it gives it at least
``threshold / n`` of its attention, ``n`` being the number of tokens that query sees (1/n is the
uniform share). The last ``history`` importance bits of every token are kept newest in bit 0, so a
chunk of queries updates them exactly like the same queries one by one. They are stored in an
int32 when ``history`` <= 32 (the default: 4 bytes per slot instead of 8, which keeps the worker's
state within 5 % of the KV at head_dim 64) and computed on in int64.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

# An int64 holds the importance history; bit 63 is the sign, so at most 62 queries are kept.
MAX_HISTORY = 62
# Up to this many bits the history is stored in an int32, its bit pattern wrapped (bit 31 = sign).
INT32_HISTORY = 32

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenScore(ABC):
    """A registered score: its per-token state and how it ranks tokens (higher stays).

    history and threshold are used by the importance-based scores only.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    fields: ClassVar[dict[str, torch.dtype]] = {}  # extra per-token state besides pos and Abar
    per_head: ClassVar[bool] = True  # False: one choice per layer (the heads' mean rank)
    holds_prompt: ClassVar[bool] = False  # the policy's default prompt hold (``HeavyPolicy.prompt_hold``)
    history: int = 32
    threshold: float = 1.0

    @property
    def observation_window(self) -> int | None:
        """Only the last this many prompt queries before a choice are scored (None: every query,
        decodes too); which queries those are is the policy's rule (``HeavyPolicy.observed``)."""
        return None

    def __post_init__(self) -> None:
        if not 1 <= self.history <= MAX_HISTORY:
            raise ValueError(f"score history must be 1..{MAX_HISTORY} queries, got {self.history}")
        if not self.threshold > 0.0:
            raise ValueError(f"score threshold must be > 0 (a multiple of 1/n), got {self.threshold}")

    def update(self, state: State, probs_kv: torch.Tensor, visible: torch.Tensor) -> State:
        """New values of ``fields`` for the scored tokens; probs_kv [Nq, H, Nk], visible [Nq, Nk]."""
        return {}

    @abstractmethod
    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        """[C, H] float: how much each candidate deserves to stay (higher stays).

        ``abar`` [C, H] is the accumulated attention; ``seen`` [C, H] the number of queries that
        have attended the token so far (its retained lifetime).
        """

    def describe(self) -> str:
        return self.summary


@dataclass(frozen=True)
class ImportanceScore(TokenScore):
    """A score kept as the importance bits of the last ``history`` queries (Scissorhands, CORM)."""

    @property
    def fields(self) -> dict[str, torch.dtype]:  # type: ignore[override]
        return {"hist": torch.int32 if self.history <= INT32_HISTORY else torch.int64}

    def update(self, state: State, probs_kv: torch.Tensor, visible: torch.Tensor) -> State:
        imp = importance(probs_kv, visible, self.threshold)
        old = state["hist"]
        return {"hist": store_bits(push_history(history_bits(old), imp, visible, self.history), old.dtype)}


# --------------------------------------------------------------------------------------------
# State updates shared by the scores
# --------------------------------------------------------------------------------------------


def last_visible_attention(old: torch.Tensor, probs_kv: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[Nk, H]: the attention of the newest query that saw each token (``old`` where none did).

    Queries are rows in position order; several requests may share the call (each key is then
    visible only to its own request's queries), so "newest" is per key column.
    """
    nq = visible.shape[0]
    rows = torch.arange(nq, device=visible.device)[:, None]
    last = torch.where(visible, rows, -1).amax(dim=0)  # [Nk]
    seen = last >= 0
    got = probs_kv[last.clamp(min=0), :, torch.arange(visible.shape[1], device=visible.device)]  # [Nk, H]
    return torch.where(seen[:, None], got.to(old.dtype), old)


def importance(probs_kv: torch.Tensor, visible: torch.Tensor, threshold: float) -> torch.Tensor:
    """[Nq, H, Nk] bool: the query gave the token at least ``threshold`` times the uniform share."""
    n = visible.sum(dim=1).clamp(min=1).to(probs_kv.dtype)  # tokens each query sees
    return (probs_kv >= (threshold / n)[:, None, None]) & visible[:, None, :]


def push_history(
    old: torch.Tensor, important: torch.Tensor, visible: torch.Tensor, history: int
) -> torch.Tensor:
    """[Nk, H] int64: ``old`` shifted by the queries that saw each token, their bits added.

    A token seen by ``s`` queries of this call moves ``s`` places (older bits fall out after
    ``history``); the newest query's bit lands in bit 0, as if the queries came one by one.
    """
    vis = visible.to(torch.int64)  # [Nq, Nk]
    after = vis.flip(0).cumsum(0).flip(0) - vis  # visible queries after each row, per key
    shift = vis.sum(dim=0)  # [Nk]
    take = important & visible[:, None, :] & (after < history)[:, None, :]  # [Nq, H, Nk]
    bits = (take.to(torch.int64) << after.clamp(max=history)[:, None, :]).sum(dim=0).T  # [Nk, H]
    mask = (1 << history) - 1
    moved = torch.where(
        (shift >= history)[:, None], torch.zeros_like(old), (old << shift.clamp(max=history)[:, None]) & mask
    )
    return moved | bits


def history_bits(stored: torch.Tensor) -> torch.Tensor:
    """The stored history as non-negative int64 bits (an int32's pattern read unsigned)."""
    if stored.dtype == torch.int32:
        return stored.to(torch.int64) & 0xFFFFFFFF
    return stored


def store_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative int64 bits in the storage dtype; an int32 gets bit 31 as its sign bit (explicitly
    wrapped, not left to the cast's out-of-range behaviour)."""
    if dtype == torch.int32:
        return torch.where(bits >= 1 << 31, bits - (1 << 32), bits).to(torch.int32)
    return bits


def popcount(bits: torch.Tensor, width: int = MAX_HISTORY) -> torch.Tensor:
    """Number of set bits of non-negative int64 values (the first ``width`` bits)."""
    count = torch.zeros_like(bits)
    for i in range(width):
        count += (bits >> i) & 1
    return count


def trailing_zeros(bits: torch.Tensor, width: int) -> torch.Tensor:
    """Zero bits below the lowest set bit, ``width`` when none is set in the first ``width``."""
    low = bits & -bits  # the lowest set bit alone
    return torch.where(low == 0, torch.full_like(bits, width), popcount(low - 1, width))
