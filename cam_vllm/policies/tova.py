"""TOVA (Oren et al., 2024): keep the tokens the newest query attends to most.

The score is the attention of the newest query that saw the token, averaged over the layer's
heads as the TOVA paper does (one choice per layer, every KV head keeps the same tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from cam_vllm.core.scores import State, TokenScore, last_visible_attention


@dataclass(frozen=True)
class TOVAScore(TokenScore):
    name: ClassVar[str] = "tova"
    summary: ClassVar[str] = "TOVA: the newest query's attention, mean over the layer's heads"
    fields: ClassVar[dict[str, torch.dtype]] = {"last": torch.float32}
    per_head: ClassVar[bool] = False

    def update(self, state: State, probs_kv: torch.Tensor, visible: torch.Tensor) -> State:
        return {"last": last_visible_attention(state["last"], probs_kv, visible)}

    def rank(self, state: State, abar: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        return state["last"].float()
