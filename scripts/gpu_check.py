"""Check cam-vllm's CUDA kernels against the PyTorch code they replace, on a GPU, at serving shapes.

Needs torch and Triton only (no vLLM, no pydantic). Prints, per check, whether the kernel equals
the torch code, its time, the torch code's time, and the kernel's achieved memory bandwidth against
the device's (a measured device-to-device copy, and the nominal peak where the device is known):

* decode scores (``kernels.triton_ops.decode_scores`` against ``scoring._score_decodes``):
  Llama-3-8B-like shapes (32 query heads, 8 KV heads, head_dim 128, paged blocks of 16), 4k-32k
  tokens of context per request, one decode query per request and a stash of 16 queries;
* CaM's chain merge (``chain_merge_values`` against ``core.merge.cam_merge``'s triangular solve);
* prompt scores from the attention's log-sum-exp: the per-key attention totals of a prompt chunk
  computed as ``exp(q.k * scale - lse)`` summed over the queries, with the LSE that the flash
  kernel returns with its output (``torch.ops.aten._scaled_dot_product_flash_attention``; vLLM's
  ``flash_attn_varlen_func`` returns the same with ``return_softmax_lse``), against
  ``core.attention.attention_totals``: equal totals, and the extra time over the attention alone.

    python scripts/gpu_check.py [--out result.json]          # on a GPU, a few minutes
    TRITON_INTERPRET=1 python scripts/gpu_check.py --quick   # tiny shapes on the CPU (CI's smoke)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# nominal HBM peaks (bytes/s) by device-name fragment; the measured copy is printed next to them
NOMINAL_PEAK = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
                "A100-SXM4-80GB": 2.04e12, "A100": 1.56e12, "L40S": 0.864e12, "L4": 0.3e12}  # fmt: skip


def _timer(device: torch.device, fn: Any, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, mib: int) -> float:
    """Achieved bytes/s of a device-to-device copy (read + write)."""
    x = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    seconds = _timer(device, lambda: y.copy_(x), 5)
    return 2 * x.numel() * 4 / seconds


def check_decode_scores(
    device: torch.device, ctx: int, reqs: int, queries: int, shape: dict, repeats: int
) -> dict:
    from cam_vllm.kernels import triton_ops
    from cam_vllm.policies.streaming import StreamingPolicy
    from cam_vllm.vllm_plugin.paged import NHDPagedKV
    from cam_vllm.vllm_plugin.scoring import _score_decodes
    from cam_vllm.vllm_plugin.step_plan import StepTokens, plan_decodes

    hq, hkv, d, b = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["block"]
    dtype = shape["dtype"]
    gen = torch.Generator().manual_seed(ctx + queries)
    # every block retained: the kernel reads the whole context (a window as long as the context);
    # the policy built directly (the GPU machine has torch and Triton, not the settings' pydantic)
    eviction = StreamingPolicy(block_size=b, sink_tokens=b, window_tokens=ctx)
    nblk = ctx // b
    num_blocks = reqs * nblk + 1
    kv = torch.randn(num_blocks, b, hkv, 2 * d, generator=gen).to(dtype).to(device).permute(0, 2, 1, 3)
    paged = NHDPagedKV(kv, d)
    table = (
        (torch.randperm(num_blocks - 1, generator=gen) + 1)[: reqs * nblk].view(reqs, nblk).to(torch.int32)
    )
    lens = torch.full((reqs,), ctx, dtype=torch.int64)
    tokens = StepTokens.from_batch(torch.arange(reqs + 1, dtype=torch.int32), lens, reqs)
    count = torch.full((reqs,), queries, dtype=torch.int64)
    host = plan_decodes(
        eviction.retained,
        tokens,
        table,
        b,
        torch.arange(reqs),
        lens - count,
        count,
        torch.arange(reqs),
    )
    from cam_vllm.vllm_plugin.step_plan import DecodeBatch

    batch = DecodeBatch(
        None, host.blocks.to(device), host.valid.to(device), host.slots.to(device),
        host.stash_rows.to(device),
        host.bias.to(device), None if host.query_mask is None else host.query_mask.to(device),
    )  # fmt: skip
    stash = torch.randn(reqs, queries, hq, d, generator=gen).to(dtype).to(device)
    want = torch.zeros(num_blocks * b, hkv, device=device)
    got = torch.zeros_like(want)

    def torch_path() -> None:
        want.zero_()
        _score_decodes(paged, want, {}, None, batch, None, 1 / math.sqrt(d), hkv, stash)

    def kernel_path() -> None:
        got.zero_()
        triton_ops.decode_scores(
            stash[batch.stash_rows, :queries], paged.key_view, batch.blocks, batch.valid, batch.slots, got,
            1 / math.sqrt(d),
        )  # fmt: skip

    torch_s = _timer(device, torch_path, repeats)
    kernel_s = _timer(device, kernel_path, repeats)
    err = float((got - want).abs().max())
    ok = bool(torch.allclose(got, want, atol=1e-5, rtol=1e-3))
    total = float(want.sum())
    ok = ok and abs(total - reqs * queries * hkv) < 1e-2 * reqs * queries * hkv  # each query: 1 per KV head
    # bytes the kernel must move: the keys (read twice: max/sum pass, then probabilities), the
    # validity mask, the queries, and Abar's read-modify-write
    key_bytes = reqs * ctx * hkv * d * kv.element_size()
    moved = (
        2 * key_bytes + host.valid.numel() + stash.numel() * stash.element_size() + 2 * reqs * ctx * hkv * 4
    )
    return {
        "check": "decode_scores", "context": ctx, "requests": reqs, "queries": queries, "ok": ok,
        "max_abs_err": err, "kernel_ms": kernel_s * 1e3, "torch_ms": torch_s * 1e3,
        "speedup": torch_s / kernel_s, "kernel_bytes_per_s": moved / kernel_s,
    }  # fmt: skip


def check_chain_merge(
    device: torch.device, heads: int, n: int, leaving: int, m: int, d: int, repeats: int
) -> dict:
    from cam_vllm.core.merge import MergeConfig, cam_merge, use_chain_kernel
    from cam_vllm.kernels import triton_ops

    gen = torch.Generator().manual_seed(n)
    config = MergeConfig(rule="cam", num_targets=m, clamp=(0.0, 1.0), targets="even", seed=3)
    values = torch.randn(n, heads, d, generator=gen).to(device)
    abar = (torch.rand(n, heads, generator=gen) * 3).to(device)
    flags = (torch.arange(n) < leaving).to(device)
    pos = (torch.arange(n)[:, None] + 100 * torch.arange(heads)).to(device)
    out: dict[str, Any] = {}

    def run() -> None:
        out["v"], out["dec"] = cam_merge(values, abar, flags, pos, 1, config)

    use_chain_kernel(None)
    torch_s = _timer(device, run, repeats)
    want, want_dec = out["v"], out["dec"]
    use_chain_kernel(triton_ops.chain_kernel())
    try:
        kernel_s = _timer(device, run, repeats)
    finally:
        use_chain_kernel(None)
    got, got_dec = out["v"], out["dec"]
    err = float((got - want).abs().max())
    ok = bool(torch.equal(got_dec.mask, want_dec.mask)) and err < 1e-4
    return {
        "check": "chain_merge", "heads": heads, "chain": n, "leaving": leaving, "m": m, "ok": ok,
        "max_abs_err": err, "kernel_ms": kernel_s * 1e3, "torch_ms": torch_s * 1e3,
        "speedup": torch_s / kernel_s,
    }  # fmt: skip


def lse_totals(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, chunk: int = 1024
) -> torch.Tensor:
    """Per-key attention totals of causal prompt queries from the attention's log-sum-exp:
    summed over queries, averaged over each KV head's query heads, of exp(q.k * scale - lse)
    (what ``attention_totals`` adds to ``Abar``). q [Hq, Nq, D]
    (the last Nq of Nk positions), k [Hkv, Nk, D], lse [Hq, Nq] -> [Nk, Hkv] (float32)."""
    hq, nq, d = q.shape
    hkv, nk, _ = k.shape
    g = hq // hkv
    total = torch.zeros(hkv, nk, dtype=torch.float32, device=q.device)
    qpos = torch.arange(nk - nq, nk, device=q.device)
    kpos = torch.arange(nk, device=q.device)
    for s in range(0, nq, chunk):  # query rows in slices: memory ~ Hq * chunk * Nk
        e = min(s + chunk, nq)
        qs = q[:, s:e].reshape(hkv, g * (e - s), d)
        logits = torch.bmm(qs, k.transpose(1, 2)).float().view(hkv, g, e - s, nk) * scale
        logits = logits - lse[:, s:e].view(hkv, g, e - s, 1)
        logits = logits.masked_fill(kpos[None, None, None, :] > qpos[None, None, s:e, None], float("-inf"))
        total += logits.exp().sum(dim=(1, 2))
    return total.T / g


def check_prompt_lse(device: torch.device, nq: int, nk: int, shape: dict, repeats: int) -> dict:
    from cam_vllm.core.attention import attention_totals

    hq, hkv, d, dtype = shape["q_heads"], shape["kv_heads"], shape["head_dim"], shape["dtype"]
    gen = torch.Generator().manual_seed(nq)
    q = torch.randn(nq, hq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(nk, hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(nk, hkv, d, generator=gen).to(dtype).to(device)
    scale = 1 / math.sqrt(d)
    qh = q.transpose(0, 1)[None]  # [1, Hq, Nq, D]
    kh = k.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)[None]  # GQA expanded for the op
    vh = v.transpose(0, 1).repeat_interleave(hq // hkv, dim=0)[None]
    out: dict[str, Any] = {}
    if nq != nk:
        raise ValueError(
            "the flash op's causal mask is top-left aligned: give it the whole prompt (nq == nk)"
        )

    def attention() -> None:
        if device.type == "cuda":
            res = torch.ops.aten._scaled_dot_product_flash_attention(
                qh, kh, vh, 0.0, True, False, scale=scale
            )
        else:  # the CPU build's flash kernel returns the LSE the same way
            res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qh, kh, vh, 0.0, True, scale=scale
            )
        out["o"], out["lse"] = res[:2]

    def attention_and_lse_scores() -> None:
        attention()
        out["lse_totals"] = lse_totals(q.transpose(0, 1), k.transpose(0, 1), out["lse"][0], scale)

    visible = torch.ones(nq, nk, dtype=torch.bool, device=device).tril(nk - nq)

    def separate_pass() -> None:
        out["totals"] = attention_totals(q, k, visible, scale)

    attn_s = _timer(device, attention, repeats)
    fused_s = _timer(device, attention_and_lse_scores, repeats)
    sep_s = _timer(device, separate_pass, repeats)
    want, got = out["totals"].float(), out["lse_totals"]
    err = float(((got - want).abs() / want.abs().clamp(min=1.0)).max())
    ok = err < 2e-2 and abs(float(got.sum()) - nq * hkv) < 1e-2 * nq * hkv  # each query: 1 per KV head
    return {
        "check": "prompt_scores_from_lse", "queries": nq, "keys": nk, "ok": ok, "max_rel_err": err,
        "attention_ms": attn_s * 1e3, "attention_plus_lse_scores_ms": fused_s * 1e3,
        "separate_score_pass_ms": sep_s * 1e3, "lse_extra_fraction": (fused_s - attn_s) / attn_s,
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the CPU interpreter smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    cuda = torch.cuda.is_available() and not interpret
    if not (cuda or interpret):
        print("gpu_check: no CUDA device (run with TRITON_INTERPRET=1 --quick to smoke-test on the CPU)")
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    quick = args.quick or not cuda
    repeats = args.repeats or (1 if quick else 10)
    import triton

    name = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter)"
    info: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "quick": quick,
    }  # fmt: skip
    if cuda:
        info["copy_bytes_per_s"] = copy_bandwidth(device, 1024)
        info["nominal_peak_bytes_per_s"] = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
    print(json.dumps(info))
    if quick:
        shape = {"q_heads": 4, "kv_heads": 2, "head_dim": 16, "block": 16, "dtype": torch.float32}
        decode_cases, chain_cases, prompt_cases = [(64, 2, 1), (64, 2, 4)], [(6, 24, 8, 4, 16)], [(32, 32)]
    else:
        shape = {"q_heads": 32, "kv_heads": 8, "head_dim": 128, "block": 16, "dtype": torch.bfloat16}
        decode_cases = [(4096, 16, 1), (16384, 8, 1), (32768, 4, 1), (4096, 16, 16), (32768, 4, 16)]
        chain_cases = [(8 * 16, 16 + 64, 16, 64, 128), (8 * 64, 16 + 256, 16, 256, 128)]
        prompt_cases = [(2048, 2048), (4096, 4096)]
    results = []
    peak = info.get("copy_bytes_per_s")
    for ctx, reqs, queries in decode_cases:
        r = check_decode_scores(device, ctx, reqs, queries, shape, repeats)
        if peak:
            r["fraction_of_copy_bandwidth"] = r["kernel_bytes_per_s"] / peak
        results.append(r)
        print(json.dumps(r))
    for heads, n, leaving, m, d in chain_cases:
        results.append(check_chain_merge(device, heads, n, leaving, m, d, repeats))
        print(json.dumps(results[-1]))
    for nq, nk in prompt_cases:
        results.append(check_prompt_lse(device, nq, nk, shape, repeats))
        print(json.dumps(results[-1]))
    ok = all(r["ok"] for r in results)
    print(
        f"gpu_check: {'all checks passed' if ok else 'SOME CHECKS FAILED'} ({len(results)} checks on {name})"
    )
    if args.out:
        args.out.write_text(json.dumps({"info": info, "results": results}, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
