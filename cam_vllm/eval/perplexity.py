"""Long-text perplexity, token by token as the paper's language-modelling runs (PG-19) do.

The text is the first ``num_tokens`` tokens of the Paul Graham essays or of the Shakespeare
plays (:mod:`cam_vllm.data`), fed as one sequence; the budget is a fraction of ``num_tokens``
(sinks + recent window). Reported: perplexity over tokens 1..n-1 and the CaM merge rate.
"""

from __future__ import annotations

from dataclasses import dataclass

from cam_vllm.config import KVPolicyConfig
from cam_vllm.data import long_text
from cam_vllm.eval.engines import Engine, perplexity

SOURCES = ("essays", "shakespeare")


@dataclass(frozen=True)
class TextSample:
    source: str
    ids: tuple[int, ...]


def load_text(tokenizer, source: str = "essays", num_tokens: int = 1024) -> TextSample:
    text = long_text(source, min_chars=8 * num_tokens)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"][:num_tokens]
    if len(ids) < num_tokens:
        raise ValueError(f"the {source} text has only {len(ids)} tokens, asked for {num_tokens}")
    return TextSample(source, tuple(ids))


def evaluate(engine: Engine, sample: TextSample, cfg: KVPolicyConfig, seed: int, progress: bool = False):
    nlls = engine.token_nlls(sample.ids, cfg, seed, progress=progress)
    return {"ppl": perplexity(nlls)}, len(nlls)
