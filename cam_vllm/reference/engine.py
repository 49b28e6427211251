"""Run a Hugging Face transformers causal LM with a :class:`PolicyCache` (batch size 1).

The model's own attention modules project and rotate q/k/v as usual; we register an attention
function with transformers' ``AttentionInterface`` that hands them to the active
:class:`PolicyCache` instead of attending over transformers' cache. The model is called with
``use_cache=False`` and explicit ``position_ids``, so transformers keeps no cache of its own.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from tqdm.auto import tqdm

from cam_vllm.config import KVPolicyConfig
from cam_vllm.policies import KVPolicy, build_policy
from cam_vllm.reference.cache import PolicyCache

ATTN_IMPLEMENTATION = "cam_reference"
_ACTIVE: ContextVar[PolicyCache | None] = ContextVar("cam_reference_cache", default=None)
_STEPS: ContextVar[tuple[int, ...] | None] = ContextVar("cam_reference_steps", default=None)


def _policy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, L, D], key/value [B, Hkv, L, D]."""
    cache = _ACTIVE.get()
    if cache is None:
        raise RuntimeError(
            f"attention implementation {ATTN_IMPLEMENTATION!r} runs only inside ReferenceEngine"
        )
    if query.shape[0] != 1:
        raise ValueError(f"the reference engine runs one sequence at a time, got batch {query.shape[0]}")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    steps = _STEPS.get() or (q.shape[0],)
    outs, a = [], 0
    for n in steps:  # this layer's steps in order; the cache's state is per layer
        outs.append(cache.attend(module.layer_idx, q[a : a + n], k[a : a + n], v[a : a + n], scale))
        a += n
    return torch.cat(outs).unsqueeze(0), None  # [1, L, Hq, D], as transformers expects


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _policy_attention)


class ReferenceEngine:
    """A transformers model whose attention is governed by a KV policy.

    ``policy`` may be a :class:`KVPolicy`, a :class:`KVPolicyConfig` (a fractional budget is then
    resolved per call against the sequence length) or None for the full cache.
    """

    def __init__(self, model, policy: KVPolicy | KVPolicyConfig | None = None, seed: int | None = None):
        _register()
        self.model = model
        self.model.set_attn_implementation(ATTN_IMPLEMENTATION)
        self.policy = policy if policy is not None else KVPolicyConfig()
        self.seed = seed
        self.cache: PolicyCache | None = None

    def _policy_for(self, length: int) -> KVPolicy:
        if isinstance(self.policy, KVPolicy):
            return self.policy
        return build_policy(self.policy, length)

    def start(self, length: int | None = None) -> PolicyCache:
        """Begin a new sequence of a ``length``-token prompt (a fractional budget is taken of it;
        a policy with the prompt hold keeps all of it until it has been read)."""
        self.cache = PolicyCache(self._policy_for(length or 0), seed=self.seed, prompt_len=length or 0)
        return self.cache

    @contextlib.contextmanager
    def _active(self) -> Iterator[PolicyCache]:
        if self.cache is None:
            raise RuntimeError("call start() before feeding tokens")
        token = _ACTIVE.set(self.cache)
        try:
            yield self.cache
        finally:
            _ACTIVE.reset(token)

    @torch.inference_mode()
    def feed(
        self, token_ids: Sequence[int] | torch.Tensor, steps: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Process the next tokens of the sequence; returns their logits [C, V].

        By default the tokens are one engine step. ``steps`` (lengths summing to C) splits them
        into consecutive steps, run in one forward *layer by layer*: each layer runs all its steps
        before the next layer starts. Every piece of the cache's state is per layer and a layer's
        step reads only that layer's state and the step's own inputs, so this equals feeding the
        steps one call each, while the weights are read once instead of once per step (feeding
        token by token is bound by reading the weights: ~4x slower on SmolLM2).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.model.device).reshape(1, -1)
        if steps is not None and (sum(steps) != ids.shape[1] or min(steps, default=1) < 1):
            raise ValueError(f"steps {list(steps)} do not split {ids.shape[1]} tokens")
        with self._active() as cache:
            start = cache.num_tokens.get(0, 0)
            pos = torch.arange(start, start + ids.shape[1], device=ids.device).unsqueeze(0)
            token = _STEPS.set(tuple(steps) if steps is not None else None)
            try:
                out = self.model(input_ids=ids, position_ids=pos, use_cache=False)
            finally:
                _STEPS.reset(token)
        return out.logits[0].float()

    def token_nlls(
        self,
        token_ids: Sequence[int],
        chunk_size: int = 1,
        progress: bool = False,
        budget_length: int | None = None,
    ) -> torch.Tensor:
        """Negative log-likelihood of tokens 1..n-1, each predicted from the tokens before it.

        ``chunk_size`` tokens are fed per step (1 = token by token, as the paper's perplexity).
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        self.start(budget_length or len(ids))
        nlls = []
        steps = range(0, len(ids) - 1, chunk_size)
        for s in tqdm(steps, disable=not progress, desc=f"ppl {self.cache.policy.name}", leave=False):
            chunk = ids[s : min(s + chunk_size, len(ids) - 1)]
            logits = self.feed(chunk)
            target = ids[s + 1 : s + 1 + len(chunk)].to(logits.device)
            nlls.append(torch.nn.functional.cross_entropy(logits, target, reduction="none"))
        return torch.cat(nlls)

    def perplexity(self, token_ids: Sequence[int], chunk_size: int = 1, progress: bool = False) -> float:
        return math.exp(float(self.token_nlls(token_ids, chunk_size, progress).mean()))

    @torch.inference_mode()
    def greedy(
        self, prompt_ids: Sequence[int], max_new_tokens: int, prefill_chunk: int | None = None
    ) -> list[int]:
        """Greedy continuation; the prompt is fed in chunks of ``prefill_chunk`` (all at once if None)."""
        self.start(len(prompt_ids))
        chunk = prefill_chunk or len(prompt_ids)
        logits = None
        for s in range(0, len(prompt_ids), chunk):
            logits = self.feed(prompt_ids[s : s + chunk])
        out: list[int] = []
        while True:
            out.append(int(logits[-1].argmax()))
            if len(out) == max_new_tokens:
                return out
            logits = self.feed(out[-1:])
