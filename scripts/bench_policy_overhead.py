"""What a KV policy adds to a decode step on the CPU worker, measured without an engine.

    python scripts/bench_policy_overhead.py                    # SmolLM2-135M shapes, batch 8
    python scripts/bench_policy_overhead.py --policies streaming,h2o,cam-h2o --steps 128

The end-to-end benchmarks (``scripts/bench_vllm_worker.py``, ``cam-vllm bench``) time whole
engines, and on a shared 2-core box their repeats differ by tens of percent. This script times
only the policy's own work, in one process, the minimum over repeats: per decode step the
builder's plan (``PolicyCPUAttentionMetadataBuilder.build`` minus the stock ``build``: step
requests, stash plan, waves, compaction, score plan) and, per layer, the impl's
``_score_and_merge`` (stash writes, scoring, merges, heavy-region choices). It also times the
stock CPU attention kernel on the compacted batch, per layer, to put the numbers in proportion.
The model's shapes (layers, query/KV heads, head size) are SmolLM2-135M's by default; the KV
cache holds random keys and values (the costs do not depend on the numbers). To compare with an
older version of the code, run it with ``PYTHONPATH`` pointing at a checkout of that version.
"""

from __future__ import annotations

import argparse
import time
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Parts:
    """Seconds inside the parts of ``score_and_merge`` (``--breakdown``): the heavy-region choices
    and merges (``scoring._choose_heavy`` and ``scoring.merge_leaving``, their own gathers and
    writes included) and the gathers of the score packs' keys (``PagedKV.gather_k`` outside
    those); the score arithmetic is the rest."""

    def __init__(self) -> None:
        self.choose = self.gather = 0.0
        self._inside = False

    def install(self) -> None:
        from cam_vllm.vllm_plugin import paged, scoring

        gather = paged.PagedKV.gather_k

        def timed(fn):  # noqa: ANN001, ANN202
            def call(*a, **k):  # noqa: ANN002, ANN003, ANN202
                t = time.perf_counter()
                self._inside = True
                try:
                    return fn(*a, **k)
                finally:
                    self._inside = False
                    self.choose += time.perf_counter() - t

            return call

        def timed_gather(pk, slots, memo=None):  # noqa: ANN001, ANN202
            if self._inside:
                return gather(pk, slots, memo)
            t = time.perf_counter()
            out = gather(pk, slots, memo)
            self.gather += time.perf_counter() - t
            return out

        scoring._choose_heavy = timed(scoring._choose_heavy)
        scoring.merge_leaving = timed(scoring.merge_leaving)
        paged.PagedKV.gather_k = timed_gather


PARTS = _Parts()


class _CountOps(TorchDispatchMode):
    """Counts the ATen operators dispatched while active (``--breakdown``: per wave and layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        self.count += 1
        return func(*args, **(kwargs or {}))


def _impl(policy, hq: int, hkv: int, d: int, scale: float, dtype: torch.dtype):
    from vllm.v1.attention.backends import cpu_attn

    from cam_vllm.vllm_plugin.attention_cpu import PolicyCPUAttentionBackendImpl

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=dtype))
    original = cpu_attn.get_current_vllm_config
    cpu_attn.get_current_vllm_config = lambda: config
    try:
        impl = PolicyCPUAttentionBackendImpl(hq, d, scale, hkv, None, None, "auto")
    finally:
        cpu_attn.get_current_vllm_config = original
    impl.policy = policy
    return impl


def _kernel(q: torch.Tensor, kv: torch.Tensor, batch, scale: float, isa: str) -> torch.Tensor:
    from vllm import _custom_ops as ops

    nb, h, b, _ = kv.shape
    key_cache, value_cache = kv.view(nb, h, 2 * b, -1).chunk(2, dim=2)
    out = torch.empty_like(q)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch.seq_lens.numel(), num_heads=q.shape[1], num_kv_heads=h, head_dim=q.shape[2],
        seq_lens=batch.seq_lens, dtype=q.dtype, query_start_loc=batch.query_start_loc, causal=True,
        sliding_window_size=-1, isa=isa, enable_kv_split=False,
    )  # fmt: skip
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=key_cache, value_cache=value_cache, output=out,
        query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens, scale=scale, causal=True,
        alibi_slopes=None, sliding_window=-1, block_table=batch.block_table, softcap=0.0,
        scheduler_metadata=meta, s_aux=None,
    )  # fmt: skip
    return out


def run(name: str, args: argparse.Namespace, count_ops: bool = False) -> dict[str, float]:
    """Prefill ``batch`` prompts (untimed), then ``steps`` decode steps; seconds per step of each part
    (``count_ops``: also the ATen operators of the policy's per-layer work, ``prefill_ops``)."""
    from cam_vllm.config import KVPolicyConfig
    from cam_vllm.policies import build_policy, same_memory_settings
    from cam_vllm.vllm_plugin import step_requests
    from cam_vllm.vllm_plugin.builder import plan_step
    from cam_vllm.vllm_plugin.paged import _write
    from cam_vllm.vllm_plugin.query_stash import StashPlanner, defers_decodes, stash_for_wave
    from cam_vllm.vllm_plugin.step_plan import StepTokens, compact_for_kernel, split_waves

    policy_name = name
    b, hq, hkv, d, layers = args.block_size, args.q_heads, args.kv_heads, args.head_size, args.layers
    scale = d**-0.5
    settings = {
        "sink_tokens": args.sinks,
        "block_size": b,
        **same_memory_settings(policy_name, args.sinks, args.window, b),
    }
    policy = build_policy(KVPolicyConfig(**settings))
    r = args.batch
    total = args.prompt_len + args.steps + 1
    width = -(-total // b)
    num_blocks = r * width + 1
    table = (torch.arange(r * width, dtype=torch.int32) + 1).view(r, width)
    dtype = getattr(torch, args.dtype)
    # the KV layout vLLM's CPU backend picks: AMX tiles for bfloat16 where the CPU has them (after
    # asking for the tile permission, as its worker does), else the vector kernel's
    amx = dtype == torch.bfloat16 and b % 32 == 0 and torch._C._cpu._init_amx()
    isa = "amx" if amx else "vec"
    kv = torch.randn(num_blocks, hkv, b, 2 * d, dtype=dtype)
    impls = [_impl(policy, hq, hkv, d, scale, dtype) for _ in range(layers)]
    lnames = [SimpleNamespace(isa=isa, layer_name=f"model.layers.{i}.attn") for i in range(layers)]
    scoring = policy.tracks_scores
    planner = StashPlanner(b) if defers_decodes(policy) else None
    ids = [f"r{i}" for i in range(r)]
    times = {"plan": 0.0, "score": 0.0, "kernel": 0.0, "prefill_plan": 0.0, "prefill_score": 0.0}
    times["prefill_kernel"] = 0.0
    for k in ("gather", "choose", "waves", "ops"):
        times[k] = times["prefill_" + k] = 0.0
    done = [0] * r

    def step(qlens: list[int], timed: bool) -> None:
        nonlocal done
        t0 = time.perf_counter()
        qsl = torch.tensor([0, *torch.tensor(qlens).cumsum(0).tolist()], dtype=torch.int32)
        lens = torch.tensor([c + n for c, n in zip(done, qlens, strict=True)], dtype=torch.int32)
        pos = torch.cat([torch.arange(c, c + n) for c, n in zip(done, qlens, strict=True)])
        req = torch.repeat_interleave(torch.arange(r), torch.tensor(qlens))
        slots = table[req].long().gather(1, (pos // b)[:, None]).flatten() * b + pos % b
        k, v = torch.randn(pos.numel(), hkv, d, dtype=dtype), torch.randn(pos.numel(), hkv, d, dtype=dtype)
        _write(kv, k, v, slots, isa)  # the step's KV (vLLM writes it before attending)
        q = torch.randn(pos.numel(), hq, d, dtype=dtype)
        t1 = time.perf_counter()  # the builder's share starts here
        stash = hold = held = None
        if scoring:  # the step's requests as the runner publishes them (seeds, prompt lengths)
            step_requests.publish(ids, [None] * r, lens.tolist(), prompt_lens=[args.prompt_len] * r)
            pub = step_requests.current(r, lens)
            hold = step_requests.holds_of(pub, policy)  # as the builder asks: a held prompt is read whole
            held = policy.eviction.held if policy.eviction.hold_span else None
        tokens = StepTokens.from_batch(qsl, lens, r, hold=hold, held=held)
        if planner is not None:
            stash = planner.plan(tokens.query_lens.tolist(), tokens.context_lens.tolist(), pub)
        waves = split_waves(policy, tokens)
        parts = []
        for i, w in enumerate(waves):
            bt = table[w.requests]
            batch = compact_for_kernel(policy.eviction.retained, w.tokens, bt, b)
            if batch is None:
                batch = SimpleNamespace(
                    query_start_loc=w.tokens.query_start_loc.to(torch.int32),
                    seq_lens=w.tokens.seq_lens.to(torch.int32),
                    block_table=bt,
                )
            plan = None
            if scoring:
                w_stash = stash_for_wave(stash, w) if i == 0 else None
                # as the builder plans: on virtual blocks, translated to this table's slots
                plan = plan_step(
                    policy, w.tokens, SimpleNamespace(block_table_tensor=bt), b, stash=w_stash,
                    defer_decodes=True,
                )  # fmt: skip
            parts.append((w.rows, batch, plan))
        t2 = time.perf_counter()
        t_kernel = t_score = 0.0
        g0, c0 = PARTS.gather, PARTS.choose
        for impl, layer in zip(impls, lnames, strict=True):
            for rows, batch, plan in parts:
                qw = q[rows].contiguous()
                a = time.perf_counter()
                _kernel(qw, kv, batch, scale, isa)
                c = time.perf_counter()
                if plan is not None and count_ops:
                    with _CountOps() as counter:
                        impl._score_and_merge(layer, qw, kv, plan)
                    times[("" if timed else "prefill_") + "ops"] += counter.count
                elif plan is not None:
                    impl._score_and_merge(layer, qw, kv, plan)
                t_kernel += c - a
                t_score += time.perf_counter() - c
        key = "" if timed else "prefill_"
        times[key + "plan"] += t2 - t1
        times[key + "score"] += t_score
        times[key + "kernel"] += t_kernel
        times[key + "gather"] += PARTS.gather - g0
        times[key + "choose"] += PARTS.choose - c0
        times[key + "waves"] += len(parts) * layers
        done = lens.tolist()
        del t0

    chunk = args.chunk
    left = [args.prompt_len] * r
    while any(left):  # prefill in chunks, all requests side by side (untimed)
        qlens = [min(chunk, n) for n in left]
        step(qlens, timed=False)
        left = [n - q for n, q in zip(left, qlens, strict=True)]
    for _ in range(args.steps):
        step([1] * r, timed=True)
    # decode: per step; prefill: per chunk of every request (chunks side by side)
    chunks = -(-args.prompt_len // args.chunk)
    return {k: v / (chunks if k.startswith("prefill_") else args.steps) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policies", default="streaming,h2o,cam-h2o,cam-streaming")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-size", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument(
        "--breakdown",
        action="store_true",
        help="also split the prefill score+merge time into the packs' key gathers, the score "
        "arithmetic and the heavy-region choices or merges, per wave and layer, with the ATen "
        "operators each runs",
    )
    args = ap.parse_args()
    if args.breakdown:
        PARTS.install()
    torch.set_num_threads(1)  # vLLM's CPU worker runs attention on one thread per rank here
    names = args.policies.split(",")
    best: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        for name in names:
            got = run(name, args)
            prev = best.setdefault(name, got)
            for k, v in got.items():
                prev[k] = min(prev[k], v)
    print(
        f"batch {args.batch}, prompt {args.prompt_len}, {args.steps} decode steps, {args.layers} layers, "
        f"{args.q_heads}/{args.kv_heads} heads x {args.head_size}, block {args.block_size}, "
        f"sinks {args.sinks} + {args.window} tokens, {args.dtype}, best of {args.repeats}; ms per decode step"
    )
    print(f"{'policy':<22}{'plan':>8}{'score+merge':>13}{'policy total':>14}{'stock kernel':>14}")
    for name in names:
        t = best[name]
        print(
            f"{name:<22}{t['plan'] * 1e3:>8.2f}{t['score'] * 1e3:>13.2f}"
            f"{(t['plan'] + t['score']) * 1e3:>14.2f}{t['kernel'] * 1e3:>14.2f}"
        )
    print(f"\nprefill, ms per step of {args.batch} chunks of {args.chunk} tokens (kernel: one call per wave)")
    print(f"{'policy':<22}{'plan':>8}{'score+merge':>13}{'policy total':>14}{'stock kernel':>14}")
    for name in names:
        t = best[name]
        print(
            f"{name:<22}{t['prefill_plan'] * 1e3:>8.2f}{t['prefill_score'] * 1e3:>13.2f}"
            f"{(t['prefill_plan'] + t['prefill_score']) * 1e3:>14.2f}{t['prefill_kernel'] * 1e3:>14.2f}"
        )
    if args.breakdown:
        print("\nprefill, microseconds per wave and layer (a kernel call, a score pass, a choice or merge)")
        print(
            f"{'policy':<22}{'waves':>7}{'kernel':>9}{'gather K':>10}{'score':>9}{'choice/merge':>14}"
            f"{'plan':>8}{'ATen ops':>10}"
        )
        for name in names:
            t = best[name]
            n = max(t["prefill_waves"], 1.0)
            ops = run(name, args, count_ops=True)["prefill_ops"] / n
            score = t["prefill_score"] - t["prefill_gather"] - t["prefill_choose"]
            cells = [t["prefill_kernel"], t["prefill_gather"], score, t["prefill_choose"], t["prefill_plan"]]
            print(
                f"{name:<22}{n:>7.0f}"
                + "".join(f"{c / n * 1e6:>{w}.0f}" for c, w in zip(cells, (9, 10, 9, 14, 8), strict=True))
                + f"{ops:>10.0f}"
            )


if __name__ == "__main__":
    main()
