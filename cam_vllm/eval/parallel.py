"""The reference engine's token-by-token semantics, computed in one batched forward per sequence.

Token by token, CaM changes values between steps, so a plain chunked forward cannot reproduce it
(our engine merges at the end of a step; the authors' zero-shot code only masks, without merging).
But with a positional policy everything a later query depends on can be computed in parallel,
layer by layer, because **keys are never merged**:

* the attention probabilities ``P[t, k]`` of every query t over every token k depend on q, k and
  the policy's visibility mask only, so one masked softmax gives all of them;
* the accumulated attention of token k after step s is ``cumsum_t P[t, k]`` (t <= s), so the
  merge probability of token j, evicted at the end of step ``e_j`` into the targets
  ``[j + 1, j + 1 + c_j)`` (the ``c_j <= m`` tokens after it), is known for every j at once,
  and so is its Bernoulli draw (keyed by seed, layer, position, KV head);
* the value token j carries when it is evicted includes what was merged into it before:
  ``Vfin_j = v_j + sum_{i: j in targets(i), M_i} Vfin_i / c_i``. This is a strictly lower
  triangular linear recursion, ``Vfin = (I - N)^-1 v``, solved by one triangular solve;
* query t reads ``v_k`` plus the merges made at the end of steps before t:
  ``out_t = P[t] v + sum_{j: e_j < t, M_j} (sum_{k in targets(j)} P[t, k] / c_j) Vfin_j``.

This equals :class:`~cam_vllm.reference.engine.ReferenceEngine` fed one token per step, up to
float rounding (tests compare the two on a tiny model and on SmolLM2). After a prompt, the final
state (retained keys, merged values ``Vfin``, ``Abar``) is handed to a
:class:`~cam_vllm.reference.cache.PolicyCache`, so generation continues in the reference engine.
Sequences of a batch are right-padded; each has its own budget and schedule.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache

import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.rng import merge_uniforms, target_choices
from cam_vllm.eval.budget import resolve_budget
from cam_vllm.eval.engines import EngineStats, ScoreRequest
from cam_vllm.policies import KVPolicy, build_policy, is_score_driven, resolve_merge

ATTN_IMPLEMENTATION = "cam_parallel"


@dataclass(frozen=True)
class Schedule:
    """What a positional policy does to one sequence of ``length`` tokens fed one per step.

    visible [L, L]: query t may attend token k. evict_step [L]: the step after which token j
    leaves the cache (L = never within the sequence). target_start/target_count [L]: the merge
    targets of token j, positions [start, start + count). final_retained [L]: the cache after
    the last step.
    """

    length: int
    visible: torch.Tensor
    evict_step: torch.Tensor
    target_start: torch.Tensor
    target_count: torch.Tensor
    final_retained: torch.Tensor


@lru_cache(maxsize=4096)
def schedule(cfg: KVPolicyConfig, length: int) -> Schedule:
    """The schedule of an already resolved ``cfg`` (explicit window) for ``length`` tokens."""
    policy = build_policy(cfg)
    if policy.merge is not None and policy.merge.rule != "cam":
        raise ValueError(f"the closed form computes CaM's merges only, not {policy.merge.rule!r}")
    ev = policy.eviction
    pos = torch.arange(length)
    visible = ev.visible(pos, pos)
    steps = pos[:, None]
    kept_after = ev.retained(pos[None, :], steps + 2) | (pos[None, :] > steps)  # [t, j]
    gone = ~kept_after
    ever = gone.any(dim=0)
    evict = torch.where(ever, gone.int().argmax(dim=0), torch.full_like(pos, length))
    m = policy.merge.num_targets if policy.merge is not None else 0
    # CaM's chain (core.merge.cam_merge): token j merges into the tokens right after it that exist
    # at its eviction step e_j; for a positional policy the tokens between j and the window leave
    # with j (a block) and pass on what they receive, so these are positions j+1 .. j+c.
    e = evict.clamp(max=length - 1)
    start = torch.where(ever, pos + 1, torch.zeros_like(pos))
    count = torch.where(ever, (e - pos).clamp(min=0, max=m), torch.zeros_like(pos))
    final = ev.retained(pos, length + 1)
    return Schedule(length, visible, evict, start, count, final)


@dataclass
class _Batch:
    """Padded schedules of the sequences in one forward, and what the forward records."""

    policy: KVPolicy
    seed: int
    lengths: torch.Tensor  # [B]
    visible: torch.Tensor  # [B, L, L]
    evict_step: torch.Tensor  # [B, L]
    target_start: torch.Tensor  # [B, L]
    target_count: torch.Tensor  # [B, L]
    final_retained: torch.Tensor | None = None  # [L] (batch of one, when capturing)
    capture: bool = False
    decisions: int = 0
    merged: int = 0
    evicted: int = 0
    layers: dict | None = None
    record: dict | None = None  # merge diagnostics (see :func:`_record`), when asked for


_ACTIVE: ContextVar[_Batch | None] = ContextVar("cam_parallel_batch", default=None)


def _parallel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, L, D]."""
    batch = _ACTIVE.get()
    if batch is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs only inside ParallelBackend"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = attend(batch, module.layer_idx, query, key, value, scale)
    return out.transpose(1, 2).to(query.dtype), None  # [B, L, Hq, D]


def attend(batch: _Batch, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """One layer for a whole batch: returns [B, Hq, L, D] float32 (see the module docstring)."""
    b, hq, n, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g, n, d)
    vf = v.float()
    logits = torch.einsum("bhgqd,bhkd->bhgqk", qf, k.float()) * scale
    logits = logits.masked_fill(~batch.visible[:, None, None], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)  # [B, Hkv, G, L, L]
    out = probs @ vf[:, :, None]  # [B, Hkv, G, L, D]
    merge = batch.policy.merge
    valid_evict = batch.evict_step < batch.lengths[:, None]  # evicted within the sequence
    batch.evicted += int(valid_evict.sum())
    if merge is None:
        _capture(batch, layer, k, vf, None)
        return out.reshape(b, hq, n, d)

    probs_kv = probs.mean(dim=2)  # [B, Hkv, L(t), L(k)], GQA: mean over the group
    # Abar_k after step t (accumulated), or only step t's attention (current)
    scores = probs_kv.cumsum(dim=2) if batch.policy.score_mode == "accumulated" else probs_kv
    e = batch.evict_step.clamp(max=n - 1)  # [B, L(j)]
    rows = scores.gather(2, e[:, None, :, None].expand(b, hkv, n, n))  # [B, Hkv, j, k] = score at e_j
    abar_j = rows.diagonal(dim1=2, dim2=3)  # [B, Hkv, L]
    start, count = batch.target_start, batch.target_count  # [B, L]
    csum = torch.nn.functional.pad(rows.cumsum(dim=-1), (1, 0))  # [B, Hkv, j, L + 1]
    hi = (start + count)[:, None, :, None].expand(b, hkv, n, 1)
    lo = start[:, None, :, None].expand(b, hkv, n, 1)
    target_sum = (csum.gather(3, hi) - csum.gather(3, lo))[..., 0]  # [B, Hkv, L]
    # Eq. 14 exactly as core.merge.merge_probability: 0/0 -> 0, x/0 -> 1, then clamp.
    ratio = abar_j / (target_sum / count[:, None, :].clamp(min=1).float())
    p = torch.nan_to_num(ratio, nan=0.0, posinf=1.0).clamp(min=merge.clamp[0], max=merge.clamp[1])
    u = merge_uniforms(batch.seed, layer, torch.arange(n), hkv).T.to(p.device)  # [Hkv, L]
    can_merge = valid_evict & (count > 0)  # [B, L]
    mask = (u[None] < p) & can_merge[:, None, :]  # [B, Hkv, L(j)]
    batch.decisions += int(can_merge.sum()) * hkv
    batch.merged += int(mask.sum())

    pos = torch.arange(n)
    if merge.targets == "even":
        into = (pos[None, :, None] >= start[:, None, :]) & (pos[None, :, None] < (start + count)[:, None, :])
        weight = mask.float() / count[:, None, :].clamp(min=1).float()  # [B, Hkv, j]
        nmat = into[:, None].float() * weight[:, :, None, :]  # [B, Hkv, i, j]
        cp = torch.nn.functional.pad(probs.cumsum(dim=-1), (1, 0))  # [B, Hkv, G, t, L + 1]
        hi5 = (start + count)[:, None, None, None, :].expand(b, hkv, g, n, n)
        lo5 = start[:, None, None, None, :].expand(b, hkv, g, n, n)
        seen = cp.gather(4, hi5) - cp.gather(4, lo5)  # [B, Hkv, G, t, j]: sum_k in targets(j) P[t, k]
    else:  # random-single: all of V_j goes to one target chosen per (j, head)
        choice = torch.zeros(b, hkv, n, dtype=torch.long)
        for c in count.unique().tolist():
            if c > 0:
                sel = count == c  # [B, L]
                ch = target_choices(batch.seed, layer, torch.arange(n), hkv, int(c)).T  # [Hkv, L]
                choice = torch.where(sel[:, None, :], ch[None], choice)
        tgt = (start[:, None, :] + choice).clamp(max=n - 1)  # [B, Hkv, j]
        weight = mask.float()
        nmat = (pos[None, None, :, None] == tgt[:, :, None, :]).float() * weight[:, :, None, :]
        seen = probs.gather(4, tgt[:, :, None, None, :].expand(b, hkv, g, n, n))
    eye = torch.eye(n).expand(b, hkv, n, n)
    vfin = torch.linalg.solve_triangular(eye - nmat, vf, upper=False, unitriangular=True)  # [B, Hkv, L, D]
    before = batch.evict_step[:, None, :] < pos[None, :, None]  # [B, t, j]: merged before step t
    gmat = seen * weight[:, :, None, None, :] * before[:, None, None]
    out = out + gmat @ vfin[:, :, None]
    if batch.record is not None:
        _record(batch.record, can_merge, ratio, p, nmat, vf, vfin)
    _capture(batch, layer, k, vfin, scores)
    return out.reshape(b, hq, n, d)


def _record(rec: dict, can_merge, ratio, p, nmat, v, vfin) -> None:
    """Sum what explains CaM's behaviour over layers: how often Abar_i >= mean(Abar_targets)
    (p clamps to 1: CaM merges like the "no merge mask" ablation), the mean p, and how much the
    values that received merges grew (||Vfin|| / ||v||: merges compound, since a target that is
    evicted later carries what it received into its own targets)."""
    cm = can_merge[:, None, :].expand_as(p)
    ratio = torch.nan_to_num(ratio, nan=0.0, posinf=1e9)
    received = nmat.sum(dim=-1) > 0  # [B, Hkv, L]
    gain = vfin.norm(dim=-1) / v.norm(dim=-1).clamp(min=1e-12)
    for key, value in (
        ("decisions", int(cm.sum())),
        ("ratio_ge_1", int(((ratio >= 1) & cm).sum())),
        ("p_sum", float(p[cm].sum())),
        ("received", int(received.sum())),
        ("gain_sum", float(gain[received].sum())),
    ):
        rec[key] = rec.get(key, 0) + value


def _capture(batch: _Batch, layer: int, k: torch.Tensor, v_now: torch.Tensor, scores) -> None:
    """Record the cache after the last step (batch of one) for handing over to a PolicyCache."""
    if not batch.capture:
        return
    from cam_vllm.reference.cache import LayerCache

    keep = batch.final_retained
    n = k.shape[2]
    abar = torch.zeros(n, k.shape[1]) if scores is None else scores[0, :, -1, :].T.contiguous()
    batch.layers[layer] = LayerCache(
        k=k[0].transpose(0, 1)[keep].clone(),
        v=v_now[0].transpose(0, 1)[keep].to(k.dtype).clone(),
        positions=torch.arange(n)[keep],
        abar=abar[keep].float().clone(),
    )


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _parallel_attention)


class ParallelBackend:
    """The evaluation protocol with :func:`attend`: batched, token-by-token semantics, no KV cache."""

    name = "parallel"

    def __init__(self, model, batch_tokens: int = 4096):
        _register()
        self.model = model
        self.batch_tokens = batch_tokens
        self.stats = EngineStats()
        self._reference = None

    @contextlib.contextmanager
    def _active(self, batch: _Batch) -> Iterator[_Batch]:
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        token = _ACTIVE.set(batch)
        try:
            yield batch
        finally:
            _ACTIVE.reset(token)

    def _make_batch(self, cfgs: Sequence[KVPolicyConfig], lengths: Sequence[int], seed: int) -> _Batch:
        n = max(lengths)
        b = len(lengths)
        visible = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)
        evict = torch.full((b, n), n, dtype=torch.long)
        start = torch.zeros(b, n, dtype=torch.long)
        count = torch.zeros(b, n, dtype=torch.long)
        for i, (cfg, length) in enumerate(zip(cfgs, lengths, strict=True)):
            s = schedule(cfg, length)
            visible[i, :length, :length] = s.visible
            evict[i, :length] = s.evict_step
            start[i, :length] = s.target_start
            count[i, :length] = s.target_count
            kept = build_policy(cfg).eviction.max_retained_tokens() or length
            self.stats.kept_tokens += min(length, kept)
            self.stats.tokens += length
            self.stats.sequences += 1
        return _Batch(build_policy(cfgs[0]), seed, torch.tensor(list(lengths)), visible, evict, start, count)

    @torch.inference_mode()
    def _hidden(self, batch: _Batch, ids: torch.Tensor) -> torch.Tensor:
        """Last hidden states [B, L, H] of right-padded ``ids`` [B, L] under ``batch``."""
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        with self._active(batch):
            out = self.model.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False)
        self.stats.evicted += batch.evicted
        self.stats.merge_decisions += batch.decisions
        self.stats.merged += batch.merged
        return out.last_hidden_state

    @torch.inference_mode()
    def _logprobs_of(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log p(targets) [N] from hidden states [N, H], in slices to bound the logits' memory."""
        head = self.model.get_output_embeddings()
        out = []
        for s in range(0, hidden.shape[0], 512):
            logits = head(hidden[s : s + 512]).float()
            out.append(-torch.nn.functional.cross_entropy(logits, targets[s : s + 512], reduction="none"))
        return torch.cat(out) if out else torch.zeros(0)

    def _delegate(self, cfg: KVPolicyConfig):
        """The reference engine, for a merge rule this closed form does not compute (only CaM's
        is linear in the values) or a score-driven policy (its retained set depends on the
        scores, not on positions alone); None when this engine computes ``cfg`` itself. Both engines
        have the same token-by-token semantics, so this changes the speed, not the numbers."""
        base, rule = resolve_merge(cfg.policy, cfg.merge)
        if rule in (None, "cam") and not is_score_driven(base):
            return None
        if self._reference is None:
            from cam_vllm.eval.engines import ReferenceBackend

            self._reference = ReferenceBackend(self.model)
        self._reference.stats = self.stats
        return self._reference

    def loglikelihoods(
        self, requests: Sequence[ScoreRequest], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> list[float]:
        from tqdm.auto import tqdm

        if (ref := self._delegate(cfg)) is not None:
            return ref.loglikelihoods(requests, cfg, seed, progress=progress)

        order = sorted(range(len(requests)), key=lambda i: -requests[i].length)
        groups, cur = [], []
        for i in order:
            if cur and (len(cur) + 1) * requests[cur[0]].length > self.batch_tokens:
                groups.append(cur)
                cur = []
            cur.append(i)
        if cur:
            groups.append(cur)
        result = [0.0] * len(requests)
        for grp in tqdm(groups, disable=not progress, desc=f"score {cfg.policy}", leave=False):
            seqs = [list(requests[i].context) + list(requests[i].continuation[:-1]) for i in grp]
            lengths = [len(s) for s in seqs]
            cfgs = [resolve_budget(cfg, requests[i].length) for i in grp]
            ids = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
            hidden = self._hidden(self._make_batch(cfgs, lengths, seed), ids)
            rows, cols, targets, owner = [], [], [], []
            for r, i in enumerate(grp):
                ctx, cont = requests[i].context, requests[i].continuation
                for j, tok in enumerate(cont):
                    rows.append(r)
                    cols.append(len(ctx) - 1 + j)
                    targets.append(tok)
                    owner.append(i)
            lp = self._logprobs_of(hidden[rows, cols], torch.tensor(targets))
            for i, x in zip(owner, lp.tolist(), strict=True):
                result[i] += x
        return result

    def token_nlls(
        self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> torch.Tensor:
        if (ref := self._delegate(cfg)) is not None:
            return ref.token_nlls(ids, cfg, seed, progress=progress)
        seq = list(ids[:-1])
        rcfg = resolve_budget(cfg, len(ids))
        hidden = self._hidden(self._make_batch([rcfg], [len(seq)], seed), torch.tensor([seq]))
        return -self._logprobs_of(hidden[0], torch.tensor(list(ids[1:])))

    @torch.inference_mode()
    def merge_diagnostics(self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int) -> dict:
        """Feed ``ids`` (token by token semantics) and return CaM's merge statistics over all layers:
        merge rate, share of decisions with Abar_i >= mean(Abar_targets) (p = 1), mean p, and the
        mean norm growth ||Vfin|| / ||v|| of the values that received merges."""
        if resolve_merge(cfg.policy, cfg.merge)[1] != "cam":
            raise ValueError(f"merge diagnostics are CaM's; policy {cfg.policy!r} does not merge with CaM")
        rcfg = resolve_budget(cfg, len(ids))
        batch = self._make_batch([rcfg], [len(ids)], seed)
        batch.record = {}
        self._hidden(batch, torch.tensor([list(ids)]))
        r = batch.record
        d = max(r.get("decisions", 0), 1)
        return {
            "merge_rate": batch.merged / d,
            "p_is_1": r.get("ratio_ge_1", 0) / d,
            "mean_p": r.get("p_sum", 0.0) / d,
            "value_gain": r.get("gain_sum", 0.0) / max(r.get("received", 0), 1),
        }

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int], cfg: KVPolicyConfig, seed: int):
        """Run the prompt token by token (in parallel); returns (last logits [V], ReferenceEngine).

        The engine holds the same cache as if the prompt had been fed one token per step, so
        decoding continues with ``engine.feed``.
        """
        from cam_vllm.reference.cache import PolicyCache
        from cam_vllm.reference.engine import ReferenceEngine

        n = len(prompt_ids)
        batch = self._make_batch([cfg], [n], seed)
        batch.capture = True
        batch.layers = {}
        batch.final_retained = schedule(cfg, n).final_retained
        hidden = self._hidden(batch, torch.tensor([list(prompt_ids)]))
        logits = self.model.get_output_embeddings()(hidden[0, -1:]).float()[0]
        engine = ReferenceEngine(self.model, cfg, seed=seed)
        cache = PolicyCache(build_policy(cfg), seed=seed)
        cache.layers = batch.layers
        cache.num_tokens = dict.fromkeys(batch.layers, n)
        engine.cache = cache
        return logits, engine

    @torch.inference_mode()
    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, cfg: KVPolicyConfig, seed: int
    ) -> list[int]:
        if (ref := self._delegate(cfg)) is not None:
            return ref.generate(prompt_ids, max_new_tokens, cfg, seed)
        rcfg = resolve_budget(cfg, len(prompt_ids))
        logits, engine = self.prefill(prompt_ids, rcfg, seed)
        eos = self.model.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        out = [int(logits.argmax())]
        while len(out) < max_new_tokens and out[-1] not in eos:
            out.append(int(engine.feed(out[-1:])[-1].argmax()))
        return out
