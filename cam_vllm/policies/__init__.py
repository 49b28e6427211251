"""Policy registry: a policy name maps to an eviction policy, optionally with a merge rule.

``"<name>"`` is plain eviction by the registered policy; ``"<rule>-<name>"`` is the same eviction
with the merge rule ``<rule>`` (``core.rules.MERGE_RULES``: ``cam-streaming`` is StreamingLLM with
CaM merging, ``weighted-streaming`` with the convex weighted merge). The rule can also be given
on its own (``KVPolicyConfig.merge``, ``--kv-merge``). Adding a policy is one file with an
:class:`EvictionPolicy` subclass plus one line in ``_FACTORIES``; adding a merge rule is one line
in ``MERGE_RULES``; every combination then has a name.

A score-driven policy (H2O, TOVA, Scissorhands, CORM: a :class:`HeavyPolicy` whose heavy region
is chosen by a score) is one file with a :class:`~cam_vllm.core.scores.TokenScore` subclass plus
one line in ``SCORES``.

This module never imports ``cam_vllm.config`` (the settings import the registry to validate
names, not the other way round); ``build_policy`` takes any object with the settings' fields.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cam_vllm.core.attention import ScoreMode
from cam_vllm.core.merge import MergeConfig
from cam_vllm.core.rules import MERGE_RULES
from cam_vllm.core.scores import TokenScore
from cam_vllm.policies.base import EvictionPolicy, FullCache
from cam_vllm.policies.corm import CORMScore
from cam_vllm.policies.h2o import H2OScore
from cam_vllm.policies.heavy import HeavyPolicy
from cam_vllm.policies.scissorhands import ScissorhandsScore
from cam_vllm.policies.snapkv import SnapKVScore
from cam_vllm.policies.streaming import StreamingPolicy
from cam_vllm.policies.tova import TOVAScore

if TYPE_CHECKING:
    from cam_vllm.config import KVPolicyConfig


# Score-driven policies: name -> score. Each gets a heavy region between sinks and window.
SCORES: dict[str, type[TokenScore]] = {
    "h2o": H2OScore,
    "tova": TOVAScore,
    "scissorhands": ScissorhandsScore,
    "corm": CORMScore,
    "snapkv": SnapKVScore,
}


def _heavy(name: str) -> Callable[[Any], EvictionPolicy]:
    def build(c: Any) -> EvictionPolicy:
        cls = SCORES[name]
        settings = {
            "history": c.score_history,
            "threshold": c.score_threshold,
            "window": getattr(c, "observation_window", None),
            "kernel": getattr(c, "pooling_kernel", None),
        }
        own = {f.name for f in dataclasses.fields(cls)}
        score = cls(**{k: v for k, v in settings.items() if k in own and v is not None})
        hold = getattr(c, "prompt_hold", None)
        hold_tokens = getattr(c, "prompt_hold_tokens", None) or 0
        return HeavyPolicy(
            block_size=c.block_size,
            sink_tokens=c.sink_tokens,
            window_tokens=c.window_tokens or 0,
            heavy_tokens=c.heavy_tokens or 0,
            score=score,
            prompt_hold=bool(hold_tokens) or (cls.holds_prompt if hold is None else bool(hold)),
            prompt_hold_tokens=hold_tokens,
        )

    return build


_FACTORIES: dict[str, Callable[[Any], EvictionPolicy]] = {
    "none": lambda c: FullCache(block_size=c.block_size),
    "streaming": lambda c: StreamingPolicy(
        block_size=c.block_size,
        sink_tokens=c.sink_tokens,
        window_tokens=c.window_tokens or 0,
        token_exact=getattr(c, "token_exact", False),
    ),
    **{name: _heavy(name) for name in SCORES},
}


def _hold_words(ev: HeavyPolicy) -> str:
    if ev.prompt_hold_tokens:
        t = ev.prompt_hold_tokens
        return f"a prompt being read holds at most {t} tokens, compressed when it reaches them"
    return "the prompt is held whole until read"


def is_score_driven(base: str) -> bool:
    """Whether the eviction policy ``base`` keeps a score-selected heavy region."""
    return base in SCORES


def policy_names() -> list[str]:
    """Every accepted policy name (plain, and with each merge rule)."""
    names = list(_FACTORIES)
    return names + [f"{rule}-{n}" for rule in MERGE_RULES for n in names if n != "none"]


def split_policy_name(name: str) -> tuple[str, str | None]:
    """``(eviction policy, merge rule or None)`` of ``name``; raises naming the choices if unknown."""
    base, rule = name, None
    for r in MERGE_RULES:
        if name.startswith(r + "-") and name.removeprefix(r + "-") in _FACTORIES:
            base, rule = name.removeprefix(r + "-"), r
            break
    if base not in _FACTORIES or (rule is not None and base == "none"):
        raise ValueError(f"unknown KV policy {name!r}; choose one of: {', '.join(policy_names())}")
    return base, rule


def base_policy_name(name: str) -> str:
    """The eviction policy under ``name`` (``cam-streaming`` -> ``streaming``); raises if unknown."""
    return split_policy_name(name)[0]


def same_memory_settings(name: str, sinks: int, window: int, block_size: int = 1) -> dict[str, Any]:
    """KVPolicyConfig fields under which policy ``name`` holds sinks + ``window`` tokens per
    request, so that benchmarks compare policies at one memory: a score-driven policy gets half of
    ``window`` (rounded down to ``block_size``) as its heavy region and the rest as its window; the
    full cache (``none``) gets no settings besides its name."""
    settings: dict[str, Any] = {"policy": name}
    if name == "none":
        return settings
    settings.update(sink_tokens=sinks, window_tokens=window)
    if is_score_driven(base_policy_name(name)):
        heavy = window // 2 // block_size * block_size
        settings.update(heavy_tokens=heavy, window_tokens=window - heavy)
    return settings


def resolve_merge(policy: str, merge: str | None) -> tuple[str, str | None]:
    """The eviction policy and merge rule that ``policy`` plus an explicit ``merge`` ask for.

    ``merge`` None keeps what the name says; ``"none"`` asks for no merging. A name that already
    carries another rule, or merging with nothing evicted, is an error naming the fix.
    """
    base, rule = split_policy_name(policy)
    if merge is None:
        return base, rule
    if merge != "none" and merge not in MERGE_RULES:
        raise ValueError(f"unknown merge rule {merge!r}; choose one of: none, {', '.join(MERGE_RULES)}")
    wanted = None if merge == "none" else merge
    if rule is not None and rule != wanted:
        raise ValueError(
            f"policy {policy!r} already merges with {rule!r}, but merge {merge!r} was asked for. "
            f"Fix: give the eviction policy alone ({base!r}) with the merge rule"
        )
    if base == "none" and wanted is not None:
        raise ValueError(f"merge {merge!r} needs an evicting policy; policy 'none' keeps every token")
    return base, wanted


def merge_rule_of(policy: str, merge: str | None = None) -> str | None:
    """The merge rule ``policy`` (with an explicit ``merge``) uses; None for plain eviction."""
    return resolve_merge(policy, merge)[1]


def canonical_name(base: str, rule: str | None) -> str:
    return base if rule is None else f"{rule}-{base}"


@dataclass(frozen=True)
class KVPolicy:
    """What an engine needs: the eviction rule, the merge (None = plain eviction), the score."""

    eviction: EvictionPolicy
    merge: MergeConfig | None
    score_mode: ScoreMode = "accumulated"
    name: str = "none"

    def describe(self) -> str:
        """One line for logs and status endpoints: the policy and every setting that matters."""
        ev = self.eviction
        parts = [f"policy {self.name}", f"block size {ev.block_size}"]
        if isinstance(ev, HeavyPolicy):
            assert ev.score is not None
            parts.append(
                f"sinks {ev.sink_tokens} (kept: {ev.sink_end}), heavy {ev.heavy_tokens} tokens "
                f"({ev.score.describe()}), window {ev.window_tokens} tokens, "
                f"at most {ev.max_retained_tokens()} tokens per sequence"
                + (" after its prompt (" + _hold_words(ev) + ")" if ev.prompt_hold else "")
            )
        elif isinstance(ev, StreamingPolicy) and ev.token_exact:
            parts.append(
                f"sinks {ev.sink_tokens}, window {ev.window_tokens} tokens, token-exact (attends to at "
                f"most {ev.max_retained_tokens()} tokens, holds at most {ev.max_held_tokens()} in blocks)"
            )
        elif isinstance(ev, StreamingPolicy):
            parts.append(
                f"sinks {ev.sink_tokens} (kept: {ev.sink_end}), window {ev.window_tokens} tokens, "
                f"at most {ev.max_retained_tokens()} tokens per sequence"
            )
        m = self.merge
        if m is not None and m.rule == "cam":
            parts.append(
                f"CaM merge into the {m.num_targets} tokens after each evicted one ({m.targets}), "
                f"clamp {list(m.clamp)}, {self.score_mode} attention, seed {m.seed}"
            )
        elif m is not None:
            parts.append(f"{m.rule} merge ({MERGE_RULES[m.rule].summary}), {self.score_mode} attention")
        return "; ".join(parts)

    @property
    def runs_in_waves(self) -> bool:
        """Whether a multi-token step runs in waves (``StreamingPolicy.waves``): whenever a block
        leaves the window inside a chunk, the later queries must see what token-by-token decoding
        would have left (the heavy region re-chosen, the leaving block merged). Then chunking,
        batching and preemption do not change a request's cache. Plain eviction needs no waves:
        each query's visibility is exact by position."""
        ev = self.eviction
        return isinstance(ev, HeavyPolicy) or (isinstance(ev, StreamingPolicy) and self.merge is not None)

    @property
    def tracks_scores(self) -> bool:
        """Whether attention probabilities must be computed at all (token-exact: the engine
        computes the attention output itself)."""
        return self.merge is not None or self.score is not None or self.token_exact

    @property
    def token_exact(self) -> bool:
        """Queries see the per-token policy's tokens inside held blocks (``StreamingPolicy``)."""
        return bool(getattr(self.eviction, "token_exact", False))

    @property
    def score(self) -> TokenScore | None:
        """The score choosing the heavy region (None: a positional policy)."""
        return self.eviction.score if isinstance(self.eviction, HeavyPolicy) else None


def build_policy(config: KVPolicyConfig, length: int | None = None) -> KVPolicy:
    """Validate ``config`` (resolving a fractional budget against ``length``) and build it."""
    config = config.resolve(length)
    base, rule = resolve_merge(config.policy, config.merge)
    merge = None
    if rule is not None:
        merge = MergeConfig(
            rule=rule,
            num_targets=config.merge_targets,
            clamp=config.merge_clamp,
            targets=config.merge_target_mode,
            seed=config.seed,
            similarity=config.merge_similarity,
        )
    return KVPolicy(_FACTORIES[base](config), merge, config.score_mode, canonical_name(base, rule))


def hold_options(policy: KVPolicy) -> tuple[bool, bool, bool]:
    """(a request may choose whether to hold its prompt, the server holds prompts, the server's
    hold is bounded) for ``policy``. Choosing needs a score-driven policy whose hold, if any, is
    whole (a bounded hold's rule is the server's, for every row) and whose score does not need
    the hold (SnapKV's observation window is the prompt's end)."""
    ev = policy.eviction
    score = policy.score
    holds, bounded = bool(ev.holds_prompt), bool(ev.hold_span)
    choosable = score is not None and not bounded and score.observation_window is None
    return choosable, holds, bounded


__all__ = [
    "hold_options",
    "EvictionPolicy",
    "FullCache",
    "HeavyPolicy",
    "SCORES",
    "is_score_driven",
    "KVPolicy",
    "StreamingPolicy",
    "base_policy_name",
    "build_policy",
    "policy_names",
    "merge_rule_of",
    "resolve_merge",
    "split_policy_name",
]
