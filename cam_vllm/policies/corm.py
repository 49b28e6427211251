"""CORM (seed 003): a key goes once none of the last ``history`` queries found it important.

CORM's budget is adaptive; here the heavy region caps it. Per KV head the rank is how recently
the token was last important (attention of at least ``threshold`` times the uniform share):
tokens unimportant for the whole history go first, as CORM evicts them, and when more (or
fewer) must go than CORM would evict, the longest-unimportant go first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.core.scores import ImportanceScore, State, history_bits, trailing_zeros


@dataclass(frozen=True)
class CORMScore(ImportanceScore):
    name: ClassVar[str] = "corm"
    summary: ClassVar[str] = "CORM: evict keys no recent query found important, per KV head"

    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        since = torch.minimum(trailing_zeros(history_bits(state["hist"]), self.history), seen)
        return -since.float()
