"""The retrieval suite's samples through NVIDIA kvpress, the peer a user would try instead.

    .venv/bin/python scripts/kvpress_ruler.py [--tokens 2048] [--limit 12] [--out docs/eval]

Runs the same samples as ``cam-vllm eval ruler`` (same tokens: the evaluation seed, the prepared
SmolLM2, float32) through kvpress's own pipeline in a virtual environment of its own
(``--venv``, made on first use: kvpress pins transformers < 5.3, which vLLM 0.32 cannot share),
with each press at the same kept fraction of the prompt, batch 1, and scores the answers with
``cam_vllm.eval.ruler.score``. Two placements of the question:

* ``appended``: kvpress's pipeline as documented: the context is compressed, then the question
  (and the answer prefix) is appended uncompressed, so the question's tokens never compete and a
  press cannot see them while it chooses (except through what it keeps);
* ``inside``: the question is part of the compressed context and only the end of the chat turn
  and the answer prefix are appended, as in a serving engine, where the prompt is the prompt.

The kept fraction is of kvpress's context (the prompt up to the split), so ``appended`` keeps a
few tokens fewer than ``inside`` for the same fraction. Writes ``kvpress-ruler-<tokens>.json``
(rows like the eval's) and prints a table. The worker half (``--worker``) runs inside that
environment and imports nothing of cam-vllm.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

KVPRESS = "kvpress==0.5.5"
# the presses compared, as a user would construct them (kvpress defaults), plus SnapKV with the
# pooling kernel cam-vllm's snapkv uses (chosen on cam-vllm's dev samples, not these)
PRESSES = ("none", "snapkv", "snapkv-k31", "expected_attention", "streaming_llm", "tova", "knorm")
# not a kvpress press: snapkv-k31's selection, then the kept values refitted by least squares over
# the observation queries (Attention Matching's value fit, without its per-slot bias); run only
# when asked (``--presses snapkv-k31-refit --ridge ...``), a trial of the merge rule it would be
TRIALS = ("snapkv-k31-refit",)
PLACEMENTS = ("appended", "inside")


def _press(name: str, ratio: float, ridge: float = 0.0):  # noqa: ANN202 (kvpress types: worker only)
    import kvpress

    if name == "none":
        return None
    if name == "snapkv-k31-refit":
        return _refit_press()(compression_ratio=ratio, kernel_size=31, ridge=ridge)
    make = {
        "snapkv": lambda: kvpress.SnapKVPress(compression_ratio=ratio),
        "snapkv-k31": lambda: kvpress.SnapKVPress(compression_ratio=ratio, kernel_size=31),
        "expected_attention": lambda: kvpress.ExpectedAttentionPress(compression_ratio=ratio),
        "streaming_llm": lambda: kvpress.StreamingLLMPress(compression_ratio=ratio),
        "tova": lambda: kvpress.TOVAPress(compression_ratio=ratio),
        "knorm": lambda: kvpress.KnormPress(compression_ratio=ratio),
    }
    return make[name]()


def _refit_press():  # noqa: ANN202
    """SnapKV's choice, then per KV head the kept values V' minimising
    ``||A V' - O||^2 + lam ||V' - V||^2``: ``O`` the full cache's attention output of the observation
    queries (all query heads of the group), ``A`` their attention over the kept keys alone, ``lam``
    ``ridge`` times the mean of ``diag(A^T A)`` (the pull towards the original values)."""
    import math
    from dataclasses import dataclass

    import kvpress
    import torch
    from kvpress.presses.scorer_press import compute_n_kept
    from kvpress.utils import get_prerope_query_states
    from transformers.models.llama.modeling_llama import rotate_half

    @dataclass
    class RefitSnapKV(kvpress.SnapKVPress):
        ridge: float = 0.01

        def compress(self, module, hidden_states, keys, values, attentions, kwargs):  # noqa: ANN001, ANN202
            if self.compression_ratio == 0:
                return keys, values
            scores = self.score(module, hidden_states, keys, values, attentions, kwargs)
            b, h, length, d = keys.shape
            idx = scores.topk(compute_n_kept(length, self.compression_ratio), dim=-1).indices
            idx = idx.sort(dim=-1).values  # [B, H, n]
            w = self.window_size
            q = get_prerope_query_states(module, hidden_states[:, -w:])  # [B, Hq, w, D]
            cos, sin = kwargs["position_embeddings"]
            cos, sin = cos[:, -w:].unsqueeze(1), sin[:, -w:].unsqueeze(1)
            q = q * cos + rotate_half(q) * sin
            g = q.shape[1] // h
            q = q.reshape(b, h, g * w, d).float()  # query head j reads KV head j // g
            logits = q @ keys.float().transpose(-1, -2) / math.sqrt(d)  # [B, H, gw, L]
            qpos = (length - w + torch.arange(w)).repeat(g)
            logits = logits.masked_fill(torch.arange(length)[None, :] > qpos[:, None], float("-inf"))
            full_out = torch.softmax(logits, dim=-1) @ values.float()  # [B, H, gw, D]
            a = torch.softmax(logits.gather(-1, idx.unsqueeze(2).expand(-1, -1, g * w, -1)), dim=-1)
            gather = idx.unsqueeze(-1).expand(-1, -1, -1, d)
            kept_v = values.gather(2, gather).float()
            ata = a.transpose(-1, -2) @ a  # [B, H, n, n]
            lam = self.ridge * ata.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
            eye = torch.eye(ata.shape[-1], dtype=ata.dtype)
            chol = torch.linalg.cholesky(ata + lam * eye)  # (torch.linalg.solve stalled in this hook)
            new_v = torch.cholesky_solve(a.transpose(-1, -2) @ full_out + lam * kept_v, chol)
            return keys.gather(2, gather).contiguous(), new_v.to(values.dtype).contiguous()

    return RefitSnapKV


def worker(jobs_file: str, out_file: str) -> None:
    """Inside the kvpress environment: every (sample, press, kept fraction, placement)."""
    import kvpress  # noqa: F401  (registers the kv-press-text-generation pipeline)
    import torch
    from tqdm import tqdm
    from transformers import pipeline

    jobs = json.loads(Path(jobs_file).read_text())
    torch.set_num_threads(jobs["threads"])
    pipe = pipeline("kv-press-text-generation", model=jobs["model"], device="cpu", dtype=torch.float32)
    out = []
    for run in tqdm(jobs["runs"], desc="kvpress", disable=jobs["quiet"]):
        s = jobs["samples"][run["sample"]]
        ids = s["ids"]
        cut = s["question_at"] if run["placement"] == "appended" else s["turn_end"]
        inputs = {
            "context_ids": torch.tensor([ids[:cut]]),
            "questions_ids": [torch.tensor([ids[cut:]])],
        }
        press = _press(run["press"], 1.0 - run["kept"], run.get("ridge") or 0.0)
        start = time.monotonic()
        with torch.inference_mode():
            answer = pipe._forward(inputs, max_new_tokens=jobs["max_new_tokens"], press=press)[0]
        out.append({**run, "generated": answer, "seconds": time.monotonic() - start})
    Path(out_file).write_text(json.dumps(out))


def _split(tokenizer, ids: list[int]) -> tuple[int, int]:
    """Token indices where the question (``\\n\\n`` + question) and the end of the user turn start."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != list(ids):
        raise RuntimeError("a sample does not re-tokenise to its own ids; cannot split it")
    end_char = text.rfind("<|im_end|>")
    q_char = text.rfind("\n\n", 0, end_char)
    starts = [a for a, _ in enc["offset_mapping"]]

    def first_at(c: int) -> int:  # the token holding character c
        return max(i for i, a in enumerate(starts) if a <= c)

    return first_at(q_char), first_at(end_char)


def _ensure_venv(venv: Path, quiet: bool) -> Path:
    py = venv / "bin" / "python"
    if py.exists():
        return py
    print(f"kvpress_ruler: making {venv} ({KVPRESS}, transformers < 5.3, torch CPU)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    import torch

    pins = [KVPRESS, "transformers<5.3", f"torch=={torch.__version__}"]
    subprocess.run([str(py), "-m", "pip", "install", *(["-q"] if quiet else []), *pins], check=True)
    return py


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--limit", type=int, default=12, help="samples per task")
    p.add_argument("--ruler-tasks", nargs="+", default=["niah_single_number", "niah_multivalue"])
    p.add_argument("--kept", nargs="+", type=float, default=[0.1, 0.25], help="kept fractions")
    p.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES + TRIALS)
    p.add_argument(
        "--ridge", nargs="+", type=float, default=[0.1], help="snapkv-k31-refit: pulls towards the old values"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="sample seed (default: the evaluation seed; 97, DEV_SEED, to choose settings)",
    )
    p.add_argument("--placements", nargs="+", default=list(PLACEMENTS), choices=PLACEMENTS)
    p.add_argument("--venv", type=Path, default=Path(".venv-kvpress"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("docs/eval"))
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--worker", nargs=2, metavar=("JOBS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return

    import tempfile

    from cam_vllm.eval.ruler import EVAL_SEED, make_samples, score
    from cam_vllm.eval.runner import environment
    from cam_vllm.models import prepare_model

    seed = EVAL_SEED if args.seed is None else args.seed
    model = prepare_model()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    samples = []
    for task in args.ruler_tasks:
        for s in make_samples(tok, task, args.tokens, args.limit, seed):
            q_at, end_at = _split(tok, list(s.prompt_ids))
            samples.append(
                {
                    "task": task,
                    "answers": list(s.answers),
                    "ids": list(s.prompt_ids),
                    "question_at": q_at,
                    "turn_end": end_at,
                }
            )
    runs = [{"sample": i, "press": "none", "kept": 1.0, "placement": "inside"} for i in range(len(samples))]
    for press in (x for x in args.presses if x != "none"):
        for ridge in args.ridge if press in TRIALS else [None]:
            for kept in args.kept:
                for placement in args.placements:
                    runs += [
                        {"sample": i, "press": press, "kept": kept, "placement": placement, "ridge": ridge}
                        for i in range(len(samples))
                    ]
    py = _ensure_venv(args.venv.resolve(), args.no_progress)
    with tempfile.TemporaryDirectory() as tmp:
        jobs = Path(tmp) / "jobs.json"
        got = Path(tmp) / "out.json"
        jobs.write_text(
            json.dumps(
                {
                    "model": str(model),
                    "samples": samples,
                    "runs": runs,
                    "max_new_tokens": 48,
                    "threads": args.threads,
                    "quiet": args.no_progress,
                }
            )
        )
        subprocess.run([str(py), __file__, "--worker", str(jobs), str(got)], check=True)
        results = json.loads(got.read_text())
    version = subprocess.run(
        [
            str(py),
            "-c",
            "import importlib.metadata as m; print(m.version('kvpress'), m.version('transformers'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    rows: dict[tuple, dict] = {}
    for r in results:
        s = samples[r["sample"]]
        name = r["press"] if r.get("ridge") is None else f"{r['press']}@{r['ridge']:g}"
        key = (s["task"], name, r["kept"], r["placement"])
        row = rows.setdefault(
            key,
            {
                "task": "ruler",
                "data": f"{s['task']}-{args.tokens}",
                "engine": "kvpress",
                "policy": name,
                "variant": r["placement"],
                "budget": None if r["press"] == "none" else r["kept"],
                "n_items": 0,
                "score": 0.0,
                "seconds": 0.0,
                "examples": [],
            },
        )
        got_score = score(s["answers"], r["generated"])
        row["n_items"] += 1
        row["score"] += got_score
        row["seconds"] += r["seconds"]
        row["examples"].append({"answers": s["answers"], "generated": r["generated"], "score": got_score})
    for row in rows.values():
        row["score"] /= row["n_items"]
    meta = {
        **environment("kvpress", "prepared SmolLM2-135M-Instruct"),
        "torch_threads": args.threads,
        "kvpress": version[0],
        "transformers": version[1],  # the kvpress environment's
        "dtype": "float32",
        "sample_seed": seed,
        "command": "python scripts/kvpress_ruler.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    tail = "" if seed == EVAL_SEED else f"-seed{seed}"
    path = args.out / f"kvpress-ruler-{args.tokens}{tail}.json"
    path.write_text(json.dumps({"meta": meta, "rows": list(rows.values())}, indent=1))
    print(f"{'task':24} {'press':20} {'placement':9} {'kept':>5} {'score':>6}")
    for (task, press, kept, placement), row in sorted(rows.items()):
        print(f"{task:24} {press:20} {placement:9} {kept:5.2f} {row['score']:6.2f}")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
