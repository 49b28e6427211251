"""H2O (Zhang et al., 2023): keep the heavy hitters, the tokens with the most accumulated attention.

Per KV head, a token's score is the sum of the attention every query gave it since it was cached
(``Abar``, the quantity CaM also weighs by). The recent window is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.core.scores import State, TokenScore


@dataclass(frozen=True)
class H2OScore(TokenScore):
    name: ClassVar[str] = "h2o"
    summary: ClassVar[str] = "H2O: heavy hitters by accumulated attention, per KV head"

    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return abar.float()
