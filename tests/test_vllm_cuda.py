"""The CUDA worker path (``attention_cuda.py``, ``cuda_startup.py``, ``paged.NHDPagedKV``).

Without a GPU (CI, this machine) everything that does not need CUDA runs here on CPU tensors:
the NHD gather/scatter against a plain model of vLLM's logical cache view, the compacted
FlashAttention metadata (through the real ``FlashAttentionMetadataBuilder.build``), checked by a
torch model of ``flash_attn_varlen_func``'s documented semantics (paged K/V via ``block_table``,
``seqused_k``, bottom-right aligned causal mask), the per-step score/merge plan and impl against
the reference ``PolicyCache``, registration (CUDA backends untouched on a CPU platform), the
start-up rules, and the internals list. ``gpu``-marked tests run the real kernels and engines;
they are skipped without CUDA and have not run on a GPU yet.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

from worker_harness import (  # noqa: E402
    LAYOUTS,
    common_metadata,
    flash_reference,
    logical_cache,
    run_worker_steps,
    write_tokens,
)
from worker_harness import cpu_flash_builder as _cpu_flash_builder  # noqa: E402

from cam_vllm.config import KVPolicyConfig  # noqa: E402
from cam_vllm.core.attention import attention_with_probs  # noqa: E402
from cam_vllm.policies import build_policy  # noqa: E402

BLOCK = 16  # FlashAttention's kernel block sizes are multiples of 16 (CUDA's default block size)
SINKS, WINDOW = 4, 64


def streaming(cam: bool = False, block: int = BLOCK, window: int = WINDOW):
    name = "cam-streaming" if cam else "streaming"
    return build_policy(
        KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=window, block_size=block)
    )


# --- the NHD (logical [B, H, N, K|V]) layout -----------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nhd_gather_scatter_matches_plain_model(layout, dtype):
    from cam_vllm.vllm_plugin.paged import NHDPagedKV

    gen = torch.Generator().manual_seed(0)
    nb, h, d = 6, 3, 32
    kv = logical_cache(LAYOUTS[layout], nb, h, BLOCK, d, dtype)
    slots = torch.tensor([0, BLOCK - 1, BLOCK + 2, 5 * BLOCK + 7, 3 * BLOCK])
    k = torch.randn(len(slots), h, d, generator=gen).to(dtype)
    v = torch.randn(len(slots), h, d, generator=gen).to(dtype)
    write_tokens(kv, slots, k, v)
    paged = NHDPagedKV(kv, d)
    assert torch.equal(paged.gather_k(slots), k) and torch.equal(paged.gather_v(slots), v)
    # what FlashAttentionImpl.forward itself reads: kv_cache.transpose(1, 2).split(head_size, -1)
    key_cache, value_cache = kv.transpose(1, 2).split(d, dim=-1)
    assert torch.equal(key_cache[slots // BLOCK, slots % BLOCK], k)
    before = kv.clone()
    new_v = torch.randn(2, h, d, generator=gen).to(dtype)
    paged.scatter_v(slots[1:3], new_v)  # writes through the view into the buffer
    assert torch.equal(value_cache[slots[1:3] // BLOCK, slots[1:3] % BLOCK], new_v)
    assert torch.equal(paged.gather_k(slots), k)  # keys never change
    changed = (kv != before).any(dim=-1).any(dim=1)  # [B, N]
    assert changed.sum() <= 2 and not changed[0, 0]


def test_nhd_refuses_a_view_that_is_not_k_then_v():
    from cam_vllm.vllm_plugin.paged import LayoutError, NHDPagedKV

    with pytest.raises(LayoutError):
        NHDPagedKV(torch.zeros(2, 1, BLOCK, 48), 32)


# --- FlashAttention metadata from a synthetic batch -----------------------------------------------


def cpu_flash_builder(policy=None, block_size=BLOCK):
    return _cpu_flash_builder(policy, block_size)


def scenario(seed=0, head=32, hkv=2, hq=4):
    """Requests mixing a long prompt, decodes and chunks crossing window boundaries; blocks that
    are already evicted before the step are poisoned with NaN (as if freed and reused)."""
    torch.manual_seed(seed)
    policy = streaming().eviction
    reqs = [(0, 200), (150, 1), (100, 70), (37, 5), (0, 1), (64, 1), (300, 40), (95, 2)]
    widths = [-(-(c + n) // BLOCK) for c, n in reqs]
    num_blocks = sum(widths) + 4
    perm = torch.randperm(num_blocks - 1) + 1  # block 0 is vLLM's null block
    table = torch.zeros(len(reqs), max(widths) + 3, dtype=torch.int32)  # wider than needed
    kv = logical_cache(LAYOUTS["LBNHC (NHD)"], num_blocks, hkv, BLOCK, head)
    full_k, full_v, qs, stale, slot_mapping = [], [], [], [], []
    used = 0
    for r, ((c, n), w) in enumerate(zip(reqs, widths, strict=True)):
        table[r, :w] = perm[used : used + w]
        used += w
        pos = torch.arange(c + n)
        k, v = torch.randn(c + n, hkv, head), torch.randn(c + n, hkv, head)
        slots = table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK
        write_tokens(kv, slots, k, v)
        slot_mapping.append(slots[c:])
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(n, hq, head))
        for j in range(w):
            if (j + 1) * BLOCK <= c and not bool(policy.retained(torch.tensor(j * BLOCK), c + 1)):
                stale.append(int(table[r, j]))
    assert stale
    kv[stale] = float("nan")
    cm = common_metadata([n for _, n in reqs], [c + n for c, n in reqs], table, torch.cat(slot_mapping))
    return SimpleNamespace(
        policy=policy, reqs=reqs, table=table, kv=kv, k=full_k, v=full_v, q=torch.cat(qs), cm=cm
    )


def test_compacted_metadata_attends_exactly_to_retained_blocks():
    from cam_vllm.vllm_plugin.builder import compact_common_metadata

    s = scenario()
    kernel_cm = compact_common_metadata(s.policy.retained, s.cm, BLOCK)
    assert kernel_cm is not s.cm and kernel_cm.num_reqs > s.cm.num_reqs  # chunks were split
    # host and "device" copies agree; token-level fields are untouched
    assert torch.equal(kernel_cm.query_start_loc, kernel_cm.query_start_loc_cpu)
    assert torch.equal(kernel_cm.seq_lens, kernel_cm.seq_lens_cpu_upper_bound)
    assert kernel_cm.num_actual_tokens == s.cm.num_actual_tokens
    assert kernel_cm.slot_mapping is s.cm.slot_mapping
    assert kernel_cm.max_seq_len == int(kernel_cm.seq_lens.max())
    assert kernel_cm.max_query_len == int((kernel_cm.query_start_loc.diff()).max())
    assert kernel_cm.block_table_tensor.dtype == s.table.dtype
    assert kernel_cm.req_idx is None and kernel_cm.is_prefilling.numel() == kernel_cm.num_reqs
    assert kernel_cm.max_seq_len <= SINKS + WINDOW + 70  # never the whole cached sequence
    meta = SimpleNamespace(
        query_start_loc=kernel_cm.query_start_loc,
        seq_lens=kernel_cm.seq_lens,
        block_table=kernel_cm.block_table_tensor,
    )
    out = flash_reference(s.q, s.kv, meta, 0.125, 32)
    assert not torch.isnan(out).any()  # stale (NaN) blocks are never read
    q0 = 0
    for r, (c, n) in enumerate(s.reqs):
        q_pos, kv_pos = torch.arange(c, c + n), torch.arange(c + n)
        expected, _ = attention_with_probs(
            s.q[q0 : q0 + n], s.k[r], s.v[r], s.policy.visible(q_pos, kv_pos), 0.125
        )
        torch.testing.assert_close(out[q0 : q0 + n], expected, atol=2e-5, rtol=1e-5)
        q0 += n


def test_nothing_evicted_keeps_the_stock_metadata():
    from cam_vllm.vllm_plugin.builder import compact_common_metadata

    table = torch.arange(1, 13, dtype=torch.int32).view(2, 6)
    cm = common_metadata([50, 1], [50, 40], table, torch.arange(51))
    assert compact_common_metadata(streaming().eviction.retained, cm, BLOCK) is cm


@pytest.mark.parametrize("cam", [False, True], ids=["streaming", "cam-streaming"])
def test_builder_build_gives_flash_metadata_of_the_compacted_batch(cam):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionMetadata
    from cam_vllm.vllm_plugin.builder import compact_common_metadata

    s = scenario()
    policy = streaming(cam=cam)
    meta = cpu_flash_builder(policy).build(0, s.cm)
    assert isinstance(meta, PolicyFlashAttentionMetadata) and isinstance(meta, FlashAttentionMetadata)
    kernel_cm = compact_common_metadata(policy.eviction.retained, s.cm, BLOCK)
    assert torch.equal(meta.query_start_loc, kernel_cm.query_start_loc)
    assert torch.equal(meta.seq_lens, kernel_cm.seq_lens)
    assert torch.equal(meta.block_table, kernel_cm.block_table_tensor)
    assert meta.slot_mapping is s.cm.slot_mapping
    assert meta.num_actual_tokens == s.cm.num_actual_tokens
    assert (meta.max_query_len, meta.max_seq_len) == (kernel_cm.max_query_len, kernel_cm.max_seq_len)
    assert meta.scheduler_metadata is None and meta.causal is True
    if not cam:
        assert meta.cam_plan is None and meta.cam_waves is None
        return
    # chunks crossing window blocks run in waves, merging in between; the plans made on virtual
    # blocks name the step's physical slots
    assert meta.cam_plan is None and len(meta.cam_waves) > 1
    plans = [w.plan for w in meta.cam_waves]
    assert any(p.merges for p in plans)
    resets = torch.cat([p.reset_slots for p in plans])
    assert torch.equal(resets.sort().values, s.cm.slot_mapping.long().sort().values)


@pytest.mark.parametrize("name", ["cam-h2o", "cam-streaming", "kvmerger-tova"])
def test_plan_translation_names_the_physical_slots_of_every_field(name):
    """A plan made on virtual block ids and translated (what both builders run) equals the plan
    made on the physical table itself, field by field: resets, packs, merges, heavy-region events,
    decodes with their null-block padding."""
    from cam_vllm.vllm_plugin.builder import plan_step, step_tokens
    from cam_vllm.vllm_plugin.step_plan import plan_scores

    s = scenario()
    extra = {"heavy_tokens": 32} if "streaming" not in name else {}
    policy = build_policy(
        KVPolicyConfig(policy=name, sink_tokens=SINKS, window_tokens=WINDOW, block_size=BLOCK, **extra)
    )
    tokens = step_tokens(s.cm)
    got = plan_step(policy, tokens, s.cm, BLOCK)
    want = plan_scores(policy, tokens, s.cm.block_table_tensor, s.cm.slot_mapping, BLOCK)
    assert torch.equal(got.reset_slots, want.reset_slots)
    assert torch.equal(got.reset_positions, want.reset_positions)
    assert len(got.packs) == len(want.packs) > 0
    for g, w in zip(got.packs, want.packs, strict=True):
        assert g.q_rows == w.q_rows and torch.equal(g.kv_slots, w.kv_slots)
        assert torch.equal(g.visible, w.visible)
    assert len(got.merges) == len(want.merges)
    for g, w in zip(got.merges, want.merges, strict=True):
        assert torch.equal(g.slots, w.slots) and torch.equal(g.leaving, w.leaving)
    assert len(got.heavy) == len(want.heavy)
    for g, w in zip(got.heavy, want.heavy, strict=True):
        for field in ("heavy_slots", "leaving_slots", "receivers"):
            assert torch.equal(getattr(g, field), getattr(w, field)), field
    if policy.score is not None:
        assert got.heavy, "the scenario must evict at the end of the step"
    else:
        assert got.merges, "the scenario must merge at the end of the step"
    assert (got.decode is None) == (want.decode is None)
    if want.decode is not None:
        for field in ("blocks", "slots", "valid", "q_rows"):
            assert torch.equal(getattr(got.decode, field), getattr(want.decode, field)), field
        assert bool((want.decode.blocks == 0).any()), "decodes padded with the null block"


# what the CPU path's harness runs (tests/test_vllm_worker.py), through the FlashAttention builder
FLASH_WORKER_CASES = [
    ("cam", "accumulated", "streaming"),
    ("cam", "current", "streaming"),
    ("kvmerger", "accumulated", "streaming"),
    (None, "accumulated", "h2o"),
    ("cam", "accumulated", "h2o"),
    (None, "accumulated", "tova"),
    ("weighted", "accumulated", "scissorhands"),
    ("kvmerger", "accumulated", "corm"),
]
WORKER_CHUNKS = [[150, 1, 1, 37, 1, 1, 1, 40, 1, 1], [1, 70, 1, 1, 1, 100, 1, 30, 1, 1]]


@pytest.mark.parametrize(("rule", "mode", "base"), FLASH_WORKER_CASES)
def test_flash_builder_and_impl_reproduce_policy_cache(rule, mode, base, monkeypatch):
    """The FlashAttention builder's ``build`` (waves where a chunk crosses window blocks, the plan
    on virtual blocks translated), the CUDA impl's ``forward`` over a torch model of the kernel,
    NHD layout: outputs, keys, values, Abar and score state equal the reference cache at every
    step, freed blocks poisoned."""
    run_worker_steps(rule, mode, base, WORKER_CHUNKS, monkeypatch, deferred=False, backend="flash")


@pytest.mark.parametrize(("rule", "base"), [("cam", "streaming"), (None, "h2o"), ("kvmerger", "corm")])
def test_flash_builder_deferred_decode_scoring_reproduces_policy_cache(rule, base, monkeypatch):
    chunks = [[150] + [1] * 41 + [37] + [1] * 34, [1, 70] + [1] * 44 + [100] + [1] * 30]
    run_worker_steps(rule, "accumulated", base, chunks, monkeypatch, deferred=True, backend="flash")


@pytest.mark.parametrize(("rule", "base"), [(None, "snapkv"), ("cam", "snapkv"), ("cam", "scissorhands")])
def test_flash_builder_prompt_hold_reproduces_policy_cache(rule, base, monkeypatch):
    chunks = [[150, 1, 1, 37] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 100] + [1] * 38 + [30, 1, 1]]
    run_worker_steps(
        rule, "accumulated", base, chunks, monkeypatch, deferred=True, hold=(189, 174), backend="flash"
    )


@pytest.mark.parametrize("request_holds", [(True, False), (False, True)])
def test_flash_builder_a_requests_own_prompt_hold_reproduces_policy_cache(request_holds, monkeypatch):
    """Through the builder's reading of each request's ``vllm_xargs`` (``step_requests.holds_of``)."""
    chunks = [[150, 1, 1, 37] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 100] + [1] * 38 + [30, 1, 1]]
    run_worker_steps(
        "cam", "accumulated", "h2o", chunks, monkeypatch, deferred=True, hold=(189, 174), backend="flash",
        request_holds=request_holds,
    )  # fmt: skip


def test_flash_builder_bounded_prompt_hold_reproduces_policy_cache(monkeypatch):
    chunks = [[150, 1, 1, 137] + [1] * 40 + [40, 1, 1], [1, 70, 1, 1, 1, 200] + [1] * 38 + [30, 1, 1]]
    refs = run_worker_steps(
        "cam", "accumulated", "snapkv", chunks, monkeypatch, deferred=True, hold=(289, 274),
        hold_tokens=192, backend="flash",
    )  # fmt: skip
    assert all(ref.stats.max_retained == 192 for ref in refs)


@pytest.mark.parametrize("rule", [None, "cam"])
def test_flash_builder_token_exact_reproduces_the_per_token_cache(rule, monkeypatch):
    run_worker_steps(
        rule, "accumulated", "streaming", WORKER_CHUNKS, monkeypatch, deferred=False, exact=True,
        backend="flash",
    )  # fmt: skip


# --- registration and start-up ------------------------------------------------------------------


def test_register_on_a_cpu_platform_leaves_cuda_backends_untouched():
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from cam_vllm.plugin import register
    from cam_vllm.vllm_plugin import _register_cuda_worker_side, registration_error
    from cam_vllm.vllm_plugin.attention_cuda import register_cuda_attention

    assert not current_platform.is_cuda()
    register()
    _register_cuda_worker_side()
    assert registration_error() is None
    assert register_cuda_attention() is False
    for member in ("FLASH_ATTN", "TRITON_ATTN", "FLASHINFER", "FLEX_ATTENTION", "CUSTOM"):
        assert not AttentionBackendEnum[member].is_overridden(), member
    assert AttentionBackendEnum.FLASH_ATTN.get_path() == AttentionBackendEnum.FLASH_ATTN.value


def test_register_on_cuda_repoints_flash_attn_idempotently():
    from vllm.v1.attention.backends.flash_attn import (
        FlashAttentionBackend,
        FlashAttentionImpl,
        FlashAttentionMetadataBuilder,
    )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionBackend, register_cuda_attention

    try:
        assert register_cuda_attention(force=True) and register_cuda_attention(force=True)
        backend = AttentionBackendEnum.FLASH_ATTN.get_class()
        assert backend is PolicyFlashAttentionBackend and issubclass(backend, FlashAttentionBackend)
        assert AttentionBackendEnum[backend.get_name()] is AttentionBackendEnum.FLASH_ATTN
        assert issubclass(backend.get_impl_cls(), FlashAttentionImpl)
        assert issubclass(backend.get_builder_cls(), FlashAttentionMetadataBuilder)
        assert backend.forward_includes_kv_cache_update is False  # K/V are written before forward
    finally:
        AttentionBackendEnum.FLASH_ATTN.clear_override()


def _args(**fields):
    base = dict(attention_backend=None, attention_config=None, enforce_eager=False, async_scheduling=None)
    return SimpleNamespace(**{**base, "kv_cache_dtype": "auto", **fields})


def test_cuda_engine_args_defaults_select_flash_attention_eagerly():
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from cam_vllm.vllm_plugin.cuda_startup import cuda_engine_args_fixes

    args = _args()
    problems, changes = cuda_engine_args_fixes(args, "streaming")
    assert problems == [] and len(changes) == 3
    assert args.attention_backend is AttentionBackendEnum.FLASH_ATTN
    assert args.enforce_eager is True and args.async_scheduling is False
    # already as required: nothing to change, for every policy (score-driven ones included)
    for name in ("streaming", "h2o", "cam-snapkv", "kvmerger-corm"):
        problems, changes = cuda_engine_args_fixes(args, name)
        assert problems == [] and changes == [], name


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"attention_backend": "TRITON_ATTN"}, "attention backend TRITON_ATTN is not supported"),
        ({"attention_config": {"backend": "FLASHINFER"}}, "attention backend FLASHINFER"),
        ({"async_scheduling": True}, "--async-scheduling is not supported"),
        ({"kv_cache_dtype": "fp8"}, "quantized KV cache (fp8)"),
        ({"kv_cache_dtype": "fp8_e4m3"}, "quantized KV cache (fp8_e4m3)"),
    ],
)
def test_cuda_engine_args_refuse_what_is_not_supported(fields, message):
    from cam_vllm.vllm_plugin.cuda_startup import cuda_engine_args_fixes

    problems, _ = cuda_engine_args_fixes(_args(**fields), "cam-streaming")
    assert any(message in p for p in problems), problems


def test_cuda_engine_args_through_real_engine_args(monkeypatch):
    """The hook on a real ``EngineArgs`` (CUDA simulated): fields vLLM reads are set, errors are
    KVPolicyStartupError; on this CPU platform the hook changes nothing."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from cam_vllm.vllm_plugin import cuda_startup
    from cam_vllm.vllm_plugin.startup import KVPolicyStartupError

    args = EngineArgs(model="unused")
    assert cuda_startup.prepare_cuda_engine_args(args, "streaming") is args
    assert args.attention_backend is None and args.enforce_eager is False  # CPU: untouched

    monkeypatch.setattr(cuda_startup, "platform_is_cuda", lambda: True)
    cuda_startup.prepare_cuda_engine_args(args, "streaming")
    assert args.attention_backend is AttentionBackendEnum.FLASH_ATTN
    assert args.enforce_eager is True and args.async_scheduling is False
    bad = EngineArgs(model="unused", attention_backend="FLASHINFER", kv_cache_dtype="fp8")
    with pytest.raises(KVPolicyStartupError, match="FLASHINFER is not supported.*fp8"):
        cuda_startup.prepare_cuda_engine_args(bad, "streaming")


def test_builder_config_checks_are_a_second_line_of_defence():
    from cam_vllm.vllm_plugin.attention_cpu import PolicyCPUAttentionBackend
    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionBackend

    spec = SimpleNamespace(block_size=BLOCK, sliding_window=None, prefix_cacheable=False)
    ok = SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="NONE")),
        scheduler_config=SimpleNamespace(async_scheduling=False),
        cache_config=SimpleNamespace(cache_dtype="auto", enable_prefix_caching=False),
    )
    heavy = build_policy(
        KVPolicyConfig(
            policy="cam-h2o", sink_tokens=SINKS, window_tokens=WINDOW, heavy_tokens=32, block_size=32
        )
    )
    for policy in (streaming(cam=True), heavy):  # score-driven policies run on CUDA too
        assert PolicyFlashAttentionBackend.policy_problems(ok, policy, spec) == []
    bad = SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="FULL_AND_PIECEWISE")),
        scheduler_config=SimpleNamespace(async_scheduling=True),
        cache_config=SimpleNamespace(cache_dtype="fp8", enable_prefix_caching=True),
    )
    cacheable = SimpleNamespace(block_size=BLOCK, sliding_window=None)
    problems = PolicyFlashAttentionBackend.policy_problems(bad, heavy, cacheable)
    assert len(problems) == 4, problems  # prefix caching with score state, CUDA graphs, async, fp8
    # FlashAttention pages in kernel blocks the policy's blocks are made of; CPU blocks must be equal
    assert PolicyFlashAttentionBackend.policy_problems(ok, streaming(block=8), spec)
    assert PolicyFlashAttentionBackend.policy_problems(ok, streaming(block=32), spec) == []
    assert PolicyCPUAttentionBackend.policy_problems(ok, streaming(block=32), spec)
    assert PolicyCPUAttentionBackend.policy_problems(bad, streaming(), spec) == []  # engine rules: CUDA's


# --- internals ----------------------------------------------------------------------------------

# (paged.NHDPagedKV imports nothing from vLLM; paged.py's vLLM imports belong to the CPU path)
CUDA_MODULES = ["attention_cuda.py", "cuda_startup.py", "__init__.py"]


def _vllm_names_used(path: Path) -> set[str]:
    """``module:name`` for every ``from vllm... import name`` in a file (also inside functions)."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            used |= {f"{node.module}:{alias.name}" for alias in node.names}
    return used


def test_every_vllm_import_of_the_cuda_path_is_listed():
    from cam_vllm.vllm_plugin import internals

    plugin_dir = Path(internals.__file__).parent
    listed = {e.target.split(".")[0] if ":" not in e.target else e.target for e in internals.INTERNALS}
    heads = {t.split(":")[0] + ":" + t.split(":")[1].split(".")[0] for t in listed if ":" in t}
    # current_platform is a lazy module attribute (vllm.platforms.__getattr__), listed through
    # the Platform method we call on it
    lazy = {"vllm.platforms:current_platform": "vllm.platforms.interface:Platform.is_cuda"}
    for name in CUDA_MODULES:
        for used in _vllm_names_used(plugin_dir / name):
            assert used in heads or lazy.get(used) in listed, f"{name} imports {used}: add it to INTERNALS"
    assert internals.check_vllm_internals(raise_on_error=False) == []
    cuda_entries = [e for e in internals.INTERNALS if e in internals.CUDA_INTERNALS]
    assert len(cuda_entries) == len(internals.CUDA_INTERNALS) > 10


# --- on a GPU (skipped without CUDA; not run on a GPU yet) ----------------------------------------


@pytest.mark.gpu
def test_gpu_nhd_reads_what_reshape_and_cache_flash_writes():
    from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash

    from cam_vllm.vllm_plugin.paged import NHDPagedKV

    dev = torch.device("cuda")
    for layout in LAYOUTS.values():
        kv = logical_cache(layout, 8, 2, BLOCK, 64, torch.bfloat16, dev)
        slots = torch.tensor([0, 17, 40, 127, 5], device=dev)
        k = torch.randn(5, 2, 64, device=dev, dtype=torch.bfloat16)
        v = torch.randn(5, 2, 64, device=dev, dtype=torch.bfloat16)
        key_cache, value_cache = kv.transpose(1, 2).split(64, dim=-1)
        one = torch.ones((), device=dev)
        reshape_and_cache_flash(k, v, key_cache, value_cache, slots, "auto", one, one)
        paged = NHDPagedKV(kv, 64)
        assert torch.equal(paged.gather_k(slots), k) and torch.equal(paged.gather_v(slots), v)


@pytest.mark.gpu
def test_gpu_flash_attention_on_the_compacted_batch_matches_retained_attention():
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from cam_vllm.vllm_plugin.builder import compact_common_metadata

    s = scenario(head=64)
    dev = torch.device("cuda")
    kv = s.kv.to(dev, torch.bfloat16)
    cm = dataclasses.replace(
        s.cm,
        query_start_loc=s.cm.query_start_loc.to(dev),
        seq_lens=s.cm.seq_lens.to(dev),
        block_table_tensor=s.table.to(dev),
        slot_mapping=s.cm.slot_mapping.to(dev),
    )
    kernel_cm = compact_common_metadata(s.policy.retained, cm, BLOCK)
    assert kernel_cm.block_table_tensor.device.type == "cuda"
    key_cache, value_cache = kv.transpose(1, 2).split(64, dim=-1)
    q = s.q.to(dev, torch.bfloat16)
    out = torch.empty_like(q)
    flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=out,
        cu_seqlens_q=kernel_cm.query_start_loc,
        max_seqlen_q=kernel_cm.max_query_len,
        seqused_k=kernel_cm.seq_lens,
        max_seqlen_k=kernel_cm.max_seq_len,
        softmax_scale=0.125,
        causal=True,
        block_table=kernel_cm.block_table_tensor,
    )
    assert not torch.isnan(out).any()
    ref = flash_reference(q.float().cpu(), kv.float().cpu(), kernel_cm_host(kernel_cm), 0.125, 64)
    torch.testing.assert_close(out.float().cpu(), ref, atol=2e-2, rtol=2e-2)


def kernel_cm_host(cm):
    return SimpleNamespace(
        query_start_loc=cm.query_start_loc_cpu,
        seq_lens=cm.seq_lens_cpu_upper_bound,
        block_table=cm.block_table_tensor.cpu(),
    )


@pytest.mark.gpu
@pytest.mark.engine
@pytest.mark.slow
def test_gpu_engine_no_eviction_is_stock_and_policies_run(tmp_path):
    """A real CUDA engine (bf16 tiny Llama, FLASH_ATTN selected by the plugin): no policy and a
    window longer than the sequence give stock tokens; streaming and cam-streaming run and
    change the long prompt's continuation. (bf16 vs the float32 reference engine is not a
    token-exact comparison; the exact checks are the CPU tests above.)"""
    import gc

    from vllm import LLM, SamplingParams
    from vllm_helpers import make_tiny_model, temp_env, token_prompts

    model = make_tiny_model(tmp_path / "model", hidden_size=256, intermediate_size=512, head_dim=64)
    prompts = [token_prompts(1, n, seed=i)[0] for i, n in enumerate((300, 77, 161))]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)

    def run(policy, plugins=True):
        extra = {"additional_config": {"kv_policy": policy}} if policy else {}
        with temp_env(None if plugins else {"VLLM_PLUGINS": ""}):
            llm = LLM(
                str(model),
                dtype="bfloat16",
                block_size=BLOCK,
                max_model_len=1024,
                enable_prefix_caching=False,
                gpu_memory_utilization=0.3,
                **extra,
            )
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        del llm
        gc.collect()
        torch.cuda.empty_cache()
        return [list(o.outputs[0].token_ids) for o in outs]

    stock = run(None, plugins=False)
    assert run({"policy": "none"}) == stock
    assert run({"policy": "streaming", "sink_tokens": SINKS, "window_tokens": 1024}) == stock
    got = run({"policy": "streaming", "sink_tokens": SINKS, "window_tokens": WINDOW})
    assert got[0] != stock[0]
    assert run({"policy": "cam-streaming", "sink_tokens": SINKS, "window_tokens": WINDOW})  # runs


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_impls_refuse_what_a_policy_cannot_serve_and_leave_other_layers_alone(backend, monkeypatch):
    """Both impls pick their policy through impl_common; a feature the policy cannot combine
    with is refused by name, encoder layers keep stock attention."""
    from vllm.v1.attention.backend import AttentionType

    from cam_vllm.vllm_plugin import impl_common

    if backend == "cpu":
        from cam_vllm.vllm_plugin.attention_cpu import PolicyCPUAttentionBackendImpl as Impl
    else:
        from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionImpl as Impl
    policy = streaming(cam=True)
    monkeypatch.setattr(impl_common, "policy_of", lambda config: policy)
    if backend == "cpu":  # the stock CPU impl reads the model dtype from the current config
        from vllm.v1.attention.backends import cpu_attn

        fake = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
        monkeypatch.setattr(cpu_attn, "get_current_vllm_config", lambda: fake)
    impl = Impl(4, 32, 0.125, 2, None, None, "auto")
    assert impl.policy is policy and impl._abar is None and impl._layer_index is None
    with pytest.raises(NotImplementedError, match="ALiBi"):
        Impl(4, 32, 0.125, 2, [0.5] * 4, None, "auto")
    with pytest.raises(NotImplementedError, match="soft-capping"):
        Impl(4, 32, 0.125, 2, None, None, "auto", logits_soft_cap=30.0)
    encoder = Impl(4, 32, 0.125, 2, None, None, "auto", attn_type=AttentionType.ENCODER_ONLY)
    assert encoder.policy is None
