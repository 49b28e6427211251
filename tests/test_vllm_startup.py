"""Start-up validation: every configuration a KV policy cannot serve fails with the problem and
the fix, through ``vllm.LLM`` and through a real ``vllm serve`` process. Nothing falls back to
full attention silently."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm_helpers import engine_env, make_llm, make_tiny_model, vllm_command  # noqa: E402

from cam_vllm.vllm_plugin.startup import KVPolicyStartupError, check_kv_cache_config, model_problems  # noqa: E402

TESTS_DIR = Path(__file__).parent


# ------------------------------------------------------------------------------ no engine


def _model(**kw):
    base = dict(
        runner_type="generate",
        is_encoder_decoder=False,
        use_mla=False,
        is_attention_free=False,
        is_hybrid=False,
        is_multimodal_model=False,
        is_diffusion=False,
        rswa_window=None,
        architectures=["XForCausalLM"],
        hf_text_config=SimpleNamespace(),
        get_sliding_window=lambda: None,
    )
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize(
    "fields,expected",
    [
        ({}, None),
        ({"is_encoder_decoder": True}, "encoder-decoder"),
        ({"use_mla": True}, "multi-head latent attention"),
        ({"is_hybrid": True}, "state-space"),
        ({"is_attention_free": True}, "no attention layers"),
        ({"is_multimodal_model": True}, "multimodal"),
        ({"runner_type": "pooling"}, "'pooling' model"),
        (
            {"hf_text_config": SimpleNamespace(layer_types=["full_attention", "sliding_attention"])},
            "not full attention (sliding_attention)",
        ),
        ({"get_sliding_window": lambda: 4096}, "sliding-window attention (sliding_window=4096)"),
        (
            {"get_sliding_window": lambda: 4096, "hf_text_config": SimpleNamespace(use_sliding_window=False)},
            None,
        ),
        ({"hf_text_config": SimpleNamespace(attention_chunk_size=8192)}, "chunked local attention"),
    ],
)
def test_model_problems(fields: dict, expected: str | None) -> None:
    problems = model_problems(_model(**fields))
    if expected is None:
        assert problems == []
    else:
        assert len(problems) == 1 and expected in problems[0], problems


def test_engine_core_refuses_layers_without_the_policy_spec() -> None:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

    config = SimpleNamespace(
        additional_config={"kv_policy": {"policy": "streaming", "window_tokens": 64}},
        cache_config=SimpleNamespace(block_size=32),
        model_config=SimpleNamespace(max_model_len=1024),
    )
    plain = FullAttentionSpec(block_size=32, num_kv_heads=2, head_size=32, dtype=torch.float32)
    kv = KVCacheConfig(
        num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.attn"], plain)]
    )
    with pytest.raises(KVPolicyStartupError, match=r"FullAttentionSpec for model.layers.0.attn"):
        check_kv_cache_config(config, kv)


# ------------------------------------------------------------------------------ vllm.LLM

BAD_SETTINGS = [
    ({"policy": "h3o"}, {}, ["unknown KV policy 'h3o'", "choose one of", "cam-h2o", "Fix:"]),
    (
        {"policy": "h2o", "heavy_tokens": 48, "window_tokens": 64},
        {},
        ["heavy tokens (48) must be a non-negative multiple of the block size 32; use 32 or 64", "Fix:"],
    ),
    (
        {"policy": "cam-h2o", "budget": 0.05},
        {"max_model_len": 1024},
        ["budget 0.05 of 1024 tokens", "each needs at least one block of 32 tokens", "Fix: raise the budget"],
    ),
    (
        {"policy": "corm", "window_tokens": 64, "score_history": 100},
        {},
        ["score_history", "less than or equal to 62", "Fix:"],
    ),
    (
        {"policy": "streaming", "window_tokens": 64, "heavy_tokens": 64},
        {},
        ["heavy_tokens applies to score-driven policies", "Fix:"],
    ),
    (
        {"policy": "tova", "window_tokens": 64},
        {"tensor_parallel_size": 2},
        ["tova chooses one set of tokens per layer", "Fix: --tensor-parallel-size 1"],
    ),
    (
        {"policy": "h2o", "window_tokens": 64},
        {"tensor_parallel_size": 4},
        ["replicates the model's 2 KV heads", "Fix: --tensor-parallel-size <= 2"],
    ),
    (
        {"policy": "streaming", "sink_tokens": 64, "window_tokens": 64},
        {},
        ["sink tokens (64) must be fewer than window tokens (64)", "Fix:"],
    ),
    (
        {"policy": "streaming", "window_tokens": 100},
        {},
        ["window of 100 tokens is not a multiple of the block size 32; use 96 or 128", "Fix:"],
    ),
    (
        {"policy": "streaming", "sink_tokens": 0, "window_tokens": 16},
        {},
        ["smaller than one block (32 tokens)", "Fix:"],
    ),
    (
        {"policy": "cam-streaming", "budget": 0.01},
        {"max_model_len": 1024},
        ["budget 0.01 of 1024 tokens", "hold at least one block of 32 tokens", "Fix:"],
    ),
    (
        {"policy": "streaming", "window_tokens": 64},
        {"enable_prefix_caching": True},
        ["prefix caching were both requested", "Fix: drop --enable-prefix-caching"],
    ),
    (
        {"policy": "snapkv", "window_tokens": 32, "observation_window": 64},
        {},
        ["observation window of 64 queries is longer than the window of 32 tokens", "Fix: lower"],
    ),
    (
        {"policy": "snapkv", "window_tokens": 64, "pooling_kernel": 8},
        {},
        ["pooling_kernel must be odd", "use 7 or 9"],
    ),
    (
        {"policy": "snapkv", "window_tokens": 64, "prompt_hold_tokens": 100},
        {},
        ["prompt_hold_tokens (100) must be a multiple of the block size 32", "= 160 tokens", "use 192"],
    ),
    (
        {"policy": "cam-streaming", "window_tokens": 64, "prompt_hold": True},
        {},
        ["prompt_hold applies to score-driven policies", "not 'cam-streaming'"],
    ),
]


@pytest.mark.engine
@pytest.mark.parametrize("settings,engine_kwargs,fragments", BAD_SETTINGS)
def test_bad_settings_through_llm(tmp_path_factory, settings, engine_kwargs, fragments) -> None:
    model = _tiny(tmp_path_factory)
    with pytest.raises(KVPolicyStartupError) as info:
        make_llm(model, block_size=32, additional_config={"kv_policy": settings}, **engine_kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


_TINY: dict[str, Path] = {}


def _tiny(tmp_path_factory, kind: str = "llama", **overrides) -> Path:
    key = kind + repr(sorted(overrides.items()))
    if key not in _TINY:
        _TINY[key] = make_tiny_model(tmp_path_factory.mktemp(kind), kind, weights=False, **overrides)
    return _TINY[key]


@pytest.mark.engine
@pytest.mark.parametrize(
    "kind,overrides,fragments",
    [
        (
            "mistral",
            {"sliding_window": 64},
            ["sliding-window attention (sliding_window=64)", "--hf-overrides '{\"sliding_window\": null}'"],
        ),
        (
            "deepseek_v3",
            {
                "kv_lora_rank": 32,
                "q_lora_rank": None,
                "qk_rope_head_dim": 16,
                "qk_nope_head_dim": 16,
                "v_head_dim": 32,
                "n_routed_experts": 4,
                "num_experts_per_tok": 2,
                "first_k_dense_replace": 2,
            },
            ["multi-head latent attention (MLA)"],
        ),
    ],
)
def test_unsupported_models_through_llm(tmp_path_factory, kind, overrides, fragments) -> None:
    model = _tiny(tmp_path_factory, kind, **overrides)
    policy = {"policy": "cam-streaming", "window_tokens": 64}
    with pytest.raises(KVPolicyStartupError) as info:
        make_llm(model, block_size=32, additional_config={"kv_policy": policy})
    text = str(info.value)
    for fragment in fragments + ["cannot serve model", "plain decoder-only full-attention models"]:
        assert fragment in text


# ------------------------------------------------------------------------------ vllm serve


def _serve(model: Path, *flags: str, timeout: int = 400) -> subprocess.CompletedProcess:
    engine_env()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")])
    cmd = [
        *vllm_command(),
        "serve",
        str(model),
        "--port",
        "0",
        "--enforce-eager",
        "--dtype",
        "float32",
        "--gpu-memory-utilization",
        "0.3",
        "--block-size",
        "32",
        *flags,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.engine
def test_serve_refuses_bad_window_before_starting(tmp_path_factory) -> None:
    done = _serve(_tiny(tmp_path_factory), "--kv-policy", "cam-streaming", "--kv-window-tokens", "100")
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "cam-vllm: KV policy 'cam-streaming' cannot run with block size 32" in out
    assert "use 96 or 128" in out
    assert "EngineCore" not in out  # refused in the API server, no engine process started


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_serve_engine_core_refuses_silent_full_attention(tmp_path_factory) -> None:
    """The workers report plain full-attention specs (cam-vllm's backend inactive there): the
    engine core refuses, and the message reaches the user of `vllm serve`."""
    model = make_tiny_model(tmp_path_factory.mktemp("tiny-weights"))
    done = _serve(
        model,
        "--kv-policy",
        "streaming",
        "--kv-window-tokens",
        "64",
        "--max-model-len",
        "512",
        "--num-gpu-blocks-override",
        "32",
        "--worker-cls",
        "vllm_plain_spec_worker.PlainSpecWorker",
    )
    assert done.returncode != 0
    out = done.stdout + done.stderr
    assert "cam-vllm: KV policy 'streaming' is configured but not every attention layer uses it" in out
    assert "FullAttentionSpec for model.layers.0.self_attn.attn" in out


@pytest.mark.engine
@pytest.mark.parametrize(
    "extra,message",
    [
        (
            {"speculative_config": {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}},
            "speculative decoding is not supported with a KV policy",
        ),
        (
            {"kv_transfer_config": {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}},
            "KV transfer / offloading connectors are not supported",
        ),
        (
            {"decode_context_parallel_size": 2, "tensor_parallel_size": 4},
            "decode/prefill context parallelism is not supported",
        ),
        ({"kv_sharing_fast_prefill": True}, "--kv-sharing-fast-prefill is not supported"),
        ({"pipeline_parallel_size": 2}, "Fix: --pipeline-parallel-size 1"),
    ],
    ids=[
        "speculative-decoding",
        "kv-connector",
        "decode-context-parallel",
        "kv-sharing",
        "pipeline-parallel",
    ],
)
def test_set_ups_a_policy_cannot_serve_are_refused_by_name(tmp_path_factory, extra, message) -> None:
    """vLLM's own EngineArgs.create_engine_config (what `vllm serve` and `vllm.LLM` call before any
    process starts) refuses each set-up, naming it."""
    from vllm.engine.arg_utils import EngineArgs

    engine_env()
    from cam_vllm.plugin import register

    register()
    args = EngineArgs(
        model=str(_tiny(tmp_path_factory)),
        dtype="float32",
        block_size=32,
        max_model_len=2048,
        enforce_eager=True,
        additional_config={"kv_policy": {"policy": "cam-streaming", "window_tokens": 64}},
        **extra,
    )
    with pytest.raises(KVPolicyStartupError, match=re.escape(message)):
        args.create_engine_config()
