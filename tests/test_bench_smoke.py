"""``cam-vllm bench`` runs end to end: a real server, vLLM's own `vllm bench serve`, a report.
Only that it runs and reports (one tiny configuration); the numbers are in docs/benchmarks.md."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from vllm_helpers import make_peaky_model  # noqa: E402

from cam_vllm.cli import main  # noqa: E402

pytestmark = [pytest.mark.engine, pytest.mark.slow]


def test_bench_runs_vllms_benchmark_and_reports(tmp_path, capsys):
    model = make_peaky_model(tmp_path / "model")
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(model), "--policies", "cam-streaming", "--input-len", "200"]
    # 128 output tokens: the run lasts long enough (~1-3 s) for the /metrics sampler to see it
    argv += ["--output-len", "128", "--num-prompts", "4", "--max-concurrency", "4", "--pool-blocks", "40"]
    argv += ["--window", "64", "--max-num-batched-tokens", "128", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    (result,) = report["results"]
    assert result["policy"] == "cam-streaming" and result["max_concurrency"] == 4
    assert result["result"]["completed"] == 4
    assert result["result"]["output_throughput"] > 0
    assert result["peak_running"] >= 1
    assert "| cam-streaming |" in capsys.readouterr().out
    assert (out / "bench.md").exists()


def test_a_workload_longer_than_the_pool_is_refused_by_name(tmp_path, capsys):
    argv = ["bench", "--model", str(tmp_path), "--input-len", "4000", "--pool-blocks", "40"]
    assert main(argv) == 1
    assert "does not fit max_model_len 1248" in capsys.readouterr().err


def test_step_vs_context_times_only_decode_steps(tmp_path):
    """scripts/bench_step_vs_context.py (docs/benchmarks.md's ms/step against context plot): it
    runs, and the steps it times are exactly the decode steps of the batch."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_step_vs_context.py"
    argv = [sys.executable, str(script), "--lengths", "64,160", "--new-tokens", "5", "--batch", "2"]
    argv += ["--policies", "none,streaming", "--window", "64", "--out", str(tmp_path), "--no-progress"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "step_vs_context.json").read_text())["results"]
    assert set(results) == {"none", "streaming"}
    for by_len in results.values():
        assert set(by_len) == {"64", "160"}
        assert all(r["steps"] == 5 and r["mean_ms"] > 0 for r in by_len.values())
    assert "last / first" in done.stdout
