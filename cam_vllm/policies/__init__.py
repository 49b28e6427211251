"""Policy registry: a policy name maps to an eviction policy, optionally wrapped by CaM merging.

``"<name>"`` is plain eviction by the registered policy; ``"cam-<name>"`` is the same eviction
with CaM merging of what it evicts. Adding a policy is one file with an
:class:`EvictionPolicy` subclass plus one line in ``_FACTORIES``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.attention import ScoreMode
from cam_vllm.core.merge import MergeConfig
from cam_vllm.policies.base import EvictionPolicy, FullCache
from cam_vllm.policies.streaming import StreamingPolicy

CAM_PREFIX = "cam-"

_FACTORIES: dict[str, Callable[[KVPolicyConfig], EvictionPolicy]] = {
    "none": lambda c: FullCache(block_size=c.block_size),
    "streaming": lambda c: StreamingPolicy(
        block_size=c.block_size, sink_tokens=c.sink_tokens, window_tokens=c.window_tokens or 0
    ),
}


def policy_names() -> list[str]:
    """Every accepted policy name (plain and CaM-wrapped)."""
    names = list(_FACTORIES)
    return names + [CAM_PREFIX + n for n in names if n != "none"]


def base_policy_name(name: str) -> str:
    """The eviction policy under ``name`` (``cam-streaming`` -> ``streaming``); raises if unknown."""
    base = name.removeprefix(CAM_PREFIX)
    if base not in _FACTORIES or name == CAM_PREFIX + "none":
        raise ValueError(f"unknown KV policy {name!r}; choose one of: {', '.join(policy_names())}")
    return base


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
        if isinstance(ev, StreamingPolicy):
            parts.append(
                f"sinks {ev.sink_tokens} (kept: {ev.sink_end}), window {ev.window_tokens} tokens, "
                f"at most {ev.max_retained_tokens()} tokens per sequence"
            )
        if self.merge is not None:
            m = self.merge
            parts.append(
                f"CaM merge into {m.num_targets} targets ({m.targets}), clamp {list(m.clamp)}, "
                f"{self.score_mode} attention, seed {m.seed}"
            )
        return "; ".join(parts)

    @property
    def tracks_scores(self) -> bool:
        """Whether attention probabilities must be computed at all."""
        return self.merge is not None


def build_policy(config: KVPolicyConfig, length: int | None = None) -> KVPolicy:
    """Validate ``config`` (resolving a fractional budget against ``length``) and build it."""
    config = config.resolve(length)
    base = base_policy_name(config.policy)
    merge = None
    if config.policy.startswith(CAM_PREFIX):
        merge = MergeConfig(
            num_targets=config.merge_targets,
            clamp=config.merge_clamp,
            targets=config.merge_target_mode,
            seed=config.seed,
        )
    return KVPolicy(_FACTORIES[base](config), merge, config.score_mode, config.policy)


__all__ = [
    "EvictionPolicy",
    "FullCache",
    "KVPolicy",
    "StreamingPolicy",
    "base_policy_name",
    "build_policy",
    "policy_names",
]
