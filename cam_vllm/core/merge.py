"""CaM cache merging (Zhang et al., ICML 2024, Eq. 14-15), layout-agnostic.

For an evicted token ``i`` and its ``m`` merge targets (the tokens that follow it in the cache),
per KV head::

    p = clamp(Abar_i / mean(Abar_targets), lo, hi)     # Eq. 14, default [lo, hi] = [0, 1]
    M ~ Bernoulli(p)                                   # one draw per (token, KV head)
    V_k += M * V_i / m     for every target k           # Eq. 15; keys are never merged

Token by token (the paper), the targets of the token that leaves are the ``m`` oldest tokens of
the recent window, i.e. the ``m`` tokens right after it. A paged cache evicts a whole block at
once; :func:`cam_merge` then merges the block's tokens *as if they had left one by one*: each
token into the ``m`` tokens that follow it (the first ones still in the leaving block), in
position order, so a token passes on what it received from the tokens before it, exactly like
the per-token path. Merging a whole block into the same ``m`` targets instead (the first vLLM
version) multiplies the merged mass by about ``p * B / m`` per block and blows up (see
docs/results.md). The chain is a unit lower-triangular linear system, solved per KV head.
"""

from __future__ import annotations

from collections.abc import Callable
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
    rule: the merge rule (``core.rules``): ``cam`` (this module) or another registered rule,
        which uses the fields that apply to it.
    similarity: ``kvmerger``: key cosine at or above which adjacent leaving tokens form a set.
    """

    rule: str = "cam"
    num_targets: int = 16
    clamp: tuple[float, float] = (0.0, 1.0)
    targets: TargetMode = "even"
    seed: int = 0
    similarity: float = 0.8

    def __post_init__(self) -> None:
        lo, hi = self.clamp
        if self.num_targets < 1:
            raise ValueError(f"merge num_targets must be >= 1, got {self.num_targets}")
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"merge clamp must satisfy 0 <= lo <= hi <= 1, got {self.clamp}")
        if not -1.0 <= self.similarity <= 1.0:
            raise ValueError(f"merge similarity is a cosine in [-1, 1], got {self.similarity}")
        if self.targets not in ("even", "random-single"):
            raise ValueError(f"unknown merge target mode {self.targets!r}")


def merge_probability(
    abar_evicted: torch.Tensor, abar_targets: torch.Tensor, clamp: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Eq. 14 without the draw: [E, H] probabilities from Abar_evicted [E, H], Abar_targets [T, H]."""
    return probability_from_mean(abar_evicted, abar_targets.float().mean(dim=0, keepdim=True), clamp)


def probability_from_mean(
    abar_evicted: torch.Tensor, target_mean: torch.Tensor, clamp: tuple[float, float] = (0.0, 1.0)
) -> torch.Tensor:
    """Eq. 14 given the mean ``Abar`` of each token's targets (broadcast against [E, H]).

    0/0 counts as 0 (nothing known about either side: do not merge), x/0 with x > 0 as 1.
    """
    ratio = abar_evicted.float() / target_mean
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


# Leaving tokens solved together in one triangular system (bounds memory for a long prefill
# chunk that evicts thousands of tokens at once; exact, since a token only reaches m ahead).
CHAIN_SOURCES_PER_SOLVE = 128


@dataclass(frozen=True)
class ChainKernel:
    """A device kernel for the even-target chain merge (``cam_vllm.kernels``; the CUDA worker
    installs Triton's). ``run(x [H, N, D] float32, weights [N, H], counts [N], m)`` merges in
    place; ``available(x)`` says whether it runs on ``x``'s device."""

    run: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], None]
    available: Callable[[torch.Tensor], bool]


_chain_kernel: ChainKernel | None = None


def use_chain_kernel(kernel: ChainKernel | None) -> None:
    """Merge chains with ``kernel`` where it is available (None: the torch solve everywhere)."""
    global _chain_kernel
    _chain_kernel = kernel


@dataclass(frozen=True)
class MergeDecisions:
    """What a merge rule decided, per leaving token (chain order) and KV head."""

    mask: torch.Tensor  # [E, H] bool: merged
    num_targets: torch.Tensor  # [E] int64: receivers the token could go to (0: none, no decision)
    # value growth of this event (``rules.merge_leaving`` fills it): the sum over the staying
    # (token, KV head) values it changed of ||v after|| / ||v before||, and how many there were
    growth_sum: float = 0.0
    growth_count: int = 0
    # rules that move each merged (token, head) into one receiver (weighted, kvmerger): [E, H]
    # int64 chain index of that receiver (meaningful where ``mask``); None: spread (CaM)
    receiver: torch.Tensor | None = None

    @property
    def decisions(self) -> int:
        """(token, KV head) pairs that were decided (had somewhere to go)."""
        return int((self.num_targets > 0).sum()) * self.mask.shape[1]

    @property
    def merged(self) -> int:
        return int(self.mask.sum())


def chain_targets(num_entries: int, sources: torch.Tensor, m: int) -> torch.Tensor:
    """How many chain entries follow each source (at most ``m``): its number of targets."""
    return (num_entries - 1 - sources).clamp(min=0, max=m)


def build_chain(
    positions: torch.Tensor, leaving: torch.Tensor, receivers: torch.Tensor, reach: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The merge chain of one sequence: (indices into ``positions``, leaving flags) in position order.

    positions: [N] of the cached tokens; leaving: [N] bool, the tokens that leave now;
    receivers: [N] bool, retained tokens that may receive (the recent window; never sinks). The
    chain holds every leaving token and the receivers after them, cut ``reach`` entries after
    the last leaving token (no token reaches further; None: keep every receiver).
    """
    idx = torch.nonzero(leaving | receivers).flatten()
    idx = idx[torch.argsort(positions[idx])]
    flags = leaving[idx]
    src = torch.nonzero(flags).flatten()
    if src.numel() == 0:
        return idx[:0], flags[:0]
    if reach is None:
        return idx, flags
    end = int(src[-1]) + 1 + reach
    return idx[:end], flags[:end]


def cam_merge(
    values: torch.Tensor,
    abar: torch.Tensor,
    leaving: torch.Tensor,
    positions: torch.Tensor,
    layer: int,
    config: MergeConfig,
    seed: int | None = None,
    heads: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MergeDecisions]:
    """CaM-merge the leaving tokens of a *chain* into the tokens that follow them.

    The chain is one sequence's tokens in position order: every token that leaves this step and
    the retained tokens after them that may receive merges (the oldest ``m`` of the recent
    window are enough). values: [N, H, D]; abar: [N, H]; leaving: [N] bool; positions: [N], or
    [N, H] when each head's chain holds other tokens (the draws of a leaving token are keyed by
    its position). A leaving token at chain index
    ``i`` merges into entries ``i+1 .. i+c`` with ``c = min(m, N-1-i)``, after receiving from
    the leaving tokens before it. Returns (new values [N, H, D] in ``values``' dtype, decisions).
    Draws are keyed by (seed, layer, position, KV head); pass ``heads`` (global KV-head indices)
    when this process holds only some heads (tensor parallelism).
    """
    n, num_heads, _ = values.shape
    device = values.device
    head_ids = heads if heads is not None else torch.arange(num_heads, device=device)
    seed = config.seed if seed is None else seed
    m = config.num_targets
    src = torch.nonzero(leaving).flatten()  # [E] chain indices, ascending
    count = chain_targets(n, src, m)  # [E]
    csum = torch.nn.functional.pad(abar.float().cumsum(dim=0), (0, 0, 1, 0))  # [N + 1, H]
    target_sum = csum[src + 1 + count] - csum[src + 1]  # [E, H]
    target_mean = target_sum / count.clamp(min=1)[:, None].float()
    p = probability_from_mean(abar[src], target_mean, config.clamp)  # [E, H]
    u = merge_uniforms(seed, layer, positions[src], head_ids).to(device)
    mask = merge_mask(p, u) & (count > 0)[:, None]
    decisions = MergeDecisions(mask, count)
    if not bool(mask.any()):
        return values, decisions

    acc = torch.promote_types(values.dtype, torch.float32)
    x = values.to(acc).permute(1, 0, 2).clone()  # [H, N, D]
    kernel = _chain_kernel
    if kernel is not None and config.targets == "even" and acc == torch.float32 and kernel.available(x):
        weights = torch.zeros(n, num_heads, dtype=acc, device=device)
        weights[src] = mask.to(acc) / count.clamp(min=1)[:, None].to(acc)
        counts = torch.zeros(n, dtype=torch.int64, device=device)
        counts[src] = count
        kernel.run(x, weights, counts, m)
        return x.permute(1, 0, 2).to(values.dtype), decisions
    if config.targets == "random-single":
        choice = target_choices(seed, layer, positions[src], head_ids, count.clamp(min=1)[:, None])
        choice = choice.to(device)
    for a in range(0, src.numel(), CHAIN_SOURCES_PER_SOLVE):
        s = src[a : a + CHAIN_SOURCES_PER_SOLVE]
        c = count[a : a + CHAIN_SOURCES_PER_SOLVE]
        lo, hi = int(s[0]), int((s + c).max()) + 1
        rows = torch.arange(lo, hi, device=device)[:, None]  # [n, 1]
        cols = s[None, :]  # [1, e]
        w = mask[a : a + CHAIN_SOURCES_PER_SOLVE].to(acc)  # [e, H]
        if config.targets == "even":
            into = (rows > cols) & (rows <= cols + c[None, :])  # [n, e]
            w = w / c.clamp(min=1)[:, None].to(acc)
        else:  # random-single: the whole value into one of the targets
            pick = cols + 1 + choice[a : a + CHAIN_SOURCES_PER_SOLVE].T  # [H, e]
            into = rows[None] == pick[:, None, :]  # [H, n, e]
        # L[h, i, j] = weight of source j into row i; sources are columns (s - lo) of the span
        contrib = into.to(acc) * w.T[:, None, :]  # [H, n, e]
        lower = torch.zeros(num_heads, hi - lo, hi - lo, dtype=acc, device=device)
        lower[:, :, s - lo] = contrib
        eye = torch.eye(hi - lo, dtype=acc, device=device)
        x[:, lo:hi] = torch.linalg.solve_triangular(eye - lower, x[:, lo:hi], upper=False, unitriangular=True)
    return x.permute(1, 0, 2).to(values.dtype), decisions
