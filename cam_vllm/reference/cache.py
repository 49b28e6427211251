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

Score-driven policies (``HeavyPolicy``) hold their cache as vLLM does, in *slots*: a slot has the
logical position the scheduler sees (``positions``: sinks | heavy region | window), and per KV
head the token it holds now (``state["pos"]``). Visibility is decided on the slots' positions, as
vLLM's block table does; when tokens leave the window, ``core.selection.heavy_step`` chooses, per
head, which of them and of the heavy slots' tokens stay in the heavy slots (and merges the rest).

Steps may be single tokens (decoding, the paper's path) or chunks (vLLM's chunked prefill): a
chunk attends exactly like its tokens would one by one, and eviction/merging happens at the end
of the step, as in vLLM where a block is freed only after the step that last read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cam_vllm.core.attention import accumulate_attention, attention_with_probs, reduce_to_kv_heads
from cam_vllm.core.merge import MergeDecisions, build_chain
from cam_vllm.core.rules import merge_leaving, merge_rule
from cam_vllm.core.selection import Tokens, heavy_step
from cam_vllm.policies import HeavyPolicy, KVPolicy


@dataclass
class LayerCache:
    """Retained slots of one layer: k, v [N, Hkv, D], positions [N], abar [N, Hkv] float32,
    and for score-driven policies the per-head state (``pos`` and the score's fields) [N, Hkv]."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    abar: torch.Tensor
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def select(self, idx: torch.Tensor) -> None:
        self.k, self.v, self.positions, self.abar = (
            self.k[idx],
            self.v[idx],
            self.positions[idx],
            self.abar[idx],
        )
        self.state = {name: t[idx] for name, t in self.state.items()}

    def tokens(self, idx: torch.Tensor) -> Tokens:
        return Tokens(self.k[idx], self.v[idx], self.abar[idx], {n: t[idx] for n, t in self.state.items()})


@dataclass
class CacheStats:
    """What eviction and merging did, summed over layers (a token counts once per layer)."""

    evicted_tokens: int = 0
    merge_decisions: int = 0  # (token, KV head) pairs that were considered for merging
    merged: int = 0  # of those, how many were merged (Bernoulli draw was 1)
    growth_sum: float = 0.0  # sum of ||v after|| / ||v before|| over the staying values merges changed
    growth_count: int = 0
    max_retained: int = 0  # largest number of tokens any layer held after an append

    @property
    def merge_rate(self) -> float:
        return self.merged / self.merge_decisions if self.merge_decisions else 0.0

    def add(self, decided: MergeDecisions) -> None:
        """Count one merge event."""
        self.merge_decisions += decided.decisions
        self.merged += decided.merged
        self.growth_sum += decided.growth_sum
        self.growth_count += decided.growth_count


@dataclass
class PolicyCache:
    """KV cache of one sequence under ``policy``; ``seed`` keys the CaM draws (default: policy's)."""

    policy: KVPolicy
    seed: int | None = None
    layers: dict[int, LayerCache] = field(default_factory=dict)
    stats: CacheStats = field(default_factory=CacheStats)
    num_tokens: dict[int, int] = field(default_factory=dict)
    prompt_len: int = 0  # the sequence's prompt: held whole when the policy holds its prompt

    @property
    def hold_end(self) -> int:
        """End of the held prompt (``EvictionPolicy.kept``); 0 when the policy holds nothing."""
        return self.prompt_len if self.policy.eviction.holds_prompt else 0

    def reset(self) -> None:
        self.layers.clear()
        self.num_tokens.clear()
        self.stats = CacheStats()

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """One step of ``layer``: q [C, Hq, D], k/v [C, Hkv, D] for the next C positions.

        Returns the attention output [C, Hq, D]. A chunk of a score-driven or merging policy runs
        in waves (``KVPolicy.runs_in_waves``): whenever a block leaves the window, the heavy region
        is chosen or the block merged before the chunk's later queries attend.
        """
        ev = self.policy.eviction
        if self.policy.runs_in_waves and q.shape[0] > 1:
            start = self.num_tokens.get(layer, 0)
            wave = ev.waves(torch.arange(start, start + q.shape[0]), hold_end=self.hold_end)
            if int(wave[-1]) > 0:
                outs = []
                for w in range(int(wave[-1]) + 1):
                    rows = torch.nonzero(wave == w).flatten()
                    a, b = int(rows[0]), int(rows[-1]) + 1
                    outs.append(self._attend_step(layer, q[a:b], k[a:b], v[a:b], scale))
                return torch.cat(outs)
        return self._attend_step(layer, q, k, v, scale)

    def _attend_step(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        start = self.num_tokens.get(layer, 0)
        positions = torch.arange(start, start + q.shape[0], device=q.device)
        st = self._append(layer, k, v, positions)
        self.stats.max_retained = max(self.stats.max_retained, st.positions.numel())

        visible = self.policy.eviction.visible(positions, st.positions, self.hold_end)
        out, probs = attention_with_probs(q, st.k, st.v, visible, scale)
        if self.policy.tracks_scores:
            probs_kv = reduce_to_kv_heads(probs, st.k.shape[1])
            score = self.policy.score
            if score is not None and score.observation_window is not None:
                # only the observation window's queries count (SnapKV: the prompt's last queries)
                seen = self.policy.eviction.observed(positions, self.hold_end)
                probs_kv, visible = probs_kv[seen], visible[seen]
            st.abar = accumulate_attention(st.abar, probs_kv, self.policy.score_mode)
            if score is not None and score.fields:
                st.state.update(score.update(st.state, probs_kv, visible))

        self.num_tokens[layer] = start + q.shape[0]
        self._evict(layer, st, next_num_tokens=start + q.shape[0] + 1)
        return out

    def _append(self, layer: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> LayerCache:
        zeros = torch.zeros(k.shape[0], k.shape[1], dtype=torch.float32, device=k.device)
        new_state = {}
        score = self.policy.score
        if score is not None:
            new_state["pos"] = pos[:, None].expand(-1, k.shape[1]).to(torch.int32)
            for name, dtype in score.fields.items():
                new_state[name] = torch.zeros(k.shape[0], k.shape[1], dtype=dtype, device=k.device)
        st = self.layers.get(layer)
        if st is None:
            st = LayerCache(
                k.clone(),
                v.clone(),
                pos.clone(),
                zeros,
                {n: t.clone() for n, t in new_state.items()},
            )
            self.layers[layer] = st
        else:
            st.k = torch.cat([st.k, k])
            st.v = torch.cat([st.v, v])
            st.positions = torch.cat([st.positions, pos])
            st.abar = torch.cat([st.abar, zeros])
            st.state = {n: torch.cat([st.state[n], t]) for n, t in new_state.items()}
        return st

    def _evict(self, layer: int, st: LayerCache, next_num_tokens: int) -> None:
        """Drop what the next query will not see, merging it first when the policy merges."""
        keep = self.policy.eviction.kept(st.positions, next_num_tokens, self.hold_end)
        if bool(keep.all()):
            return
        gone = ~keep
        self.stats.evicted_tokens += int(gone.sum())
        merge = self.policy.merge
        ev = self.policy.eviction
        if isinstance(ev, HeavyPolicy):
            self._choose_heavy(layer, st, gone, next_num_tokens)
        elif merge is not None:
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
            self.stats.add(res.decisions)
        st.select(keep)

    def _choose_heavy(self, layer: int, st: LayerCache, gone: torch.Tensor, next_num_tokens: int) -> None:
        """Heavy slots + leaving tokens compete; the winners fill the heavy slots, the rest merge."""
        ev = self.policy.eviction
        assert isinstance(ev, HeavyPolicy) and ev.score is not None
        p = st.positions
        heavy = torch.nonzero((p >= ev.heavy_start) & (p < ev.prefix_end)).flatten()
        leaving = torch.nonzero(gone).flatten()
        cand = torch.cat([heavy, leaving])
        merge = self.policy.merge
        receivers = None
        if merge is not None:
            window = torch.nonzero(~gone & (p >= ev.window_start(next_num_tokens))).flatten()
            window = window[torch.argsort(p[window])]
            reach = merge_rule(merge.rule).reach(merge)
            recv_idx = window if reach is None else window[:reach]
            receivers = st.tokens(recv_idx)
        res = heavy_step(
            st.tokens(cand), receivers, heavy.numel(), ev.score, next_num_tokens - 1, merge, layer, self.seed
        )
        st.k[heavy], st.v[heavy], st.abar[heavy] = res.heavy.k, res.heavy.v, res.heavy.abar
        for name, t in res.heavy.state.items():
            st.state[name][heavy] = t
        if res.receiver_v is not None:
            st.v[recv_idx] = res.receiver_v
            st.abar[recv_idx] = res.receiver_abar
            if res.receiver_k is not None:
                st.k[recv_idx] = res.receiver_k
        for d in res.decisions:
            self.stats.add(d)
        if ev.restarts_scores(next_num_tokens, self.hold_end):  # a bounded hold's next window scores afresh
            st.abar.zero_()
