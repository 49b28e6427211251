"""Prefill scoring: ``attention_totals`` with its mask made per layer vs once per step, side by side.

    python scripts/bench_totals_mask.py [--repeats 2]

One pack of SmolLM2's shape (256 queries x 516 keys, 9 query / 3 KV heads, head_dim 64), one
thread, minimum of 30 calls each; prints both times and the change.
"""

from __future__ import annotations

import argparse
import time

import torch

from cam_vllm.core.attention import attention_totals, totals_bias


def _best_ms(fn, n: int = 30) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    nq, nk, hq, hkv, d = 256, 516, 9, 3, 64
    q, k = torch.randn(nq, hq, d, generator=g), torch.randn(nk, hkv, d, generator=g)
    visible = torch.rand(nq, nk, generator=g) > 0.3
    bias = totals_bias(visible, hq // hkv)
    for _ in range(args.repeats):
        per_layer = _best_ms(lambda: attention_totals(q, k, visible, 0.125))
        per_step = _best_ms(lambda: attention_totals(q, k, visible, 0.125, bias))
        change = (per_step - per_layer) / per_layer * 100
        print(f"mask per layer {per_layer:.2f} ms, mask once per step {per_step:.2f} ms ({change:+.0f} %)")


if __name__ == "__main__":
    main()
