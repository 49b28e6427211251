"""The ``weighted`` merge rule: a convex merge that cannot inflate values.

Why: CaM adds ``V_i / m`` on top of its targets, a feedback loop whose gain is the merge rate, and
its merged content is spread so thin that it cannot be retrieved (docs/results.md). A weighted
average has gain below one by construction. After WeightedKV (arXiv 2503.01330; merge weights are
accumulated attention) and kvpress's MergingPress (target = the retained key most similar to the
evicted one), per KV head, for every leaving token ``i``::

    t   = argmax_r cos(k_i, k_r)       over the receivers r (retained, never sinks)
    V_t = (A_t V_t + sum_i A_i V_i) / (A_t + sum_i A_i)      # a convex combination
    A_t = A_t + sum_i A_i                                    # the running weight

``A`` is the slot's accumulated attention (``Abar``): the attention mass a slot has drawn is its
weight, and a slot that absorbed others carries their mass on (when it leaves in turn, it merges
as the tokens it stands for). A token merges only when its best cosine is positive (a key
pointing away from every receiver would mix unrelated content) and its weight is positive.
Keys are never changed; ``sum A V`` over a merge is conserved; nothing is random.
"""

from __future__ import annotations

import torch

from cam_vllm.core.merge import MergeDecisions


def weighted_merge(
    values: torch.Tensor, keys: torch.Tensor, abar: torch.Tensor, leaving: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, MergeDecisions]:
    """Merge the leaving entries of a chain into the most similar receiver, per KV head.

    values, keys: [N, H, D]; abar: [N, H] (the running weights); leaving: [N] bool (the other
    entries are the receivers). Returns (values [N, H, D] in ``values``' dtype, abar [N, H]
    float32, decisions): only receivers change.
    """
    src = torch.nonzero(leaving).flatten()
    dst = torch.nonzero(~leaving).flatten()
    n_heads = values.shape[1]
    count = torch.full((src.numel(),), dst.numel(), dtype=torch.int64, device=values.device)
    if src.numel() == 0 or dst.numel() == 0:
        mask = torch.zeros(src.numel(), n_heads, dtype=torch.bool, device=values.device)
        return values, abar.float(), MergeDecisions(mask, count)

    acc = torch.promote_types(values.dtype, torch.float32)
    kn = torch.nn.functional.normalize(keys.to(acc), dim=-1)
    sim = torch.einsum("ehd,thd->het", kn[src], kn[dst])  # [H, E, T]
    best_sim, best = sim.max(dim=-1)  # [H, E]
    w_src = abar[src].to(acc).T  # [H, E]
    mask = (best_sim > 0) & (w_src > 0)
    w = w_src * mask
    v_src = values[src].to(acc).permute(1, 0, 2)  # [H, E, D]
    v_dst = values[dst].to(acc).permute(1, 0, 2)  # [H, T, D]
    a_dst = abar[dst].to(acc).T  # [H, T]
    # weights are scaled per head to a maximum of 1 before they multiply values: tiny (subnormal)
    # weights would otherwise underflow in the products and break convexity
    scale = torch.maximum(w.amax(dim=1, keepdim=True), a_dst.amax(dim=1, keepdim=True))
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    ws, a_s = w / scale, a_dst / scale
    num = torch.zeros_like(v_dst).scatter_add_(1, best[..., None].expand_as(v_src), ws[..., None] * v_src)
    got_s = torch.zeros_like(v_dst[..., 0]).scatter_add_(1, best, ws)  # [H, T]
    got = torch.zeros_like(v_dst[..., 0]).scatter_add_(1, best, w)
    total = a_dst + got
    received = got > 0
    merged = (a_s[..., None] * v_dst + num) / torch.where(received, a_s + got_s, 1.0)[..., None]
    v_new = torch.where(received[..., None], merged, v_dst)

    out_v = values.clone()
    out_v[dst] = v_new.permute(1, 0, 2).to(values.dtype)
    out_a = abar.float().clone()
    out_a[dst] = torch.where(received, total, a_dst).T.float()
    return out_v, out_a, MergeDecisions(mask.T.contiguous(), count, receiver=dst[best].T.contiguous())
