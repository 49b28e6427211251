"""What ``cam-vllm eval <task>`` does: load model and data, run the grid, write JSON + report."""

from __future__ import annotations

import argparse
import datetime as _dt
import logging
import shlex
import sys
from pathlib import Path

from cam_vllm.errors import CamVllmError
from cam_vllm.eval import multiple_choice as mc
from cam_vllm.eval import needle, perplexity, ruler
from cam_vllm.eval.results import write_json, write_report
from cam_vllm.eval.runner import MC_TASKS, environment, make_specs, run_grid
from cam_vllm.policies import merge_rule_of

log = logging.getLogger(__name__)

# The CI preset: the first 30 PIQA items (full cache: 22/30 right, no near ties), one budget,
# one seed, every policy; then 128 essay tokens of perplexity.
SMOKE = {"mc_task": "piqa", "limit": 30, "budgets": [0.5], "seeds": [0], "ppl_tokens": 128}


def build_engine(name: str, model, batch_tokens: int = 4096):
    """An engine on a loaded transformers model (the vLLM engine loads its own: run_command)."""
    if name == "reference":
        from cam_vllm.eval.engines import ReferenceBackend

        return ReferenceBackend(model)
    from cam_vllm.eval.parallel import ParallelBackend

    return ParallelBackend(model, batch_tokens=batch_tokens)


def mc_evaluator(engine, tokenizer, task: str, limit: int | None, progress: bool):
    items = mc.load_items(task, limit)
    requests = [mc.item_requests(tokenizer, it) for it in items]
    flat = [r for rs in requests for r in rs]
    metrics = mc.TASKS[task].metrics

    labels = [it.label for it in items]
    majority = max(labels.count(c) for c in set(labels)) / len(labels)

    def evaluate(cfg, seed):
        lls = engine.loglikelihoods(flat, cfg, seed, progress=progress)
        scores: dict[str, list[float]] = {m: [] for m in metrics}
        first = []  # did the model pick the first choice (acc's argmax)? shows a collapse to one answer
        i = 0
        for it in items:
            ll = lls[i : i + it.num_choices]
            s = mc.item_scores(it, ll)
            first.append(float(max(range(len(ll)), key=ll.__getitem__) == 0))
            i += it.num_choices
            for m in metrics:
                scores[m].append(s[m])
        out = {m: sum(v) / len(v) for m, v in scores.items()}
        out["picks_first"] = sum(first) / len(first)
        return out, {"n_requests": len(flat), "majority": majority}

    return evaluate, len(items)


def task_needs_scores(task: str) -> bool:
    """Zero-shot tasks score continuations with a per-request budget (not on vLLM)."""
    return task in MC_TASKS or task in ("mc", "smoke")


def run_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.task == "report":
        for p in write_report(out, img_dir=args.img):
            print(p)
        return 0

    import torch

    from cam_vllm.eval.engines import load_model

    torch.set_num_threads(max(1, args.threads))
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.engine == "vllm":
        from transformers import AutoTokenizer

        from cam_vllm.eval.vllm_engine import NO_ZERO_SHOT, VllmBackend
        from cam_vllm.models import prepare_model

        if task_needs_scores(args.task):
            raise CamVllmError(f"{args.task}: {NO_ZERO_SHOT}")
        path = args.model or prepare_model()
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        length = max(4096, -(-(args.tokens + 64) // 32) * 32)  # the longest prompt and its answer
        engine = VllmBackend(path, chunk=args.chunk, dtype=args.dtype, max_model_len=length, batch=args.batch)
    else:
        model, tokenizer = load_model(args.model, dtype)
        engine = build_engine(args.engine, model, args.batch_tokens)
    progress = not args.no_progress
    meta = environment(engine.name, args.model or "prepared SmolLM2-135M-Instruct")
    meta.update(
        {"command": "cam-vllm " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "dtype": args.dtype}
    )
    if args.engine == "vllm":
        meta.update({"vllm_block_size": engine.block_size, "vllm_prefill_chunk": engine.chunk})
    overrides = overrides_from_args(args)

    task = args.task
    budgets, seeds, limit = args.budgets, args.seeds, args.limit
    if task == "smoke":
        budgets, seeds, limit = SMOKE["budgets"], SMOKE["seeds"], SMOKE["limit"]
    specs = make_specs(args.policy, budgets, args.ablation, overrides, args.sinks)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = out / f"{args.name or task + '-' + stamp}.json"
    rows: list[dict] = []

    def save(row=None):
        if row is not None:
            rows.append(row)
        write_json(path, meta, rows)

    if task in ("ppl", "smoke"):
        sources = args.text if task == "ppl" else ["essays"]
        n = args.tokens if task == "ppl" else SMOKE["ppl_tokens"]
        for source in sources:
            sample = perplexity.load_text(tokenizer, source, n)

            def evaluate(cfg, seed, sample=sample):
                metrics, n_scored = perplexity.evaluate(engine, sample, cfg, seed, progress=progress)
                return metrics, {"n_tokens": n_scored + 1}

            run_grid(engine, "ppl", f"{source}-{n}", specs, seeds, evaluate, 1, progress, save)
    if task == "merge-stats":
        if engine.name != "parallel":
            raise CamVllmError("merge-stats needs --engine parallel")
        for source in args.text:
            sample = perplexity.load_text(tokenizer, source, args.tokens)

            def evaluate(cfg, seed, sample=sample):
                return engine.merge_diagnostics(sample.ids, cfg, seed), {"n_tokens": len(sample.ids)}

            cam_specs = [s for s in specs if merge_rule_of(s.policy) == "cam"]
            run_grid(
                engine,
                "merge-stats",
                f"{source}-{args.tokens}",
                cam_specs,
                seeds,
                evaluate,
                1,
                progress,
                save,
            )
    if task in MC_TASKS or task in ("mc", "smoke"):
        names = MC_TASKS if task == "mc" else ([SMOKE["mc_task"]] if task == "smoke" else [task])
        for name in names:
            evaluate, n_items = mc_evaluator(engine, tokenizer, name, limit, progress)
            run_grid(engine, name, "", specs, seeds, evaluate, n_items, progress, save)
    if task == "ruler":
        seed = ruler.DEV_SEED if args.dev else ruler.EVAL_SEED
        for name in args.ruler_tasks:
            samples_r = ruler.make_samples(tokenizer, name, args.tokens, limit or 10, seed=seed)

            def evaluate_r(cfg, seed, samples_r=samples_r):
                metrics, examples = ruler.evaluate(engine, tokenizer, samples_r, cfg, seed)
                return metrics, {"examples": examples, "sample_seed": samples_r and seed}

            data = f"{name}-{args.tokens}" + ("-dev" if args.dev else "")
            run_grid(engine, "ruler", data, specs, seeds, evaluate_r, len(samples_r), progress, save)
    if task == "needle":
        samples = needle.make_samples(tokenizer, args.tokens, args.depths, per_depth=limit or 4)

        def evaluate(cfg, seed):
            metrics, examples = needle.evaluate(engine, tokenizer, samples, cfg, seed)
            return metrics, {"examples": examples}

        run_grid(
            engine, "needle", f"haystack-{args.tokens}", specs, seeds, evaluate, len(samples), progress, save
        )
    save()
    if hasattr(engine, "close"):
        engine.close()
    log.info("wrote %s", path)
    for p in write_report(out, img_dir=args.img):
        log.info("wrote %s", p)
    print(path)
    return 0


def overrides_from_args(args: argparse.Namespace) -> dict:
    from cam_vllm.eval.runner import READING_KEYS  # imports torch: not at the CLI's start

    ov = {}
    names = ("block_size", "merge_targets", "merge_target_mode", "merge_similarity", "score_mode")
    for name in (*names, *READING_KEYS):
        if getattr(args, name) is not None:
            ov[name] = getattr(args, name)
    if args.merge_clamp is not None:
        ov["merge_clamp"] = tuple(args.merge_clamp)
    return ov
