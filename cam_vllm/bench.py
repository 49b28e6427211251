"""``cam-vllm bench``: vLLM's own serving benchmark, one real server per KV policy, side by side.

Every configuration gets the same fixed KV pool (``--num-gpu-blocks-override``), the same engine
flags and the same workload; the full cache (``none``) runs with prefix caching off. For each one
a ``vllm serve`` is started, ``vllm bench serve`` (random dataset, the model's own tokenizer, no
network) is run against it, ``/metrics`` is read once it is done (the peak of running requests,
which cam-vllm's stat logger records every engine step, and vLLM's preemption counter), and the
server is stopped. The table gives each number and its ratio to the full cache and to
``streaming``, measured in the same run. ``--out`` also writes the JSON and a PNG.

Workloads (``--workload``): ``decode`` (short prompt, output several times the window),
``prefill`` (long prompt, short output), ``mixed`` (1024 in, 128 out), or
``--input-len`` / ``--output-len`` given directly. ``--max-concurrency`` takes several values for
a sweep.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cam_vllm.errors import CamVllmError
from cam_vllm.subcommands import register_subcommand

WORKLOADS = {"decode": (128, 1024), "prefill": (2048, 32), "mixed": (1024, 128)}
DEFAULT_POLICIES = ["none", "streaming", "cam-streaming", "h2o", "cam-h2o"]
# (column, key in vLLM's result JSON, higher is better)
METRICS = [
    ("out tok/s", "output_throughput", True),
    ("total tok/s", "total_token_throughput", True),
    ("req/s", "request_throughput", True),
    ("TTFT p50 ms", "p50_ttft_ms", False),
    ("TTFT p99 ms", "p99_ttft_ms", False),
    ("TPOT p50 ms", "p50_tpot_ms", False),
    ("TPOT p99 ms", "p99_tpot_ms", False),
]


@dataclass
class BenchResult:
    policy: str
    max_concurrency: int
    result: dict[str, Any] = field(default_factory=dict)  # vLLM's own JSON
    peak_running: float = 0.0
    preemptions: float = 0.0
    seconds: float = 0.0

    def value(self, key: str) -> float:
        if key == "peak_running":
            return self.peak_running
        if key == "preemptions":
            return self.preemptions
        return float(self.result.get(key, float("nan")))


def _read_metrics(base: str) -> dict[str, float]:
    """Peak running requests and preemptions of the server's life so far, from one scrape.

    The peak is the highest bucket reached by ``cam_vllm:scheduler_running_requests``, which
    cam-vllm's stat logger fills from every step's scheduler stats: sampling vLLM's
    ``num_requests_running`` gauge instead missed short peaks, because a busy server answers
    ``/metrics`` up to a second late."""
    import httpx

    from cam_vllm.loadtest import parse_metrics, peak_running

    text = httpx.get(f"{base}/metrics", timeout=30).text
    peak = peak_running(text)
    if peak is None:
        raise CamVllmError(
            f"{base}/metrics has no cam_vllm:scheduler_running_requests: is the cam-vllm plugin loaded "
            "(and --api-server-count 1)?"
        )
    return {
        "peak_running": peak,
        "preemptions": parse_metrics(text).get("vllm:num_preemptions_total", 0.0),
    }


def server_flags(args: argparse.Namespace, policy: str) -> list[str]:
    """``vllm serve`` flags of one configuration (the pool and engine flags are shared)."""
    flags = ["--dtype", args.dtype, "--block-size", str(args.block_size), "--enforce-eager"]
    flags += ["--num-gpu-blocks-override", str(args.pool_blocks), "--max-model-len", str(args.max_model_len)]
    flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens), "--served-model-name", "bench"]
    flags += ["--no-enable-prefix-caching", "--max-num-seqs", str(args.max_num_seqs)]
    if policy != "none":
        kv = policy_settings(args, policy)
        flags += ["--kv-policy", kv["policy"], "--kv-sink-tokens", str(args.sinks)]
        flags += ["--kv-window-tokens", str(kv["window_tokens"])]
        if "heavy_tokens" in kv:
            flags += ["--kv-heavy-tokens", str(kv["heavy_tokens"])]
        if "prompt_hold_tokens" in kv:
            flags += ["--kv-prompt-hold-tokens", str(kv["prompt_hold_tokens"])]
    return flags + list(args.server_arg or [])


def policy_settings(args: argparse.Namespace, policy: str) -> dict[str, Any]:
    """The KV policy settings of one configuration (``NAME`` or ``NAME@TOKENS``: a bounded prompt
    hold), at the memory of sinks + ``--window`` tokens."""
    from cam_vllm.policies import same_memory_settings

    name, _, hold = policy.partition("@")
    kv = same_memory_settings(name, args.sinks, args.window, args.block_size)
    if args.heavy is not None and "heavy_tokens" in kv:  # given: on top of --window
        kv.update(heavy_tokens=args.heavy, window_tokens=args.window)
    if hold:
        if not hold.isdigit():
            raise ValueError(f"NAME@TOKENS takes a number of tokens, got {hold!r}")
        kv["prompt_hold_tokens"] = int(hold)
    return kv


def check_policies(args: argparse.Namespace) -> None:
    """Refuse an unknown policy or an impossible setting before any server starts, naming it."""
    from cam_vllm.config import KVPolicyConfig, short_reason
    from cam_vllm.policies import build_policy

    for policy in args.policies:
        if policy == "none":
            continue
        try:
            kv = {"sink_tokens": args.sinks, **policy_settings(args, policy), "block_size": args.block_size}
            build_policy(KVPolicyConfig(**kv).resolve(args.max_model_len))
        except ValueError as e:
            raise CamVllmError(f"bench: --policies {policy}: {short_reason(e)}") from None


def run_one(args: argparse.Namespace, policy: str, concurrency: int, workdir: Path) -> BenchResult:
    import subprocess

    from cam_vllm.launch import served, vllm_command

    inp, out = args.input_len, args.output_len
    log = workdir / f"serve-{policy}-{concurrency}.log"
    result_file = f"bench-{policy}-{concurrency}.json"
    res = BenchResult(policy, concurrency)
    with served(args.model, log, *server_flags(args, policy), timeout=args.start_timeout) as base:
        cmd = [*vllm_command(), "bench", "serve", "--backend", "vllm", "--base-url", base, "--model", "bench"]
        cmd += ["--tokenizer", str(args.model), "--dataset-name", "random", "--random-input-len", str(inp)]
        cmd += ["--random-output-len", str(out), "--num-prompts", str(args.num_prompts), "--ignore-eos"]
        cmd += ["--max-concurrency", str(concurrency), "--seed", str(args.seed), "--save-result"]
        cmd += ["--result-dir", str(workdir), "--result-filename", result_file, "--request-rate", "inf"]
        cmd += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
        if args.no_progress:
            cmd.append("--disable-tqdm")
        start = time.monotonic()
        stderr = subprocess.PIPE if args.no_progress else None  # else vLLM's progress bar shows
        run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=args.run_timeout)
        res.seconds = time.monotonic() - start
        if run.returncode != 0:
            raise CamVllmError(
                f"vllm bench serve failed for {policy} (status {run.returncode}):\n"
                + (run.stdout or "")[-2000:]
                + (run.stderr or "")[-2000:]
            )
        res.result = json.loads((workdir / result_file).read_text())
        scraped = _read_metrics(base)
        res.peak_running, res.preemptions = scraped["peak_running"], scraped["preemptions"]
    return res


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and b == b and a == a else "-"


def table(results: list[BenchResult]) -> str:
    """Side-by-side Markdown table: each value, then its ratio to none and to streaming."""
    cols = [*METRICS, ("peak running", "peak_running", True), ("preemptions", "preemptions", False)]
    lines = []
    for conc in sorted({r.max_concurrency for r in results}):
        rows = [r for r in results if r.max_concurrency == conc]
        ref = {r.policy: r for r in rows}
        lines.append(f"\nmax concurrency {conc}\n")
        lines.append("| policy | " + " | ".join(c for c, _, _ in cols) + " |")
        lines.append("|---" * (len(cols) + 1) + "|")
        for r in rows:
            cells = []
            for _, key, _ in cols:
                v = r.value(key)
                cell = f"{v:.1f}" if v == v else "-"
                extras = [
                    f"{_ratio(v, ref[base].value(key))} {base}"
                    for base in ("none", "streaming")
                    if base in ref and base != r.policy and key != "preemptions"
                ]
                cells.append(cell + (f" ({', '.join(extras)})" if extras else ""))
            lines.append(f"| {r.policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: list[BenchResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concs = sorted({r.max_concurrency for r in results})
    policies = list(dict.fromkeys(r.policy for r in results))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (label, key) in zip(
        axes,
        [
            ("output tokens/s", "output_throughput"),
            ("TPOT p50 (ms)", "p50_tpot_ms"),
            ("peak running requests", "peak_running"),
        ],
        strict=True,  # fmt: skip
    ):
        width = 0.8 / max(len(concs), 1)
        for j, conc in enumerate(concs):
            vals = [next((r.value(key) for r in results if r.policy == p and r.max_concurrency == conc), 0.0)
                    for p in policies]  # fmt: skip
            ax.bar([i + j * width for i in range(len(policies))], vals, width, label=f"concurrency {conc}")
        ax.set_xticks([i + width * (len(concs) - 1) / 2 for i in range(len(policies))], policies, rotation=30)
        ax.set_title(label)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the prepared SmolLM2)")
    parser.add_argument(
        "--policies",
        nargs="+",
        default=DEFAULT_POLICIES,
        help="none = the full cache; NAME@TOKENS: a score-driven policy whose prompt hold is bounded "
        "to TOKENS (--kv-prompt-hold-tokens), e.g. snapkv@768",
    )
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="mixed",
        help="input + output tokens: "
        + ", ".join(f"{k} {i} + {o}" for k, (i, o) in sorted(WORKLOADS.items()))
        + " (default: %(default)s)",
    )
    parser.add_argument("--input-len", type=int, default=None, help="prompt tokens (overrides --workload)")
    parser.add_argument("--output-len", type=int, default=None, help="output tokens (overrides --workload)")
    parser.add_argument("--num-prompts", type=int, default=16, help="requests per run (default: %(default)s)")
    parser.add_argument(
        "--max-concurrency",
        type=int,
        nargs="+",
        default=[16],
        help="requests in flight; several values: a sweep (default: %(default)s)",
    )
    parser.add_argument(
        "--pool-blocks",
        type=int,
        default=64,
        help="KV pool of every configuration, in blocks (default: %(default)s)",
    )
    parser.add_argument(
        "--block-size", type=int, default=32, help="KV block size in tokens (default: %(default)s)"
    )
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="default: what the pool holds (its blocks but the null one)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=256,
        help="vLLM's tokens per step, i.e. the prefill chunk (default: %(default)s)",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="vLLM's most requests running at once (default: %(default)s)",
    )
    parser.add_argument(
        "--sinks", type=int, default=4, help="sink tokens of every policy (default: %(default)s)"
    )
    parser.add_argument(
        "--window",
        type=int,
        default=256,
        help="tokens each policy keeps besides the sinks, heavy + window if score-driven "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--heavy",
        type=int,
        default=None,
        help="score-driven policies' heavy tokens (default: half of --window, the rest their window: "
        "every policy holds sinks + --window tokens)",
    )
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random prompts (default: %(default)s)"
    )
    parser.add_argument("--server-arg", action="append", help="one more `vllm serve` argument (repeatable)")
    parser.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        help="seconds a server may take to start (default: %(default)s)",
    )
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=3600.0,
        help="seconds one benchmark run may take (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="folder for bench.json, bench.md, bench.png and server logs, written after every run "
        "(default: a new temporary folder)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the /metrics request

    wl_in, wl_out = WORKLOADS[args.workload]
    args.input_len = args.input_len or wl_in
    args.output_len = args.output_len or wl_out
    args.max_model_len = args.max_model_len or (args.pool_blocks - 1) * args.block_size  # block 0: null
    if args.input_len + args.output_len > args.max_model_len:
        raise CamVllmError(
            f"bench: a request of {args.input_len} + {args.output_len} tokens does not fit max_model_len "
            f"{args.max_model_len} (the pool of {args.pool_blocks} blocks of {args.block_size}); "
            "use a bigger --pool-blocks or shorter lengths"
        )
    check_policies(args)
    if args.model is None:
        from cam_vllm import models

        args.model = str(models.prepare_model())
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="cam-vllm-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    configs = [(p, c) for c in args.max_concurrency for p in args.policies]
    results: list[BenchResult] = []
    with tqdm(configs, desc="bench", disable=args.no_progress, file=sys.stderr) as bar:
        for policy, conc in bar:
            bar.set_postfix_str(f"{policy} @ {conc}")
            results.append(run_one(args, policy, conc, out))
            text = write_results(args, results, out)  # after every run: a failed later run loses nothing
    print(text)
    print(f"\nresults: {out}")
    return 0


def write_results(args: argparse.Namespace, results: list[BenchResult], out: Path) -> str:
    """bench.json, bench.md and bench.png of the runs so far; returns the table."""
    setup = {k: v for k, v in vars(args).items() if k not in ("func",)}
    report = {"setup": setup, "results": [r.__dict__ for r in results]}
    (out / "bench.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(results)
    (out / "bench.md").write_text(text + "\n")
    with contextlib.suppress(ImportError):  # matplotlib is in the eval extra
        plot(results, out / "bench.png")
    return text


register_subcommand(
    "bench",
    "vLLM's serving benchmark (vllm bench serve) on one server per KV policy, same pool, side by side",
    _arguments,
    _run,
)
