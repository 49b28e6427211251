"""Shared helpers for the tests that start a real vLLM engine (CPU build).

Importable without vLLM (engine tests skip when it is missing). Engines are expensive (~20 s each
on a 2-core runner): build one per configuration in a module-scoped fixture and share it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import random
from collections.abc import Iterator
from pathlib import Path

VOCAB_SIZE = 1000
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def engine_env() -> None:
    """Process environment a CPU engine needs here (set before building an engine)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _corpus(n_lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "dor", "len", "st"]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(600)]
    words += ["the", "a", "of", "and", "to", "in", "is", "it", "that", "was", "for", "on", "are"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 30))) for _ in range(n_lines)]


def make_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer (~850 tokens) trained on a synthetic corpus (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK)
    fast.save_pretrained(str(path))


def make_tiny_model(path: Path, model_type: str = "llama", weights: bool = True, **overrides) -> Path:
    """A tiny random decoder (2 layers, hidden 64, 4 heads of 32, 2 KV heads) plus tokenizer.

    ``model_type`` picks the transformers config (llama, mistral, qwen2, ...); ``overrides`` go
    into the config (e.g. ``sliding_window=64``). ``weights=False`` writes only config.json and
    the tokenizer: enough for start-up checks that fail before weights load.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    fields = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # the CPU kernels refuse head size 16
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    if not weights:
        config.architectures = [f"{type(config).__name__.removesuffix('Config')}ForCausalLM"]
        config.save_pretrained(str(path))
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    return path


# Bigger than make_tiny_model's default and with peaky attention, so that eviction and merging
# visibly change greedy outputs; head_dim 64 like SmolLM2.
PEAKY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, head_dim=64, initializer_range=0.08)


def make_peaky_model(path: Path | str, **overrides) -> Path:
    """The tiny Llama the engine tests and the worker benchmark share (see ``PEAKY``)."""
    return make_tiny_model(path, **{**PEAKY, **overrides})


# --------------------------------------------------------------------------------------------
# Engines and KV accounting
# --------------------------------------------------------------------------------------------

BASE_ENGINE_KWARGS = dict(
    enforce_eager=True,
    dtype="float32",
    gpu_memory_utilization=0.3,
    disable_log_stats=False,  # scheduler stats (KV usage, running requests) every step
    seed=0,
)


@contextlib.contextmanager
def temp_env(env: dict[str, str] | None) -> Iterator[None]:
    """Set ``env`` for the duration (an engine's spawned processes read it at start), then restore."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def make_llm(model: Path | str, env: dict[str, str] | None = None, **kwargs):
    """A ``vllm.LLM`` on the CPU build with the test defaults (call under ``__main__`` guards:
    the engine core is a spawned process); ``env`` is set only while it starts (:func:`temp_env`)."""
    engine_env()
    from vllm import LLM

    with temp_env(env):
        return LLM(str(model), **{**BASE_ENGINE_KWARGS, **kwargs})


@contextlib.contextmanager
def running(llm) -> Iterator:
    """Yield ``llm``; shut its engine core down afterwards, also when the test failed."""
    try:
        yield llm
    finally:
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm


def metric_values(llm) -> dict[str, float]:
    """This engine's gauges from vLLM's metrics snapshot (``LLM.get_metrics``)."""
    values: dict[str, float] = {}
    for metric in llm.get_metrics():
        value = getattr(metric, "value", None)
        if isinstance(value, (int, float)):
            values[metric.name] = float(value)
    return values


def blocks_in_use(llm, num_blocks: int) -> int:
    """KV blocks held by requests, from vLLM's own accounting: ``vllm:kv_cache_usage_perc`` is
    ``1 - free / (num_blocks - 1)`` (the block pool's free count; the null block excluded)."""
    usage = metric_values(llm)["vllm:kv_cache_usage_perc"]
    return round(usage * (num_blocks - 1))


def run_sampled(llm, prompts: list[list[int]], params, num_blocks: int, on_step=None) -> list[dict]:
    """Submit ``prompts`` (token ids) and step the engine to the end, sampling after every step:
    blocks in use and running / waiting requests (scheduler stats of that step).

    ``on_step(step, sample)`` may abort requests (``llm.llm_engine.abort_request``).
    """
    engine = llm.llm_engine
    for i, ids in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": ids}, params)
    samples: list[dict] = []
    step = 0
    while engine.has_unfinished_requests():
        engine.step()
        values = metric_values(llm)
        sample = {
            "step": step,
            "blocks": round(values["vllm:kv_cache_usage_perc"] * (num_blocks - 1)),
            "running": int(values.get("vllm:num_requests_running", 0)),
            "waiting": int(values.get("vllm:num_requests_waiting", 0)),
        }
        samples.append(sample)
        if on_step is not None:
            on_step(step, sample)
        step += 1
    return samples


def token_prompts(n: int, length: int, vocab: int = 800, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


_HF_MODELS: dict = {}


def reference_greedy(model_path, policy, prompt: list[int], max_tokens: int, chunk: int | None = None):
    """Greedy tokens, their logprobs and the final cache of the reference engine (transformers,
    float32; the model loaded once per path), the prompt fed in ``chunk``-token steps (None: one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from cam_vllm.reference.engine import ReferenceEngine

    key = str(model_path)
    if key not in _HF_MODELS:
        _HF_MODELS[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    eng = ReferenceEngine(_HF_MODELS[key], policy)
    eng.start(len(prompt))
    chunk = chunk or len(prompt)
    for s in range(0, len(prompt), chunk):
        logits = eng.feed(prompt[s : s + chunk])
    tokens, lps = [], []
    while True:
        logp = torch.log_softmax(logits[-1], dim=-1)
        tokens.append(int(logp.argmax()))
        lps.append(float(logp[tokens[-1]]))
        if len(tokens) == max_tokens:
            return tokens, lps, eng.cache
        logits = eng.feed(tokens[-1:])


# --------------------------------------------------------------------------------------------
# `vllm serve` processes (cam_vllm.launch: the benchmark command starts its servers the same way)
# --------------------------------------------------------------------------------------------

from cam_vllm.launch import served, vllm_command  # noqa: E402,F401
