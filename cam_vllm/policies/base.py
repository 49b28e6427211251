"""The eviction-policy interface.

A policy answers two questions about one sequence, for one layer:
  * which cached tokens may a query at position ``q`` attend to (``visible``), and
  * which cached tokens does the cache drop once ``num_tokens`` tokens exist (``retained``).
CaM merging is not a policy: it wraps any policy (see :class:`cam_vllm.policies.KVPolicy`) and
merges what the policy drops into the policy's recent window, whose start ``window_start`` gives
(the block layout's one rule, :mod:`cam_vllm.policies.layout`).

Policies here are *positional*: their decisions depend only on token positions and the sequence
length, so vLLM's scheduler (which frees blocks) and its workers (which attend and merge)
compute the same retained set independently. ``block_size`` > 1 makes decisions at block
granularity, as a paged cache must; ``block_size == 1`` is the per-token behaviour of the paper.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.policies.layout import in_held_prompt


@dataclass(frozen=True)
class EvictionPolicy(ABC):
    """Base class: subclasses define ``retained`` and ``window_start`` and register a name."""

    name: ClassVar[str]
    block_size: int = 1

    @abstractmethod
    def retained(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        """Bool mask: is a token at ``positions`` kept while the sequence has ``num_tokens``?

        Both arguments broadcast (e.g. positions [1, Nk] against num_tokens [Nq, 1]).
        """

    @abstractmethod
    def window_start(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """First position of the recent window (the merge targets start there)."""

    def max_retained_tokens(self) -> int | None:
        """Upper bound on retained tokens for any length (None: unbounded)."""
        return None

    def block_retained(self, starts: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        """Whether the blocks starting at ``starts`` hold a retained token. Block-granular
        policies keep or drop a block whole, so its first position decides."""
        return self.retained(starts, num_tokens)

    @property
    def holds_prompt(self) -> bool:
        """Whether a sequence keeps every prompt token until its prompt has been read (the
        *prompt hold*: the policy chooses after reading, e.g. SnapKV); see :meth:`kept`."""
        return False

    @property
    def hold_span(self) -> int:
        """Tokens by which a bounded prompt hold's window start moves (0: a whole-prompt hold, or
        none); see :meth:`held`."""
        return 0

    def kept(
        self, positions: torch.Tensor, num_tokens: int | torch.Tensor, hold_end: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """``retained``, or every token while the sequence is inside its held prompt.

        ``hold_end``: the prompt length of a sequence whose policy holds its prompt (0: no hold).
        A query at position ``q < hold_end`` sees what the hold keeps (:meth:`held`: its whole
        causal prefix, or up to a bounded hold's size); from the first query past the prompt on,
        the policy's own rule applies. Broadcasts like ``retained``.
        """
        out = self.retained(positions, num_tokens)
        if isinstance(hold_end, int) and hold_end <= 0:
            return out
        return out | (in_held_prompt(num_tokens, hold_end) & self.held(positions, num_tokens))

    def held(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        """What a held prompt keeps at ``num_tokens`` (a superset of ``retained``): everything,
        unless the hold is bounded (``HeavyPolicy.prompt_hold_tokens``)."""
        return torch.ones_like(positions + num_tokens, dtype=torch.bool)

    def visible(
        self, q_positions: torch.Tensor, kv_positions: torch.Tensor, hold_end: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """[Nq, Nk] bool: causal and retained when the query is the newest token.

        Queries of one chunk each see the retained set of their own length (q + 1), so a chunked
        prefill attends exactly like token-by-token decoding would. ``hold_end``: see :meth:`kept`.
        """
        kv = kv_positions[None, :]
        q = q_positions[:, None]
        return self.kept(kv, q + 1, hold_end) & (kv <= q)


@dataclass(frozen=True)
class FullCache(EvictionPolicy):
    """Keep everything: vLLM's own behaviour."""

    name: ClassVar[str] = "none"

    def retained(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        return torch.ones_like(positions + num_tokens, dtype=torch.bool)

    def window_start(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        return num_tokens * 0
