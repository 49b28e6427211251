"""The evaluation grid: task x policy (x ablation variant) x budget x seed -> rows of results.

One :class:`RunSpec` is one row: a policy, a budget (None = full cache), a variant name and the
:class:`KVPolicyConfig` fields it overrides. Seeds only matter for CaM (the merge draws); the
full cache and plain StreamingLLM are deterministic and run once (seed 0).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cam_vllm.config import KVPolicyConfig
from cam_vllm.eval.results import aggregate
from cam_vllm.policies import base_policy_name, is_score_driven, merge_rule_of

# Settings of choosing after the prompt (``--prompt-hold``, snapkv's observation and pooling):
# applied to the rows they mean something for, and named in those rows' labels.
READING_KEYS = ("prompt_hold", "prompt_hold_tokens", "observation_window", "pooling_kernel")

# Named ablations (paper Tables 2 and 3, and the block-granular merging vLLM needs).
ABLATIONS: dict[str, dict] = {
    "cam": {},
    "no-mask": {"merge_clamp": (1.0, 1.0)},  # Table 2 "w.o. merge mask": always merge
    "random-single": {"merge_target_mode": "random-single"},  # Table 2 "w.o. avg merge"
    "current": {"score_mode": "current"},  # Table 2 "w.o. acc. attention"
    "clamp-0-0.5": {"merge_clamp": (0.0, 0.5)},  # Table 3
    "clamp-0-0.75": {"merge_clamp": (0.0, 0.75)},
    "clamp-0.5-1": {"merge_clamp": (0.5, 1.0)},
    "clamp-0-1": {"merge_clamp": (0.0, 1.0)},
    "block16": {"block_size": 16},  # eviction and merging a block at a time (vLLM CUDA blocks)
    "block32": {"block_size": 32},  # (the smallest block vLLM's CPU backend accepts)
    # queries see exactly the per-token sinks and window inside the held blocks (streaming, any rule)
    "token-exact": {"token_exact": True},
}


def _finite(x: float) -> float | None:
    """None for NaN (JSON has no NaN): the statistic was not measured."""
    return None if math.isnan(x) else x


def random_merges(spec: RunSpec) -> bool:
    """Whether the spec's merges are random draws (CaM), so that several seeds mean something."""
    return merge_rule_of(spec.policy, spec.overrides.get("merge")) == "cam"


MC_TASKS = ("copa", "piqa", "winogrande", "openbookqa", "rte")
TASK_NAMES = ("ppl", *MC_TASKS, "mc", "needle", "ruler", "smoke")


@dataclass(frozen=True)
class RunSpec:
    policy: str
    budget: float | None
    variant: str = ""
    overrides: dict = field(default_factory=dict)
    sinks: int = 4

    def config(self, seed: int = 0) -> KVPolicyConfig:
        budget = self.budget if self.policy != "none" else None
        return KVPolicyConfig(
            policy=self.policy, sink_tokens=self.sinks, budget=budget, seed=seed, **self.overrides
        )


def make_specs(
    policies: Sequence[str],
    budgets: Sequence[float],
    ablations: Sequence[str] = (),
    overrides: dict | None = None,
    sinks: int = 4,
) -> list[RunSpec]:
    """The rows of one command. ``none`` gets one row; ablations apply to CaM only, except block
    sizes, which apply to every evicting policy (StreamingLLM with blocks is the baseline there)."""
    overrides = dict(overrides or {})
    specs: list[RunSpec] = []
    variants = list(ablations) or [""]
    for policy in policies:
        if policy == "none":
            specs.append(RunSpec("none", None, "", {}, sinks))
            continue
        for variant in variants:
            if variant and variant not in ABLATIONS:
                raise ValueError(f"unknown ablation {variant!r}; choose from {', '.join(ABLATIONS)}")
            ov = {**overrides, **ABLATIONS.get(variant, {})}
            rule = merge_rule_of(policy)
            base = base_policy_name(policy)
            streaming = base == "streaming"
            if ov.get("token_exact") and not streaming:
                continue  # token-exact windows are a streaming setting
            # the prompt hold applies to score-driven policies (snapkv holds anyway), snapkv's own
            # settings to snapkv
            reading: tuple[str, ...] = ()
            if base == "snapkv":
                reading = ("prompt_hold_tokens", "observation_window", "pooling_kernel")
            elif is_score_driven(base):
                reading = ("prompt_hold", "prompt_hold_tokens")
            ov = {k: v for k, v in ov.items() if k not in READING_KEYS or k in reading}
            if rule != "cam":
                exact = ("token_exact",) if streaming else ()
                ov = {k: v for k, v in ov.items() if k in ("block_size", *exact, *reading)}
                if variant and not any(k in ov for k in ABLATIONS[variant]):
                    continue  # a merge ablation on plain eviction (or another rule) does not apply
            # flags on top of a named ablation stay in the label: another row, not the same one
            extra = {k: v for k, v in ov.items() if k not in ABLATIONS.get(variant, {})}
            label = ",".join(x for x in (variant, _label(extra)) if x)
            for b in budgets:
                spec = RunSpec(policy, b, label, ov, sinks)
                if spec not in specs:
                    specs.append(spec)
    return specs


def _label(overrides: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(overrides.items()))


def environment(engine_name: str, model_path: str) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "engine": engine_name,
        "model": str(model_path),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def run_grid(
    engine,
    task: str,
    data_label: str,
    specs: Sequence[RunSpec],
    seeds: Sequence[int],
    evaluate: Callable[[KVPolicyConfig, int], tuple[dict, dict]],
    n_items: int,
    progress: bool = True,
    on_row: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run ``evaluate(cfg, seed) -> (metrics, extra)`` for every spec and seed; one row per spec."""
    from tqdm.auto import tqdm

    rows = []
    todo = [(s, seed) for s in specs for seed in (seeds if random_merges(s) else seeds[:1])]
    bar = tqdm(total=len(todo), desc=f"{task} {data_label}".strip(), disable=not progress)
    for spec in specs:
        spec_seeds = list(seeds) if random_merges(spec) else list(seeds[:1])
        per_metric: dict[str, list[float]] = {}
        extra: dict = {}
        engine.stats.reset()
        t0 = time.perf_counter()
        for seed in spec_seeds:
            bar.set_postfix_str(f"{spec.policy} {spec.variant} b={spec.budget} seed={seed}")
            metrics, extra = evaluate(spec.config(seed), seed)
            for k, v in metrics.items():
                per_metric.setdefault(k, []).append(v)
            bar.update(1)
        stats = engine.stats
        row = {
            "task": task,
            "data": data_label,
            "engine": engine.name,
            "policy": spec.policy,
            "variant": spec.variant,
            "budget": spec.budget if spec.policy != "none" else None,
            "config": spec.config().model_dump(exclude={"seed", "budget"}),
            "seeds": spec_seeds if random_merges(spec) else [],
            "n_items": n_items,
            "metrics": {k: aggregate(v) for k, v in per_metric.items()},
            "merge_rate": stats.merge_rate if merge_rule_of(spec.policy) else None,
            "value_growth": _finite(stats.value_growth) if merge_rule_of(spec.policy) else None,
            "mean_budget": stats.mean_budget,
            "seconds": round(time.perf_counter() - t0, 2),
            **extra,
        }
        rows.append(row)
        if on_row:
            on_row(row)
    bar.close()
    return rows
