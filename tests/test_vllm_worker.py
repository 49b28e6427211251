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
from worker_harness import BLOCK, SINKS, WINDOW, _kernel, run_worker_steps, streaming

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.attention import attention_with_probs
from cam_vllm.policies import build_policy

PROMPT_LENS = (300, 77, 161)
NEW_TOKENS = 24
SMALL_CHUNK = 40  # not a multiple of the block size on purpose


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


@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_a_steps_memo_reads_and_writes_every_layers_cache_at_the_same_slots(isa):
    """The element indices a step's first layer makes (``memo``) serve the other layers' caches:
    the same slots, each layer's own numbers, reads and writes alike."""
    pytest.importorskip("vllm")
    from cam_vllm.vllm_plugin.paged import PagedKV, probe_layout

    dtype = torch.bfloat16 if isa == "amx" else torch.float32
    layout = probe_layout(isa, dtype, BLOCK, 64)
    layers = [PagedKV(torch.randn(6, 2, BLOCK, 128).to(dtype), layout) for _ in range(3)]
    slots = torch.tensor([33, 34, 70, 5, 150, 151, 152])
    memo: dict = {}
    for paged in layers:
        plain_k, plain_v = paged.gather_k(slots), paged.gather_v(slots)
        assert torch.equal(paged.gather_k(slots, memo), plain_k)
        assert torch.equal(paged.gather_v(slots, memo), plain_v)
        new = torch.randn(slots.numel(), 2, 64).to(dtype)
        paged.scatter_v(slots, new, memo)
        paged.scatter_k(slots, -new, memo)
        assert torch.equal(paged.gather_v(slots), new) and torch.equal(paged.gather_k(slots), -new)
    assert memo  # made once, by the first layer


# --- the compacted batch, run through vLLM's own CPU kernel -------------------------------------


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
    run_worker_steps(rule, mode, base, chunks, monkeypatch, deferred=False)


@pytest.mark.parametrize("rule", [None, "cam", "weighted", "kvmerger"])
def test_token_exact_worker_steps_reproduce_the_per_token_cache(rule, monkeypatch):
    """Token-exact blocks (a 61-token window on blocks of 32): the impl computes every output
    itself, hiding the tokens of held blocks that the per-token policy no longer shows, and merges
    a token at every step; against a per-token (block size 1) PolicyCache, with freed blocks
    poisoned."""
    chunks = [[150, 1, 1, 37, 1, 1, 1, 40, 1, 1], [1, 70, 1, 1, 1, 100, 1, 30, 1, 1]]
    run_worker_steps(rule, "accumulated", "streaming", chunks, monkeypatch, deferred=False, exact=True)


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
    run_worker_steps(rule, mode, base, chunks, monkeypatch, deferred=True)


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
    run_worker_steps(rule, "accumulated", base, chunks, monkeypatch, deferred=True, hold=(189, 174))


@pytest.mark.parametrize(("rule", "base"), [(None, "h2o"), ("cam", "scissorhands"), ("kvmerger", "tova")])
def test_a_requests_own_prompt_hold_reproduces_the_held_policy_cache(rule, base, monkeypatch):
    """A server without the hold, one request asking for it (``vllm_xargs kv_prompt_hold``): that
    request equals the reference cache with the hold, the other the one without, in one batch."""
    chunks = [[150, 1, 1, 37] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 100] + [1] * 38 + [30, 1, 1]]
    run_worker_steps(
        rule,
        "accumulated",
        base,
        chunks,
        monkeypatch,
        deferred=True,
        hold=(189, 174),
        request_holds=(True, False),
    )


BOUNDED_HOLD_CASES = [(None, "snapkv"), ("cam", "snapkv"), ("kvmerger", "snapkv"), (None, "h2o")]


@pytest.mark.parametrize(("rule", "base"), BOUNDED_HOLD_CASES)
def test_bounded_prompt_hold_worker_steps_reproduce_policy_cache_without_an_engine(rule, base, monkeypatch):
    """A bounded hold of 192 tokens (the policy keeps 160): prompts of 289 and 274 tokens are
    compressed each time they reach it (inside chunks too, between waves) and once more at their
    end; SnapKV's scores start afresh after each compression. The blocks freed are the block
    manager's own (``BlockLayout.freeable``), poisoned, so the worker must never read one again."""
    chunks = [[150, 1, 1, 137] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 200] + [1] * 38 + [30, 1, 1]]
    refs = run_worker_steps(
        rule, "accumulated", base, chunks, monkeypatch, deferred=True, hold=(289, 274), hold_tokens=192
    )
    for ref in refs:  # never more than the bound held, and the bound was reached
        assert ref.stats.max_retained == 192


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
