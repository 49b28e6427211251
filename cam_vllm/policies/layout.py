"""A sinks + window policy's block layout: the one rule for where a sequence's kept tokens lie.

The scheduler (which blocks to free, how many a request can hold), the workers' step plan
(what each query sees, per-request windows) and the policies themselves all ask one frozen
:class:`BlockLayout`, for ints (the scheduler) and tensors (per query, per row) alike:

* the kept prefix ``[0, prefix_end)``: the sinks, plus the heavy region of a score-driven policy;
* the recent window: the last ``window_tokens / block_size`` blocks (the newest possibly
  partial), or exactly the last ``window_tokens`` tokens for a token-exact layout;
* the prompt hold: while the next query is inside a held prompt, nothing goes (a whole-prompt
  hold) or the window start moves in steps of ``hold_span`` tokens (a bounded hold).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def in_held_prompt(num_tokens: int | torch.Tensor, hold_end: int | torch.Tensor) -> bool | torch.Tensor:
    """The prompt hold's one rule: a query that sees ``num_tokens`` tokens is still inside a held
    prompt of ``hold_end`` tokens (0: no hold), so what the hold keeps stays."""
    return num_tokens <= hold_end


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class BlockLayout:
    """Where the kept tokens of a sequence lie, in tokens, for blocks of ``block_size``.

    ``prefix_end``: end of the kept prefix (whole blocks unless ``exact``). ``window_tokens``:
    the recent window (a multiple of the block size unless ``exact``). ``exact``: queries see
    exactly the last ``window_tokens`` tokens while memory is still freed in whole blocks (a
    block goes once its last token has left). ``hold_span``: a bounded prompt hold's step (0: a
    whole-prompt hold, or none; whether a sequence holds its prompt is per sequence, ``hold_end``).
    """

    prefix_end: int
    window_tokens: int
    block_size: int
    exact: bool = False
    hold_span: int = 0

    @property
    def block_prefix_end(self) -> int:
        """End of the blocks that are never freed: the prefix rounded up to whole blocks."""
        return _cdiv(self.prefix_end, self.block_size) * self.block_size

    @property
    def block_window_tokens(self) -> int:
        """Window tokens the held blocks cover: the window, or (exact) enough whole blocks that
        the last ``window_tokens`` tokens always lie in them, ``W + B - 1`` rounded up."""
        b = self.block_size
        return _cdiv(self.window_tokens + b - 1, b) * b if self.exact else self.window_tokens

    def window_start(
        self, num_tokens: int | torch.Tensor, window_tokens: int | torch.Tensor | None = None
    ) -> int | torch.Tensor:
        """First recent-window position of a sequence of ``num_tokens`` tokens, never below the
        prefix end. ``window_tokens``: a smaller window of a request's own (per row, or one int)."""
        b = 1 if self.exact else self.block_size
        w = self.window_tokens if window_tokens is None else window_tokens
        start = -(-num_tokens // b) * b - w
        if isinstance(start, torch.Tensor):
            return start.clamp(min=self.prefix_end)
        return max(self.prefix_end, start)

    def held_window_start(self, num_tokens: int | torch.Tensor) -> int | torch.Tensor:
        """First window position a held prompt keeps at ``num_tokens``: the prefix end for a
        whole-prompt hold (nothing goes), else the window start moved in steps of ``hold_span``
        (a held prompt keeps up to ``hold_span - 1`` tokens more than the policy and compresses
        each time a step is reached)."""
        if not self.hold_span:
            return num_tokens * 0 + self.prefix_end
        p = self.prefix_end
        return p + (self.window_start(num_tokens) - p) // self.hold_span * self.hold_span

    def kept_start(
        self,
        num_tokens: int | torch.Tensor,
        hold_end: int | torch.Tensor = 0,
        window_tokens: int | torch.Tensor | None = None,
    ) -> int | torch.Tensor:
        """First window position kept for a query that sees ``num_tokens`` tokens: the held
        window start while it is inside a held prompt of ``hold_end`` tokens, else the window's."""
        start = self.window_start(num_tokens, window_tokens)
        if isinstance(hold_end, int) and hold_end <= 0:
            return start
        inside = in_held_prompt(num_tokens, hold_end)
        if isinstance(inside, torch.Tensor):
            return torch.where(inside, self.held_window_start(num_tokens), start)
        return self.held_window_start(num_tokens) if inside else start

    def retained(
        self, positions: torch.Tensor, num_tokens: int | torch.Tensor, hold_end: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Bool: is the token at ``positions`` kept while the sequence has ``num_tokens``?"""
        return (positions < self.prefix_end) | (positions >= self.kept_start(num_tokens, hold_end))

    def held(self, positions: torch.Tensor, num_tokens: int | torch.Tensor) -> torch.Tensor:
        """Bool: does a held prompt keep the token at ``positions`` at ``num_tokens``?"""
        return (positions < self.prefix_end) | (positions >= self.held_window_start(num_tokens))

    def freeable(
        self, processed_tokens: int, hold_end: int = 0, window_tokens: int | None = None
    ) -> tuple[int, int]:
        """``[first, last)`` block indices that no query from now on attends to (the next query
        sits at ``processed_tokens`` and sees ``processed_tokens + 1`` tokens); empty while the
        window still reaches the prefix, or while a whole-prompt hold lasts. An exact window's
        oldest block stays while any of its tokens is in the window."""
        b = self.block_size
        first = self.block_prefix_end // b
        start = int(self.kept_start(processed_tokens + 1, hold_end, window_tokens))
        return first, max(first, start // b)

    @property
    def held_window_tokens(self) -> int:
        """Most window tokens held in whole blocks: a bounded hold's, during the prompt."""
        return self.block_window_tokens + (self.hold_span - self.block_size if self.hold_span else 0)

    def max_blocks(self, step_tokens: int, max_model_len: int) -> int:
        """Most blocks one sequence ever holds (a whole-prompt hold aside: it holds its prompt).
        Blocks are freed at the start of a step for ``processed + 1`` tokens, then the step
        allocates for up to ``step_tokens`` new tokens:
        ``prefix + cdiv(p + c, B) - (cdiv(p + 1, B) - W/B) <= prefix + W/B + cdiv(c - 1, B)``
        blocks. Never more than full attention needs for ``max_model_len`` tokens."""
        b = self.block_size
        bound = (self.block_prefix_end + self.held_window_tokens) // b + _cdiv(max(step_tokens - 1, 0), b)
        return min(bound, _cdiv(max_model_len, b))
