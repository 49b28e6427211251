"""The worker side on CPU: attention over exactly the retained blocks, scores and CaM merging.

Engine-free tests pin the two risky mechanics (the KV layout, and the compacted batch the fused
kernel sees); engine tests run real ``vllm.LLM`` CPU engines on a tiny random Llama and compare
greedy outputs with stock vLLM (no policy, or a window covering the sequence) and with the
reference engine (``ReferenceEngine``, same block-granular policy, same prefill chunking).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.attention import attention_with_probs
from cam_vllm.policies import build_policy

BLOCK = 32
SINKS, WINDOW = 4, 64
PROMPT_LENS = (300, 77, 161)
NEW_TOKENS = 24
SMALL_CHUNK = 40  # not a multiple of the block size on purpose


HEAVY = 64


def streaming(
    block: int = BLOCK,
    window: int = WINDOW,
    cam: bool = False,
    rule: str | None = None,
    base: str = "streaming",
    exact: bool = False,
    hold: bool | None = None,
    hold_tokens: int | None = None,
):
    rule = rule or ("cam" if cam else None)
    name = f"{rule}-{base}" if rule else base
    extra = {"heavy_tokens": HEAVY} if base != "streaming" else {}
    if exact:
        extra["token_exact"] = True
    if hold is not None:
        extra["prompt_hold"] = hold
    if hold_tokens is not None:
        extra["prompt_hold_tokens"] = hold_tokens
    return build_policy(
        KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=window, block_size=block, **extra)
    )


def test_register_attention_repoints_cpu_attn_idempotently():
    pytest.importorskip("vllm")
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, CPUAttentionMetadataBuilder
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from cam_vllm.vllm_plugin.attention_cpu import PolicyCPUAttentionBackend, register_attention

    register_attention()
    register_attention()
    backend = AttentionBackendEnum.CPU_ATTN.get_class()
    assert backend is PolicyCPUAttentionBackend
    assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.CPU_ATTN
    assert issubclass(backend.get_impl_cls(), CPUAttentionBackendImpl)
    assert issubclass(backend.get_builder_cls(), CPUAttentionMetadataBuilder)


# --- the KV layout ------------------------------------------------------------------------------


@pytest.mark.parametrize(("isa", "head"), [("vec", 64), ("vec", 128), ("vec16", 80), ("amx", 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_probe_reads_what_the_backend_writes(isa, head, dtype):
    pytest.importorskip("vllm")
    from cam_vllm.vllm_plugin.paged import probe_layout

    layout = probe_layout(isa, dtype, BLOCK, head)  # raises LayoutError unless it round-trips
    from cam_vllm.vllm_plugin.paged import PagedKV

    kv = torch.randn(6, 2, BLOCK, 2 * head).to(dtype)
    paged = PagedKV(kv, layout)
    blocks = torch.tensor([[3, 1, 0], [5, 5, 2]])  # whole blocks, as the decode scoring reads them
    slots = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)
    want = torch.stack([paged.gather_k(s) for s in slots])  # [R, N, H, D]
    want = want.view(2, 3, BLOCK, 2, head).permute(0, 1, 3, 4, 2)  # [R, nb, H, D, B]
    assert torch.equal(paged.gather_block_kt(blocks), want)
    if isa in ("vec", "vec16"):  # the fact the notes warn about: K transposed, V token-major
        t, d = torch.meshgrid(torch.arange(BLOCK), torch.arange(head), indexing="ij")
        assert torch.equal(layout.k_offsets, d * BLOCK + t)
        assert torch.equal(layout.v_offsets, BLOCK * head + t * head + d)


# --- the compacted batch, run through vLLM's own CPU kernel -------------------------------------


def _kernel(q, kv, batch, scale, isa="vec"):
    from vllm import _custom_ops as ops

    nb, h, b, _ = kv.shape
    key_cache, value_cache = kv.view(nb, h, 2 * b, -1).chunk(2, dim=2)
    out = torch.zeros_like(q)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=batch.seq_lens.numel(),
        num_heads=q.shape[1],
        num_kv_heads=h,
        head_dim=q.shape[2],
        seq_lens=batch.seq_lens,
        dtype=q.dtype,
        query_start_loc=batch.query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=False,
    )
    ops.cpu_attention_with_kv_cache(
        query=q,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=batch.block_table,
        softcap=0.0,
        scheduler_metadata=meta,
        s_aux=None,
    )
    return out


def test_compacted_batch_attends_exactly_to_retained_blocks_in_the_stock_kernel():
    pytest.importorskip("vllm")
    from cam_vllm.vllm_plugin.paged import PagedKV, _write, probe_layout
    from cam_vllm.vllm_plugin.step_plan import StepTokens, compact_for_kernel

    torch.manual_seed(0)
    policy = streaming().eviction
    hq, hkv, d, scale = 4, 2, 64, 0.125
    # (cached tokens, new tokens): a long prompt in one chunk, decodes, and chunks that cross
    # window boundaries mid-chunk, some with eviction already under way
    reqs = [(0, 200), (150, 1), (100, 70), (37, 5), (0, 1), (64, 1), (300, 40), (95, 2)]
    widths = [-(-(c + n) // BLOCK) for c, n in reqs]
    num_blocks = sum(widths) + 4
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 is vLLM's null block
    table = torch.zeros(len(reqs), max(widths), dtype=torch.int32)
    kv = torch.zeros(num_blocks, hkv, BLOCK, 2 * d)
    layout = probe_layout("vec", kv.dtype, BLOCK, d)
    full_k, full_v, qs, stale = [], [], [], []
    used = 0
    for r, ((c, n), w) in enumerate(zip(reqs, widths, strict=True)):
        table[r, :w] = perm[used : used + w]
        used += w
        pos = torch.arange(c + n)
        k, v = torch.randn(c + n, hkv, d), torch.randn(c + n, hkv, d)
        _write(kv, k, v, table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK, "vec")
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(n, hq, d))
        # blocks already evicted before this step may be freed and reused: poison them
        for j in range(w):
            if (j + 1) * BLOCK <= c and not bool(policy.retained(torch.tensor(j * BLOCK), c + 1)):
                stale.append(int(table[r, j]))
    assert stale, "the scenario must contain evicted blocks"
    kv.view(num_blocks, -1)[stale] = float("nan")

    qsl = torch.tensor([0] + [n for _, n in reqs]).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([c + n for c, n in reqs], dtype=torch.int32)
    tokens = StepTokens.from_batch(qsl, seq_lens, len(reqs))
    batch = compact_for_kernel(policy.retained, tokens, table, BLOCK)
    assert batch is not None and batch.seq_lens.numel() > len(reqs)  # chunks were split
    out = _kernel(torch.cat(qs), kv, batch, scale)

    paged = PagedKV(kv, layout)
    for r, (c, n) in enumerate(reqs):
        q_pos, kv_pos = torch.arange(c, c + n), torch.arange(c + n)
        expected, _ = attention_with_probs(qs[r], full_k[r], full_v[r], policy.visible(q_pos, kv_pos), scale)
        got = out[int(qsl[r]) : int(qsl[r + 1])]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
        # and the paged reader sees the same tokens the kernel does (retained ones)
        keep = policy.retained(kv_pos, c + 1) | (kv_pos >= c)
        slots = table[r].long()[kv_pos[keep] // BLOCK] * BLOCK + kv_pos[keep] % BLOCK
        assert torch.equal(paged.gather_k(slots), full_k[r][keep])
        assert torch.equal(paged.gather_v(slots), full_v[r][keep])


def test_nothing_evicted_keeps_the_stock_batch():
    from cam_vllm.vllm_plugin.step_plan import StepTokens, compact_for_kernel

    qsl = torch.tensor([0, 90, 91], dtype=torch.int32)
    seq_lens = torch.tensor([90, 60], dtype=torch.int32)
    table = torch.arange(1, 9, dtype=torch.int32).view(2, 4)
    tokens = StepTokens.from_batch(qsl, seq_lens, 2)
    assert compact_for_kernel(streaming().eviction.retained, tokens, table, BLOCK) is None


def _impl_for(policy, hq, hkv, d, scale, monkeypatch):
    """Our impl outside an engine (vLLM's constructor reads the model dtype from the config)."""
    from types import SimpleNamespace

    from vllm.v1.attention.backends import cpu_attn

    from cam_vllm.vllm_plugin.attention_cpu import PolicyCPUAttentionBackendImpl

    config = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: config)
    impl = PolicyCPUAttentionBackendImpl(hq, d, scale, hkv, None, None, "auto")
    assert impl.policy is None  # no current vLLM config with a kv_policy: stock behaviour
    impl.policy = policy
    return impl


WORKER_CASES = [
    ("cam", "accumulated", "streaming"),
    ("cam", "current", "streaming"),
    ("weighted", "accumulated", "streaming"),
    ("kvmerger", "accumulated", "streaming"),
    (None, "accumulated", "h2o"),
    ("cam", "accumulated", "h2o"),
    (None, "accumulated", "tova"),
    ("cam", "accumulated", "scissorhands"),
    (None, "accumulated", "corm"),
    ("weighted", "accumulated", "h2o"),
    ("kvmerger", "accumulated", "corm"),
]


@pytest.mark.parametrize(("rule", "mode", "base"), WORKER_CASES)
def test_worker_steps_reproduce_policy_cache_without_an_engine(rule, mode, base, monkeypatch):
    """Kernel on the compacted batch + score/merge plan + impl, step by step, two requests with
    different chunkings, against one reference PolicyCache per request (outputs, values, Abar).
    Freed blocks are poisoned with NaN after every step, as if reused by someone else."""
    chunks = [[150, 1, 1, 37, 1, 1, 1, 40, 1, 1], [1, 70, 1, 1, 1, 100, 1, 30, 1, 1]]
    _run_worker_steps(rule, mode, base, chunks, monkeypatch, deferred=False)


@pytest.mark.parametrize("rule", [None, "cam", "weighted", "kvmerger"])
def test_token_exact_worker_steps_reproduce_the_per_token_cache(rule, monkeypatch):
    """Token-exact blocks (a 61-token window on blocks of 32): the impl computes every output
    itself, hiding the tokens of held blocks that the per-token policy no longer shows, and merges
    a token at every step; against a per-token (block size 1) PolicyCache, with freed blocks
    poisoned."""
    chunks = [[150, 1, 1, 37, 1, 1, 1, 40, 1, 1], [1, 70, 1, 1, 1, 100, 1, 30, 1, 1]]
    _run_worker_steps(rule, "accumulated", "streaming", chunks, monkeypatch, deferred=False, exact=True)


@pytest.mark.parametrize(("rule", "mode", "base"), WORKER_CASES)
def test_deferred_decode_scoring_reproduces_policy_cache_without_an_engine(rule, mode, base, monkeypatch):
    """The same with deferred scoring (``query_stash``: decode queries scored once per block, or
    in ``current`` mode only where a block ends): long decode runs across block ends, a prompt
    chunk continuing a stash, a one-token first step, a one-token first wave. Outputs, keys and
    values equal the reference at every step; Abar and the score state whenever the request has
    no query waiting."""
    # request 0's 37-token chunk starts at 191, the last slot of a block: its first wave is one
    # token, which is not a decode and must be scored at once
    chunks = [[150] + [1] * 41 + [37] + [1] * 34, [1, 70] + [1] * 44 + [100] + [1] * 30]
    _run_worker_steps(rule, mode, base, chunks, monkeypatch, deferred=True)


HOLD_CASES = [
    (None, "snapkv"),
    ("cam", "snapkv"),
    ("weighted", "snapkv"),
    ("kvmerger", "snapkv"),
    (None, "h2o"),
    ("cam", "scissorhands"),
]


@pytest.mark.parametrize(("rule", "base"), HOLD_CASES)
def test_prompt_hold_worker_steps_reproduce_policy_cache_without_an_engine(rule, base, monkeypatch):
    """The prompt hold (SnapKV, or h2o ... with ``prompt_hold``): prompts of 189 and 174 tokens in
    chunks of odd sizes keep every token until read, the choice runs at the end of each prompt
    (SnapKV: from the observation window's queries only), decoding follows, and a later chunk
    past the prompt (a recompute after preemption) runs in waves; against the reference cache
    with the same prompt lengths, freed blocks poisoned, deferred scoring where the builder uses it."""
    chunks = [[150, 1, 1, 37] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 100] + [1] * 38 + [30, 1, 1]]
    _run_worker_steps(rule, "accumulated", base, chunks, monkeypatch, deferred=True, hold=(189, 174))


BOUNDED_HOLD_CASES = [(None, "snapkv"), ("cam", "snapkv"), ("kvmerger", "snapkv"), (None, "h2o")]


@pytest.mark.parametrize(("rule", "base"), BOUNDED_HOLD_CASES)
def test_bounded_prompt_hold_worker_steps_reproduce_policy_cache_without_an_engine(rule, base, monkeypatch):
    """A bounded hold of 192 tokens (the policy keeps 160): prompts of 289 and 274 tokens are
    compressed each time they reach it (inside chunks too, between waves) and once more at their
    end; SnapKV's scores start afresh after each compression. The blocks freed are the block
    manager's own (``freeable_blocks``), poisoned, so the worker must never read one again."""
    chunks = [[150, 1, 1, 137] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 200] + [1] * 38 + [30, 1, 1]]
    refs = _run_worker_steps(
        rule, "accumulated", base, chunks, monkeypatch, deferred=True, hold=(289, 274), hold_tokens=192
    )
    for ref in refs:  # never more than the bound held, and the bound was reached
        assert ref.stats.max_retained == 192


def _run_worker_steps(
    rule,
    mode,
    base,
    chunks,
    monkeypatch,
    deferred: bool,
    exact: bool = False,
    hold: tuple | None = None,
    hold_tokens: int | None = None,
) -> list:
    pytest.importorskip("vllm")
    import dataclasses
    from types import SimpleNamespace

    from cam_vllm.reference.cache import PolicyCache
    from cam_vllm.vllm_plugin import step_plan, step_requests
    from cam_vllm.vllm_plugin.kv_manager import freeable_blocks
    from cam_vllm.vllm_plugin.paged import _write
    from cam_vllm.vllm_plugin.query_stash import StashPlanner, stash_for_wave
    from cam_vllm.vllm_plugin.step_plan import StepTokens, compact_for_kernel, plan_scores, split_waves

    monkeypatch.setattr(step_plan, "MAX_PAIRS_PER_CALL", 3000)  # exercise query slicing
    torch.manual_seed(0)
    window = 61 if exact else WINDOW  # token-exact: not a whole number of blocks
    policy = dataclasses.replace(
        streaming(
            rule=rule,
            base=base,
            window=window,
            exact=exact,
            hold=True if hold else None,
            hold_tokens=hold_tokens,
        ),
        score_mode=mode,
    )
    observe = policy.score is not None and policy.score.observation_window is not None
    if rule == "kvmerger":  # random keys are nearly orthogonal: let every adjacent pair form a set
        policy = dataclasses.replace(policy, merge=dataclasses.replace(policy.merge, similarity=-1.0))
    # the oracle: the same policy per token (token-exact: block size 1, nothing held beyond it)
    oracle = policy
    if exact:
        oracle = dataclasses.replace(
            policy, eviction=dataclasses.replace(policy.eviction, block_size=1, token_exact=False)
        )
    hq, hkv, d, scale = 4, 2, 64, 0.125
    lengths = [sum(c) for c in chunks]
    widths = [-(-n // BLOCK) for n in lengths]
    num_blocks = sum(widths) + 1
    table = torch.zeros(2, max(widths), dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1) + 1
    table[0, : widths[0]], table[1, : widths[1]] = perm[: widths[0]], perm[widths[0] :]
    kv = torch.zeros(num_blocks, hkv, BLOCK, 2 * d)
    impl = _impl_for(policy, hq, hkv, d, scale, monkeypatch)
    layer = SimpleNamespace(isa="vec", layer_name="model.layers.3.self_attn.attn")
    prompts = hold or (0, 0)
    refs = [PolicyCache(oracle, prompt_len=p) for p in prompts]
    hold_t = torch.tensor(prompts, dtype=torch.int64) if hold else None
    planner = StashPlanner(BLOCK) if deferred and mode == "accumulated" and not observe else None
    done = [0, 0]
    waves_seen: list[int] = []
    flushed = 0
    for step in range(len(chunks[0])):
        qs, slots, expected = [], [], []
        for r in range(2):
            n, c = chunks[r][step], done[r]
            q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
            pos = torch.arange(c, c + n)
            slot = table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK
            _write(kv, k, v, slot, "vec")
            qs.append(q)
            slots.append(slot)
            expected.append(refs[r].attend(3, q, k, v, scale))
            done[r] += n
        qsl = torch.tensor([0, chunks[0][step], chunks[0][step] + chunks[1][step]], dtype=torch.int32)
        held_rule = policy.eviction.held if hold_tokens else None
        tokens = StepTokens.from_batch(
            qsl, torch.tensor(done, dtype=torch.int32), 2, hold=hold_t, held=held_rule
        )
        q_all, slot_all = torch.cat(qs), torch.cat(slots)
        out = torch.empty_like(q_all)
        stash = None
        if planner is not None:
            step_requests.publish(["a", "b"], [None, None], done)
            pub = step_requests.current(2, torch.tensor(done))
            stash = planner.plan(tokens.query_lens.tolist(), tokens.context_lens.tolist(), pub)
            flushed += int(stash.flush_req.numel())
        waves = split_waves(policy, tokens)  # merging/scoring chunks crossing window blocks: several
        waves_seen.append(len(waves))
        for i, wave in enumerate(waves):  # as PolicyImplMixin.forward runs them
            t, rows, bt = wave.tokens, wave.rows, table[wave.requests]
            w_stash = stash_for_wave(stash, wave) if i == 0 else None
            plan = plan_scores(policy, t, bt, slot_all[rows], BLOCK, stash=w_stash, defer_decodes=deferred)
            if exact:  # the stock kernel does not run: the impl writes every row's output
                w_out = torch.full_like(q_all[rows], float("nan"))
                impl._score_and_merge(layer, q_all[rows], kv, plan, w_out)
                out[rows] = w_out
                continue
            batch = compact_for_kernel(policy.eviction.block_retained, t, bt, BLOCK)
            if batch is None:
                batch = SimpleNamespace(
                    query_start_loc=t.query_start_loc.to(torch.int32),
                    seq_lens=t.seq_lens.to(torch.int32),
                    block_table=bt,
                )
            out[rows] = _kernel(q_all[rows].contiguous(), kv, batch, scale)
            impl._score_and_merge(layer, q_all[rows], kv, plan)
        torch.testing.assert_close(out, torch.cat(expected), atol=2e-5, rtol=1e-5)
        for r in range(2):
            st = refs[r].layers[3]
            slot = table[r].long()[st.positions // BLOCK] * BLOCK + st.positions % BLOCK
            torch.testing.assert_close(impl._paged.gather_v(slot), st.v, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(impl._paged.gather_k(slot), st.k, atol=1e-6, rtol=1e-6)
            settled = not deferred or (
                "ab"[r] not in planner.entries if planner is not None else done[r] % BLOCK == 0
            )
            if settled:  # no query of this request waits to be scored
                torch.testing.assert_close(impl._abar[slot], st.abar, atol=1e-6, rtol=1e-5)
                for name, t in st.state.items():  # score-driven: per-head token positions, scores
                    torch.testing.assert_close(impl._state[name][slot], t, atol=1e-6, rtol=1e-5)
            if hold:  # the blocks the scheduler frees now (its own rule): poison them
                ev = policy.eviction
                first, last = freeable_blocks(
                    done[r], ev.prefix_end, ev.window_tokens, BLOCK, 0, prompts[r], ev.hold_span
                )
                kv[table[r, first:last].long()] = float("nan")
                continue
            for j in range(widths[r]):  # blocks the scheduler frees now: poison them
                if not bool(policy.eviction.block_retained(torch.tensor(j * BLOCK), done[r] + 1)):
                    kv[int(table[r, j])] = float("nan")
    if rule is not None and not (exact and rule == "kvmerger"):  # per token kvmerger never merges
        assert sum(ref.stats.merged for ref in refs) > 0
    if planner is not None:
        assert flushed >= 4 and planner.rows <= 2, "stash rows are scored at block ends and reused"
    runs_in_waves = rule is not None or base != "streaming"
    assert (max(waves_seen) > 1) == runs_in_waves, "long chunks of merging or score policies run in waves"
    if base != "streaming":  # heavy slots hold tokens from beyond the region, per head differently
        st = refs[0].layers[3]
        heavy = (st.positions >= policy.eviction.heavy_start) & (st.positions < policy.eviction.prefix_end)
        pos = st.state["pos"][heavy]
        assert (pos >= policy.eviction.prefix_end).any(), "the heavy region never took a later token"
        if type(policy.score).per_head:
            assert not torch.equal(pos[:, 0], pos[:, 1]), "KV heads should keep different tokens"
    return refs


# --- real engines -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from vllm_helpers import make_peaky_model

    return make_peaky_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def prompts():
    from vllm_helpers import token_prompts

    return [token_prompts(1, n, seed=i)[0] for i, n in enumerate(PROMPT_LENS)]


@contextlib.contextmanager
def engine(model, policy: dict | None = None, plugins: bool = True, **kwargs):
    """One engine for the duration of a test (engines are torn down at once: memory)."""
    from vllm_helpers import make_llm, running

    args = dict(block_size=BLOCK, max_model_len=2048, enable_prefix_caching=False, disable_log_stats=True)
    if policy is not None:
        args["additional_config"] = {"kv_policy": policy}
    # VLLM_PLUGINS="" is read by the spawned engine core and worker: stock vLLM
    llm = make_llm(model, env=None if plugins else {"VLLM_PLUGINS": ""}, **{**args, **kwargs})
    try:
        with running(llm):
            yield llm
    finally:
        del llm
        import gc

        gc.collect()


def generate(llm, prompts, max_tokens=NEW_TOKENS, logprobs=False):
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0 if logprobs else None
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    if not logprobs:
        return tokens
    lps = [
        [step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)]
        for o in outs
    ]
    return tokens, lps


def reference(model_path, policy, prompt, max_tokens=NEW_TOKENS, chunk=None):
    """Greedy tokens and their logprobs from the reference engine (transformers, float32)."""
    from vllm_helpers import reference_greedy

    return reference_greedy(model_path, policy, prompt, max_tokens, chunk)[:2]


@pytest.fixture(scope="module")
def stock_output(tiny_model, prompts):
    with engine(tiny_model, plugins=False) as llm:
        return generate(llm, prompts)


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize(
    "policy",
    [
        {"policy": "none"},
        {"policy": "streaming", "sink_tokens": SINKS, "window_tokens": 1024},  # covers everything
    ],
    ids=["none", "window-longer-than-sequence"],
)
def test_no_eviction_is_exactly_stock_vllm(tiny_model, prompts, stock_output, policy):
    with engine(tiny_model, policy) as llm:
        assert generate(llm, prompts) == stock_output


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.parametrize("chunk", [None, SMALL_CHUNK], ids=["one-chunk", "small-chunks"])
def test_streaming_matches_reference(tiny_model, prompts, stock_output, chunk):
    # small chunks: one request at a time, so vLLM's chunks are exactly SMALL_CHUNK tokens
    kwargs = dict(max_num_batched_tokens=SMALL_CHUNK, max_num_seqs=1) if chunk else {}
    with engine(
        tiny_model, {"policy": "streaming", "sink_tokens": SINKS, "window_tokens": WINDOW}, **kwargs
    ) as llm:
        got = generate(llm, prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(tiny_model, streaming(), prompt, chunk=chunk)[0]
    assert got[0] != stock_output[0], "eviction should change the long prompt's continuation"


@pytest.mark.engine
@pytest.mark.slow
def test_cam_matches_reference_and_is_independent_of_batching(tiny_model, prompts, stock_output):
    policy = {"policy": "cam-streaming", "sink_tokens": SINKS, "window_tokens": WINDOW}
    with engine(tiny_model, policy, max_num_seqs=8, max_num_batched_tokens=2048) as llm:
        got, lps = generate(llm, prompts, logprobs=True)
        for prompt, tokens, logprobs in zip(prompts, got, lps, strict=True):
            ref_tokens, ref_lps = reference(tiny_model, streaming(cam=True), prompt)
            assert tokens == ref_tokens
            torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(ref_lps), atol=2e-4, rtol=1e-4)
        streaming_tokens = reference(tiny_model, streaming(), prompts[0])[0]
        assert got[0] != streaming_tokens, "merging should change the long prompt's continuation"

        # continuous batching: requests of different lengths join and finish at different steps;
        # the long request gets exactly what it got alone (draws are keyed by position)
        from vllm import SamplingParams
        from vllm_helpers import token_prompts

        others = [token_prompts(1, n, seed=10 + n)[0] for n in (40, 230, 120, 500)]
        engine_ = llm.llm_engine
        engine_.add_request(
            "alone-again",
            {"prompt_token_ids": prompts[0]},
            SamplingParams(temperature=0.0, max_tokens=3 * NEW_TOKENS, ignore_eos=True),
        )
        outputs = {}
        step, pending = 0, list(enumerate(others))
        while engine_.has_unfinished_requests() or pending:
            if pending and step % 5 == 0:  # a new request every few steps
                i, ids = pending.pop(0)
                engine_.add_request(
                    f"other{i}",
                    {"prompt_token_ids": ids},
                    SamplingParams(temperature=0.0, max_tokens=10 + 15 * i, ignore_eos=True),
                )
            for out in engine_.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
            step += 1
        long_alone = generate(llm, [prompts[0]], max_tokens=3 * NEW_TOKENS)[0]
        assert outputs["alone-again"] == long_alone
        for i, ids in enumerate(others):  # each batched request also equals its own solo run
            assert outputs[f"other{i}"] == generate(llm, [ids], max_tokens=10 + 15 * i)[0]


@pytest.mark.engine
@pytest.mark.slow
def test_cam_with_small_prefill_chunks_matches_reference(tiny_model, prompts):
    """Waves make CaM's merges independent of chunking: vLLM in small chunks equals the reference
    fed in the same chunks and the reference fed the whole prompt at once."""
    policy = {"policy": "cam-streaming", "sink_tokens": SINKS, "window_tokens": WINDOW}
    with engine(tiny_model, policy, max_num_batched_tokens=SMALL_CHUNK, max_num_seqs=1) as llm:
        got = generate(llm, prompts)
    for prompt, tokens in zip(prompts, got, strict=True):
        assert tokens == reference(tiny_model, streaming(cam=True), prompt, chunk=SMALL_CHUNK)[0]
        assert tokens == reference(tiny_model, streaming(cam=True), prompt, chunk=None)[0]


@pytest.mark.parametrize("name", ["cam-h2o", "cam-tova", "weighted-scissorhands", "corm"])
def test_heavy_events_of_a_step_run_side_by_side_as_they_would_one_by_one(name):
    """The worker runs a step's heavy-region events with equal shapes as one call (events side by
    side on the head axis): the same cache, Abar and state as one event at a time."""
    pytest.importorskip("vllm")
    from cam_vllm.vllm_plugin.paged import PagedKV, probe_layout
    from cam_vllm.vllm_plugin.scoring import _choose_heavy, new_score_state
    from cam_vllm.vllm_plugin.step_plan import HeavyEvent

    torch.manual_seed(3)
    policy = streaming(rule=name.split("-")[0] if "-" in name else None, base=name.split("-")[-1])
    hkv, d, nb = 2, 64, 40
    layout = probe_layout("vec", torch.float32, BLOCK, d)
    kv = torch.randn(nb, hkv, BLOCK, 2 * d)
    state = new_score_state(policy, nb * BLOCK, hkv)
    for t in state.values():
        t.copy_(
            torch.randint(0, 1 << 20, t.shape).to(t.dtype) if t.dtype == torch.int64 else torch.rand(t.shape)
        )
    state["pos"].copy_(torch.randperm(nb * BLOCK)[:, None].expand(-1, hkv))  # distinct token positions
    abar = torch.rand(nb * BLOCK, hkv)
    perm = torch.randperm(nb - 1) + 1

    def slots(blocks):
        return (blocks[:, None] * BLOCK + torch.arange(BLOCK)).flatten()

    events = [
        HeavyEvent(
            slots(perm[6 * i : 6 * i + 2]),
            slots(perm[6 * i + 2 : 6 * i + 3]),
            slots(perm[6 * i + 3 : 6 * i + 4])[:16],
            300 + i,
        )
        for i in range(3)
    ]
    heads = torch.arange(hkv)
    together = (kv.clone(), abar.clone(), {n: t.clone() for n, t in state.items()})
    _choose_heavy(PagedKV(together[0], layout), together[1], together[2], events, policy, 2, heads, False)
    for e in events:
        _choose_heavy(PagedKV(kv, layout), abar, state, [e], policy, 2, heads, False)
    assert torch.equal(together[0], kv) and torch.equal(together[1], abar)
    for n, t in state.items():
        assert torch.equal(together[2][n], t), n


@pytest.mark.parametrize("rule", ["cam", "weighted", "kvmerger"])
def test_merge_chains_of_one_shape_run_side_by_side_as_they_would_one_by_one(rule):
    """The plan groups a step's merge chains by shape and seed (``group_merges``) and the worker
    merges each group in one call, heads side by side: the same cache and Abar as one chain at a
    time; chains of another shape or seed are their own group."""
    pytest.importorskip("vllm")
    import dataclasses

    from cam_vllm.vllm_plugin.paged import PagedKV, probe_layout
    from cam_vllm.vllm_plugin.scoring import score_and_merge
    from cam_vllm.vllm_plugin.step_plan import group_merges

    torch.manual_seed(5)
    policy = streaming(rule=rule)
    if rule == "kvmerger":  # random keys are nearly orthogonal: let every adjacent pair form a set
        policy = dataclasses.replace(policy, merge=dataclasses.replace(policy.merge, similarity=-1.0))
    hkv, d, nb = 2, 64, 40
    layout = probe_layout("vec", torch.float32, BLOCK, d)
    kv = torch.randn(nb, hkv, BLOCK, 2 * d)
    abar = torch.rand(nb * BLOCK, hkv)
    perm = torch.randperm(nb - 1) + 1
    leaving = torch.arange(48) < 32  # a block leaves into the 16 window tokens after it

    def chain(i: int, seed: int | None = None, n: int = 48):
        slots = (perm[2 * i : 2 * i + 2, None] * BLOCK + torch.arange(BLOCK)).flatten()[:n]
        return slots, 100 * i + torch.arange(n), leaving[:n], seed

    chains = [chain(0), chain(1), chain(2), chain(3, seed=7), chain(4, n=40)]
    groups = group_merges(chains)
    assert sorted(g.num_events for g in groups) == [1, 1, 3]
    heads = torch.arange(hkv)

    def run(kv, abar, events):
        score_and_merge(
            paged=PagedKV(kv, layout), abar=abar, query=torch.empty(0, 4, d), packs=[], merges=events,
            policy=policy, scale=0.125, num_kv_heads=hkv, layer_index=2, heads=heads, count_tokens=False,
        )  # fmt: skip

    before = kv.clone()
    together = (kv.clone(), abar.clone())
    run(*together, groups)
    run(kv, abar, [e for c in chains for e in group_merges([c])])
    assert torch.equal(together[0], kv) and torch.equal(together[1], abar)
    assert not torch.equal(kv, before), "nothing was merged"


@pytest.mark.parametrize("name", ["streaming", "cam-streaming", "h2o", "tova", "scissorhands", "cam-corm"])
def test_slot_state_bytes_are_what_the_worker_allocates_and_within_five_percent(name):
    """``slot_state_bytes`` (docs/benchmarks.md's per-model table) counts the tensors ``_bind``
    allocates per slot and KV head; issue 11's bound: at most 5 % of the KV it describes, also for
    the smallest case, a 16-bit KV at head_dim 64 (Scissorhands/CORM: int32 history)."""
    from cam_vllm.vllm_plugin.scoring import new_score_state, slot_state_bytes

    policy = build_policy(KVPolicyConfig(policy=name, sink_tokens=4, window_tokens=64))
    state = new_score_state(policy, 10, 3)
    allocated = sum(t.element_size() * t.numel() for t in state.values()) + (
        4 * 10 * 3 if policy.tracks_scores else 0  # Abar, float32 [slots, Hkv]
    )
    assert slot_state_bytes(policy) * 10 * 3 == allocated
    assert (slot_state_bytes(policy) == 0) == (name == "streaming")
    assert slot_state_bytes(policy) / (2 * 64 * 2) <= 0.05
