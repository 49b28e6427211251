"""Long-context retrieval ("needle in a haystack") with a KV budget.

A sentence holding a fact (a passcode of one of several colored doors, a random number) is
planted at a given depth of a haystack of Paul Graham essays (at the sentence boundary nearest
that depth); the question comes at the end, in SmolLM2-Instruct's chat template. The answer is
greedy; it is correct when the passcode's digits appear in it. The budget is a fraction of the
whole prompt (sinks + recent window), so StreamingLLM keeps the needle only when it is recent;
CaM can only help by carrying its information in merged values.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from cam_vllm.config import KVPolicyConfig
from cam_vllm.data import long_text
from cam_vllm.eval.engines import Engine

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
_COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden")


@dataclass(frozen=True)
class NeedleSample:
    depth: float
    index: int
    answer: str
    prompt_ids: tuple[int, ...]


def _haystack_sentences(num_chars: int, offset: int) -> list[str]:
    text = long_text("essays", min_chars=offset + num_chars + 10_000)
    text = re.sub(r"\s+", " ", text)[offset:]
    start = text.find(". ") + 2  # begin at a sentence
    sentences = re.split(r"(?<=[.!?]) ", text[start:])
    out, total = [], 0
    for s in sentences:
        if total >= num_chars:
            break
        out.append(s)
        total += len(s) + 1
    return out


def make_samples(
    tokenizer, haystack_tokens: int = 1024, depths=DEPTHS, per_depth: int = 4, seed: int = 1234
) -> list[NeedleSample]:
    """``per_depth`` samples per depth: each a different haystack offset, door and passcode."""
    rng = random.Random(seed)
    samples = []
    for i in range(per_depth):
        color = _COLORS[i % len(_COLORS)]
        code = str(rng.randrange(1000, 10000))
        needle = f"The passcode for the {color} door is {code}."
        question = f"What is the passcode for the {color} door? Answer with the number only."
        offset = rng.randrange(0, 200_000)
        sentences = _haystack_sentences(num_chars=5 * haystack_tokens, offset=offset)
        for depth in depths:
            hay = _fit(tokenizer, sentences, needle, question, depth, haystack_tokens)
            samples.append(NeedleSample(depth, i, code, tuple(hay)))
    return samples


def _prompt(tokenizer, sentences: list[str], needle: str, question: str, depth: float) -> list[int]:
    at = round(depth * len(sentences))
    body = " ".join(sentences[:at] + [needle] + sentences[at:])
    messages = [{"role": "user", "content": f"{body}\n\n{question}"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _fit(tokenizer, sentences, needle, question, depth, haystack_tokens) -> list[int]:
    """Drop trailing haystack sentences until the haystack has at most ``haystack_tokens`` tokens."""
    lo, hi = 1, len(sentences)
    base = len(_prompt(tokenizer, [], needle, question, 0.0))
    while lo < hi:  # largest number of sentences that fits
        mid = (lo + hi + 1) // 2
        if len(_prompt(tokenizer, sentences[:mid], needle, question, depth)) - base <= haystack_tokens:
            lo = mid
        else:
            hi = mid - 1
    return _prompt(tokenizer, sentences[:lo], needle, question, depth)


def is_correct(answer: str, generated: str) -> bool:
    """True when one of the numbers in ``generated`` (digits possibly split by spaces, as small
    models sometimes write them) is exactly the passcode; "1234567890" does not contain "3456"."""
    numbers = [re.sub(r"[ ,]", "", n) for n in re.findall(r"\d[\d ,]*\d|\d", generated)]
    return answer in numbers


def evaluate(engine: Engine, tokenizer, samples, cfg: KVPolicyConfig, seed: int, max_new_tokens: int = 24):
    """Accuracy overall and per depth, plus every generated answer for the record."""
    hits: dict[float, list[float]] = {}
    examples = []
    for s in samples:
        out = tokenizer.decode(
            engine.generate(s.prompt_ids, max_new_tokens, cfg, seed), skip_special_tokens=True
        )
        hits.setdefault(s.depth, []).append(float(is_correct(s.answer, out)))
        examples.append({"depth": s.depth, "answer": s.answer, "generated": out})
    flat = [h for v in hits.values() for h in v]
    metrics = {"acc": sum(flat) / len(flat)}
    metrics.update({f"acc@{d:g}": sum(v) / len(v) for d, v in sorted(hits.items())})
    return metrics, examples
