"""Results: one JSON file per command, a markdown table and PNG plots over all of them.

A result file is ``{"meta": {...}, "rows": [row, ...]}``; a row is one (task, policy, variant,
budget) with its metrics aggregated over seeds::

    {"task": "copa", "engine": "reference", "policy": "cam-streaming", "variant": "cam",
     "budget": 0.2, "config": {...}, "seeds": [0, 1, 2, 3, 4], "n_items": 100,
     "metrics": {"acc": {"mean": 0.6, "std": 0.01, "values": [...]}}, "merge_rate": 0.8,
     "mean_budget": 0.21, "seconds": 12.3}

``std`` is the sample standard deviation over seeds (0 for a single seed).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path

from cam_vllm.policies import SCORES, is_score_driven, merge_rule_of, split_policy_name

POLICY_ORDER = {"none": 0, "streaming": 1, "cam-streaming": 2} | {
    name: 3 + 2 * i + j for i, s in enumerate(SCORES) for j, name in enumerate((s, f"cam-{s}"))
}
SCORE_COLORS = {"streaming": "tab:blue", "h2o": "tab:red", "tova": "tab:green", "scissorhands": "tab:purple"}
SCORE_COLORS |= {"corm": "tab:brown"}
MC_TASK_NAMES = ("copa", "piqa", "winogrande", "openbookqa", "rte")


def aggregate(values: Sequence[float]) -> dict:
    vals = [float(v) for v in values]
    std = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "std": std, "values": vals}


def write_json(path: Path, meta: dict, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, tuple | set):
        return list(x)
    return str(x)


def load_rows(folder: Path) -> list[dict]:
    """Every row of every result file under ``folder``.

    Rows with the same key are pooled over their seeds (more seeds added by a later command; a
    later re-run of some seeds replaces those, :func:`pool_seeds`); otherwise the later file wins.
    """
    rows: dict[tuple, dict] = {}
    for f in sorted(Path(folder).rglob("*.json"), key=lambda p: p.stat().st_mtime):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict) or "rows" not in data:
            continue
        for r in data["rows"]:
            key = row_key(r)
            rows[key] = pool_seeds(rows[key], r) if key in rows else r
    return list(rows.values())


def pool_seeds(old: dict, new: dict) -> dict:
    """One row from two runs of seeds of the same items: the union of their seeds, the later run's
    value where both ran a seed (a re-run of some seeds replaces those, keeps the others);
    ``new`` alone when they do not pool (other items or metrics, no per-seed values)."""
    a, b = old.get("seeds") or [], new.get("seeds") or []
    poolable = (
        a
        and b
        and old.get("n_items") == new.get("n_items")
        and set(old["metrics"]) == set(new["metrics"])
        and all(len(old["metrics"][k]["values"]) == len(a) for k in old["metrics"])
        and all(len(new["metrics"][k]["values"]) == len(b) for k in new["metrics"])
    )
    if not poolable:
        return new
    only_old = [s for s in a if s not in b]
    if not only_old:
        return new
    seeds = sorted({*a, *b})
    out = dict(new)
    out["seeds"] = seeds
    out["metrics"] = {}
    for k, v in new["metrics"].items():
        per_seed = dict(zip(a, old["metrics"][k]["values"], strict=True))
        per_seed.update(zip(b, v["values"], strict=True))
        out["metrics"][k] = aggregate([per_seed[s] for s in seeds])
    rates = [
        (r["merge_rate"], n)
        for r, n in ((old, len(only_old)), (new, len(b)))
        if r.get("merge_rate") is not None
    ]
    if rates:
        out["merge_rate"] = sum(r * n for r, n in rates) / sum(n for _, n in rates)
    out["seconds"] = round(old.get("seconds", 0.0) * len(only_old) / len(a) + new.get("seconds", 0.0), 2)
    return out


def row_key(r: dict) -> tuple:
    return (r["task"], r.get("engine"), r["policy"], r.get("variant", ""), r.get("budget"), r.get("data", ""))


def _fmt_metric(m: dict, percent: bool) -> str:
    if m is None:
        return ""
    scale = 100.0 if percent else 1.0
    mean = m["mean"] * scale
    if len(m.get("values", [])) > 1:
        return f"{mean:.1f} ± {m['std'] * scale:.1f}" if percent else f"{mean:.2f} ± {m['std'] * scale:.2f}"
    return f"{mean:.1f}" if percent else f"{mean:.2f}"


def _sort_key(r: dict):
    return (
        r["task"],
        r.get("data", ""),
        r.get("variant", "") != "",
        r.get("variant", ""),
        r.get("budget") if r.get("budget") is not None else -1.0,
        POLICY_ORDER.get(r["policy"], 9),
    )


def markdown_table(rows: Iterable[dict]) -> str:
    """One table per task: policy, variant, budget, metrics (accuracies in %), items, seeds."""
    by_task: dict[str, list[dict]] = {}
    for r in sorted(rows, key=_sort_key):
        by_task.setdefault(r["task"], []).append(r)
    out = []
    for task, trs in by_task.items():
        metrics = []
        for r in trs:
            for k in r["metrics"]:
                if k not in metrics:
                    metrics.append(k)
        out.append(f"### {task}\n")
        head = ["data", "engine", "policy", "variant", "budget", *metrics, "items", "seeds", "merge rate"]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in trs:
            budget = "full" if r.get("budget") is None else f"{r['budget']:.0%}"
            cells = [
                r.get("data", ""),
                r.get("engine", ""),
                r["policy"],
                r.get("variant", "") or "-",
                budget,
                *[_fmt_metric(r["metrics"].get(k), percent=k.startswith("acc")) for k in metrics],
                str(r.get("n_items", "")),
                str(len(r["seeds"])) if r.get("seeds") else "-",
                "" if r.get("merge_rate") is None else f"{r['merge_rate']:.2f}",
            ]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def paper_table(rows: Iterable[dict], budget: float = 0.2) -> str:
    """Table 1 / Table 2 layout: a column per zero-shot task (and per task with acc_norm, a second
    column), a row per policy (and variant) at ``budget`` plus the full cache; cells are accuracy
    in % (mean ± std over seeds) and the number of items."""
    rows = [r for r in rows if r["task"] in MC_TASK_NAMES and r.get("budget") in (None, budget)]
    cols = []
    for t in MC_TASK_NAMES:
        for m in ("acc", "acc_norm"):
            if any(r["task"] == t and m in r["metrics"] for r in rows):
                cols.append((t, m))
    if not cols:
        return ""
    keys = sorted(
        {(r["policy"], r.get("variant", "")) for r in rows},
        key=lambda k: (k[1] != "", POLICY_ORDER.get(k[0], 9), k[1]),
    )
    cell = {(r["task"], r["policy"], r.get("variant", "")): r for r in rows}
    head = ["policy", "variant", *[t if m == "acc" else f"{t} (acc_norm)" for t, m in cols]]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for policy, variant in keys:
        cells = []
        for t, m in cols:
            r = cell.get((t, policy, variant))
            ok = r is not None and m in r["metrics"]
            cells.append(f"{_fmt_metric(r['metrics'][m], True)} ({r['n_items']})" if ok else "")
        label = policy + ("" if policy != "none" else " (full cache)")
        out.append("| " + " | ".join([label, variant or "-", *cells]) + " |")
    return "\n".join(out) + "\n"


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    """Lay out, write (dpi 110) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_budget_curves(
    rows: Sequence[dict], path: Path, metric: str | None = None, title: str = "", log: bool = False
) -> Path | None:
    """One panel per (task, data): metric vs budget, a line per policy/variant, std as error bars.

    The full cache (budget None) is drawn as a horizontal dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = {}
    for r in rows:
        panels.setdefault((r["task"], r.get("data", "")), []).append(r)
    if not panels:
        return None
    n = len(panels)
    cols = min(n, 3)
    fig, axes = plt.subplots(
        (n + cols - 1) // cols, cols, figsize=(4.6 * cols, 3.4 * ((n + cols - 1) // cols))
    )
    axes = [axes] if n == 1 else list(getattr(axes, "flat", axes))
    for ax, ((task, data), prs) in zip(axes, sorted(panels.items()), strict=False):
        m = metric or next(iter(prs[0]["metrics"]))
        lines: dict[str, list[dict]] = {}
        for r in prs:
            if m not in r["metrics"]:
                continue
            label = r["policy"] + (f" [{r['variant']}]" if r.get("variant") else "")
            lines.setdefault(label, []).append(r)
        palette = iter(
            ["tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"] * 3
        )
        for label, lrs in sorted(
            lines.items(), key=lambda kv: (POLICY_ORDER.get(kv[0].split(" ")[0], 9), kv[0])
        ):
            full = [r for r in lrs if r.get("budget") is None]
            pts = sorted((r for r in lrs if r.get("budget") is not None), key=lambda r: r["budget"])
            for r in full:
                ax.axhline(r["metrics"][m]["mean"], color="k", ls="--", lw=1, label=f"{label} (full cache)")
            if pts:
                xs = [r["budget"] * 100 for r in pts]
                ys = [r["metrics"][m]["mean"] for r in pts]
                es = [r["metrics"][m]["std"] for r in pts]
                color = {"streaming": "tab:blue", "cam-streaming": "tab:orange"}.get(label) or next(palette)
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=3, capsize=2, label=label, color=color)
        ax.set_title(f"{task} {data}".strip())
        ax.set_xlabel("KV budget (% of sequence)")
        ax.set_xlim(0, 100)
        ax.set_ylabel(m)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_ablations(rows: Sequence[dict], path: Path, budget: float = 0.2) -> Path | None:
    """One panel per (task, data): a bar per CaM variant at ``budget``, with the full cache,
    plain StreamingLLM and default CaM as horizontal lines. Lower is better for ppl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = [r for r in rows if r.get("budget") in (None, budget)]
    panels: dict[tuple, list[dict]] = {}
    for r in at:
        metric = "ppl" if r["task"] == "ppl" else "acc"
        if r.get("variant") and merge_rule_of(r["policy"]) == "cam" and metric in r["metrics"]:
            panels.setdefault((r["task"], r.get("data", "")), []).append(r)
    if not panels:
        return None
    n = len(panels)
    cols = min(n, 3)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.6 * nrows))
    axes = [axes] if n == 1 else list(getattr(axes, "flat", axes))
    for ax, ((task, data), vrs) in zip(axes, sorted(panels.items()), strict=False):
        m = "ppl" if task == "ppl" else "acc"
        vrs = sorted(vrs, key=lambda r: r["variant"])
        ax.errorbar(
            range(len(vrs)),
            [r["metrics"][m]["mean"] for r in vrs],
            yerr=[r["metrics"][m]["std"] for r in vrs],
            fmt="o",
            capsize=3,
            color="tab:orange",
            label="CaM variant (mean ± std)",
        )
        ax.set_xticks(range(len(vrs)), [r["variant"] for r in vrs], rotation=40, ha="right", fontsize=7)
        for r in at:
            same = r["task"] == task and r.get("data", "") == data and not r.get("variant")
            if same and m in r["metrics"]:
                style = {
                    "none": ("k", "--"),
                    "streaming": ("tab:blue", "-"),
                    "cam-streaming": ("tab:green", ":"),
                }
                color, ls = style.get(r["policy"], ("grey", "-."))
                ax.axhline(r["metrics"][m]["mean"], color=color, ls=ls, lw=1.2, label=r["policy"])
        streaming_blocks = [
            r
            for r in at
            if r["task"] == task and r["policy"] == "streaming" and r.get("variant", "").startswith("block")
        ]
        for r in streaming_blocks:
            i = (
                [v["variant"] for v in vrs].index(r["variant"])
                if r["variant"] in [v["variant"] for v in vrs]
                else None
            )
            if i is not None:
                ax.plot([i - 0.4, i + 0.4], [r["metrics"][m]["mean"]] * 2, color="tab:blue", lw=2)
        ax.set_title(f"{task} {data} @ {budget:.0%}".strip())
        ax.set_ylabel(m)
        if m == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    for ax in axes[n:]:
        ax.axis("off")
    return _save(fig, path)


def plot_needle_depths(rows: Sequence[dict], path: Path) -> Path | None:
    """Retrieval accuracy per needle depth: one panel per budget, a bar group per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == "needle" and not r.get("variant")]
    if not rows:
        return None
    budgets = sorted({r["budget"] for r in rows if r.get("budget") is not None})
    full = [r for r in rows if r.get("budget") is None]
    fig, axes = plt.subplots(
        1, max(len(budgets), 1), figsize=(4.2 * max(len(budgets), 1), 3.2), squeeze=False
    )
    for ax, b in zip(axes[0], budgets or [None], strict=False):
        grp = full + [r for r in rows if r.get("budget") == b]
        grp = sorted(grp, key=lambda r: POLICY_ORDER.get(r["policy"], 9))
        depths = sorted({float(k.split("@")[1]) for r in grp for k in r["metrics"] if k.startswith("acc@")})
        width = 0.8 / max(len(grp), 1)
        for i, r in enumerate(grp):
            ys = [r["metrics"].get(f"acc@{d:g}", {}).get("mean", 0.0) * 100 for d in depths]
            label = r["policy"] + (" (full)" if r.get("budget") is None else "")
            ax.bar([j + i * width for j in range(len(depths))], ys, width, label=label)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(depths))], [f"{d:.0%}" for d in depths])
        ax.set_xlabel("needle depth")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 105)
        ax.set_title("budget " + ("full" if b is None else f"{b:.0%}"))
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_ruler(rows: Sequence[dict], path: Path) -> Path | None:
    """Retrieval-suite score against the budget: one panel per task (evaluation samples only, not
    ``-dev``), a line per policy and variant, the full cache as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["task"] == "ruler" and not r["data"].endswith("-dev")]
    if not rows:
        return None
    tasks = sorted({r["data"] for r in rows})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        grp = [r for r in rows if r["data"] == task]
        for r in grp:
            if r.get("budget") is None:
                ax.axhline(r["metrics"]["score"]["mean"] * 100, ls="--", c="k", lw=1, label="full cache")
        lines: dict[str, list[tuple[float, float]]] = {}
        for r in grp:
            if r.get("budget") is not None:
                name = r["policy"] + (f" ({r['variant']})" if r.get("variant") else "")
                lines.setdefault(name, []).append((r["budget"] * 100, r["metrics"]["score"]["mean"] * 100))
        for name, pts in sorted(lines.items(), key=lambda kv: POLICY_ORDER.get(kv[0].split(" ")[0], 9)):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel("budget (% of the prompt)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(-3, 103)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def merge_rule_ratios(rows: Sequence[dict]) -> dict[str, dict[str, list[tuple[float, float, float]]]]:
    """vLLM perplexity of every merging policy relative to plain eviction on the same engine at the
    same budget: {data: {"policy [engine]": [(budget, mean ratio, std ratio)]}} (< 1: merging helps)."""
    vllm = [
        r
        for r in rows
        if r["task"] == "ppl" and is_vllm(r) and not r.get("variant") and r.get("budget") is not None
    ]
    plain = {
        (r["engine"], r.get("data", ""), r["policy"], r["budget"]): r["metrics"]["ppl"]["mean"]
        for r in vllm
        if merge_rule_of(r["policy"]) is None
    }
    out: dict[str, dict[str, list[tuple[float, float, float]]]] = {}
    for r in vllm:
        rule = merge_rule_of(r["policy"])
        key = (r["engine"], r.get("data", ""), r["policy"].removeprefix(f"{rule}-"), r["budget"])
        if rule is None or key not in plain or key[2] != "streaming":  # score policies: own plot
            continue
        ppl, base = r["metrics"]["ppl"], plain[key]
        out.setdefault(r.get("data", ""), {}).setdefault(f"{r['policy']} [{r['engine']}]", []).append(
            (r["budget"], ppl["mean"] / base, ppl["std"] / base)
        )
    return {d: {p: sorted(v) for p, v in pol.items()} for d, pol in out.items()}


def plot_merge_rules(rows: Sequence[dict], path: Path) -> Path | None:
    """vLLM perplexity of each merge rule divided by plain eviction's, against the budget."""
    ratios = merge_rule_ratios(rows)
    if not ratios:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ratios), figsize=(4.8 * len(ratios), 3.4), squeeze=False)
    for ax, (data, pols) in zip(axes[0], sorted(ratios.items()), strict=True):
        for label, pts in sorted(pols.items()):
            xs, ys, es = zip(*pts, strict=True)
            policy = label.split(" ")[0]  # one colour per policy in every panel
            color = {"cam-streaming": "tab:orange", "weighted-streaming": "tab:green"}.get(policy)
            style = (
                {"color": color or "tab:red"} if len(xs) > 1 else {"color": color or "tab:red", "mfc": "w"}
            )
            ax.errorbar([x * 100 for x in xs], ys, yerr=es, marker="o", ms=4, capsize=2, label=label, **style)
        ax.axhline(1.0, color="k", ls="--", lw=1, label="plain eviction")
        ax.set_title(f"vLLM perplexity vs plain eviction: {data}")
        ax.set_xlabel("KV budget (% of sequence)")
        ax.set_ylabel("ppl / ppl without merging")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def is_vllm(row: dict) -> bool:
    return str(row.get("engine", "")).startswith("vllm")


def _base(policy: str) -> str:
    try:
        return split_policy_name(policy)[0]
    except ValueError:
        return policy


def score_policy_rows(rows: Sequence[dict]) -> list[dict]:
    """vLLM perplexity and retrieval rows of the score-driven policies and their baselines
    (full cache, streaming, cam-streaming) on the same data, no variants."""
    vllm = [r for r in rows if is_vllm(r) and r["task"] in ("ppl", "needle") and not r.get("variant")]
    datas = {(r["task"], r.get("data", ""), r["engine"]) for r in vllm if is_score_driven(_base(r["policy"]))}
    base = {"none", "streaming", "cam-streaming"}
    return [
        r
        for r in vllm
        if (r["task"], r.get("data", ""), r["engine"]) in datas
        and (is_score_driven(_base(r["policy"])) or r["policy"] in base)
    ]


def score_policy_table(rows: Sequence[dict]) -> str:
    """Policy x (task, data, budget): vLLM perplexity, or retrieval accuracy in %."""
    sel = score_policy_rows(rows)
    if not sel:
        return ""
    cols = sorted(
        {
            (r["task"], r.get("data", ""), r["budget"])
            for r in sel
            if r.get("budget") is not None and is_score_driven(_base(r["policy"]))
        }
    )
    cells: dict[str, dict[tuple, str]] = {}
    for r in sel:
        m = r["metrics"]["ppl" if r["task"] == "ppl" else "acc"]
        text = _fmt_metric(m, percent=r["task"] != "ppl")
        if r.get("budget") is None:
            for c in cols:
                if c[:2] == (r["task"], r.get("data", "")):
                    cells.setdefault(r["policy"], {})[c] = text
        else:
            cells.setdefault(r["policy"], {})[(r["task"], r.get("data", ""), r["budget"])] = text
    head = "| policy | " + " | ".join(f"{t} {d} {b:.0%}" for t, d, b in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for pol in sorted(cells, key=lambda p: POLICY_ORDER.get(p, 99)):
        lines.append(f"| {pol} | " + " | ".join(cells[pol].get(c, "") for c in cols) + " |")
    return "\n".join(lines) + "\n"


def plot_score_policies(rows: Sequence[dict], path: Path) -> Path | None:
    """vLLM perplexity (per text) and retrieval against the budget: a colour per eviction
    policy, solid plain, dashed with CaM; the full cache as a black dashed line."""
    sel = score_policy_rows(rows)
    if not sel:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r.get("data", "")) for r in sel})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (task, data) in zip(axes[0], panels, strict=True):
        metric = "ppl" if task == "ppl" else "acc"
        scale = 1.0 if task == "ppl" else 100.0
        grp = [r for r in sel if (r["task"], r.get("data", "")) == (task, data)]
        for r in grp:
            if r.get("budget") is None:
                ax.axhline(r["metrics"][metric]["mean"] * scale, color="k", ls="--", lw=1, label="full cache")
        scored = {
            r["budget"] for r in grp if is_score_driven(_base(r["policy"])) and r.get("budget") is not None
        }
        grp = [r for r in grp if r.get("budget") is None or r["budget"] in scored]
        for pol in sorted(
            {r["policy"] for r in grp if r.get("budget") is not None}, key=lambda p: POLICY_ORDER.get(p, 99)
        ):
            pts = sorted(
                (r for r in grp if r["policy"] == pol and r.get("budget") is not None),
                key=lambda r: r["budget"],
            )
            ax.errorbar(
                [r["budget"] * 100 for r in pts],
                [r["metrics"][metric]["mean"] * scale for r in pts],
                yerr=[r["metrics"][metric]["std"] * scale for r in pts],
                marker="o",
                ms=3,
                capsize=2,
                color=SCORE_COLORS.get(_base(pol), "tab:gray"),
                ls={None: "-", "cam": "--"}.get(merge_rule_of(pol), ":"),
                label=pol,
            )
        ax.set_title(f"vLLM {task} {data}")
        ax.set_xlabel("KV budget (% of sequence)")
        ax.set_ylabel("perplexity (log)" if task == "ppl" else "retrieval accuracy (%)")
        if task == "ppl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    return _save(fig, path)


def vllm_comparison(rows: Sequence[dict], task: str) -> list[dict]:
    """``task`` rows of the vLLM engine next to the reference rows of the same data, each labelled
    by its engine in the variant (for one plot): full cache, StreamingLLM and CaM, with the
    reference's plain (per-token) and block-32 rows."""
    vllm = [r for r in rows if r["task"] == task and is_vllm(r) and not r.get("variant")]
    budgets: dict[str, set] = {}
    for r in vllm:
        budgets.setdefault(r["engine"], set()).add(r.get("budget"))
    vllm = [r for r in vllm if len(budgets[r["engine"]]) > 2]  # curves; single points stay in the table
    data = {r.get("data", "") for r in vllm}
    out = [{**r, "variant": r["engine"]} for r in vllm]
    for r in rows:
        if r["task"] != task or is_vllm(r) or r.get("data", "") not in data:
            continue
        if not r.get("variant"):
            out.append({**r, "variant": "" if r["policy"] == "none" else "reference, per token"})
        elif r["variant"] in ("block32", "block_size=32"):
            out.append({**r, "variant": "reference, blocks of 32"})
    return out


def write_report(folder: Path, title: str = "cam-vllm evaluation", img_dir: Path | None = None) -> list[Path]:
    """``results.md`` in ``folder`` and PNG plots (in ``img_dir``, default ``folder``) from every
    result file under ``folder``."""
    folder = Path(folder)
    img_dir = Path(img_dir) if img_dir is not None else folder
    all_rows = load_rows(folder)
    rows = [r for r in all_rows if not is_vllm(r)]  # the reference semantics; vLLM rows below
    md = [f"# {title}\n"]
    for b in sorted(
        {r["budget"] for r in rows if r["task"] in MC_TASK_NAMES and r.get("budget") is not None}
    ):
        md += [f"## Zero-shot accuracy at {b:.0%} budget (acc %, items)\n", paper_table(rows, b)]
    if table := score_policy_table(all_rows):
        md += ["## Score-driven policies in vLLM (perplexity; retrieval acc %)\n", table]
    md += ["## All rows\n", markdown_table(all_rows)]
    written = []
    groups = {
        "ppl": [r for r in rows if r["task"] == "ppl" and not r.get("variant")],
        "ppl-m": [
            r
            for r in rows
            if r["task"] == "ppl" and (not r.get("variant") or r["variant"].startswith("merge_targets"))
        ],
        "mc": [r for r in rows if r["task"] in MC_TASK_NAMES and not r.get("variant")],
        "needle": [r for r in rows if r["task"] == "needle" and not r.get("variant")],
        "merge-stats": [r for r in rows if r["task"] == "merge-stats"],
    }
    for name, grs in groups.items():
        if grs:
            metric = {"ppl": "ppl", "ppl-m": "ppl", "merge-stats": "merge_rate"}.get(name, "acc")
            written.append(
                plot_budget_curves(grs, img_dir / f"{name}.png", metric=metric, log=name == "ppl-m")
            )
    written.append(plot_ablations(rows, img_dir / "ablations.png"))
    written.append(plot_needle_depths(rows, img_dir / "needle-depth.png"))
    vllm_ppl = vllm_comparison(all_rows, "ppl")
    if vllm_ppl:
        written.append(plot_budget_curves(vllm_ppl, img_dir / "vllm-ppl.png", metric="ppl", log=True))
    written.append(plot_merge_rules(all_rows, img_dir / "vllm-merge-rules.png"))
    written.append(plot_score_policies(all_rows, img_dir / "vllm-score-policies.png"))
    vllm_needle = [
        r
        for r in all_rows
        if r["task"] == "needle"
        and is_vllm(r)
        and not r.get("variant")
        and r.get("data") == "haystack-512"  # the section 8 runs; score policies: their own plot
    ]
    written.append(plot_needle_depths(vllm_needle, img_dir / "vllm-needle-depth.png"))
    written.append(plot_ruler(all_rows, img_dir / "vllm-ruler.png"))
    written = [p for p in written if p is not None]
    for p in written:
        md.append(f"![{p.stem}]({os.path.relpath(p, folder)})\n")
    (folder / "results.md").write_text("\n".join(md))
    return [folder / "results.md", *written]
