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
    argv += ["--output-len", "128", "--num-prompts", "4", "--max-concurrency", "4", "--pool-blocks", "40"]
    argv += ["--window", "64", "--max-num-batched-tokens", "128", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    report = json.loads((out / "bench.json").read_text())
    (result,) = report["results"]
    assert result["policy"] == "cam-streaming" and result["max_concurrency"] == 4
    assert result["result"]["completed"] == 4
    assert result["result"]["output_throughput"] > 0
    # the pool holds the four requests at once, and the server's high-water mark says so
    assert result["peak_running"] == 4
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


def test_every_policy_is_benchmarked_at_the_memory_of_sinks_plus_window():
    """``same_memory_settings`` (every benchmark's policy set-up) and the server flags built from it."""
    import argparse

    from cam_vllm.bench import server_flags
    from cam_vllm.policies import same_memory_settings

    assert same_memory_settings("none", 4, 128) == {"policy": "none"}
    assert same_memory_settings("cam-streaming", 4, 128) == {
        "policy": "cam-streaming",
        "sink_tokens": 4,
        "window_tokens": 128,
    }
    h2o = same_memory_settings("cam-h2o", 4, 200, block_size=32)
    assert (h2o["heavy_tokens"], h2o["window_tokens"]) == (96, 104)  # half, rounded down to blocks

    def flags(policy: str, heavy: int | None) -> list[str]:
        ns = dict(dtype="float32", block_size=32, pool_blocks=24, max_model_len=640)
        ns |= dict(
            max_num_batched_tokens=256, max_num_seqs=8, sinks=4, window=128, heavy=heavy, server_arg=None
        )
        got = server_flags(argparse.Namespace(**ns), policy)
        return got[got.index("--kv-window-tokens") :]

    assert flags("h2o", None) == ["--kv-window-tokens", "64", "--kv-heavy-tokens", "64"]
    assert flags("h2o", 32) == ["--kv-window-tokens", "128", "--kv-heavy-tokens", "32"]  # on top
    assert flags("streaming", 32) == ["--kv-window-tokens", "128"]
    bounded = ["--kv-window-tokens", "64", "--kv-heavy-tokens", "64", "--kv-prompt-hold-tokens", "512"]
    assert flags("snapkv@512", None) == bounded


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ("streamng", "unknown KV policy 'streamng'"),
        ("snapkv@100", "Fix: use 320 or more"),
        ("snapkv@1k", "takes a number of tokens"),
        ("streaming@512", "policy 'streaming' holds no prompt"),
    ],
)
def test_a_bad_policy_is_refused_before_any_server_starts(tmp_path, capsys, policy, fragment):
    """The whole list is checked first (a typo must not surface after earlier servers ran), and
    nothing is written."""
    out = tmp_path / "bench"
    argv = ["bench", "--model", str(tmp_path / "absent"), "--policies", "streaming", policy]
    assert main([*argv, "--out", str(out), "--no-progress"]) != 0
    assert fragment in capsys.readouterr().err
    assert not out.exists()


def test_every_bench_option_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    options = [w for w in text.split() if w.startswith("--") and w.strip("[],") == w]
    assert len(set(options)) >= 20
    for line in text.split("\n  --")[1:]:  # each option's entry has a help text
        assert len(line.split()) > 2, line
