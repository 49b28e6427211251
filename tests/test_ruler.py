"""The RULER-style retrieval suite: prompts, answers, scoring, and the CLI's view of it."""

from __future__ import annotations

import pytest

from cam_vllm.eval import ruler


def test_score_is_the_fraction_of_answers_found():
    assert ruler.score(["1234567"], "The number is 1234567.") == 1.0
    assert ruler.score(["abc", "def"], "ABC and something else") == 0.5
    assert ruler.score(["7e1f-aa"], "no") == 0.0


def test_the_suite_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, cam_vllm.eval.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_task_is_refused_by_name():
    import random

    with pytest.raises(ValueError, match="unknown retrieval task 'niah'"):
        ruler._spec("niah", random.Random(0))


@pytest.mark.model
@pytest.mark.parametrize("task", ruler.TASKS)
def test_samples_fit_their_length_and_hold_every_answer(prepared_model, task):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(prepared_model)
    samples = ruler.make_samples(tok, task, 512, 3)
    again = ruler.make_samples(tok, task, 512, 3)
    dev = ruler.make_samples(tok, task, 512, 3, seed=ruler.DEV_SEED)
    assert samples == again, "samples are a function of (task, length, seed)"
    assert {s.prompt_ids for s in samples}.isdisjoint({s.prompt_ids for s in dev}), "dev samples are others"
    for s in samples:
        assert 400 < len(s.prompt_ids) <= 512
        text = tok.decode(s.prompt_ids)
        question = text.rindex("<|im_start|>assistant")
        for a in s.answers:  # every answer is in the context, before the question
            assert a in text[:question]
        if task == "cwe":
            counts = {
                a: text[:question].count(f". {a} ") + text[:question].count(f". {a}\n") for a in s.answers
            }
            rest = [w for w in text[:question].split() if w.isalpha() and w not in s.answers]
            most_rare = max(rest.count(w) for w in set(rest))
            assert min(counts.values()) == 5 > most_rare == 2, "the common words are the frequent ones"
        assert ruler.score(s.answers, " ".join(s.answers)) == 1.0
    if task == "vt":  # the chain is planted in order: the value's variable first
        text = tok.decode(samples[0].prompt_ids)
        first = samples[0].answers[0]
        assert text.index(f"VAR {first} = ") < text.index(f"= VAR {first}.")


def test_the_report_plots_the_suite_and_leaves_dev_rows_out(tmp_path):
    from cam_vllm.eval.results import write_json, write_report

    def row(data, policy, budget, score, variant=""):
        return {
            "task": "ruler",
            "data": data,
            "engine": "vllm-chunk512",
            "policy": policy,
            "variant": variant,
            "budget": budget,
            "n_items": 12,
            "seeds": [],
            "metrics": {"score": {"mean": score, "std": 0.0, "values": [score]}},
        }

    rows = [row("niah_single_number-2048", "none", None, 1.0)]
    rows += [row("niah_single_number-2048", "snapkv", b, s) for b, s in ((0.1, 0.9), (0.25, 1.0))]
    write_json(tmp_path / "a.json", {}, rows)
    written = write_report(tmp_path)
    assert tmp_path / "vllm-ruler.png" in written
    text = (tmp_path / "results.md").read_text()
    assert "niah_single_number-2048" in text and "0.90" in text
    # dev rows alone give no plot (they choose settings; they are not results)
    (tmp_path / "vllm-ruler.png").unlink()
    write_json(tmp_path / "a.json", {}, [row("niah_single_number-2048-dev", "snapkv", 0.1, 0.5)])
    assert tmp_path / "vllm-ruler.png" not in write_report(tmp_path)


@pytest.mark.model
def test_the_kvpress_comparison_splits_each_prompt_at_its_question_and_turn_end(prepared_model):
    """scripts/kvpress_ruler.py hands kvpress the same token ids, cut where the question starts
    (kvpress appends it after compression) and where the user turn ends."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(__file__).resolve().parents[1] / "scripts" / "kvpress_ruler.py"
    spec = importlib.util.spec_from_file_location("kvpress_ruler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = AutoTokenizer.from_pretrained(prepared_model)
    for task in ("niah_single_number", "niah_multivalue"):
        for s in ruler.make_samples(tok, task, 512, 2):
            ids = list(s.prompt_ids)
            q, end = mod._split(tok, ids)
            assert 0 < q < end < len(ids)
            question = tok.decode(ids[q:end])
            assert question.startswith("\n\n") and question.rstrip().endswith("?"), question
            assert tok.decode(ids[end:]).startswith("<|im_end|>\n<|im_start|>assistant")
