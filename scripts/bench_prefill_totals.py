"""Prefill scoring: ``attention_totals`` against the one-pass formulation it replaced, side by side.

    python scripts/bench_prefill_totals.py [--prefix 160 416 768] [--dtype float32 bfloat16]

One pack of SmolLM2's shape (a 256-query chunk after ``prefix`` cached keys, causal, 9 query / 3
KV heads, head_dim 64), one thread, best of 30 calls each. ``before``: every block of rows over
every key, the mask added everywhere, ``exp`` (the formulation up to 2026-12-07, restated here);
``now``: ``core.attention.attention_totals`` (keys trimmed per block, mask only where it hides,
``exp2``); ``q.K^T``: the bare product over all keys, the floor of any exact second pass.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from cam_vllm.core.attention import TOTALS_BLOCK_ELEMENTS, attention_totals, totals_mask


def _best_ms(fn, n: int = 30) -> float:
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _before(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    nq, hq, d = q.shape
    nk, hkv = k.shape[0], k.shape[1]
    g = hq // hkv
    kt = k.float().permute(1, 2, 0)
    qf = q.float().view(nq, hkv, g, d).transpose(0, 1)
    total = q.new_zeros(hkv, 1, nk, dtype=torch.float32)
    step = max(1, TOTALS_BLOCK_ELEMENTS // max(hq * nk, 1))
    for s in range(0, nq, step):
        e = min(s + step, nq)
        rows = (e - s) * g
        x = torch.baddbmm(bias[s * g : e * g][None], qf[:, s:e].reshape(hkv, rows, d), kt, alpha=scale)
        x.sub_(x.amax(dim=-1, keepdim=True).clamp_min_(-3e38)).exp_()
        inv = x.sum(dim=-1, keepdim=True).clamp_min_(1e-38).reciprocal_()
        total.baddbmm_(inv.transpose(1, 2), x)
    return total[:, 0].T.div_(g)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", type=int, nargs="+", default=[0, 160, 416, 768])
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    nq, hq, hkv, d, scale = 256, 9, 3, 64, 0.125
    print(f"{'dtype':<10}{'keys':>6}{'before ms':>11}{'now ms':>9}{'q.K^T ms':>10}{'now/before':>12}")
    for dtype in args.dtype:
        for prefix in args.prefix:
            nk = prefix + nq
            q = torch.randn(nq, hq, d, generator=g).to(getattr(torch, dtype))
            k = torch.randn(nk, hkv, d, generator=g).to(q.dtype)
            visible = torch.arange(nk)[None, :] <= torch.arange(nq)[:, None] + prefix
            mask = totals_mask(visible, hq)
            got = attention_totals(q, k, visible, scale, mask)
            bias = mask.bias.repeat_interleave(hq // hkv, dim=0)  # the former mask: a row per query head
            torch.testing.assert_close(got, _before(q, k, bias, scale), atol=1e-4, rtol=1e-4)
            before = _best_ms(functools.partial(_before, q, k, bias, scale))
            now = _best_ms(functools.partial(attention_totals, q, k, visible, scale, mask))
            qk = q.float().view(nq, hkv, -1, d).transpose(0, 1).reshape(hkv, -1, d)
            floor = _best_ms(functools.partial(torch.bmm, qk, k.float().permute(1, 2, 0)))
            print(f"{dtype:<10}{nk:>6}{before:>11.2f}{now:>9.2f}{floor:>10.2f}{now / before:>11.2f}x")


if __name__ == "__main__":
    main()
