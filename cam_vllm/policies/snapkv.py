"""SnapKV (Li et al., 2024): keep what the prompt's last queries attend to, with its neighbours.

The prompt is read in full before anything is chosen (the prompt hold, ``HeavyPolicy.prompt_hold``).
The last ``observation_window`` prompt queries (the question, when it ends the prompt) are the
only queries scored: per KV head (the mean over its query heads), a token's score is the sum of
their attention to it (``Abar``, accumulated from these queries only). At the end of the prompt
the heavy region keeps the ``heavy_tokens`` best tokens by that score *pooled over neighbouring
positions* (a mean over ``pooling_kernel`` positions centred on the token, absent positions
counting 0), so that the few tokens after a matched word (the answer's digits) come along.

Decoding adds no score: a generated token that leaves the window scores 0 and is evicted, and a
prompt token of the window competes with the heavy tokens by the same pooled prompt evidence, so
the memory stays at sinks + heavy + window. Pooling runs over the candidates of a choice by
position: only candidates within ``pooling_kernel // 2`` positions are neighbours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.core.scores import State, TokenScore

MAX_POOLING_KERNEL = 255


@dataclass(frozen=True)
class SnapKVScore(TokenScore):
    name: ClassVar[str] = "snapkv"
    summary: ClassVar[str] = (
        "SnapKV: the prompt's last queries' attention, pooled over neighbours, per KV head"
    )
    holds_prompt: ClassVar[bool] = True
    window: int = 32
    kernel: int = 31

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"observation window must be >= 1 query, got {self.window}")
        if not (1 <= self.kernel <= MAX_POOLING_KERNEL and self.kernel % 2):
            raise ValueError(
                f"pooling kernel must be an odd number of positions in 1..{MAX_POOLING_KERNEL}, "
                f"got {self.kernel}"
            )

    @property
    def observation_window(self) -> int | None:
        return self.window

    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return pool_by_position(abar.float(), state["pos"], self.kernel)

    def describe(self) -> str:
        return f"{self.summary}; observation window {self.window}, pooling kernel {self.kernel}"


def pool_by_position(score: torch.Tensor, pos: torch.Tensor, kernel: int) -> torch.Tensor:
    """[C, H]: per head, the sum of ``score`` over the candidates within ``kernel // 2`` positions
    of each candidate (itself included), divided by ``kernel``. Candidates are any positions in
    any order (per head); for contiguous positions this is a zero-padded 1-D mean pooling."""
    if kernel == 1:
        return score
    r = kernel // 2
    p = pos.to(torch.int64).T.contiguous()  # [H, C]
    order = torch.argsort(p, dim=1, stable=True)
    sp = p.gather(1, order)
    cum = torch.nn.functional.pad(score.T.gather(1, order).cumsum(dim=1), (1, 0))  # [H, C + 1]
    lo = torch.searchsorted(sp, sp - r, side="left")
    hi = torch.searchsorted(sp, sp + r, side="right")
    pooled_sorted = (cum.gather(1, hi) - cum.gather(1, lo)) / kernel
    out = torch.empty_like(pooled_sorted)
    out.scatter_(1, order, pooled_sorted)
    return out.T
