"""A physically evicting, merging KV cache for one sequence: the oracle for the vLLM path.

Per layer it holds only the retained tokens (keys, values, positions, accumulated attention
``Abar`` per KV head). One call of :meth:`PolicyCache.attend` is one engine step of one layer:

1. append this step's keys/values (post-RoPE, so positions stay what they were written with);
2. attend: every query sees the tokens its policy makes visible (``EvictionPolicy.visible``);
3. if the policy merges: add this step's probabilities to ``Abar`` (``accumulate_attention``);
4. drop the tokens the *next* query will not see; with a merge rule, merge them first
   (``core.rules.merge_leaving``). CaM merges each of them, in position order, into the ``m``
   tokens that follow it: with one token leaving per step these are the oldest tokens of the next
   query's window (the paper); a leaving block chains.

Steps may be single tokens (decoding, the paper's path) or chunks (vLLM's chunked prefill): a
chunk attends exactly like its tokens would one by one, and eviction/merging happens at the end
of the step, as in vLLM where a block is freed only after the step that last read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cam_vllm.core.attention import accumulate_attention, attention_with_probs, reduce_to_kv_heads
from cam_vllm.core.merge import build_chain
from cam_vllm.core.rules import merge_leaving, merge_rule
from cam_vllm.policies import KVPolicy


@dataclass
class LayerCache:
    """Retained tokens of one layer: k, v [N, Hkv, D], positions [N], abar [N, Hkv] float32."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    abar: torch.Tensor


@dataclass
class CacheStats:
    """What eviction and merging did, summed over layers (a token counts once per layer)."""

    evicted_tokens: int = 0
    merge_decisions: int = 0  # (token, KV head) pairs that were considered for merging
    merged: int = 0  # of those, how many were merged (Bernoulli draw was 1)
    max_retained: int = 0  # largest number of tokens any layer held after an append

    @property
    def merge_rate(self) -> float:
        return self.merged / self.merge_decisions if self.merge_decisions else 0.0


@dataclass
class PolicyCache:
    """KV cache of one sequence under ``policy``; ``seed`` keys the CaM draws (default: policy's)."""

    policy: KVPolicy
    seed: int | None = None
    layers: dict[int, LayerCache] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)
    num_tokens: dict[int, int] = field(default_factory=dict)

    def reset(self) -> None:
        self.layers.clear()
        self.num_tokens.clear()
        self.stats = CacheStats()

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One step of ``layer``: q [C, Hq, D], k/v [C, Hkv, D] for the next C positions.

        Returns the attention output [C, Hq, D].
        """
        start = self.num_tokens.get(layer, 0)
        positions = torch.arange(start, start + q.shape[0], device=q.device)
        st = self._append(layer, k, v, positions)
        self.stats.max_retained = max(self.stats.max_retained, st.positions.numel())

        visible = self.policy.eviction.visible(positions, st.positions)
        out, probs = attention_with_probs(q, st.k, st.v, visible, scale)
        if self.policy.tracks_scores:
            probs_kv = reduce_to_kv_heads(probs, st.k.shape[1])
            st.abar = accumulate_attention(st.abar, probs_kv, self.policy.score_mode)

        self.num_tokens[layer] = start + q.shape[0]
        self._evict(layer, st, next_num_tokens=start + q.shape[0] + 1)
        return out

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> LayerCache:
        zeros = torch.zeros(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
        st = self.layers.get(layer)
        if st is None:
            st = LayerCache(k.clone(), v.clone(), pos.clone(), zeros)
            self.layers[layer] = st
        else:
            st.k = torch.cat([st.k, k])
            st.v = torch.cat([st.v, v])
            st.positions = torch.cat([st.positions, pos])
            st.abar = torch.cat([st.abar, zeros])
        return st

    def _evict(self, layer: int, st: LayerCache, next_num_tokens: int) -> None:
        """Drop what the next query will not see, merging it first when the policy merges."""
        keep = self.policy.eviction.retained(st.positions, next_num_tokens)
        if bool(keep.all()):
            return
        gone = ~keep
        self.stats.evicted_tokens += int(gone.sum())
        merge = self.policy.merge
        if merge is not None:
            window = keep & (st.positions >= self.policy.eviction.window_start(next_num_tokens))
            idx, leaving = build_chain(st.positions, gone, window, merge_rule(merge.rule).reach(merge))
            res = merge_leaving(
                values=st.v[idx],
                keys=st.k[idx],
                abar=st.abar[idx],
                leaving=leaving,
                positions=st.positions[idx],
                layer=layer,
                config=merge,
                seed=self.seed,
            )
            st.v[idx], st.abar[idx] = res.values, res.abar
            if res.keys is not None:
                st.k[idx] = res.keys
            self.stats.merge_decisions += res.decisions.decisions
            self.stats.merged += res.decisions.merged
        st.k, st.v, st.positions, st.abar = st.k[keep], st.v[keep], st.positions[keep], st.abar[keep]
