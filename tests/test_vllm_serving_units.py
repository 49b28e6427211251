"""cam-vllm's serving surface without a server: the metrics files and collector, the policy report,
and the entry points vLLM discovers (the real server is exercised in test_vllm_serve_openai.py)."""

from __future__ import annotations

import os
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from cam_vllm.vllm_plugin import metrics  # noqa: E402


def test_entry_points_share_one_name_so_vllm_plugins_cam_vllm_enables_all():
    for group, target in [
        ("vllm.general_plugins", "cam_vllm.plugin:register"),
        ("vllm.stat_logger_plugins", "cam_vllm.vllm_plugin.metrics:CamStatLogger"),
        ("vllm.endpoint_plugins", "cam_vllm.vllm_plugin.endpoint:KVPolicyEndpoint"),
    ]:
        found = {ep.name: ep.value for ep in entry_points(group=group)}
        assert found.get("cam_vllm") == target, (group, found)


def test_stat_logger_is_a_vllm_stat_logger():
    from vllm.v1.metrics.loggers import StatLoggerBase

    assert issubclass(metrics.CamStatLogger, StatLoggerBase)


def test_process_stats_files_are_summed_by_the_collector(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest

    monkeypatch.setenv(metrics.METRICS_DIR_ENV, str(tmp_path))
    stats = metrics.ProcessStats()
    stats.add("kv_blocks_evicted", 3)
    stats.request_step("a", 1000, 0)
    stats.request_step("a", 1000, 3 * 32)
    stats.request_step("b", 200, 0)
    stats.set_gauge("worker_requests_stashed", 0, 2)  # two owners (layers' planners) of one gauge
    stats.set_gauge("worker_requests_stashed", 1, 1)
    stats.flush()
    # a second (exited) process's file: counters count, gauges do not
    other = dict(stats.snapshot(), pid=2**22 + 12345)
    other["counters"] = dict(
        other["counters"],
        kv_blocks_evicted=5,
        merge_decisions=10,
        merges_accepted=4,
        merge_value_growth_sum=4.5,
        merge_value_growth_count=3,
    )
    (tmp_path / "dead.json").write_text(__import__("json").dumps(other))

    totals = metrics.read_totals(tmp_path)
    assert totals["counters"]["kv_blocks_evicted"] == 8
    assert totals["gauges"] == {
        "kv_tokens_retained": 1000 - 96 + 200,
        "kv_tokens_logical": 1200,
        "requests_tracked": 2,
        "worker_requests_stashed": 3,
        "requests_full_cache_running": 0,  # every gauge is reported, set or not
    }

    stats.request_finished("a")
    stats.request_finished("a")  # a second free (e.g. after preemption) is not counted twice
    stats.flush()
    registry = CollectorRegistry()
    registry.register(metrics.CamCollector({"model_name": "m", "policy": "cam-streaming"}, str(tmp_path)))
    text = generate_latest(registry).decode()
    labels = 'model_name="m",policy="cam-streaming"'
    assert f"cam_vllm:kv_blocks_evicted_total{{{labels}}} 8.0" in text
    assert f"cam_vllm:merges_accepted_total{{{labels}}} 4.0" in text  # rates are PromQL's
    assert f"cam_vllm:merge_value_growth_sum{{{labels}}} 4.5" in text  # a summary, not counters
    assert f"cam_vllm:merge_value_growth_count{{{labels}}} 3.0" in text
    assert "merge_value_growth_sum_total" not in text and "acceptance_rate" not in text
    assert f"cam_vllm:kv_policy_info{{{labels}}} 1.0" in text
    assert f"cam_vllm:request_kv_retained_ratio_count{{{labels}}} 1.0" in text
    assert f"cam_vllm:request_kv_retained_ratio_sum{{{labels}}} {(1000 - 96) / 1000}" in text
    assert f'cam_vllm:request_logical_tokens_bucket{{le="1024.0",{labels}}} 1.0' in text
    assert f"cam_vllm:kv_tokens_logical{{{labels}}} 200.0" in text
    assert f"cam_vllm:requests_tracked{{{labels}}} 1.0" in text, "a's entry is gone, b's is left"


def test_running_requests_histogram_gives_the_peak_of_the_engines_summed(tmp_path):
    """What the stat logger records each step: the requests running at once, over engines, as a
    histogram whose highest reached bucket is the peak."""
    from prometheus_client import CollectorRegistry, generate_latest
    from vllm.v1.metrics.stats import SchedulerStats

    from cam_vllm.loadtest import parse_metrics, peak_from_buckets, peak_running

    running = metrics.RunningRequests()
    logger = metrics.CamStatLogger.__new__(metrics.CamStatLogger)  # record() only; no collector
    for engine, n in [(0, 2), (1, 3), (0, 1), (1, 0), (0, 4)]:
        running.observe(engine, n)
    assert running.peak == 5  # 2 + 3 at once; 4 + 0 later is less
    before = sum(metrics.RUNNING.counts[:-1])
    logger.record(SchedulerStats(num_running_reqs=7), None, engine_idx=0)
    logger.record(None, None, engine_idx=0)  # a step without scheduler stats changes nothing
    assert sum(metrics.RUNNING.counts[:-1]) == before + 1
    registry = CollectorRegistry()
    info = {"window_tokens": "64", "merging": "false"}
    registry.register(
        metrics.CamCollector({"model_name": "m", "policy": "streaming"}, str(tmp_path), running, info)
    )
    text = generate_latest(registry).decode()
    labels = 'model_name="m",policy="streaming"'
    assert f'cam_vllm:scheduler_running_requests_bucket{{le="4.0",{labels}}} 4.0' in text
    assert f'cam_vllm:scheduler_running_requests_bucket{{le="5.0",{labels}}} 5.0' in text
    assert f"cam_vllm:scheduler_running_requests_count{{{labels}}} 5.0" in text
    assert f"cam_vllm:scheduler_running_requests_sum{{{labels}}} 16.0" in text  # 2 + 5 + 4 + 1 + 4
    info_line = (
        'cam_vllm:kv_policy_info{merging="false",model_name="m",policy="streaming",window_tokens="64"} 1.0'
    )
    assert info_line in text
    assert "cam_vllm:requests_running_peak" not in parse_metrics(text)
    assert peak_running(text) == 5.0
    assert peak_running("vllm:num_requests_running 3.0") is None
    assert peak_from_buckets({float("inf"): 0.0}) == 0.0


def test_setup_metrics_dir_exports_one_directory(monkeypatch):
    monkeypatch.delenv(metrics.METRICS_DIR_ENV, raising=False)
    metrics.setup_metrics_dir()
    first = os.environ[metrics.METRICS_DIR_ENV]
    assert os.path.isdir(first)
    metrics.setup_metrics_dir()  # children (engine core, workers) inherit it and keep it
    assert os.environ[metrics.METRICS_DIR_ENV] == first


_CHILD_AND_TOP_LEVEL = """
import multiprocessing, os, sys
from cam_vllm.vllm_plugin import metrics

def child(queue):
    metrics.setup_metrics_dir()
    queue.put(os.environ[metrics.METRICS_DIR_ENV])

if __name__ == "__main__":
    metrics.setup_metrics_dir()
    mine = os.environ[metrics.METRICS_DIR_ENV]
    queue = multiprocessing.get_context(sys.argv[1]).Queue()
    proc = multiprocessing.get_context(sys.argv[1]).Process(target=child, args=(queue,))
    proc.start()
    print(mine, queue.get(timeout=60))
    proc.join()
"""


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_a_top_level_process_never_shares_an_inherited_metrics_dir(tmp_path, start_method):
    """A `vllm serve` launched from a process that loaded the plugin (pytest, a notebook) must
    not write into that process's directory: the server's /metrics would sum both."""
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(_CHILD_AND_TOP_LEVEL)
    foreign = str(tmp_path / "someone-elses")
    env = {**os.environ, metrics.METRICS_DIR_ENV: foreign}
    out = subprocess.run(
        [sys.executable, str(script), start_method], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    mine, childs = out.stdout.split()
    assert mine != foreign, "the top-level process made its own directory"
    assert childs == mine, "an engine-core/worker child keeps its parent's directory"


def test_policy_report():
    from cam_vllm.vllm_plugin.endpoint import policy_report

    assert policy_report(None)["policy"] == "none"
    config = SimpleNamespace(
        additional_config={"kv_policy": {"policy": "cam-streaming", "sink_tokens": 4, "window_tokens": 256}},
        cache_config=SimpleNamespace(block_size=32),
        model_config=SimpleNamespace(max_model_len=4096),
    )
    report = policy_report(config)
    assert report["policy"] == "cam-streaming"
    assert report["settings"]["window_tokens"] == 256 and report["settings"]["merge_targets"] == 16
    assert report["resolved"] == {
        "block_size": 32,
        "max_model_len": 4096,
        "sink_tokens": 4,
        "sink_end": 32,
        "window_tokens": 256,
        "heavy_tokens": None,
        "score": None,
        "prompt_hold": False,
        "prompt_hold_tokens": 0,
        "observation_window": None,
        "pooling_kernel": None,
        "max_retained_tokens": 288,
        "token_exact": False,
        "max_held_tokens": 288,
        "merging": True,
        "name": "cam-streaming",
        "merge_rule": "cam",
    }
    # the merge rule given on its own: the canonical name says what runs
    config.additional_config = {
        "kv_policy": {"policy": "streaming", "merge": "weighted", "window_tokens": 256}
    }
    report = policy_report(config)
    assert report["policy"] == "streaming" and report["settings"]["merge"] == "weighted"
    assert (
        report["resolved"]["name"] == "weighted-streaming" and report["resolved"]["merge_rule"] == "weighted"
    )
    # token-exact: the window it shows, and the blocks it holds at most (sinks' block + 4 blocks)
    config.additional_config = {
        "kv_policy": {"policy": "cam-streaming", "window_tokens": 98, "token_exact": True}
    }
    report = policy_report(config)
    resolved = report["resolved"]
    assert (resolved["token_exact"], resolved["max_retained_tokens"], resolved["max_held_tokens"]) == (
        True,
        102,
        32 + 160,
    )
    assert "kv_window_tokens" not in report["per_request"]["vllm_xargs"]  # refused on such a server
    # a score-driven policy: its heavy region and score, the budget split half and half
    config.additional_config = {"kv_policy": {"policy": "cam-h2o", "budget": 0.25}}
    resolved = policy_report(config)["resolved"]
    assert (resolved["score"], resolved["heavy_tokens"], resolved["window_tokens"]) == ("h2o", 480, 512)
    assert resolved["max_retained_tokens"] == 32 + 480 + 512 and resolved["name"] == "cam-h2o"
    assert resolved["prompt_hold"] is False
    # snapkv: the prompt held until read, its observation window and pooling
    config.additional_config = {"kv_policy": {"policy": "snapkv", "budget": 0.25, "pooling_kernel": 15}}
    resolved = policy_report(config)["resolved"]
    assert (resolved["score"], resolved["prompt_hold"], resolved["observation_window"]) == (
        "snapkv",
        True,
        32,
    )
    assert resolved["pooling_kernel"] == 15 and resolved["heavy_tokens"] == 480


def test_a_merge_event_is_counted_in_this_process():
    from types import SimpleNamespace

    before = dict(metrics.STATS.counters)
    decided = SimpleNamespace(decisions=6, merged=4, growth_sum=5.0, growth_count=4)
    metrics.record_merge(2, decided, count_tokens=True)
    after = metrics.STATS.counters
    assert after["tokens_merged"] - before["tokens_merged"] == 2
    assert after["merges_accepted"] - before["merges_accepted"] == 4
    assert after["merge_value_growth_sum"] - before["merge_value_growth_sum"] == 5.0
    assert after["merge_value_growth_count"] - before["merge_value_growth_count"] == 4
