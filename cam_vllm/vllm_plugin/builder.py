"""The metadata-builder sequence both attention backends run (``CPU_ATTN`` and ``FLASH_ATTN``).

Per step, with a policy (see docs/vllm-worker.md):

1. the step's rows (:class:`~cam_vllm.vllm_plugin.step_plan.StepTokens`) from the host copies of
   the batch, with what each request asked for (full cache, own window, prompt hold:
   ``step_requests``);
2. its waves (``split_waves``: a score-driven or merging policy's chunk that crosses a point where
   a block leaves the window runs in waves, the heavy region chosen or the block merged between);
3. per wave (or once): the batch compacted to the retained blocks
   (:func:`compact_common_metadata`), the stock ``build`` on it, and for a policy that tracks
   scores the step's plan (:func:`plan_step`).

Both device-dependent parts are planned on the host without reading the device block table and
translated on its device in one gather each: the kernel batch on a table of *logical* block
indices, the score plan on *virtual* block ids (:func:`virtual_table`). So the same code, tested
against the reference engine on CPU, builds the CUDA metadata; a backend adds only its stock
builder and metadata class (:class:`PolicyBuilderMixin`) and what it can serve
(:class:`PolicyBackendMixin`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from cam_vllm.policies import KVPolicy
from cam_vllm.vllm_plugin import step_requests
from cam_vllm.vllm_plugin.impl_common import NO_BATCH_CACHES, WavePart, wave_common_metadata
from cam_vllm.vllm_plugin.query_stash import StashPlanner, defers_decodes, stash_for_wave
from cam_vllm.vllm_plugin.request_policy import allows_full
from cam_vllm.vllm_plugin.settings import policy_from_vllm_config
from cam_vllm.vllm_plugin.step_plan import (
    DecodeBatch,
    HeavyEvent,
    MergeEvent,
    Planner,
    Retained,
    ScorePack,
    StashStep,
    StepPlan,
    StepTokens,
    compact_for_kernel,
    plan_scores,
    planner_for,
    split_waves,
)

# --------------------------------------------------------------------------------------------
# What a backend can serve
# --------------------------------------------------------------------------------------------


class PolicyBackendMixin:
    """Mixed in before a stock attention backend: what it can serve with a policy, as class
    methods in vLLM's style (``supports_*``), and the one list of problems the builder asks."""

    @classmethod
    def supports_score_policies(cls) -> bool:
        """Score-driven policies (h2o, tova, scissorhands, corm, snapkv) and their prompt hold."""
        return True

    @classmethod
    def supports_token_exact(cls) -> bool:
        """Token-exact windows (``--kv-token-exact``): the plugin computes the attention output."""
        return True

    @classmethod
    def block_size_problem(cls, policy_block: int, kernel_block: int) -> str | None:
        if policy_block != kernel_block:
            return f"policy block size {policy_block} != KV-cache block size {kernel_block}"
        return None

    @classmethod
    def engine_problems(cls, vllm_config: Any) -> list[str]:
        """Engine settings this backend cannot run a policy under (beyond the spec's)."""
        return []

    @classmethod
    def policy_problems(cls, vllm_config: Any, policy: KVPolicy, spec: Any) -> list[str]:
        """Why ``policy`` cannot run on this backend for a KV-cache group of ``spec`` (empty: it can)."""
        problems = []
        block = cls.block_size_problem(policy.eviction.block_size, spec.block_size)
        if block:
            problems.append(block)
        if getattr(spec, "sliding_window", None) is not None:
            problems.append("the model has sliding-window layers")
        if policy.score is not None and not cls.supports_score_policies():
            problems.append(f"score-driven policies ({policy.score.name})")
        if policy.token_exact and not cls.supports_token_exact():
            problems.append("token-exact windows (--kv-token-exact)")
        cache = getattr(vllm_config, "cache_config", None)
        if (
            policy.tracks_scores
            and getattr(cache, "enable_prefix_caching", False)
            and getattr(spec, "prefix_cacheable", True)
        ):
            problems.append(
                "CaM merging and score state write into cached blocks, which prefix caching may "
                "share with other requests; disable prefix caching (--no-enable-prefix-caching)"
            )
        return problems + cls.engine_problems(vllm_config)

    @classmethod
    def layer_problems(cls, impl: Any, policy: KVPolicy) -> list[str]:
        """What one attention layer (its stock ``impl``, built) has that ``policy`` cannot run
        with on this backend (empty: nothing); asked by each layer's impl."""
        return []


# --------------------------------------------------------------------------------------------
# The step's rows, the kernel batch, the plan: host planning, one translation on the device
# --------------------------------------------------------------------------------------------


def host_seq_lens(cm: Any) -> torch.Tensor:
    """Host copy of ``seq_lens``. On the CPU the tensor itself; elsewhere the runner's upper
    bound, exact without speculative decoding (refused at start-up), else a copy (a sync)."""
    n = cm.num_reqs
    if cm.seq_lens.device.type == "cpu":
        return cm.seq_lens[:n]
    lens = cm.seq_lens_cpu_upper_bound
    return (cm.seq_lens.cpu() if lens is None else lens)[:n]


def step_tokens(cm: Any, *per_row: Any) -> StepTokens:
    """The step's queries from the host copies of the batch (no device sync); ``per_row``: the
    rows' full-cache flags, own windows and prompt holds, as ``StepTokens.from_batch`` takes them."""
    n = cm.num_reqs
    return StepTokens.from_batch(cm.query_start_loc_cpu[: n + 1], host_seq_lens(cm), n, *per_row)


def compact_common_metadata(
    block_retained: Retained, cm: Any, block_size: int, tokens: StepTokens | None = None
) -> Any:
    """The batch the kernel must see: pseudo-requests with compacted block-table rows.

    Planned on the host with :func:`~cam_vllm.vllm_plugin.step_plan.compact_for_kernel` over a
    table of logical block indices (row ``r`` = ``0, 1, ..., width - 1``), so its rows say which
    logical blocks each pseudo-request keeps, oldest first. The physical ids are then gathered
    from the block table on its device; columns past a row's retained blocks hold the null
    block 0 and are never read (the row's ``seq_len`` ends before them). Returns ``cm`` itself
    when nothing is evicted (the stock batch, bit-identical to stock vLLM).
    """
    tokens = tokens if tokens is not None else step_tokens(cm)
    n = cm.num_reqs
    table = cm.block_table_tensor
    width = table.shape[1]
    logical = torch.arange(width, dtype=torch.int64).expand(n, width)
    kb = compact_for_kernel(block_retained, tokens, logical, block_size)
    if kb is None:
        return cm
    device = table.device
    nblk = kb.block_table.shape[1]
    count = (kb.seq_lens.to(torch.int64) + block_size - 1) // block_size
    valid = torch.arange(nblk)[None, :] < count[:, None]
    cols = torch.where(valid, kb.block_table.to(torch.int64), 0)
    rows = table[kb.request.to(device)]  # [G, width] on the device
    phys = torch.gather(rows, 1, cols.to(device))
    phys = phys.masked_fill(~valid.to(device), 0).to(table.dtype).contiguous()
    is_prefilling = cm.is_prefilling
    if is_prefilling is not None:
        is_prefilling = is_prefilling[kb.request.to(is_prefilling.device)]
    return cm.replace(
        query_start_loc=kb.query_start_loc.to(device),
        query_start_loc_cpu=kb.query_start_loc,
        seq_lens=kb.seq_lens.to(device),
        seq_lens_cpu_upper_bound=kb.seq_lens,
        num_reqs=int(kb.request.numel()),
        max_query_len=kb.max_query_len,
        max_seq_len=kb.max_seq_len,
        block_table_tensor=phys,
        is_prefilling=is_prefilling,
        **NO_BATCH_CACHES,
    )


def virtual_table(num_reqs: int, width: int) -> torch.Tensor:
    """[R, width] int64 virtual block ids: ``1 + r * width + j`` names (request, logical block);
    0 stays the null block, so padding keeps meaning padding after the translation."""
    return 1 + torch.arange(num_reqs, dtype=torch.int64)[:, None] * width + torch.arange(width)[None, :]


def plan_step(
    policy: KVPolicy,
    tokens: StepTokens,
    cm: Any,
    block_size: int,
    seeds: list[int | None] | None = None,
    stash: StashStep | None = None,
    defer_decodes: bool = False,
    planner: Planner | None = None,
) -> StepPlan:
    """``plan_scores`` on virtual block ids, translated to the physical slots of the step's block
    table on its device (:func:`translate_plan`). The plan is the same in every layer."""
    b = block_size
    n = int(tokens.seq_lens.numel())
    width = cm.block_table_tensor.shape[1]
    virtual = virtual_table(n, width)
    pos = tokens.token_pos
    slot_mapping = virtual[tokens.token_req, pos // b] * b + pos % b  # the step's own tokens
    host = plan_scores(
        policy, tokens, virtual, slot_mapping, b, seeds=seeds, stash=stash, defer_decodes=defer_decodes,
        planner=planner,
    )  # fmt: skip
    return translate_plan(host, cm.block_table_tensor, b)


def translate_plan(plan: StepPlan, table: torch.Tensor, block_size: int) -> StepPlan:
    """A host plan on virtual block ids -> physical slots and blocks of ``table``, every tensor
    on ``table``'s device. One gather for all of the plan's slots and blocks."""
    device, b = table.device, block_size
    # physical block of virtual id v: 0 for 0 (the null block), else table.flatten()[v - 1]
    phys_of = torch.cat([table.new_zeros(1), table.flatten()]).to(torch.int64)
    slots: list[torch.Tensor] = [plan.reset_slots]
    slots += [p.kv_slots for p in plan.packs]
    slots += [m.slots.flatten() for m in plan.merges]
    for e in plan.heavy:
        slots += [e.heavy_slots, e.leaving_slots, e.receivers]
        if e.restart is not None:
            slots.append(e.restart)
    d = plan.decode
    blocks = [d.blocks.flatten(), d.slots.flatten() // b] if d is not None else []
    sizes = [int(t.numel()) for t in slots]
    vs = torch.cat(slots).to(device)
    offsets = vs % b
    flat = torch.cat([vs // b, *[t.to(device) for t in blocks]])
    phys = phys_of[flat]
    got = iter(torch.split(phys[: vs.numel()] * b + offsets, sizes))
    to = _mover(device)
    reset = next(got)
    packs = [ScorePack(p.q_rows, next(got), to(p.visible)) for p in plan.packs]
    merges = [
        MergeEvent(next(got).view(m.slots.shape), to(m.positions), to(m.leaving), m.seed) for m in plan.merges
    ]
    heavy = []
    for e in plan.heavy:
        hs, ls, rs = next(got), next(got), next(got)
        restart = next(got) if e.restart is not None else None
        heavy.append(HeavyEvent(hs, ls, rs, e.num_tokens, e.seed, restart))
    decode = None
    if d is not None:
        nb = d.blocks.numel()
        dblocks = phys[vs.numel() : vs.numel() + nb].view(d.blocks.shape)
        dslots = phys[vs.numel() + nb :].view(d.slots.shape) * b + to(d.slots % b)
        decode = DecodeBatch(
            to(d.q_rows), dblocks, to(d.valid), dslots, to(d.stash_rows), to(d.bias), to(d.query_mask)
        )
    stash = plan.stash
    if stash is not None and device.type != "cpu":
        stash = dataclasses.replace(
            stash, write_q=to(stash.write_q), write_at=to(stash.write_at), flush_row=to(stash.flush_row)
        )
    return StepPlan(reset, packs, merges, to(plan.reset_positions), heavy, decode, stash)


def _mover(device: torch.device) -> Any:
    def to(t: torch.Tensor | None) -> Any:
        return None if t is None else t.to(device)

    return to


# --------------------------------------------------------------------------------------------
# The builder
# --------------------------------------------------------------------------------------------


class PolicyBuilderMixin:
    """Mixed in before a stock metadata builder: with a policy, the sequence above; without one
    (or for layers no policy governs), the stock ``build`` unchanged.

    A backend sets ``backend`` (its :class:`PolicyBackendMixin` class: what it can serve) and
    ``metadata_cls`` (its stock metadata class with the fields ``cam_plan`` and ``cam_waves``).
    """

    backend: ClassVar[type[PolicyBackendMixin]]
    metadata_cls: ClassVar[type]

    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: Any) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)  # type: ignore[call-arg]
        policy = policy_from_vllm_config(vllm_config)
        if policy is not None and (
            getattr(self, "is_cross_attention", False) or getattr(self, "is_encoder_only_attention", False)
        ):
            policy = None  # policies govern the decoder's self-attention cache only
        if policy is not None:
            problems = self.backend.policy_problems(vllm_config, policy, kv_cache_spec)
            if problems:
                raise ValueError(f"KV policy {policy.name!r} cannot run: {'; '.join(problems)}")
        self._set_policy(policy, allows_full(vllm_config), defer_decodes=True)

    def _set_policy(self, policy: KVPolicy | None, allow_full: bool, defer_decodes: bool) -> None:
        """The builder's policy and per-step helpers (also how tests make one without an engine);
        ``defer_decodes``: deferred scoring of decode queries (``query_stash``), which an engine
        always uses (the tests compare both with the reference)."""
        if policy is not None and hasattr(self, "supports_update_block_table"):
            # metadata cached for another KV-cache group must not be re-used with that group's
            # (uncompacted) block table
            self.supports_update_block_table = False
        self.policy = policy
        self.allow_full = allow_full  # per-request full cache (request_policy.py)
        self.defer_decodes = defer_decodes  # deferred scoring of decode queries (query_stash.py)
        self.planner = None if policy is None else planner_for(policy)  # which queries are scored
        self.stash_planner: StashPlanner | None = None
        if defer_decodes and policy is not None and defers_decodes(policy):
            self.stash_planner = StashPlanner(self.block_size)  # type: ignore[attr-defined]

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        stock = super().build  # type: ignore[misc]
        if self.policy is None:
            return stock(common_prefix_len, common_attn_metadata, fast_build)
        policy, cm = self.policy, common_attn_metadata
        if isinstance(cm.causal, torch.Tensor) or not cm.causal or cm.mm_req_doc_ranges:
            raise ValueError(
                "a KV policy serves causal decoder attention only; this batch has bidirectional "
                "attention (an encoder or multimodal ranges): serve this model without --kv-policy"
            )
        step = step_requests.current(cm.num_reqs, host_seq_lens(cm))
        full = step_requests.full_of(step) if self.allow_full else None  # rows keeping the full cache
        window, layout = step_requests.own_windows(policy, step)  # rows with a smaller window of their own
        hold = step_requests.holds_of(step, policy, self.allow_full)  # rows whose prompt is held until read
        held = policy.eviction.held if policy.eviction.hold_span else None  # a bounded hold
        tokens = step_tokens(cm, full, window, layout, hold, held)
        seeds = step_requests.seeds_of(step) if policy.merge is not None else None
        stash = None
        if step is not None and self.stash_planner is not None:
            stash = self.stash_planner.plan(tokens.query_lens.tolist(), tokens.context_lens.tolist(), step)
        waves = split_waves(policy, tokens)
        if len(waves) == 1:
            meta, plan = self._build_one(common_prefix_len, cm, tokens, fast_build, seeds, stash)
            parts = None
        else:  # the heavy region is chosen (or the leaving block merged) between waves
            meta, _ = self._build_one(common_prefix_len, cm, tokens, fast_build, plan=False)
            plan = None
            device = cm.block_table_tensor.device
            parts = [
                WavePart(
                    w.rows.to(device),
                    *self._build_one(
                        common_prefix_len,
                        wave_common_metadata(cm, w),
                        w.tokens,
                        fast_build,
                        None if seeds is None else [seeds[i] for i in w.requests.tolist()],
                        stash_for_wave(stash, w) if i == 0 else None,  # every request starts in wave 0
                    ),
                )
                for i, w in enumerate(waves)
            ]
        fields = {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta)}
        return self.metadata_cls(**fields, cam_plan=plan, cam_waves=parts)

    def _build_one(
        self,
        common_prefix_len: int,
        cm: Any,
        tokens: StepTokens,
        fast_build: bool,
        seeds: list[int | None] | None = None,
        stash: StashStep | None = None,
        plan: bool = True,
    ) -> tuple[Any, StepPlan | None]:
        """Stock metadata of the batch (or wave) compacted to the retained blocks, and its plan."""
        policy = self.policy
        assert policy is not None
        block_size = self.block_size  # type: ignore[attr-defined]
        kernel_cm = compact_common_metadata(policy.eviction.block_retained, cm, block_size, tokens)
        meta = super().build(common_prefix_len, kernel_cm, fast_build)  # type: ignore[misc]
        if not (plan and policy.tracks_scores):
            return meta, None
        step_plan = plan_step(
            policy, tokens, cm, block_size, seeds=seeds, stash=stash, defer_decodes=self.defer_decodes,
            planner=self.planner,
        )  # fmt: skip
        return meta, step_plan
