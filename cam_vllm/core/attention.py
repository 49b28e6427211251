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

from typing import Literal

import torch

ScoreMode = Literal["accumulated", "current"]


def attention_with_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked softmax attention that also returns the probabilities.

    q: [Nq, Hq, D]; k, v: [Nk, Hkv, D]; visible: [Nq, Nk] bool (True = may attend); bias: None
    or [Nk, Hkv] float added to every logit of that key and KV head (count-weighted attention:
    ``ln(count)``, which makes one slot attend like ``count`` copies of itself).
    Returns (output [Nq, Hq, D] in q's dtype, probs [Nq, Hq, Nk] float32).
    Computed in float32; a query row with no visible token gets zeros (never NaN).
    """
    nq, hq, _ = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    qf = q.float().reshape(nq, hkv, group, -1)  # [Nq, Hkv, G, D]
    kf = k.float()
    logits = torch.einsum("qhgd,khd->qhgk", qf, kf) * scale  # [Nq, Hkv, G, Nk]
    if bias is not None:
        logits = logits + bias.float().T[None, :, None, :]
    mask = visible[:, None, None, :]
    logits = logits.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.einsum("qhgk,khd->qhgd", probs, v.float())
    return out.reshape(nq, hq, -1).to(q.dtype), probs.reshape(nq, hq, -1)


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


def totals_bias(visible: torch.Tensor, group: int) -> torch.Tensor:
    """The additive mask of :func:`attention_totals`, one row per (query, head of a KV group):
    [Nq * group, Nk] float32, 0 where visible, -inf elsewhere. Made once per step and shared by
    every layer (the same visibility), so a layer only reads it."""
    bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
    return bias.repeat_interleave(group, dim=0) if group > 1 else bias


def attention_totals(
    q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor, scale: float, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``accumulate_attention`` adds in ``accumulated`` mode, without the probabilities.

    q: [Nq, Hq, D]; k: [Nk, Hkv, D]; visible: [Nq, Nk] bool. Returns [Nk, Hkv] float32: the sum
    over queries of each KV head's mean probability (``bias``: :func:`totals_bias` of ``visible``,
    when the caller keeps it across layers), the same numbers as
    ``reduce_to_kv_heads(attention_with_probs(...)[1], Hkv).sum(0).T`` up to float rounding.
    Why: scoring a prefill chunk needs only these totals; going block by block over the query
    rows (mask added inside the matmul, softmax and the sum over rows done in place, the row
    normalisation folded into one matrix product) touches the probabilities a few times in cache
    instead of several full passes through memory (~1.5x faster on a CPU core).
    """
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    kt = k.float().permute(1, 2, 0)  # [Hkv, D, Nk]
    qf = q.float().view(nq, hkv, g, d).transpose(0, 1)  # [Hkv, Nq, G, D]
    if bias is None:
        bias = totals_bias(visible, g)
    total = q.new_zeros(hkv, 1, nk, dtype=torch.float32)
    step = max(1, TOTALS_BLOCK_ELEMENTS // max(hq * nk, 1))
    for s in range(0, nq, step):
        e = min(s + step, nq)
        rows = (e - s) * g
        b = bias[s * g : e * g][None]  # [1, rows, Nk], a view
        x = torch.baddbmm(b, qf[:, s:e].reshape(hkv, rows, d), kt, alpha=scale)  # [Hkv, rows, Nk]
        # a row with no visible key: max -inf, clamped so that exp gives 0 (not NaN) and adds 0
        x.sub_(x.amax(dim=-1, keepdim=True).clamp_min_(-3e38)).exp_()
        inv = x.sum(dim=-1, keepdim=True).clamp_min_(1e-38).reciprocal_()  # [Hkv, rows, 1]
        total.baddbmm_(inv.transpose(1, 2), x)
    return total[:, 0].T.div_(g)
