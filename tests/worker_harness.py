"""Worker-side harness shared by the CPU and CUDA path tests: policies, models of the two
attention kernels, and the step-by-step run of builder + impl against the reference cache.

``run_worker_steps(..., backend="cpu")`` drives the plan functions and the CPU impl with vLLM's
CPU kernel; ``backend="flash"`` drives the real FlashAttention metadata builder
(``builder.PolicyBuilderMixin.build``, on CPU tensors) and the CUDA impl's ``forward``, with the
stock FlashAttention kernel replaced by a torch model of its documented semantics
(:func:`flash_reference`), so CI runs the CUDA path's planning and scoring code.
"""

from __future__ import annotations

import pytest
import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.core.attention import attention_with_probs
from cam_vllm.policies import build_policy

BLOCK = 32
SINKS, WINDOW = 4, 64


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


# physical orders of vLLM 0.32's KVCacheLayout, restricted to one layer: permutations of the
# logical per-layer axes (B, H, N, C)
LAYOUTS = {"LBNHC (NHD)": (0, 2, 1, 3), "LBHNC (HND)": (0, 1, 2, 3)}


def _flash_impl_for(policy, hq, hkv, d, scale, monkeypatch):
    """The CUDA impl outside an engine, its stock kernel replaced by :func:`flash_reference`."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl

    from cam_vllm.vllm_plugin.attention_cuda import PolicyFlashAttentionImpl

    def kernel(self, layer, query, key, value, kv_cache, meta, output, *args, **kwargs):
        output.copy_(flash_reference(query, kv_cache, meta, self.scale, self.head_size))
        return output

    monkeypatch.setattr(FlashAttentionImpl, "forward", kernel)
    impl = PolicyFlashAttentionImpl(hq, d, scale, hkv, None, None, "auto")
    assert impl.policy is None  # no current vLLM config with a kv_policy: stock behaviour
    impl.policy = policy
    return impl


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


def cpu_flash_builder(policy=None, block_size=BLOCK, deferred=False):
    """A FlashAttention builder without a GPU: the attributes the stock ``build`` reads, as its
    constructor sets them on a machine without FA3 (no AOT schedule) and without CUDA graphs;
    ``policy`` set as the builder's constructor sets it."""
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
    builder._set_policy(policy, allow_full=False, defer_decodes=deferred)
    return builder


def run_worker_steps(
    rule,
    mode,
    base,
    chunks,
    monkeypatch,
    deferred: bool,
    exact: bool = False,
    hold: tuple | None = None,
    hold_tokens: int | None = None,
    backend: str = "cpu",
    request_holds: tuple[bool, bool] | None = None,
) -> list:
    """Two requests with the given chunkings, step by step, against one reference PolicyCache
    each (outputs, keys, values, Abar and score state), blocks the scheduler frees poisoned with
    NaN. ``backend``: "cpu" (plan functions + CPU impl + vLLM's CPU kernel) or "flash" (the
    FlashAttention builder's ``build`` + the CUDA impl's ``forward`` over a torch model of the
    FlashAttention kernel, NHD cache layout). ``request_holds``: the policy holds no prompt, and
    each request asks for its own hold or not (``vllm_xargs kv_prompt_hold``; ``hold`` gives the
    prompt lengths), against an oracle with or without the hold per request."""
    pytest.importorskip("vllm")
    flash = backend == "flash"
    import dataclasses
    from types import SimpleNamespace

    from cam_vllm.reference.cache import PolicyCache
    from cam_vllm.vllm_plugin import step_plan, step_requests
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
            hold=True if hold and request_holds is None else None,
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
    if flash:
        kv = logical_cache(LAYOUTS["LBNHC (NHD)"], num_blocks, hkv, BLOCK, d)
        impl = _flash_impl_for(policy, hq, hkv, d, scale, monkeypatch)
        builder = cpu_flash_builder(policy, BLOCK, deferred=deferred)
    else:
        kv = torch.zeros(num_blocks, hkv, BLOCK, 2 * d)
        impl = _impl_for(policy, hq, hkv, d, scale, monkeypatch)
    layer = SimpleNamespace(isa="vec", layer_name="model.layers.3.self_attn.attn")
    prompts = hold or (0, 0)
    refs = [PolicyCache(oracle, prompt_len=p) for p in prompts]
    if request_holds is not None:  # the oracle of a request that holds: the policy with the hold
        held_oracle = dataclasses.replace(
            oracle, eviction=dataclasses.replace(oracle.eviction, prompt_hold=True)
        )
        refs = [
            PolicyCache(held_oracle if own else oracle, prompt_len=p)
            for own, p in zip(request_holds, prompts, strict=True)
        ]
        prompts = tuple(p if own else 0 for own, p in zip(request_holds, prompts, strict=True))
        if flash:
            builder.allow_full = True  # the server lets requests hold their prompts
    hold_t = torch.tensor(prompts, dtype=torch.int64) if hold else None
    planner = StashPlanner(BLOCK) if deferred and mode == "accumulated" and not observe else None
    if flash:
        planner = builder.stash_planner
        assert (planner is not None) == (deferred and mode == "accumulated" and not observe and not exact)
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
            if flash:
                write_tokens(kv, slot, k, v)  # do_kv_cache_update runs before forward
            else:
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
        if flash:  # what the runner publishes, then the builder's build and the impl's forward
            params = ()
            if request_holds is not None:  # what each request sent in vllm_xargs
                params = [SimpleNamespace(extra_args={"kv_prompt_hold": own}) for own in request_holds]
            prompt_lens = (hold or prompts) if hold else ()
            step_requests.publish(["a", "b"], [None, None], done, params, prompt_lens)
            qlens = [chunks[0][step], chunks[1][step]]
            meta = builder.build(0, common_metadata(qlens, list(done), table, slot_all))
            waves_seen.append(len(meta.cam_waves or [None]))
            flushed += sum(
                int(p.plan.stash.flush_req.numel())
                for p in meta.cam_waves or [SimpleNamespace(plan=meta.cam_plan)]
                if p.plan is not None and p.plan.stash is not None
            )
            out = impl.forward(
                layer, q_all, q_all, q_all, kv, meta, torch.full_like(q_all, float("nan"))
            )  # K/V: cached
        if planner is not None and not flash:
            step_requests.publish(["a", "b"], [None, None], done)
            pub = step_requests.current(2, torch.tensor(done))
            stash = planner.plan(tokens.query_lens.tolist(), tokens.context_lens.tolist(), pub)
            flushed += int(stash.flush_req.numel())
        waves = [] if flash else split_waves(policy, tokens)  # chunks crossing window blocks: several
        if not flash:
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
            paged = impl._paged
            torch.testing.assert_close(paged.gather_v(slot), st.v, atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(paged.gather_k(slot), st.k, atol=1e-6, rtol=1e-6)
            settled = not deferred or (
                "ab"[r] not in planner.entries if planner is not None else done[r] % BLOCK == 0
            )
            if settled:  # no query of this request waits to be scored
                torch.testing.assert_close(impl._abar[slot], st.abar, atol=1e-6, rtol=1e-5)
                for name, t in st.state.items():  # score-driven: per-head token positions, scores
                    torch.testing.assert_close(impl._state[name][slot], t, atol=1e-6, rtol=1e-5)
            if hold:  # the blocks the scheduler frees now (its own rule): poison them
                first, last = policy.eviction.layout.freeable(done[r], prompts[r])
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
