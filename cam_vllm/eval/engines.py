"""Engines the evaluation can run on, behind one small protocol.

An engine answers three questions for a KV policy (a :class:`KVPolicyConfig`, whose fractional
``budget`` is resolved per sequence by :func:`cam_vllm.eval.budget.resolve_budget`) and a seed
of the CaM draws:

* ``loglikelihoods(requests, cfg, seed)``: sum of log-probabilities of each continuation given
  its context (zero-shot multiple choice; the budget is a fraction of context + continuation);
* ``token_nlls(ids, cfg, seed)``: per-token negative log-likelihoods of a long text, token by
  token (perplexity; the budget is a fraction of ``len(ids)``);
* ``generate(prompt_ids, max_new_tokens, cfg, seed)``: greedy continuation (retrieval; the
  budget is a fraction of the prompt).

:class:`ReferenceBackend` runs :class:`~cam_vllm.reference.engine.ReferenceEngine`. What it feeds
as one step, and why that equals the paper's token-by-token runs:

* full cache and plain StreamingLLM: the whole sequence as one chunk. A chunk attends exactly like
  its tokens one by one (each query sees the retained set of its own length), and eviction
  without merging changes nothing that a later query could see.
* CaM: a merge changes values that later queries read, and our engine merges at the end of a
  step; so a chunk would delay merges. Everything up to the first eviction is one chunk (nothing
  is merged before it: same result), then one token per step, i.e. exactly the authors'
  per-token path (one eviction and merge after every token).

The vLLM engine (later) implements the same protocol, so every task runs on both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.eval.budget import resolve_budget
from cam_vllm.policies import build_policy, merge_rule_of


@dataclass(frozen=True)
class ScoreRequest:
    """Score ``continuation`` (token ids) after ``context`` (token ids)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.context) + len(self.continuation)


@dataclass
class EngineStats:
    """What the cache did across the calls since the last :meth:`reset` (summed over sequences)."""

    sequences: int = 0
    tokens: int = 0
    kept_tokens: int = 0  # sum over sequences of the budget (sinks + window), capped at length
    evicted: int = 0
    merge_decisions: int = 0
    merged: int = 0
    growth_sum: float = 0.0  # merges' ||v after|| / ||v before||, summed (``core.rules.value_growth``)
    growth_count: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def merge_rate(self) -> float:
        return self.merged / self.merge_decisions if self.merge_decisions else float("nan")

    @property
    def value_growth(self) -> float:
        """Mean norm ratio after / before of the retained values one merge event changed (NaN:
        none; the parallel engine's CaM path does not count it)."""
        return self.growth_sum / self.growth_count if self.growth_count else float("nan")

    @property
    def mean_budget(self) -> float:
        """Mean fraction of a sequence the cache could hold."""
        return self.kept_tokens / self.tokens if self.tokens else float("nan")

    def reset(self) -> None:
        self.__init__()

    def as_dict(self) -> dict:
        return {
            "sequences": self.sequences,
            "tokens": self.tokens,
            "mean_budget": self.mean_budget,
            "evicted": self.evicted,
            "merge_rate": self.merge_rate,
            "value_growth": self.value_growth,
        }


@runtime_checkable
class Engine(Protocol):
    """What a task needs from an engine (the reference engine now, the vLLM engine later)."""

    name: str
    stats: EngineStats

    def loglikelihoods(
        self, requests: Sequence[ScoreRequest], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> list[float]: ...

    def token_nlls(
        self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> torch.Tensor: ...

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, cfg: KVPolicyConfig, seed: int
    ) -> list[int]: ...


def score_continuations(
    engine: Engine,
    context_ids: Sequence[int],
    continuation_ids_list: Sequence[Sequence[int]],
    cfg: KVPolicyConfig,
    seed: int = 0,
) -> list[float]:
    """Log-likelihood of each continuation after one shared context."""
    reqs = [ScoreRequest(tuple(context_ids), tuple(c)) for c in continuation_ids_list]
    return engine.loglikelihoods(reqs, cfg, seed)


def first_eviction_step(cfg: KVPolicyConfig, length: int) -> int:
    """Index of the first step (token) after which the resolved policy evicts something.

    Returns ``length`` when nothing is evicted within ``length`` tokens. Feeding tokens
    ``0..s`` as one chunk is then exactly like feeding them one by one, also with CaM.
    """
    if not cfg.evicts:
        return length
    policy = build_policy(cfg)
    pos = torch.arange(length + 1)
    hold = length if policy.eviction.holds_prompt else 0  # the sequence is the prompt
    for t in range(length):
        if not bool(policy.eviction.kept(pos[: t + 1], t + 2, hold).all()):
            return t
    return length


def load_model(path: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a checkpoint; by default the prepared SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if path is None:
        from cam_vllm.models import prepare_model

        path = prepare_model()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


class ReferenceBackend:
    """The evaluation protocol on :class:`~cam_vllm.reference.engine.ReferenceEngine` (batch 1)."""

    name = "reference"
    piece_steps = 256  # steps per forward: bounds the activations, keeps a progress bar moving

    def __init__(self, model):
        self.model = model
        self.stats = EngineStats()

    def _engine(self, cfg: KVPolicyConfig, seed: int):
        from cam_vllm.reference.engine import ReferenceEngine

        return ReferenceEngine(self.model, cfg, seed=seed)

    def _run(self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, progress: bool = False):
        """Feed ``ids`` (token-by-token semantics) and return the logits of every position [n, V]."""
        from tqdm.auto import tqdm

        n = len(ids)
        eng = self._engine(cfg, seed)
        eng.start(n)
        # merging or score-driven: token by token from the first eviction (positional plain
        # eviction attends the same in one chunk)
        scoring = merge_rule_of(cfg.policy, cfg.merge) is not None or cfg.score_driven
        first = first_eviction_step(cfg, n) if scoring else n - 1
        head = min(first + 1, n)
        steps = [head] + [1] * (n - head)
        # layer-major (ReferenceEngine.feed with steps): the same steps, one forward per piece
        pieces = [steps[i : i + self.piece_steps] for i in range(0, len(steps), self.piece_steps)]
        logits, a = [], 0
        for piece in tqdm(pieces, disable=not progress, desc=f"ref {cfg.policy}", leave=False):
            b = a + sum(piece)
            logits.append(eng.feed(list(ids[a:b]), steps=piece))
            a = b
        st = eng.cache.stats
        self.stats.sequences += 1
        self.stats.tokens += n
        self.stats.kept_tokens += min(n, build_policy(cfg).eviction.max_retained_tokens() or n)
        self.stats.evicted += st.evicted_tokens
        self.stats.merge_decisions += st.merge_decisions
        self.stats.merged += st.merged
        self.stats.growth_sum += st.growth_sum
        self.stats.growth_count += st.growth_count
        return torch.cat(logits), eng

    def loglikelihoods(
        self, requests: Sequence[ScoreRequest], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> list[float]:
        from tqdm.auto import tqdm

        out = []
        for req in tqdm(requests, disable=not progress, desc=f"score {cfg.policy}", leave=False):
            ids = list(req.context) + list(req.continuation)
            rcfg = resolve_budget(cfg, len(ids))
            logits, _ = self._run(ids[:-1], rcfg, seed)
            logp = torch.log_softmax(logits[len(req.context) - 1 :], dim=-1)
            target = torch.tensor(req.continuation, device=logp.device)
            out.append(float(logp.gather(1, target[:, None]).sum()))
        return out

    def token_nlls(
        self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> torch.Tensor:
        rcfg = resolve_budget(cfg, len(ids))
        logits, _ = self._run(list(ids[:-1]), rcfg, seed, progress)
        target = torch.as_tensor(list(ids[1:]), device=logits.device)
        return torch.nn.functional.cross_entropy(logits, target, reduction="none")

    @torch.inference_mode()
    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, cfg: KVPolicyConfig, seed: int
    ) -> list[int]:
        rcfg = resolve_budget(cfg, len(prompt_ids))
        logits, eng = self._run(list(prompt_ids), rcfg, seed)
        out = [int(logits[-1].argmax())]
        eos = self.model.config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        while len(out) < max_new_tokens and out[-1] not in eos:
            out.append(int(eng.feed(out[-1:])[-1].argmax()))
        return out


def perplexity(nlls: torch.Tensor) -> float:
    return math.exp(float(nlls.float().mean()))
