"""Tensor parallelism on vLLM's CPU build: each rank merges its own KV heads, and the draws are
keyed by the global KV-head index, so TP 2 gives what TP 1 gives."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("vllm")

pytestmark = [pytest.mark.engine, pytest.mark.slow]

POLICIES = {
    "cam-streaming": {"policy": "cam-streaming", "sink_tokens": 4, "window_tokens": 64, "seed": 3},
    # score-driven: each rank chooses the heavy region of its own KV head
    "cam-h2o": {"policy": "cam-h2o", "sink_tokens": 4, "heavy_tokens": 64, "window_tokens": 64, "seed": 3},
    # the prompt held until read, then one choice per KV head by the last queries (bounded: each
    # rank compresses its own heads at the same steps)
    "cam-snapkv": {
        "policy": "cam-snapkv",
        "sink_tokens": 4,
        "heavy_tokens": 64,
        "window_tokens": 64,
        "seed": 3,
    },
    "snapkv@256": {
        "policy": "snapkv",
        "sink_tokens": 4,
        "heavy_tokens": 64,
        "window_tokens": 64,
        "prompt_hold_tokens": 256,
    },
}
PROMPT_LENS = (300, 600)
NEW_TOKENS = 24


def _run(model, tp: int, prompts, policy: dict):
    from vllm import SamplingParams
    from vllm_helpers import make_llm

    # one core per rank; without it the CPU worker refuses ("Not enough allowed NUMA nodes")
    env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i) for i in range(tp))} if tp > 1 else None
    llm = make_llm(
        model,
        env=env,
        block_size=32,
        max_model_len=1024,
        enable_prefix_caching=False,
        disable_log_stats=True,
        tensor_parallel_size=tp,
        additional_config={"kv_policy": policy},
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [
            (
                list(o.outputs[0].token_ids),
                [s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids, strict=True)],
            )
            for o in outs
        ]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="TP 2 on the CPU build needs 2 cores (one per rank)")
@pytest.mark.parametrize("name", list(POLICIES))
def test_tensor_parallel_2_equals_1_with_cam(tmp_path, name):
    from vllm_helpers import make_peaky_model, token_prompts

    # 4 query heads, 2 KV heads: one KV head per rank at TP 2
    model = make_peaky_model(
        tmp_path / "model", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    prompts = [token_prompts(1, n, seed=n)[0] for n in PROMPT_LENS]
    one = _run(model, 1, prompts, POLICIES[name])
    two = _run(model, 2, prompts, POLICIES[name])
    for (tokens1, lps1), (tokens2, lps2) in zip(one, two, strict=True):
        assert tokens2 == tokens1
        assert max(abs(a - b) for a, b in zip(lps1, lps2, strict=True)) < 1e-3


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two nodes of one rank each need 2 cores")
def test_two_nodes_equal_one_node_with_cam(tmp_path, monkeypatch):
    """vLLM's multiprocessing across nodes, run as the Helm chart's ``multiNode`` runs it (every
    node ``vllm serve`` with the same arguments plus ``--nnodes``, ``--node-rank``,
    ``--master-addr``; all but the first ``--headless``), here two nodes of one rank each on one
    machine: tensor parallelism 2 across the nodes gives TP 1's greedy tokens and logprobs, so
    the policy runs on the headless node's rank too."""
    import json
    import socket
    import subprocess

    import httpx
    from vllm_helpers import make_peaky_model, token_prompts

    from cam_vllm.launch import served, stop_group, vllm_command

    model = make_peaky_model(
        tmp_path / "model", num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    )
    prompts = [token_prompts(1, n, seed=n)[0] for n in PROMPT_LENS]
    policy = POLICIES["cam-streaming"]
    one = _run(model, 1, prompts, policy)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        master_port = s.getsockname()[1]
    flags = [
        *("--tensor-parallel-size", "2", "--nnodes", "2", "--master-addr", "127.0.0.1"),
        *("--master-port", str(master_port), "--block-size", "32", "--max-model-len", "1024"),
        *("--enforce-eager", "--no-enable-prefix-caching", "--dtype", "float32"),
        *("--additional-config", json.dumps({"kv_policy": policy})),
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="1")
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen(
            [*vllm_command(), "serve", str(model), *flags, "--node-rank", "1", "--headless"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0")
    try:
        with served(model, tmp_path / "node0.log", *flags, "--node-rank", "0") as base:
            two = []
            for prompt in prompts:
                body = {"model": str(model), "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
                body |= {"ignore_eos": True, "logprobs": 0, "return_token_ids": True}
                choice = httpx.post(f"{base}/v1/completions", json=body, timeout=300).json()["choices"][0]
                two.append((choice["token_ids"], choice["logprobs"]["token_logprobs"]))
            metrics = httpx.get(f"{base}/metrics", timeout=30).text
    finally:
        stop_group(node1)
    assert node1.returncode is not None
    for (tokens1, lps1), (tokens2, lps2) in zip(one, two, strict=True):
        assert tokens2 == tokens1
        assert max(abs(a - b) for a, b in zip(lps1, lps2, strict=True)) < 1e-3
    evicted = [ln for ln in metrics.splitlines() if ln.startswith("cam_vllm:kv_tokens_evicted_total")]
    assert evicted and float(evicted[0].split()[-1]) > 0, evicted
