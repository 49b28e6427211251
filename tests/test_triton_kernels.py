"""The CUDA path's Triton kernels equal the torch code they replace, run by Triton's interpreter on
the CPU (``TRITON_INTERPRET=1``; no GPU here or in CI).

The comparisons run in a child pytest process that loads the kernels before anything else:
``triton.jit`` decides at decoration whether a kernel is interpreted, and once vLLM has been
imported in a process, helper functions decorated there are no longer callable from interpreted
kernels. The parent process's one test starts the child and requires all of it to pass."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

CHILD = os.environ.get("CAM_VLLM_TRITON_CHILD") == "1"
KERNELS = Path(__file__).resolve().parents[1] / "cam_vllm" / "kernels" / "triton_ops.py"
OPS = None
if CHILD:  # before vLLM is imported: the interpreted kernels
    os.environ["TRITON_INTERPRET"] = "1"
    _spec = importlib.util.spec_from_file_location("cam_vllm_triton_ops_interpreted", KERNELS)
    OPS = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(OPS)

from cam_vllm.config import KVPolicyConfig  # noqa: E402
from cam_vllm.core.merge import MergeConfig, cam_merge, use_chain_kernel  # noqa: E402
from cam_vllm.policies import build_policy  # noqa: E402

child = pytest.mark.skipif(not CHILD, reason="runs in the interpreter's child process")


@pytest.mark.skipif(CHILD, reason="the parent's test")
def test_the_kernels_equal_their_torch_twins_under_the_interpreter():
    env = dict(os.environ, CAM_VLLM_TRITON_CHILD="1", TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider", "-x"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert run.returncode == 0 and "4 passed" in run.stdout, run.stdout[-4000:] + run.stderr[-2000:]


@pytest.fixture
def ops():
    """The interpreted kernels; whatever a test installs is uninstalled afterwards."""
    yield OPS
    use_chain_kernel(None)
    try:
        from cam_vllm.vllm_plugin.scoring import use_triton_kernels
    except ImportError:  # no vLLM: nothing was installed there
        return
    use_triton_kernels(None)


@child
@pytest.mark.parametrize(
    ("n", "leaving", "m", "dtype"), [(20, 8, 4, torch.float32), (48, 32, 16, torch.bfloat16)]
)
def test_chain_merge_kernel_equals_the_triangular_solve(ops, n, leaving, m, dtype):
    torch.manual_seed(n)
    config = MergeConfig(rule="cam", num_targets=m, clamp=(0.0, 1.0), targets="even", seed=3)
    values = torch.randn(n, 3, 16).to(dtype)
    abar = torch.rand(n, 3) * 3
    flags = torch.arange(n) < leaving
    pos = (torch.arange(n)[:, None] + 100 * torch.arange(3)).contiguous()  # per head, as side by side
    want, want_dec = cam_merge(values, abar, flags, pos, 1, config)
    use_chain_kernel(ops.chain_kernel())
    got, got_dec = cam_merge(values, abar, flags, pos, 1, config)
    assert torch.equal(got_dec.mask, want_dec.mask) and got_dec.merged > 0
    torch.testing.assert_close(
        got.float(), want.float(), atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=0
    )
    assert not torch.equal(got, values), "something was merged"


@child
def test_decode_score_kernel_equals_the_torch_scores(ops):
    """Stash rows of 5, 3 and 10 queries (padding queries included), GQA 2, keys read in place
    from an NHD cache whose blocks are scattered."""
    pytest.importorskip("vllm")
    from cam_vllm.vllm_plugin.paged import NHDPagedKV
    from cam_vllm.vllm_plugin.scoring import _score_decodes
    from cam_vllm.vllm_plugin.step_plan import StepTokens, plan_decodes

    torch.manual_seed(0)
    b, hkv, g, d, nb = 16, 2, 2, 16, 20
    policy = build_policy(
        KVPolicyConfig(policy="cam-streaming", sink_tokens=4, window_tokens=32, block_size=b)
    )
    kv = torch.randn(nb, b, hkv, 2 * d).permute(0, 2, 1, 3)  # logical [blocks, heads, tokens, K|V]
    paged = NHDPagedKV(kv, d)
    lens = torch.tensor([70, 40, 90])
    tokens = StepTokens.from_batch(torch.arange(4, dtype=torch.int32), lens, 3)
    table = (torch.randperm(nb - 1) + 1)[:18].view(3, 6).to(torch.int32)
    count = torch.tensor([5, 3, 10])
    rows = torch.tensor([2, 0, 1])
    batch = plan_decodes(
        policy.eviction.retained, tokens, table, b, torch.arange(3), lens - count, count, rows
    )
    stash = torch.randn(3, 16, hkv * g, d)
    want = torch.zeros(nb * b, hkv)
    _score_decodes(paged, want, {}, None, batch, None, 0.25, hkv, stash)
    got = torch.zeros(nb * b, hkv)
    ops.decode_scores(
        stash[rows, : batch.num_queries], paged.key_view, batch.blocks, batch.valid, batch.slots, got, 0.25
    )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert float(want.sum()) == pytest.approx(float(count.sum()) * hkv, rel=1e-5)  # each query: 1 per KV head


@child
def test_cuda_worker_steps_with_the_kernels_reproduce_policy_cache(ops, monkeypatch):
    """The FlashAttention builder and the CUDA impl's forward (decodes, stashed ones too, through
    the decode kernel, CaM chains through the chain kernel) against the reference cache, as
    ``test_vllm_cuda`` runs them with torch ops."""
    pytest.importorskip("vllm")
    from worker_harness import run_worker_steps

    from cam_vllm.vllm_plugin import scoring

    calls = {"decode": 0, "chain": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return run

    use_chain_kernel(dataclasses.replace(ops.chain_kernel(), run=counted("chain", ops.chain_merge_values)))
    scoring.use_triton_kernels(ops.available, counted("decode", ops.decode_scores))
    chunks = [[150] + [1] * 41 + [37] + [1] * 34, [1, 70] + [1] * 44 + [100] + [1] * 30]
    run_worker_steps("cam", "accumulated", "streaming", chunks, monkeypatch, deferred=True, backend="flash")
    run_worker_steps("cam", "accumulated", "streaming", chunks, monkeypatch, deferred=False, backend="flash")
    assert calls["decode"] > 0 and calls["chain"] > 0, calls


@pytest.mark.skipif(CHILD, reason="the parent's test")
def test_gpu_check_script_runs_its_checks_under_the_interpreter(tmp_path):
    """``scripts/gpu_check.py --quick`` (the GPU check at tiny shapes, Triton's interpreter on the
    CPU), in a process where vLLM, pydantic and transformers cannot be imported (a GPU machine's
    image has torch and Triton only): every check runs and passes, and the JSON it writes holds
    each check's result."""
    import json

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gpu_check.json"
    script = root / "scripts" / "gpu_check.py"
    bare = (
        "import runpy, sys\n"
        "for name in ('vllm', 'pydantic', 'transformers'):\n"
        "    sys.modules[name] = None  # import of it fails, as on a bare GPU image\n"
        f"sys.argv = ['gpu_check.py', '--quick', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", bare],
        env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert run.returncode == 0 and "all checks passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]
    checks = {r["check"] for r in json.loads(out.read_text())["results"]}
    assert checks == {"decode_scores", "chain_merge", "prompt_scores_from_lse"}
