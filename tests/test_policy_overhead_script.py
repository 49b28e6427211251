"""scripts/bench_policy_overhead.py (the policy's own work per step, docs/benchmarks.md) runs
for every kind of policy and in both dtypes, and measures what the engine runs: a held prompt
(``snapkv``) is read in one wave per layer, a policy that chooses while reading in several."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_policy_overhead.py"


def _breakdown(stdout: str) -> dict[str, list[float]]:
    """The rows of the per-wave table: policy -> [waves, kernel, gather, score, choice, plan, ops]."""
    rows = stdout.split("microseconds per wave and layer")[1].splitlines()[2:]
    return {r.split()[0]: [float(x) for x in r.split()[1:]] for r in rows if r.strip()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_overhead_script_breaks_down_prompt_side_work(dtype):
    argv = [sys.executable, str(SCRIPT), "--policies", "streaming,h2o,cam-streaming,snapkv"]
    argv += ["--batch", "1", "--prompt-len", "256", "--chunk", "128", "--window", "64", "--layers", "2"]
    argv += ["--steps", "4", "--repeats", "1", "--breakdown", "--dtype", dtype]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = _breakdown(done.stdout)
    assert set(table) == {"streaming", "h2o", "cam-streaming", "snapkv"}
    layers = 2
    assert table["streaming"][0] == layers and table["streaming"][-1] == 0  # no policy work at all
    assert table["snapkv"][0] == layers  # the prompt is held: one wave per layer and chunk
    for name in ("h2o", "cam-streaming"):  # a block leaves the window inside each chunk
        waves, *_, ops = table[name]
        assert waves > layers and ops > 0
    assert table["h2o"][4] > 0  # heavy-region choices timed
    assert table["cam-streaming"][4] > 0  # merges timed
