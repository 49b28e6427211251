"""The per-layer score and merge step shared by the CPU and CUDA attention impls.

Layout access (``paged``: ``gather_k`` / ``gather_v`` / ``scatter_v`` by physical slot) and the
step plan (``packs`` of queries and the slots they score, ``merges`` leaving the window) come
from the caller; the math is ``cam_vllm.core``'s, as in the reference ``PolicyCache``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from cam_vllm.core.attention import accumulate_attention, attention_with_probs, reduce_to_kv_heads
from cam_vllm.core.rules import merge_leaving, merge_rule
from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin.metrics import record_merge


def global_kv_heads(num_local: int, total: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global indices of this tensor-parallel rank's KV heads: CaM draws are keyed by them, so
    every rank makes the decisions a single worker would."""
    from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size

    try:
        rank, world = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    except (AssertionError, RuntimeError):  # no distributed state (unit tests): one rank
        rank, world = 0, 1
    total = num_local * world if total is None else total
    if total >= world:
        heads = rank * num_local + torch.arange(num_local)
    else:
        heads = torch.full((num_local,), rank * total // world)  # heads replicated over ranks
    return heads.to(device)


def score_and_merge(
    *,
    paged: Any,
    abar: torch.Tensor,
    query: torch.Tensor,
    packs: Iterable[Any],
    merges: Iterable[Any],
    policy: KVPolicy,
    scale: float,
    num_kv_heads: int,
    layer_index: int,
    heads: torch.Tensor,
    count_tokens: bool,
) -> None:
    """Accumulate this step's attention into ``abar`` (per slot), then merge each leaving chain."""
    for pack in packs:
        k = paged.gather_k(pack.kv_slots)
        # only the probabilities are used (the output is the kernel's), so the values passed
        # are a 1-wide zero tensor: the unused output costs nothing and V is not gathered
        v = k.new_zeros(k.shape[0], k.shape[1], 1)
        _, probs = attention_with_probs(query[pack.q_rows], k, v, pack.visible, scale)
        probs_kv = reduce_to_kv_heads(probs, num_kv_heads)
        abar[pack.kv_slots] = accumulate_attention(abar[pack.kv_slots], probs_kv, policy.score_mode)
    if policy.merge is None:
        return
    rule = merge_rule(policy.merge.rule)
    for event in merges:
        res = merge_leaving(
            values=paged.gather_v(event.slots),
            keys=paged.gather_k(event.slots) if rule.needs_keys else None,
            abar=abar[event.slots],
            leaving=event.leaving,
            positions=event.positions,
            layer=layer_index,
            config=policy.merge,
            heads=heads,
        )
        stays = ~event.leaving  # a leaving token's slot is freed after this step: skip the write
        paged.scatter_v(event.slots[stays], res.values[stays])
        abar[event.slots[stays]] = res.abar[stays].to(abar.dtype)
        if res.keys is not None:
            paged.scatter_k(event.slots[stays], res.keys[stays])
        record_merge(
            num_tokens=int((res.decisions.num_targets > 0).sum()),
            decisions=res.decisions.decisions,
            accepted=res.decisions.merged,
            count_tokens=count_tokens,
        )
