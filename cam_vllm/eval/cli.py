"""``cam-vllm eval``: one command per row group of the results (kept light: no torch at import).

Examples::

    cam-vllm eval smoke --out /tmp/smoke                       # CI preset: seconds to a minute
    cam-vllm eval ppl --text essays --tokens 1024 --budgets 0.1 0.2 0.5 --seeds 0 --out results
    cam-vllm eval copa --budgets 0.2 --seeds 0 1 2 3 4 --limit 100 --out results
    cam-vllm eval mc --policy streaming cam-streaming --ablation no-mask current --budgets 0.2 --out results
    cam-vllm eval needle --tokens 1024 --depths 0 0.5 1 --limit 4 --budgets 0.2 0.5 --out results
    cam-vllm eval ruler --engine vllm --tokens 2048 --limit 10 --policy none snapkv --budgets 0.1 0.25
    cam-vllm eval report --out results                          # results.md + plots from all JSON
"""

from __future__ import annotations

import argparse

from cam_vllm.eval.ruler import TASKS as RULER_TASKS
from cam_vllm.subcommands import register_subcommand

TASKS = (
    "ppl",
    "copa",
    "piqa",
    "winogrande",
    "openbookqa",
    "rte",
    "mc",
    "needle",
    "ruler",
    "merge-stats",
    "smoke",
    "report",
)

ABLATION_NAMES = [
    "cam",
    "no-mask",
    "random-single",
    "current",
    "clamp-0-0.5",
    "clamp-0-0.75",
    "clamp-0.5-1",
    "clamp-0-1",
    "block16",
    "block32",
    "token-exact",
]  # = runner.ABLATIONS (kept here so that --help imports no torch; tests check they agree)


def _fraction(text: str) -> float:
    value = float(text.rstrip("%")) / (100.0 if text.endswith("%") else 1.0)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"a budget is a fraction in (0, 1] or a percentage, got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "task",
        choices=TASKS,
        help="ppl, a zero-shot task, mc (all 5), needle, merge-stats (CaM merge statistics), smoke, report",
    )
    p.add_argument("--policy", nargs="+", default=["none", "streaming", "cam-streaming"], help="KV policies")
    p.add_argument("--budgets", nargs="+", type=_fraction, default=[0.2], help="fractions (0.2) or 20%%")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4], help="CaM seeds (others: first)")
    p.add_argument("--limit", type=int, default=None, help="MC: first N items per task; needle: N per depth")
    p.add_argument("--out", default="eval-results", help="folder for JSON, results.md and plots")
    p.add_argument("--img", default=None, help="folder for the PNG plots (default: --out)")
    p.add_argument("--name", default=None, help="result file name (default: task and a timestamp)")
    p.add_argument(
        "--engine",
        choices=("reference", "parallel", "vllm"),
        default="parallel",
        help="reference: ReferenceEngine step by step; parallel: the same token-by-token "
        "semantics computed in one batched forward (verified equal, much faster); vllm: the "
        "plugin in a real vLLM engine, blocks of 32 and prefill chunks of --chunk (ppl, needle)",
    )
    p.add_argument("--chunk", type=int, default=16, help="vllm engine: prefill chunk (tokens per step)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the prepared SmolLM2)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on busy 2-core boxes)")
    p.add_argument("--sinks", type=int, default=4, help="sink tokens (fewer when the budget is tiny)")
    p.add_argument(
        "--ablation",
        nargs="+",
        default=[],
        choices=ABLATION_NAMES,
        metavar="NAME",
        help="named variants: " + ", ".join(ABLATION_NAMES),
    )
    g = p.add_argument_group("policy flags (apply to every row)")
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--merge-targets", type=int, default=None, help="m (default 16)")
    g.add_argument("--merge-clamp", nargs=2, type=float, default=None, metavar=("LO", "HI"))
    g.add_argument("--merge-target-mode", choices=("even", "random-single"), default=None)
    g.add_argument("--merge-similarity", type=float, default=None, help="kvmerger: set threshold")
    g.add_argument("--score-mode", choices=("accumulated", "current"), default=None)
    g.add_argument(
        "--prompt-hold",
        action="store_true",
        default=None,
        help="h2o, tova, scissorhands, corm: choose after the whole prompt is read (snapkv always does)",
    )
    g.add_argument(
        "--prompt-hold-tokens",
        type=int,
        default=None,
        help="score-driven policies: bound the prompt hold to this many tokens (implies --prompt-hold)",
    )
    g.add_argument("--observation-window", type=int, default=None, help="snapkv: last prompt queries scored")
    g.add_argument("--pooling-kernel", type=int, default=None, help="snapkv: positions pooled (odd)")
    t = p.add_argument_group("task options")
    t.add_argument("--text", nargs="+", choices=("essays", "shakespeare"), default=["essays", "shakespeare"])
    t.add_argument("--tokens", type=int, default=1024, help="ppl: text length; needle: haystack length")
    t.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    t.add_argument("--batch-tokens", type=int, default=4096, help="parallel engine: tokens per forward")
    t.add_argument(
        "--ruler-tasks",
        nargs="+",
        default=list(RULER_TASKS),
        choices=RULER_TASKS,
        metavar="TASK",
        help="ruler: which tasks (" + ", ".join(RULER_TASKS) + ")",
    )
    t.add_argument(
        "--dev",
        action="store_true",
        help="ruler: the samples for choosing settings (another seed), never the evaluation's",
    )
    t.add_argument("--batch", type=int, default=1, help="vllm engine: sequences in flight (ruler)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from cam_vllm.eval.tasks import run_command

    return run_command(args)


register_subcommand(
    "eval", "evaluate KV policies (perplexity, zero-shot, retrieval, ablations)", add_arguments, run
)
