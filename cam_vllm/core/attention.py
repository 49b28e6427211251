"""Attention probabilities and accumulated attention per KV head.

Layout-agnostic: every function takes plain token-major tensors of *one sequence*
(``q [Nq, Hq, D]``, ``k/v [Nk, Hkv, D]``). Whoever owns the storage (the reference cache, or
the vLLM glue reading paged blocks) gathers into this form and scatters results back.

GQA convention, used everywhere in this project: the probability a KV head gives to a token is
the **mean** over the query heads that share that KV head. Each row of the reduced
probabilities still sums to one, so ``Abar`` has the same scale with or without GQA. (CaM only
uses ratios of ``Abar`` values of the same head, so the sum would give identical decisions.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ScoreMode = Literal["accumulated", "current"]


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    hidden: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention that also returns the probabilities.

    q: [Nq, Hq, D]; k, v: [Nk, Hkv, D]; visible: [Nq, Nk] bool (True = may attend); hidden:
    :func:`additive_mask` of ``visible`` when the caller keeps it across layers.
    Returns (output [Nq, Hq, D] in q's dtype, probs [Nq, Hq, Nk] float32).
    Computed in float32; a query row with no visible token gets zeros (never NaN).
    """
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    group = hq // hkv
    # one batched product per KV head ([Hkv, Nq * G, D] x [Hkv, D, Nk]), the scale folded into
    # the queries, the mask added as a [Nq, Nk] bias: ~2x faster than an einsum and a broadcast
    # masked_fill over every (query head, key)
    qf = (q.float() * scale).view(nq, hkv, group, d).transpose(0, 1).reshape(hkv, nq * group, d)
    logits = torch.bmm(qf, k.float().permute(1, 2, 0)).view(hkv, nq, group, nk)
    if hidden is None:
        hidden = additive_mask(visible)
    probs = torch.softmax(logits.add_(hidden[None, :, None, :]), dim=-1)
    if not bool(visible.any(dim=1).all()):
        probs = torch.nan_to_num(probs, nan=0.0)  # a row that sees nothing: zeros, not NaN
    probs = probs.transpose(0, 1)  # [Nq, Hkv, G, Nk]
    out = torch.einsum("qhgk,khd->qhgd", probs, v.float())
    return out.reshape(nq, hq, -1).to(q.dtype), probs.reshape(nq, hq, nk)


def additive_mask(visible: torch.Tensor) -> torch.Tensor:
    """[Nq, Nk] float32: 0 where ``visible``, -inf elsewhere (added to the logits)."""
    return torch.zeros(visible.shape, dtype=torch.float32, device=visible.device).masked_fill_(
        ~visible, float("-inf")
    )


def reduce_to_kv_heads(probs: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[..., Hq, Nk] -> [..., Hkv, Nk]: mean over the query heads of each KV head (GQA)."""
    *lead, hq, nk = probs.shape
    return probs.reshape(*lead, num_kv_heads, hq // num_kv_heads, nk).mean(dim=-2)


def accumulate_attention(
    abar: torch.Tensor, probs_kv: torch.Tensor, mode: ScoreMode = "accumulated"
) -> torch.Tensor:
    """Update the per-token score ``Abar`` [Nk, Hkv] with this step's probabilities.

    probs_kv: [Nq, Hkv, Nk] (queries of this step, already reduced to KV heads).
    ``accumulated`` (the paper): Abar_i += sum over this step's queries of A[i].
    ``current`` (ablation, Table 2): Abar_i = A[i] of this step's last query.
    """
    if mode == "accumulated":
        return abar + probs_kv.sum(dim=0).transpose(0, 1)
    if mode == "current":
        return probs_kv[-1].transpose(0, 1).clone()
    raise ValueError(f"unknown score mode {mode!r}")


# Rows of (query, query head) per block of :func:`attention_totals`, sized so that one block of
# probabilities (rows x keys, float32) stays in a core's cache while it is reduced.
TOTALS_BLOCK_ELEMENTS = 1 << 17

# exp(x) == exp2(x * log2(e)): the scale is folded into the queries and the exponential taken as
# exp2, because torch's CPU exp leaves its vector path for arguments below about -87 (masked or
# far-below-maximum logits) and is 10-40x slower there, while exp2 is not.
LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TotalsMask:
    """The mask of :func:`attention_totals` for one visibility pattern, made once per step and
    read by every layer: ``bias`` [Nq, Nk] (:func:`additive_mask`), and per block of query rows
    ``(s, e, c0, c1, cm)``: the rows' visible keys lie in columns [c0, c1) (causal chunks see
    fewer keys early on) and only columns [cm, c1) hide any key from some row (the rest needs no
    mask)."""

    bias: torch.Tensor
    spans: tuple[tuple[int, int, int, int, int], ...]


def totals_mask(visible: torch.Tensor, num_q_heads: int, bias: torch.Tensor | None = None) -> TotalsMask:
    """The :class:`TotalsMask` of ``visible`` [Nq, Nk] for ``num_q_heads`` (``bias``: its
    :func:`additive_mask`, if the caller has it)."""
    nq, nk = visible.shape
    step = max(1, TOTALS_BLOCK_ELEMENTS // max(num_q_heads * nk, 1))
    spans = []
    for s in range(0, nq, step):
        e = min(s + step, nq)
        cols = torch.nonzero(visible[s:e].any(dim=0)).flatten()
        if not cols.numel():
            continue  # no row sees a key: they add nothing
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
        hidden = torch.nonzero((~visible[s:e, c0:c1]).any(dim=0)).flatten()
        cm = c0 + int(hidden[0]) if hidden.numel() else c1
        spans.append((s, e, c0, c1, cm))
    return TotalsMask(additive_mask(visible) if bias is None else bias, tuple(spans))


def attention_totals(
    q: torch.Tensor,
    k: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    mask: TotalsMask | None = None,
) -> torch.Tensor:
    """What ``accumulate_attention`` adds in ``accumulated`` mode, without the probabilities.

    q: [Nq, Hq, D]; k: [Nk, Hkv, D]; visible: [Nq, Nk] bool. Returns [Nk, Hkv] float32: the sum
    over queries of each KV head's mean probability, the same numbers as
    ``reduce_to_kv_heads(attention_with_probs(...)[1], Hkv).sum(0).T`` up to float rounding
    (``mask``: :func:`totals_mask` of ``visible``, when the caller keeps it across layers).
    Why: scoring a prefill chunk needs only these totals. Block by block over the query rows,
    each block only over the key columns its rows see (a causal chunk's early queries see few of
    its keys), the mask added only where it hides something, the softmax and the sum over rows
    done in place with the row normalisation folded into one matrix product: the probabilities
    are touched a few times in cache instead of several full passes through memory.
    """
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    if mask is None:
        mask = totals_mask(visible, hq)
    kt = k.float().permute(1, 2, 0)  # [Hkv, D, Nk]
    qf = (q.float() * (scale * LOG2E)).view(nq, hkv, g, d).transpose(0, 1)  # [Hkv, Nq, G, D]
    total = q.new_zeros(hkv, 1, nk, dtype=torch.float32)
    for s, e, c0, c1, cm in mask.spans:
        rows = (e - s) * g
        x = torch.bmm(qf[:, s:e].reshape(hkv, rows, d), kt[:, :, c0:c1])  # [Hkv, rows, c1 - c0], log2 units
        if cm < c1:  # the rows are (query, head of the KV group): one mask row per query
            x.view(hkv, e - s, g, c1 - c0)[..., cm - c0 :].add_(mask.bias[s:e, None, cm:c1])
        # a row with no visible key: max -inf, clamped so that exp2 gives 0 (not NaN) and adds 0
        x.sub_(x.amax(dim=-1, keepdim=True).clamp_min_(-3e38)).exp2_()
        inv = x.sum(dim=-1, keepdim=True).clamp_min_(1e-38).reciprocal_()  # [Hkv, rows, 1]
        total[:, :, c0:c1].baddbmm_(inv.transpose(1, 2), x)
    return total[:, 0].T.div_(g)
