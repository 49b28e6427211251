"""The ``kvmerger`` merge rule: KVMerger's merging sets (Wang et al. 2024, seed 002) in a paged cache.

KVMerger observes that adjacent keys of a sequence are often nearly parallel. It groups runs of
consecutive tokens with similar keys into *merging sets*, picks the set's pivot (its token with
the most attention) and merges the set's keys with Gaussian-kernel weights around the pivot's key
and its values by attention; tokens outside any set are evicted. Here, per KV head, over the
tokens that leave the cache now (a block, in position order)::

    sets: a token joins the previous leaving token's set if they are adjacent and
          cos(k_t, k_{t-1}) >= similarity; sets of one token are plainly evicted
    p   = argmax_{j in set} Abar_j                                   # the pivot
    g_j = exp(-|k_j - k_p|^2 / (2 s^2)),  s^2 = mean_j |k_j - k_p|^2  # Gaussian kernel
    k*  = sum g_j k_j / sum g_j;   v* = sum Abar_j v_j / sum Abar_j;   A* = sum Abar_j

Where the merged pair lives: vLLM frees the whole leaving block after the step, so no slot of the
set (the pivot's included) can hold it. It joins the retained window token whose key is most
similar to ``k*`` (cosine > 0), by the same convex, ``Abar``-weighted average as the ``weighted``
rule, *keys included*: ``K_r = (A_r K_r + A* k*) / (A_r + A*)``, likewise ``V_r``, ``A_r += A*``.
Keys are what KVMerger merges; a merged key keeps the attention that the set drew pointing at
one slot. Our choices, not the paper's (whose per-layer thresholds are set offline): one
similarity threshold for every layer, and the kernel width ``s`` taken from the set itself (so
the weights do not depend on the keys' scale). Deterministic; nothing is random.
"""

from __future__ import annotations

import torch

from cam_vllm.core.merge import MergeDecisions


def merging_sets(keys: torch.Tensor, chain_index: torch.Tensor, similarity: float) -> torch.Tensor:
    """Set id of every leaving token per KV head, [E, H] int64 (ids ascend within a head).

    keys: [E, H, D] of the leaving tokens in position order; chain_index: [E] their chain
    indices (a gap in them, a retained token in between, always starts a new set).
    """
    kn = torch.nn.functional.normalize(keys, dim=-1)
    adjacent = (kn[1:] * kn[:-1]).sum(dim=-1)  # [E-1, H]
    contiguous = (chain_index[1:] == chain_index[:-1] + 1)[:, None]
    starts = torch.ones(keys.shape[0], keys.shape[1], dtype=torch.int64, device=keys.device)
    starts[1:] = (~((adjacent >= similarity) & contiguous)).to(torch.int64)
    return starts.cumsum(dim=0) - 1


def _per_set(x: torch.Tensor, gid: torch.Tensor, n: int, reduce: str = "sum") -> torch.Tensor:
    """Reduce x [E, H, ...] over the tokens of each set (flat ids ``gid`` [E, H] < n) -> [n, ...]."""
    flat = x.reshape(gid.numel(), *x.shape[2:])
    index = gid.reshape(-1)
    if reduce == "sum":
        return torch.zeros(n, *x.shape[2:], dtype=x.dtype, device=x.device).index_add_(0, index, flat)
    init = float("-inf") if reduce == "amax" else float("inf")
    out = torch.full((n, *x.shape[2:]), init, dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(0, index, flat, reduce=reduce)


def kvmerger_merge(
    values: torch.Tensor, keys: torch.Tensor, abar: torch.Tensor, leaving: torch.Tensor, similarity: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, MergeDecisions]:
    """Merge the leaving entries' merging sets into the most similar receiver, keys and values.

    values, keys: [N, H, D]; abar: [N, H]; leaving: [N] bool (the rest are receivers). Returns
    (values, keys in the inputs' dtypes, abar float32, decisions); only receivers change.
    """
    src = torch.nonzero(leaving).flatten()
    dst = torch.nonzero(~leaving).flatten()
    e, h = src.numel(), values.shape[1]
    device = values.device
    count = torch.full((e,), dst.numel(), dtype=torch.int64, device=device)
    if e == 0 or dst.numel() == 0:
        mask = torch.zeros(e, h, dtype=torch.bool, device=device)
        return values, keys, abar.float(), MergeDecisions(mask, count)

    acc = torch.promote_types(values.dtype, torch.float32)
    k, v, a = keys[src].to(acc), values[src].to(acc), abar[src].to(acc)  # [E, H, D], [E, H]
    heads = torch.arange(h, device=device)
    gid = merging_sets(k, src, similarity) + heads[None, :] * e  # [E, H], flat over heads
    n = h * e
    size = _per_set(torch.ones_like(a), gid, n)  # [n]
    in_set = size[gid] >= 2  # [E, H]

    # pivot: the first token of its set with the largest Abar
    best = _per_set(a, gid, n, "amax")
    token = torch.arange(e, device=device)[:, None].expand(e, h).to(acc)
    first = torch.where(a == best[gid], token, torch.full_like(token, float(e)))
    pivot = _per_set(first, gid, n, "amin").long()  # [n] token index of each set's pivot
    k_pivot = k[pivot[gid], heads[None, :].expand(e, h)]  # [E, H, D]
    d2 = ((k - k_pivot) ** 2).sum(dim=-1)  # [E, H]
    s2 = (_per_set(d2, gid, n) / size.clamp(min=1))[gid]
    g = torch.where(s2 > 0, torch.exp(-d2 / (2 * s2.clamp(min=1e-30))), torch.ones_like(d2))
    k_star = _per_set(g[..., None] * k, gid, n) / _per_set(g, gid, n).clamp(min=1e-30)[:, None]
    a_star = _per_set(a, gid, n)  # [n]
    v_star = _per_set(a[..., None] * v, gid, n) / a_star.clamp(min=1e-30)[:, None]

    # one merged pair per set that has >= 2 tokens and attention mass: into the receiver whose key
    # is most similar to k*, per head (sets of head j only look at head j's receivers)
    set_head = torch.arange(n, device=device) // e  # [n]
    live = (size >= 2) & (a_star > 0)
    k_dst, v_dst = keys[dst].to(acc), values[dst].to(acc)  # [T, H, D]
    a_dst = abar[dst].to(acc)  # [T, H]
    sim = torch.einsum(  # flat set id s = head * E + local id, so k* reshapes to [H, E, D]
        "hed,thd->het",
        torch.nn.functional.normalize(k_star.view(h, e, -1), dim=-1),
        torch.nn.functional.normalize(k_dst, dim=-1),
    )  # [H, E, T]
    best_sim, target = sim.reshape(n, -1).max(dim=-1)
    live &= best_sim > 0
    w = torch.where(live, a_star, torch.zeros_like(a_star))
    slot = target * h + set_head  # flat (receiver, head)
    got_w = torch.zeros(dst.numel() * h, dtype=acc, device=device).index_add_(0, slot, w)
    got_k = torch.zeros(dst.numel() * h, k.shape[-1], dtype=acc, device=device)
    got_k.index_add_(0, slot, w[:, None] * k_star)
    got_v = torch.zeros(dst.numel() * h, v.shape[-1], dtype=acc, device=device)
    got_v.index_add_(0, slot, w[:, None] * torch.nan_to_num(v_star))
    got_w, got_k, got_v = got_w.view(-1, h), got_k.view(-1, h, k.shape[-1]), got_v.view(-1, h, v.shape[-1])
    received = got_w > 0
    total = torch.where(received, a_dst + got_w, torch.ones_like(a_dst))[..., None]
    new_k = torch.where(received[..., None], (a_dst[..., None] * k_dst + got_k) / total, k_dst)
    new_v = torch.where(received[..., None], (a_dst[..., None] * v_dst + got_v) / total, v_dst)

    out_v, out_k, out_a = values.clone(), keys.clone(), abar.float().clone()
    out_v[dst], out_k[dst] = new_v.to(values.dtype), new_k.to(keys.dtype)
    out_a[dst] = torch.where(received, a_dst + got_w, a_dst).float()
    mask = in_set & live[gid]
    return out_v, out_k, out_a, MergeDecisions(mask, count, receiver=dst[target[gid]])
