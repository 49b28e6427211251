"""Decode throughput of the vLLM CPU worker path: none vs streaming vs cam-streaming (vs h2o...), one run.

    python scripts/bench_vllm_worker.py                      # tiny random Llama (made on the fly)
    python scripts/bench_vllm_worker.py --model PATH         # e.g. the prepared SmolLM2

Each policy gets its own engine (same settings, float32, block size 32, prefix caching off).
Score-driven policies (h2o, tova, scissorhands, corm and their cam- forms) get the same memory as
streaming: --window split into a heavy region and a window of half each.
Decode time is isolated as t(max_tokens = 1 + N) - t(max_tokens = 1) for the same prompts, so
prefill cost cancels; decode tokens/s = batch * N / that difference. Engines run one after the
other (an idle engine's worker keeps polling), each measured --repeats times, best of them;
t(max_tokens = 1), the batch's prefill, is printed too.

A name ending in ``@exact`` runs a streaming policy with ``token_exact`` (same visible window, about
one block more held per request). To compare with an older version of the code, run this script
with ``PYTHONPATH`` pointing at a checkout of it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _timed(llm, prompts, max_tokens: int) -> float:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint directory (default: a tiny random Llama)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--policies", default="none,streaming,cam-streaming")
    args = ap.parse_args()

    sys.path.insert(0, str(ROOT / "tests"))
    from vllm_helpers import make_llm, make_peaky_model, token_prompts

    tmp = Path(tempfile.mkdtemp(prefix="cam-bench-"))
    model = args.model or make_peaky_model(tmp / "tiny")
    prompts = token_prompts(args.batch, args.prompt_len, seed=0)
    names = args.policies.split(",")
    from cam_vllm.policies import same_memory_settings

    # one engine at a time: an idle vLLM engine's worker keeps polling (~25 % of a core here), so
    # engines kept alive side by side slow each other down on a small machine
    times: dict[str, list[float]] = {n: [] for n in names}
    ttft: dict[str, list[float]] = {n: [] for n in names}
    for name in names:
        policy_name, _, variant = name.partition("@")
        policy = same_memory_settings(policy_name, args.sinks, args.window)
        if variant == "exact":  # token-exact window: the plugin computes every query's attention
            policy["token_exact"] = True
        llm = make_llm(
            model,
            block_size=32,
            max_model_len=args.prompt_len + args.new_tokens + 64,
            enable_prefix_caching=False,
            disable_log_stats=True,
            max_num_seqs=args.batch,
            additional_config={"kv_policy": policy},
        )
        _timed(llm, prompts, 4)  # warm-up
        for _ in range(args.repeats):
            first = _timed(llm, prompts, 1)
            ttft[name].append(first)
            times[name].append(_timed(llm, prompts, 1 + args.new_tokens) - first)
        llm.llm_engine.engine_core.shutdown()
        del llm
    best = {n: min(t) for n, t in times.items()}
    rows = [(n, args.batch * args.new_tokens / best[n], best[n] / args.new_tokens * 1e3) for n in names]
    for n, t in times.items():  # the spread shows how noisy the machine was
        print(f"{n}: ms/step per repeat", " ".join(f"{x / args.new_tokens * 1e3:.2f}" for x in t))
    for n, t in ttft.items():
        print(f"{n}: prefill of the batch (s) per repeat", " ".join(f"{x:.2f}" for x in t))

    print(
        f"\nmodel {model}; batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, "
        f"sinks {args.sinks} + window {args.window}, block 32, float32"
    )
    base = rows[0][1]
    ref = best.get("streaming")  # the per-step cost of scoring and merging is measured against it
    head = f"{'policy':<20}{'decode tok/s':>14}{'ms/step':>10}{'vs ' + rows[0][0]:>12}"
    print(head + (f"{'ms/step vs streaming':>22}" if ref else ""))
    for name, tps, ms in rows:
        line = f"{name:<20}{tps:>14.1f}{ms:>10.2f}{tps / base:>11.1%}"
        print(line + (f"{best[name] / ref - 1:>+21.1%}" if ref else ""))


if __name__ == "__main__":
    main()
