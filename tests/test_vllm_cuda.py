"""The CUDA worker path (``attention_cuda.py``, ``cuda_startup.py``, ``paged.NHDPagedKV``).

Without a GPU (CI, this machine) everything that does not need CUDA runs here on CPU tensors:
the NHD gather/scatter against a plain model of vLLM's logical cache view, the compacted
FlashAttention metadata (through the real ``FlashAttentionMetadataBuilder.build``), checked by a
torch model of ``flash_attn_varlen_func``'s documented semantics (paged K/V via ``block_table``,
``seqused_k``, bottom-right aligned causal mask), the per-step score/merge plan and impl against
the reference ``PolicyCache``, registration (CUDA backends untouched on a CPU platform), the
start-up rules, and the internals list. ``gpu``-marked tests run the real kernels and engines;
they are skipped without CUDA and HAVE NOT BEEN RUN (no GPU was available when they were written).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")

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

# physical orders of vLLM 0.32's KVCacheLayout, restricted to one layer: permutations of the
# logical per-layer axes (B, H, N, C)
LAYOUTS = {"LBNHC (NHD)": (0, 2, 1, 3), "LBHNC (HND)": (0, 1, 2, 3)}


def logical_cache(layout, num_blocks, heads, block, head, dtype=torch.float32, device="cpu"):
    """A per-layer cache as vLLM hands it to the backend: a [B, H, N, 2D] view of a buffer whose
    memory order is ``layout``."""
    shape = (num_blocks, heads, block, 2 * head)
    physical = torch.zeros([shape[i] for i in layout], dtype=dtype, device=device)
    inverse = [layout.index(i) for i in range(4)]
    view = physical.permute(*inverse)
    assert view.shape == shape
    return view


def write_tokens(kv, slots, k, v):
    """Plain model of reshape_and_cache_flash: token ``s`` goes to block ``s // B``, offset ``s % B``,
    K in the first ``D`` elements of the last axis, V in the rest."""
    b, d = kv.shape[2], k.shape[-1]
    for i, s in enumerate(slots.tolist()):
        kv[s // b, :, s % b, :d] = k[i]
        kv[s // b, :, s % b, d:] = v[i]


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


def flash_reference(q, kv, meta, scale, head):
    """Torch model of ``flash_attn_varlen_func(q, k_cache, v_cache, cu_seqlens_q, seqused_k,
    block_table, causal=True)`` as documented in vllm/vllm_flash_attn/flash_attn_interface.py:
    row ``i`` reads ``seqused_k[i]`` keys through its block-table row, and the causal mask is
    aligned to the bottom right (query ``j`` of ``n`` sees keys ``< L - n + j + 1``)."""
    key_cache, value_cache = kv.transpose(1, 2).split(head, dim=-1)  # as FlashAttentionImpl.forward
    b = kv.shape[2]
    qsl, lens, table = meta.query_start_loc, meta.seq_lens, meta.block_table
    out = torch.zeros_like(q)
    for i in range(lens.numel()):
        q0, q1, n_k = int(qsl[i]), int(qsl[i + 1]), int(lens[i])
        pos = torch.arange(n_k)
        blocks = table[i].long()[pos // b]
        k, v = key_cache[blocks, pos % b], value_cache[blocks, pos % b]
        n_q = q1 - q0
        vis = pos[None, :] <= (n_k - n_q + torch.arange(n_q))[:, None]
        out[q0:q1] = attention_with_probs(q[q0:q1], k, v, vis, scale)[0]
    return out


def common_metadata(query_lens, seq_lens, table, slot_mapping):
    from vllm.v1.attention.backend import CommonAttentionMetadata

    qsl = torch.tensor([0, *query_lens]).cumsum(0).to(torch.int32)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return CommonAttentionMetadata(
        query_start_loc=qsl.clone(),  # "device" copies (CPU here), host copies below
        query_start_loc_cpu=qsl,
        seq_lens=lens.clone(),
        seq_lens_cpu_upper_bound=lens,
        num_reqs=len(seq_lens),
        num_actual_tokens=int(qsl[-1]),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_table_tensor=table,
        slot_mapping=slot_mapping,
        is_prefilling=torch.tensor([q > 1 for q in query_lens]),
    )


def cpu_flash_builder(block_size=BLOCK):
    """A FlashAttention builder without a GPU: the attributes the stock ``build`` reads, as its
    constructor sets them on a machine without FA3 (no AOT schedule) and without CUDA graphs."""
    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionMetadataBuilder

    builder = object.__new__(PolicyFlashAttentionMetadataBuilder)
    builder.block_size = block_size
    builder.aot_schedule = False
    builder.aot_sliding_window = None
    builder.use_full_cuda_graph = False
    builder.max_cudagraph_size = None
    builder.max_num_splits = 0
    builder.dcp_world_size = 1
    builder.mm_prefix_query_ranges_np = None
    builder.rswa_window = None
    return builder


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
    from cam_vllm.vllm_plugin.attention_cuda import compact_common_metadata

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
    from cam_vllm.vllm_plugin.attention_cuda import compact_common_metadata

    table = torch.arange(1, 13, dtype=torch.int32).view(2, 6)
    cm = common_metadata([50, 1], [50, 40], table, torch.arange(51))
    assert compact_common_metadata(streaming().eviction.retained, cm, BLOCK) is cm


@pytest.mark.parametrize("cam", [False, True], ids=["streaming", "cam-streaming"])
def test_builder_build_gives_flash_metadata_of_the_compacted_batch(cam):
    from vllm.v1.attention.backends.flash_attn import FlashAttentionMetadata

    from cam_vllm.vllm_plugin.attention_cuda import (
        PolicyFlashAttentionMetadata,
        build_policy_metadata,
        compact_common_metadata,
    )

    s = scenario()
    policy = streaming(cam=cam)
    meta = build_policy_metadata(cpu_flash_builder(), policy, 0, s.cm)
    assert isinstance(meta, PolicyFlashAttentionMetadata) and isinstance(meta, FlashAttentionMetadata)
    kernel_cm = compact_common_metadata(policy.eviction.retained, s.cm, BLOCK)
    assert torch.equal(meta.query_start_loc, kernel_cm.query_start_loc)
    assert torch.equal(meta.seq_lens, kernel_cm.seq_lens)
    assert torch.equal(meta.block_table, kernel_cm.block_table_tensor)
    assert meta.slot_mapping is s.cm.slot_mapping
    assert meta.num_actual_tokens == s.cm.num_actual_tokens
    assert (meta.max_query_len, meta.max_seq_len) == (kernel_cm.max_query_len, kernel_cm.max_seq_len)
    assert meta.scheduler_metadata is None and meta.causal is True
    assert (meta.cam_plan is not None) == cam
    if cam:
        assert meta.cam_plan.packs and meta.cam_plan.merges
        assert torch.equal(meta.cam_plan.written_slots, s.cm.slot_mapping)


def _impl(policy, hq, hkv, d, scale):
    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionImpl

    impl = PolicyFlashAttentionImpl(hq, d, scale, hkv, None, None, "auto")
    assert impl.policy is None  # no current vLLM config with a kv_policy: stock behaviour
    impl.policy = policy
    return impl


@pytest.mark.parametrize("mode", ["accumulated", "current"])
def test_worker_steps_reproduce_policy_cache(mode, monkeypatch):
    """The builder's metadata (waves where a chunk crosses window blocks) + the flash model +
    device plans + impl, step by step, two requests with different chunkings, against one
    reference PolicyCache per request (outputs, values, Abar); evicted blocks are poisoned with
    NaN after every step."""
    from cam_vllm.reference.cache import PolicyCache
    from cam_vllm.vllm_plugin import step_plan
    from cam_vllm.vllm_plugin.attention_cuda import build_policy_metadata, plan_device_scores, step_tokens
    from cam_vllm.vllm_plugin.paged import NHDPagedKV

    monkeypatch.setattr(step_plan, "MAX_PAIRS_PER_CALL", 3000)  # exercise query slicing
    torch.manual_seed(0)
    policy = dataclasses.replace(streaming(cam=True), score_mode=mode)
    hq, hkv, d, scale = 4, 2, 32, 0.125
    chunks = [[150, 1, 1, 37, 1, 1, 1, 40, 1, 1], [1, 70, 1, 1, 1, 100, 1, 30, 1, 1]]
    widths = [-(-sum(c) // BLOCK) for c in chunks]
    num_blocks = sum(widths) + 1
    table = torch.zeros(2, max(widths), dtype=torch.int32)
    perm = torch.randperm(num_blocks - 1) + 1
    table[0, : widths[0]], table[1, : widths[1]] = perm[: widths[0]], perm[widths[0] :]
    kv = logical_cache(LAYOUTS["LBNHC (NHD)"], num_blocks, hkv, BLOCK, d)
    impl = _impl(policy, hq, hkv, d, scale)
    layer = SimpleNamespace(layer_name="model.layers.3.self_attn.attn")
    refs = [PolicyCache(policy) for _ in chunks]
    done = [0, 0]
    builder, waves_seen = cpu_flash_builder(), 0
    for step in range(len(chunks[0])):
        qs, slots, expected = [], [], []
        for r in range(2):
            n, c = chunks[r][step], done[r]
            q, k, v = torch.randn(n, hq, d), torch.randn(n, hkv, d), torch.randn(n, hkv, d)
            pos = torch.arange(c, c + n)
            slot = table[r].long()[pos // BLOCK] * BLOCK + pos % BLOCK
            write_tokens(kv, slot, k, v)  # do_kv_cache_update runs before forward on CUDA
            qs.append(q)
            slots.append(slot)
            expected.append(refs[r].attend(3, q, k, v, scale))
            done[r] += n
        q_all = torch.cat(qs)
        cm = common_metadata([chunks[0][step], chunks[1][step]], list(done), table, torch.cat(slots))
        meta = build_policy_metadata(builder, policy, 0, cm)  # what PolicyImplMixin.forward runs:
        parts = meta.cam_waves or [SimpleNamespace(rows=torch.arange(q_all.shape[0]), meta=meta, plan=None)]
        out = torch.empty_like(q_all)
        for part in parts:  # wave by wave (a chunk across window blocks), else the whole step
            out[part.rows] = flash_reference(q_all[part.rows], kv, part.meta, scale, d)
            plan = part.plan if meta.cam_waves else plan_device_scores(policy, step_tokens(cm), cm, BLOCK)
            impl._score_and_merge(layer, q_all[part.rows], kv, plan)
        waves_seen += len(meta.cam_waves or ())
        torch.testing.assert_close(out, torch.cat(expected), atol=2e-5, rtol=1e-5)
        paged = NHDPagedKV(kv, d)
        for r in range(2):
            st = refs[r].layers[3]
            slot = table[r].long()[st.positions // BLOCK] * BLOCK + st.positions % BLOCK
            torch.testing.assert_close(paged.gather_v(slot), st.v, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(impl._abar[slot], st.abar, atol=1e-6, rtol=1e-5)
            for j in range(widths[r]):  # blocks the scheduler frees now: poison them
                if not bool(policy.eviction.retained(torch.tensor(j * BLOCK), done[r] + 1)):
                    kv[int(table[r, j])] = float("nan")
    assert sum(ref.stats.merged for ref in refs) > 0
    assert waves_seen > 0, "the long chunks must cross window blocks (merges between waves)"


def test_padding_slots_do_not_reset_real_scores():
    """slot_mapping may hold -1 (padding); the Abar reset sends those to a spare row."""
    from cam_vllm.vllm_plugin.attention_cuda import DeviceStepPlan

    impl = _impl(streaming(cam=True), 4, 2, 32, 0.125)
    kv = logical_cache(LAYOUTS["LBNHC (NHD)"], 3, 2, BLOCK, 32)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    impl._bind(layer, kv)
    impl._abar.fill_(1.0)
    impl._score_and_merge(layer, torch.zeros(3, 4, 32), kv, DeviceStepPlan(torch.tensor([5, -1, -1]), [], []))
    assert impl._abar[5].eq(0).all() and impl._abar[:-1].sum() == (3 * BLOCK - 1) * 2


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
    # already as required: nothing to change
    problems, changes = cuda_engine_args_fixes(args, "streaming")
    assert problems == [] and changes == []


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
    from cam_vllm.vllm_plugin.attention_cuda import engine_config_problems

    spec = SimpleNamespace(block_size=BLOCK, sliding_window=None, prefix_cacheable=False)
    ok = SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="NONE")),
        scheduler_config=SimpleNamespace(async_scheduling=False),
        cache_config=SimpleNamespace(cache_dtype="auto", enable_prefix_caching=False),
    )
    assert engine_config_problems(ok, streaming(cam=True), spec) == []
    bad = SimpleNamespace(
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="FULL_AND_PIECEWISE")),
        scheduler_config=SimpleNamespace(async_scheduling=True),
        cache_config=SimpleNamespace(cache_dtype="fp8", enable_prefix_caching=False),
    )
    problems = engine_config_problems(bad, streaming(), SimpleNamespace(block_size=32, sliding_window=None))
    assert len(problems) == 4, problems  # block size, CUDA graphs, async, fp8


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


# --- on a GPU (skipped without CUDA; NOT RUN so far) ----------------------------------------------


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

    from cam_vllm.vllm_plugin.attention_cuda import compact_common_metadata

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
