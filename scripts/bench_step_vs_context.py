"""Milliseconds per decode step against the context length (tokens seen), full cache vs policies.

    python scripts/bench_step_vs_context.py --model ~/.cache/cam-vllm/models/smollm2-135m-instruct \
        --lengths 1024,2048,4096,8064 --batch 2 --policies none,streaming,h2o,cam-h2o,cam-streaming

Why: a bounded policy's decode step should cost the same at 1k and at 8k tokens of context (it
attends over sinks + window), while the full cache's grows with the context. One engine per policy
(same settings, float32, block 32, prefix caching off), started once; for every length a batch of
prompts of that length is submitted and the engine is stepped by hand: the steps after every
request has its first token are pure decode steps of the whole batch, and each is timed. One
prefill per length, not three as in ``bench_vllm_worker.py``, so 8k prompts stay affordable here.
Prints a table (mean and median ms/step per length), writes JSON and a PNG next to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def decode_steps(llm, prompts: list[list[int]], new_tokens: int, tag: str) -> list[float]:
    """Seconds of each engine step after every request got its first token (decode-only steps)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=1 + new_tokens, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    produced: dict[str, int] = {}
    times: list[float] = []
    while engine.has_unfinished_requests():
        decoding = len(produced) == len(prompts) and all(n >= 1 for n in produced.values())
        t = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t
        for out in outs:
            produced[out.request_id] = len(out.outputs[0].token_ids)
        if decoding and outs:  # a step that produced tokens for the running batch
            times.append(dt)
    return times


def machine() -> dict:
    """Where and when the numbers were taken (they mean little without it)."""
    import os
    import platform

    import torch

    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def plot(results: dict[str, dict[int, dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, by_len in results.items():
        lens = sorted(by_len)
        ax.plot(lens, [by_len[n]["mean_ms"] for n in lens], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ticks = sorted(next(iter(results.values())))
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.set_xlabel("context (tokens seen by each request)")
    ax.set_ylabel("ms per decode step (mean)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random Llama)")
    ap.add_argument(
        "--lengths",
        default="1024,2048,4096,8064",
        help="prompt lengths (comma-separated); prompt + new tokens + 64 must fit the model (SmolLM2: 8192)",
    )
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps timed per length")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--policies", default="none,streaming,cam-streaming")
    ap.add_argument("--out", default=None, help="folder for step_vs_context.json / .png")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from tqdm import tqdm
    from vllm_helpers import make_llm, make_peaky_model, token_prompts

    from cam_vllm.policies import same_memory_settings

    tmp = Path(tempfile.mkdtemp(prefix="cam-bench-"))
    out = Path(args.out) if args.out else tmp
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or make_peaky_model(tmp / "tiny")
    lengths = [int(x) for x in args.lengths.split(",")]
    names = args.policies.split(",")
    results: dict[str, dict[int, dict]] = {}
    bar = tqdm(total=len(names) * len(lengths), desc="step vs context", disable=args.no_progress)
    # one engine at a time: an idle engine's worker keeps polling and would slow the measured one
    for name in names:
        llm = make_llm(
            model,
            block_size=32,
            max_model_len=max(lengths) + args.new_tokens + 64,
            max_num_batched_tokens=args.max_num_batched_tokens,
            enable_prefix_caching=False,
            disable_log_stats=True,
            max_num_seqs=args.batch,
            additional_config={"kv_policy": same_memory_settings(name, args.sinks, args.window)},
        )
        decode_steps(llm, token_prompts(args.batch, 64, seed=1), 8, "warm")
        results[name] = {}
        for length in lengths:
            bar.set_postfix_str(f"{name} @ {length}")
            times = decode_steps(
                llm, token_prompts(args.batch, length, seed=length), args.new_tokens, f"L{length}"
            )
            ms = [t * 1e3 for t in times]
            results[name][length] = {
                "steps": len(ms),
                "mean_ms": statistics.fmean(ms),
                "median_ms": statistics.median(ms),
                "max_ms": max(ms),
            }
            bar.update()
        llm.llm_engine.engine_core.shutdown()
        del llm
    bar.close()

    setup = (
        f"model {Path(str(model)).name}; batch {args.batch}, {args.new_tokens} decode steps per length, "
        f"sinks {args.sinks} + {args.window} tokens, block 32, float32"
    )
    print(f"\n{setup}\nms per decode step, mean (median) over the timed steps\n")
    print(f"{'policy':<16}" + "".join(f"{n:>16}" for n in lengths) + f"{'last / first':>14}")
    for name, by_len in results.items():
        cells = "".join(f"{by_len[n]['mean_ms']:>8.1f} ({by_len[n]['median_ms']:>5.1f})" for n in lengths)
        growth = by_len[lengths[-1]]["mean_ms"] / by_len[lengths[0]]["mean_ms"]
        print(f"{name:<16}{cells}{growth:>13.2f}x")
    if "streaming" in results:
        print("\nvs streaming (mean ms/step)")
        for name, by_len in results.items():
            ratios = "".join(
                f"{by_len[n]['mean_ms'] / results['streaming'][n]['mean_ms']:>16.2f}" for n in lengths
            )
            print(f"{name:<16}{ratios}")
    record = {"setup": {**vars(args), **machine()}, "results": results}
    (out / "step_vs_context.json").write_text(json.dumps(record, indent=1))
    with contextlib.suppress(ImportError):  # matplotlib is in the eval extra
        plot(results, out / "step_vs_context.png", setup)
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
