"""Scissorhands (Liu et al., 2023): keep the tokens that stayed important (persistence of importance).

Per KV head, over the last ``history`` queries that saw a token, count the queries for which it
was unimportant (attention below ``threshold`` times the uniform share); the tokens with the most
such queries go first. A token seen by fewer queries counts only those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.core.scores import ImportanceScore, State, history_bits, popcount


@dataclass(frozen=True)
class ScissorhandsScore(ImportanceScore):
    name: ClassVar[str] = "scissorhands"
    summary: ClassVar[str] = "Scissorhands: fewest unimportant queries in a history window, per KV head"

    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        window = seen.clamp(max=self.history)
        unimportant = window - popcount(history_bits(state["hist"]), self.history)
        return -unimportant.float()
