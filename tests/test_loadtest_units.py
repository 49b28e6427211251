"""Pure logic of ``cam-vllm load-test`` (the storm itself runs against real servers in
test_vllm_load.py)."""

from __future__ import annotations

import pytest

from cam_vllm.errors import CamVllmError
from cam_vllm.loadtest import StormConfig, StormReport, _quantile, parse_metrics


def test_metrics_are_summed_over_label_sets_and_comments_skipped():
    text = "\n".join(
        [
            "# HELP vllm:num_preemptions_total Preemptions",
            'vllm:num_preemptions_total{engine="0",model_name="m"} 3.0',
            'vllm:num_preemptions_total{engine="1",model_name="m"} 4.0',
            'cam_vllm:requests_tracked{model_name="m",policy="cam-h2o"} 0.0',
            "vllm:kv_cache_usage_perc 0.25",
            "broken_line_without_value x",
        ]
    )
    m = parse_metrics(text)
    assert m["vllm:num_preemptions_total"] == 7.0
    assert m["cam_vllm:requests_tracked"] == 0.0
    assert m["vllm:kv_cache_usage_perc"] == 0.25
    assert "broken_line_without_value" not in m


def test_a_report_is_ok_only_without_errors_leaks_or_a_changed_probe():
    clean = dict(healthy=True, kv_blocks_in_use_ratio=0.0, requests_tracked=0.0, running_after=0.0)
    clean |= dict(waiting_after=0.0, probe_before="a", probe_after="a")
    assert StormReport(**clean).ok
    assert not StormReport(**(clean | {"probe_after": "b"})).ok
    assert StormReport(**(clean | {"requests_tracked": 2.0})).leaks == [
        "plugin state left for 2 requests (cam_vllm:requests_tracked)"
    ]
    assert "KV blocks in use" in StormReport(**(clean | {"kv_blocks_in_use_ratio": 0.1})).leaks[0]
    assert not StormReport(**(clean | {"errors": ["request 3: HTTP 500"]})).ok
    assert not StormReport(**(clean | {"healthy": False})).ok
    assert StormReport(**(clean | {"requests_tracked": -1.0})).ok, "a server without cam-vllm has no gauge"


@pytest.mark.parametrize(
    "bad",
    [
        dict(prompt_tokens=(10, 5)),
        dict(max_tokens=(0, 4)),
        dict(requests=0),
        dict(abort_fraction=1.5),
        dict(vocab=2),
    ],
)
def test_impossible_settings_are_refused_by_name(bad):
    with pytest.raises(CamVllmError, match="load test"):
        StormConfig(**bad)


def test_quantiles():
    assert _quantile([], 0.99) == 0.0
    assert _quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert _quantile([float(i) for i in range(100)], 0.99) == 99.0
