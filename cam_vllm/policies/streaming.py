"""StreamingLLM (Xiao et al., 2023): keep the first tokens (attention sinks) and a recent window.

Per token (block_size 1), a query at position q sees positions [0, S) and [q + 1 - W, q]: the
window W counts the query itself, so the cache never holds more than S + W tokens. With
blocks of B tokens, the sink region is rounded up to whole blocks and the window is the last W/B
blocks (the newest possibly partial), so the window holds between W - B + 1 and W tokens and
a whole block leaves it at once. Keys keep the rotary position they were written with.

``token_exact`` (blocks of B > 1): queries see exactly what the per-token policy shows (S sinks and
the last W tokens) while the cache still frees whole blocks: a block is held until its last
token leaves, so the blocks held cover the sinks rounded up to a block and ``W + B - 1`` window
tokens rounded up (``block_prefix_end``, ``block_window_tokens``: what vLLM's block manager
keeps). Tokens of a held block that the policy no longer shows are masked by the engine, which
therefore computes the attention output itself (the fused kernel has no per-token mask).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from cam_vllm.policies.base import EvictionPolicy
from cam_vllm.policies.layout import BlockLayout


@dataclass(frozen=True)
class StreamingPolicy(EvictionPolicy):
    name: ClassVar[str] = "streaming"
    sink_tokens: int = 4
    window_tokens: int = 1024
    token_exact: bool = False

    def __post_init__(self) -> None:
        self._check_blocks()
        if self.sink_tokens >= self.window_tokens:
            raise ValueError(
                f"sink tokens ({self.sink_tokens}) must be fewer than window tokens "
                f"({self.window_tokens}); StreamingLLM keeps a few sinks and a larger window"
            )

    def _check_blocks(self) -> None:
        b = self.block_size
        if b < 1:
            raise ValueError(f"block_size must be >= 1, got {b}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink tokens must be >= 0, got {self.sink_tokens}")
        if self.window_tokens < b:
            raise ValueError(
                f"window of {self.window_tokens} tokens is smaller than one block ({b} tokens); "
                "raise the window or lower the block size"
            )
        if self.window_tokens % b and not self.token_exact:
            raise ValueError(
                f"window of {self.window_tokens} tokens is not a multiple of the block size {b}; "
                f"use {self.window_tokens // b * b} or {(self.window_tokens // b + 1) * b}"
            )

    @property
    def sink_end(self) -> int:
        """End of the sink region: the sinks rounded up to whole blocks."""
        b = self.block_size
        return -(-self.sink_tokens // b) * b

    @property
    def prefix_end(self) -> int:
        """End of the kept prefix (whole blocks): the sinks here; sinks + heavy region in subclasses.
        Token-exact: the sinks themselves."""
        return self.sink_tokens if self.token_exact else self.sink_end

    @cached_property
    def layout(self) -> BlockLayout:
        """The policy's block layout: the one window / hold rule the scheduler and the workers ask."""
        b, exact = self.block_size, self.token_exact
        return BlockLayout(self.prefix_end, self.window_tokens, b, exact, self.hold_span)

    @property
    def block_prefix_end(self) -> int:
        """End of the blocks that are never freed (the prefix rounded up to whole blocks)."""
        return self.layout.block_prefix_end

    @property
    def block_window_tokens(self) -> int:
        """Window tokens the held blocks cover: the window, or (token-exact) enough whole blocks
        that the last ``window_tokens`` are always in them: ``W + B - 1`` rounded up."""
        return self.layout.block_window_tokens

    def window_start(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        return self.layout.window_start(num_tokens)

    def retained(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        return self.layout.retained(positions, num_tokens)

    def block_retained(self, starts: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        """Whether the blocks starting at ``starts`` hold any retained token (token-exact: the
        sinks' block and the oldest window block are partly retained)."""
        kept = self.retained(starts, num_tokens)
        if self.token_exact:
            kept = kept | self.retained(starts + self.block_size - 1, num_tokens)
        return kept

    def max_retained_tokens(self) -> int:
        return self.prefix_end + self.window_tokens

    def held_window_start(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """First window position a held prompt keeps at ``num_tokens`` (``BlockLayout``)."""
        return self.layout.held_window_start(num_tokens)

    def held(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        return self.layout.held(positions, num_tokens)

    def max_held_tokens(self) -> int:
        """Most cached tokens a sequence holds in whole blocks (what its memory costs)."""
        return self.block_prefix_end + self.block_window_tokens

    def waves(
        self,
        positions: torch.Tensor,
        request: torch.Tensor | None = None,
        hold_end: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Wave index of each query of a step (0, 1, ...; per request, in position order).

        A new wave starts at a query whose retained set lost a block that the previous query of
        the same request still saw (its window start moved). ``request``: each query's request
        (None: all one request). ``hold_end`` (per query, or one int): queries inside a held prompt
        (:meth:`EvictionPolicy.kept`) see what the hold keeps, so they share a wave until a
        bounded hold compresses, and the first query past the prompt starts a new one (the policy
        chooses before it attends).
        """
        starts = self.layout.kept_start(positions + 1, hold_end)
        new = torch.zeros_like(positions, dtype=torch.int64)
        if positions.numel() > 1:
            same = torch.ones_like(positions[1:], dtype=torch.bool)
            if request is not None:
                same = request[1:] == request[:-1]
            new[1:] = (same & (starts[1:] != starts[:-1])).to(torch.int64)
        count = new.cumsum(0)
        if request is None:
            return count
        first = torch.ones_like(positions, dtype=torch.bool)
        first[1:] = request[1:] != request[:-1]
        base = torch.where(first, count, torch.zeros_like(count))
        base = torch.cummax(base, dim=0).values  # the count at each request's first query
        return count - base
