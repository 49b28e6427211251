"""Merge rules, chosen independently of the eviction policy: one registry, one entry point.

Every engine (the reference cache, the vLLM worker) hands :func:`merge_leaving` the same thing:
one sequence's *chain* (``merge.build_chain``: the tokens that leave now and the retained window
tokens after them, in position order) with their values, keys, running weights (``Abar``) and
positions, and writes back what it returns. Adding a rule is one file in ``core`` with its math
plus one line in ``MERGE_RULES``; the policy names ``<rule>-<policy>`` then exist everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from cam_vllm.core.kvmerger import kvmerger_merge
from cam_vllm.core.merge import MergeConfig, MergeDecisions, cam_merge
from cam_vllm.core.weighted import weighted_merge


@dataclass(frozen=True)
class MergeResult:
    """New values and weights of the chain's entries (receivers changed, leaving ones irrelevant)."""

    values: torch.Tensor  # [N, H, D]
    abar: torch.Tensor  # [N, H]
    decisions: MergeDecisions
    keys: torch.Tensor | None = None  # [N, H, D] when the rule merges keys, else None (unchanged)


@dataclass(frozen=True)
class MergeRule:
    """A registered rule: what it needs and how far past the last leaving token it reaches."""

    name: str
    summary: str
    needs_keys: bool
    writes_keys: bool
    reach: Callable[[MergeConfig], int | None]  # None: every receiver of the window
    run: Callable[..., MergeResult]


def _cam(values, keys, abar, leaving, positions, layer, config, seed, heads) -> MergeResult:  # noqa: ANN001
    new_v, decided = cam_merge(values, abar, leaving, positions, layer, config, seed=seed, heads=heads)
    return MergeResult(new_v, abar, decided)


def _weighted(values, keys, abar, leaving, positions, layer, config, seed, heads) -> MergeResult:  # noqa: ANN001
    return MergeResult(*weighted_merge(values, keys, abar, leaving))


def _kvmerger(values, keys, abar, leaving, positions, layer, config, seed, heads) -> MergeResult:  # noqa: ANN001
    new_v, new_k, new_a, decided = kvmerger_merge(values, keys, abar, leaving, config.similarity)
    return MergeResult(new_v, new_a, decided, keys=new_k)


MERGE_RULES: dict[str, MergeRule] = {
    "cam": MergeRule(
        name="cam",
        summary="CaM (ICML 2024): V_i/m into the m tokens after i, Bernoulli(Abar ratio)",
        needs_keys=False,
        writes_keys=False,
        reach=lambda c: c.num_targets,
        run=_cam,
    ),
    "weighted": MergeRule(
        name="weighted",
        summary="convex, Abar-weighted average into the most similar window key",
        needs_keys=True,
        writes_keys=False,
        reach=lambda c: None,
        run=_weighted,
    ),
    "kvmerger": MergeRule(
        name="kvmerger",
        summary="KVMerger: runs of similar leaving keys merged (keys too) into the most similar window slot",
        needs_keys=True,
        writes_keys=True,
        reach=lambda c: None,
        run=_kvmerger,
    ),
}


def merge_rule(name: str) -> MergeRule:
    """The rule called ``name``; raises naming the choices."""
    if name not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {name!r}; choose one of: {', '.join(MERGE_RULES)}")
    return MERGE_RULES[name]


def merge_leaving(
    values: torch.Tensor,
    keys: torch.Tensor | None,
    abar: torch.Tensor,
    leaving: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    config: MergeConfig,
    seed: int | None = None,
    heads: torch.Tensor | None = None,
) -> MergeResult:
    """Apply ``config.rule`` to one chain (shapes as in ``cam_merge``; keys only if the rule needs them)."""
    rule = merge_rule(config.rule)
    if rule.needs_keys and keys is None:
        raise ValueError(f"merge rule {rule.name!r} needs the chain's keys")
    res = rule.run(values, keys, abar, leaving, positions, layer, config, seed, heads)
    total, count = value_growth(values, res.values, leaving)
    return replace(res, decisions=replace(res.decisions, growth_sum=total, growth_count=count))


def value_growth(before: torch.Tensor, after: torch.Tensor, leaving: torch.Tensor) -> tuple[float, int]:
    """``(sum, count)`` of ``||after|| / ||before||`` over the staying (token, head) values a merge
    changed: how much a rule inflates what stays (CaM adds mass: > 1; a convex average of
    dissimilar vectors shrinks them: usually < 1). Leaving entries are skipped (their slots are
    freed), and so are zero values."""
    b, a = before[~leaving].float(), after[~leaving].float()
    norm_b = b.norm(dim=-1)
    hit = (a != b).any(dim=-1) & (norm_b > 0)
    ratio = torch.where(hit, a.norm(dim=-1) / norm_b.clamp_min(torch.finfo(b.dtype).tiny), 0.0)
    total, count = torch.stack([ratio.sum(), hit.sum().to(ratio.dtype)]).tolist()  # one device sync
    return total, int(count)
