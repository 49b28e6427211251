"""CaM cache merging (Zhang et al., ICML 2024, Eq. 14-15), layout-agnostic.

For an evicted token ``i`` and the ``m`` merge targets (the oldest tokens of the recent window),
per KV head::

    p = clamp(Abar_i / mean(Abar_targets), lo, hi)     # Eq. 14, default [lo, hi] = [0, 1]
    M ~ Bernoulli(p)                                   # one draw per (token, KV head)
    V_k += M * V_i / m     for every target k           # Eq. 15; keys are never merged

Several tokens evicted at once (a block leaving the window) are merged into the same targets,
each with its own draw; since merging does not change ``Abar``, this equals merging them one
after another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from cam_vllm.core.rng import merge_uniforms, target_choices

TargetMode = Literal["even", "random-single"]


@dataclass(frozen=True)
class MergeConfig:
    """How evicted values are merged. Defaults are the paper's CaM.

    num_targets: m, the number of oldest window tokens that receive an evicted value (the
        authors' code hard-codes 16).
    clamp: the interval of Eq. 14; (1, 1) always merges (ablation "w.o. merge mask"),
        (0, 0) never merges (plain eviction).
    targets: "even" spreads V_i / m over all m targets; "random-single" adds V_i to one
        target chosen at random (ablation "w.o. avg merge").
    seed: the default seed of the draws (a request's own seed overrides it in serving).
    """

    num_targets: int = 16
    clamp: tuple[float, float] = (0.0, 1.0)
    targets: TargetMode = "even"
    seed: int = 0

    def __post_init__(self) -> None:
        lo, hi = self.clamp
        if self.num_targets < 1:
            raise ValueError(f"merge num_targets must be >= 1, got {self.num_targets}")
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"merge clamp must satisfy 0 <= lo <= hi <= 1, got {self.clamp}")
        if self.targets not in ("even", "random-single"):
            raise ValueError(f"unknown merge target mode {self.targets!r}")


def merge_probability(
    abar_evicted: torch.Tensor, abar_targets: torch.Tensor, clamp: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Eq. 14 without the draw: [E, H] probabilities from Abar_evicted [E, H], Abar_targets [T, H].

    0/0 counts as 0 (nothing known about either side: do not merge), x/0 with x > 0 as 1.
    """
    ref = abar_targets.float().mean(dim=0, keepdim=True)  # [1, H]
    ratio = abar_evicted.float() / ref
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=1.0)
    return ratio.clamp(min=clamp[0], max=clamp[1])


def merge_mask(probability: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Bernoulli(p) from given uniforms in [0, 1): True where u < p (p = 1 always merges)."""
    return uniforms < probability


def merge_values(
    v_targets: torch.Tensor,
    v_evicted: torch.Tensor,
    mask: torch.Tensor,
    choice: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eq. 15: the new values of the targets.

    v_targets: [T, H, D]; v_evicted: [E, H, D]; mask: [E, H] bool.
    choice: None for the even spread (each target gets sum_i M_i V_i / T); else [E, H] target
    indices for the random-single ablation (the chosen target gets M_i V_i).
    Accumulates in at least float32 and returns v_targets' dtype.
    """
    acc = torch.promote_types(v_targets.dtype, torch.float32)
    contrib = v_evicted.to(acc) * mask.unsqueeze(-1).to(acc)  # [E, H, D]
    out = v_targets.to(acc)
    if choice is None:
        out = out + contrib.sum(dim=0, keepdim=True) / v_targets.shape[0]
    else:
        onehot = torch.nn.functional.one_hot(choice, v_targets.shape[0]).to(acc)  # [E, H, T]
        out = out + torch.einsum("eht,ehd->thd", onehot, contrib)
    return out.to(v_targets.dtype)


def cam_merge(
    v_targets: torch.Tensor,
    v_evicted: torch.Tensor,
    abar_targets: torch.Tensor,
    abar_evicted: torch.Tensor,
    evicted_positions: torch.Tensor,
    layer: int,
    config: MergeConfig,
    seed: int | None = None,
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One CaM merge of E evicted tokens into T targets of one layer.

    Returns (new v_targets [T, H, D], merge mask [E, H]). Draws are keyed by
    (seed, layer, evicted position, KV head); pass ``heads`` (global KV-head indices) when this
    process holds only some heads (tensor parallelism).
    """
    num_heads = v_targets.shape[1]
    head_ids = heads if heads is not None else torch.arange(num_heads, device=v_targets.device)
    seed = config.seed if seed is None else seed
    p = merge_probability(abar_evicted, abar_targets, config.clamp)
    u = merge_uniforms(seed, layer, evicted_positions, head_ids).to(p.device)
    mask = merge_mask(p, u)
    choice = None
    if config.targets == "random-single":
        choice = target_choices(seed, layer, evicted_positions, head_ids, v_targets.shape[0])
        choice = choice.to(v_targets.device)
    return merge_values(v_targets, v_evicted, mask, choice), mask
