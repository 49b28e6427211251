"""cam-vllm's Prometheus metrics, served on vLLM's own ``/metrics``.

The numbers originate in processes that do not serve HTTP: blocks are evicted by the KV manager in
the engine core, merges happen in the attention layers of each worker, while ``/metrics`` is
served by the API server. vLLM's engine-core -> API-server path (``SchedulerStats``) has no field
for plugin data, so the processes talk through a small directory instead:

* the general plugin's :func:`setup_metrics_dir` (run by ``register()`` in every process) creates
  a private temporary directory in the first vLLM process (the API server, or the user's process
  for ``vllm.LLM``) and exports it as ``$CAM_VLLM_METRICS_DIR``; the engine core and the workers,
  started later, inherit it;
* each writing process keeps its cumulative counts in memory (:data:`STATS`, O(1) per event) and a
  daemon thread writes them as ``<dir>/<pid>.json`` (atomic replace) at most every
  :data:`FLUSH_SECONDS` when they changed, and once more at exit;
* in the API server, :class:`CamStatLogger` (entry point ``vllm.stat_logger_plugins``, loaded by
  vLLM's ``AsyncLLM`` by default) registers :class:`CamCollector` in the Prometheus registry that
  ``/metrics`` serves. At scrape time the collector sums the files (counters of exited
  processes stay; gauges only from live processes).

This is the same scheme as prometheus_client's multiprocess mode, kept private: vLLM's own metrics
stay in vLLM's registry mode (single API server) untouched. With ``--api-server-count > 1`` vLLM
serves a multiprocess registry and cam-vllm's metrics are not exported (a warning is logged).

Metrics (labels ``model_name``, ``policy``), by Prometheus' conventions (counters end in ``_total``,
ratios and rates are left to PromQL, nothing is "since start" but counters):

* ``cam_vllm:kv_policy_info`` - 1, with the policy's settings as labels;
* ``cam_vllm:kv_blocks_evicted_total`` / ``cam_vllm:kv_tokens_evicted_total`` - KV blocks (tokens)
  the policy freed (engine core);
* ``cam_vllm:tokens_merged_total`` - tokens that left the retained set and went through the merge
  rule, counted once per token; ``cam_vllm:merge_decisions_total`` /
  ``cam_vllm:merges_accepted_total`` - decisions per (token, layer, KV head) (CaM: its Bernoulli
  draws; weighted: whether a similar receiver was found) and how many merged;
* ``cam_vllm:merge_value_growth`` - a summary (``_sum`` / ``_count``) of the norm ratio after /
  before of the retained values a merge changed: its mean is > 1 where merges add mass (CaM),
  usually < 1 for convex rules;
* ``cam_vllm:kv_tokens_retained`` / ``cam_vllm:kv_tokens_logical`` - summed over running requests;
  ``cam_vllm:requests_tracked`` - requests the KV manager holds per-request state for (0 when the
  engine is idle; anything else is a leak, which ``cam-vllm load-test`` checks);
  ``cam_vllm:worker_requests_stashed`` - requests whose decode queries the workers hold for deferred
  scoring (``query_stash.py``; also 0 when idle);
* ``cam_vllm:scheduler_running_requests`` - a histogram of the requests running at each engine step
  (from vLLM's per-step ``SchedulerStats``, summed over engines), integer buckets up to 64: the
  largest bucket an ``increase()`` over a window reaches is the concurrency a policy reached in
  it, which scraping ``vllm:num_requests_running`` misses while a busy server answers late;
* histograms per finished request: ``cam_vllm:request_kv_retained_ratio`` (retained KV tokens /
  logical length, the compression achieved), ``cam_vllm:request_kv_tokens_retained``,
  ``cam_vllm:request_logical_tokens``.
"""

from __future__ import annotations

import atexit
import bisect
import json
import logging
import multiprocessing
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cam_vllm.vllm_plugin.process_state import PLUGIN

logger = logging.getLogger("cam_vllm")

METRICS_DIR_ENV = "CAM_VLLM_METRICS_DIR"
PREFIX = "cam_vllm:"
FLUSH_SECONDS = 0.25

COUNTERS = {
    "kv_blocks_evicted": "KV-cache blocks freed by the KV policy (evicted from the retained set)",
    "kv_tokens_evicted": "KV-cache token slots freed by the KV policy",
    "tokens_merged": "Tokens that left the retained set and went through the merge rule (once per token)",
    "merge_decisions": "Merge decisions (CaM: draws), one per (evicted token, layer, KV head)",
    "merges_accepted": "Merge decisions that merged the evicted value into a retained token",
    "requests_full_cache": 'Requests accepted with the full KV cache (vllm_xargs {"kv_policy": "none"})',
}
# a summary's two parts, counted like counters: sum over the retained (token, layer, KV head)
# values a merge changed of ||v after|| / ||v before||, and how many
SUMMARY_PARTS = ("merge_value_growth_sum", "merge_value_growth_count")
GAUGES = {
    "kv_tokens_retained": "KV tokens held for running requests (after eviction)",
    "kv_tokens_logical": "Logical length (tokens with KV written) of running requests",
    "requests_tracked": "Requests with per-request state in cam-vllm's KV manager (0 when idle: none leaked)",
    "worker_requests_stashed": (
        "Requests whose decode queries a worker holds for deferred scoring, summed over workers "
        "(0 when idle: none leaked)"
    ),
    "requests_full_cache_running": (
        "Requests the scheduler holds with the full KV cache (per-request kv_policy none; 0 when idle)"
    ),
}
# requests running at an engine step: exact up to 64, coarse above
RUNNING_BUCKETS = (*map(float, range(65)), 96.0, 128.0, 192.0, 256.0, 512.0, 1024.0)
RATIO_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
TOKEN_BUCKETS = tuple(float(2**i) for i in range(5, 18))
HISTOGRAMS = {
    "request_kv_retained_ratio": (
        "Per finished request: KV tokens retained / logical length (the compression achieved)",
        RATIO_BUCKETS,
    ),
    "request_kv_tokens_retained": ("Per finished request: KV tokens retained at the end", TOKEN_BUCKETS),
    "request_logical_tokens": (
        "Per finished request: logical length (tokens with KV written)",
        TOKEN_BUCKETS,
    ),
}


def observe(counts: list, bounds: tuple[float, ...], value: float) -> None:
    """One histogram observation; ``counts``: a count per bound, one above them all, then the sum."""
    counts[bisect.bisect_left(bounds, value)] += 1
    counts[-1] += value


def setup_metrics_dir() -> None:
    """Create and export the shared directory in the first vLLM process (children inherit it).

    Only multiprocessing children (engine core, workers) keep an inherited directory. A top-level
    process always makes its own: a ``vllm serve`` started from a Python process that had
    loaded the plugin (a test suite, a notebook) inherits that process's variable through
    ``os.environ``, and the two would then sum each other's counts and gauges.
    """
    if os.environ.get(METRICS_DIR_ENV) and multiprocessing.parent_process() is not None:
        return
    if PLUGIN.metrics_dir is None:
        PLUGIN.metrics_dir = tempfile.TemporaryDirectory(prefix="cam-vllm-metrics-")
    os.environ[METRICS_DIR_ENV] = PLUGIN.metrics_dir.name


# --------------------------------------------------------------------------------------------
# Writer side (engine core, workers)
# --------------------------------------------------------------------------------------------


class ProcessStats:
    """This process's cumulative counts and the running requests' KV lengths; flushed to a file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.pid = os.getpid()
        self.counters = dict.fromkeys((*COUNTERS, *SUMMARY_PARTS), 0)
        self.histograms = {name: [0] * (len(b) + 1) + [0.0] for name, (_, b) in HISTOGRAMS.items()}
        self.running: dict[str, list[int]] = {}  # request id -> [logical tokens, evicted tokens]
        self.gauges: dict[str, dict[int, float]] = {}  # set_gauge: name -> owner -> value
        self.dirty = False
        self._thread: threading.Thread | None = None

    def _touch(self) -> None:
        if self.pid != os.getpid():  # forked: the parent's counts are the parent's
            self._reset()
        self.dirty = True
        if self._thread is None and os.environ.get(METRICS_DIR_ENV):
            self._thread = threading.Thread(target=self._flush_loop, name="cam-vllm-metrics", daemon=True)
            self._thread.start()
            atexit.register(self.flush)

    def add(self, name: str, value: float) -> None:
        if value:
            with self._lock:
                self._touch()
                self.counters[name] += value

    def set_gauge(self, name: str, owner: int, value: float) -> None:
        """This owner's part of gauge ``name`` (the process reports the sum over its owners)."""
        with self._lock:
            parts = self.gauges.setdefault(name, {})
            if parts.get(owner) != value:
                self._touch()
                parts[owner] = value

    def request_step(self, request_id: str, logical_tokens: int, evicted_tokens: int) -> None:
        """A request has ``logical_tokens`` with KV slots; ``evicted_tokens`` more were just freed."""
        with self._lock:
            self._touch()
            entry = self.running.setdefault(request_id, [0, 0])
            entry[0] = max(entry[0], logical_tokens)
            entry[1] += evicted_tokens

    def request_finished(self, request_id: str) -> None:
        with self._lock:
            entry = self.running.pop(request_id, None)
            if entry is None or entry[0] <= 0:
                return
            self._touch()
            logical, evicted = entry
            retained = max(logical - evicted, 0)
            self._observe("request_kv_retained_ratio", retained / logical)
            self._observe("request_kv_tokens_retained", retained)
            self._observe("request_logical_tokens", logical)

    def _observe(self, name: str, value: float) -> None:
        observe(self.histograms[name], HISTOGRAMS[name][1], value)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pid": self.pid,
                "counters": dict(self.counters),
                "gauges": {
                    "kv_tokens_logical": sum(e[0] for e in self.running.values()),
                    "kv_tokens_retained": sum(max(e[0] - e[1], 0) for e in self.running.values()),
                    "requests_tracked": len(self.running),
                    **{name: sum(parts.values()) for name, parts in self.gauges.items()},
                },
                "histograms": {k: list(v) for k, v in self.histograms.items()},
            }

    def flush(self) -> None:
        directory = os.environ.get(METRICS_DIR_ENV)
        if not directory or not self.dirty or self.pid != os.getpid():
            return
        self.dirty = False
        try:
            path = Path(directory) / f"{self.pid}.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)
        except OSError as exc:  # the directory went away (shutdown): metrics are best effort
            logger.debug("cam-vllm: could not write metrics: %s", exc)

    def _flush_loop(self) -> None:
        while True:
            time.sleep(FLUSH_SECONDS)
            self.flush()


STATS = ProcessStats()


def record_merge(num_tokens: int, decided: Any, count_tokens: bool) -> None:
    """One merge event of a layer (worker; ``decided``: its ``core.merge.MergeDecisions``).
    ``count_tokens``: this layer/rank counts tokens."""
    if count_tokens:
        STATS.add("tokens_merged", num_tokens)
    STATS.add("merge_decisions", decided.decisions)
    STATS.add("merges_accepted", decided.merged)
    STATS.add("merge_value_growth_sum", decided.growth_sum)
    STATS.add("merge_value_growth_count", decided.growth_count)


# --------------------------------------------------------------------------------------------
# Reader side (API server)
# --------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_totals(directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The sums over every process's file (gauges: live processes only)."""
    directory = directory or os.environ.get(METRICS_DIR_ENV)
    total = {
        "counters": dict.fromkeys((*COUNTERS, *SUMMARY_PARTS), 0),
        "gauges": dict.fromkeys(GAUGES, 0),
        "histograms": {name: [0] * (len(b) + 1) + [0.0] for name, (_, b) in HISTOGRAMS.items()},
    }
    if not directory or not Path(directory).is_dir():
        return total
    for path in Path(directory).glob("*.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for name, value in data.get("counters", {}).items():
            if name in total["counters"]:
                total["counters"][name] += value
        if _alive(int(data.get("pid", -1))):
            for name, value in data.get("gauges", {}).items():
                if name in total["gauges"]:
                    total["gauges"][name] += value
        for name, values in data.get("histograms", {}).items():
            mine = total["histograms"].get(name)
            if mine is not None and len(mine) == len(values):
                total["histograms"][name] = [a + b for a, b in zip(mine, values, strict=True)]
    return total


class RunningRequests:
    """Requests running at each engine step, from the API server's per-step scheduler stats, as a
    histogram (:data:`RUNNING_BUCKETS`).

    Each engine reports its own count; an observation is the sum of every engine's latest count
    (with data parallelism the engines' steps interleave, so this is the concurrency the server as
    a whole had, to within one step)."""

    def __init__(self) -> None:
        self.latest: dict[int, int] = {}
        self.counts = [0] * (len(RUNNING_BUCKETS) + 1) + [0.0]  # as a process's histograms
        self.peak = 0  # for tests and logs; not exported (a window's peak comes from the buckets)

    def observe(self, engine_idx: int, running: int) -> None:
        self.latest[engine_idx] = running
        now = sum(self.latest.values())
        self.peak = max(self.peak, now)
        observe(self.counts, RUNNING_BUCKETS, now)


RUNNING = RunningRequests()


class CamCollector:
    """A prometheus_client collector producing cam-vllm's metrics from the shared directory
    (and the running-requests peak this process's stat logger observes)."""

    def __init__(
        self,
        labels: dict[str, str],
        directory: str | None = None,
        running: RunningRequests | None = None,
        info: dict[str, str] | None = None,
    ) -> None:
        self.labels = labels
        self.directory = directory
        self.running = running or RUNNING
        self.info = info or {}

    def describe(self) -> Iterable[Any]:
        return []  # no up-front description: collect() reads files, keep registration cheap

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            SummaryMetricFamily,
        )

        names, values = list(self.labels), list(self.labels.values())
        info = GaugeMetricFamily(
            PREFIX + "kv_policy_info",
            "The KV policy and its settings, as labels (value 1)",
            labels=[*names, *self.info],
        )
        info.add_metric([*values, *self.info.values()], 1.0)
        yield info
        totals = read_totals(self.directory)
        for name, doc in COUNTERS.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=names)
            family.add_metric(values, totals["counters"][name])
            yield family
        growth = SummaryMetricFamily(
            PREFIX + "merge_value_growth",
            "||v after|| / ||v before|| of each retained (token, layer, KV head) value a merge changed "
            "(mean: CaM adds mass, > 1; convex rules usually < 1)",
            labels=names,
        )
        growth.add_metric(
            values,
            count_value=totals["counters"]["merge_value_growth_count"],
            sum_value=totals["counters"]["merge_value_growth_sum"],
        )
        yield growth
        for name, doc in GAUGES.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=names)
            family.add_metric(values, totals["gauges"][name])
            yield family
        histograms = {
            name: (doc, bounds, totals["histograms"][name]) for name, (doc, bounds) in HISTOGRAMS.items()
        }
        histograms["scheduler_running_requests"] = (
            "Requests running at each engine step (summed over engines)",
            RUNNING_BUCKETS,
            self.running.counts,
        )
        for name, (doc, bounds, counts) in histograms.items():
            cumulative, running = [], 0
            for bound, count in zip([*map(str, bounds), "+Inf"], counts[:-1], strict=True):
                running += count
                cumulative.append((bound, running))
            family = HistogramMetricFamily(PREFIX + name, doc, labels=names)
            family.add_metric(values, cumulative, sum_value=counts[-1])
            yield family


def install_collector(vllm_config: Any) -> CamCollector | None:
    """Register :class:`CamCollector` in the registry vLLM's ``/metrics`` serves (once)."""
    if PLUGIN.collector is not None:
        return PLUGIN.collector
    from prometheus_client import REGISTRY

    from cam_vllm.vllm_plugin.settings import policy_config_from_additional

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        logger.warning(
            "cam-vllm: vLLM serves a multiprocess Prometheus registry (--api-server-count > 1); "
            "cam-vllm's metrics are not exported in that mode"
        )
        return None
    try:
        config = policy_config_from_additional(getattr(vllm_config, "additional_config", None))
    except ValueError:
        config = None
    policy = "none"
    if config is not None:  # the canonical name: <merge rule>-<policy> (h2o + --kv-merge cam: cam-h2o)
        from cam_vllm.policies import canonical_name, resolve_merge

        policy = canonical_name(*resolve_merge(config.policy, config.merge))
    model_name = getattr(vllm_config.model_config, "served_model_name", None) or "unknown"
    if isinstance(model_name, list | tuple):
        model_name = model_name[0]
    info = {}
    if config is not None:  # what the settings resolve to for this engine (as GET /v1/kv_policy says)
        from cam_vllm.vllm_plugin.endpoint import policy_report

        resolved = policy_report(vllm_config).get("resolved") or {}
        info = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in resolved.items()}
        info = {k: v for k, v in info.items() if v != "None" and k != "name"}
    PLUGIN.collector = CamCollector({"model_name": str(model_name), "policy": str(policy)}, info=info)
    REGISTRY.register(PLUGIN.collector)
    return PLUGIN.collector


def _make_stat_logger() -> type:
    """:class:`CamStatLogger`, made on first use: its base is vLLM's, and the workers' math that
    records merges (``scoring``) must import without vLLM (``scripts/gpu_check.py``)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class CamStatLogger(StatLoggerBase):
        """``vllm.stat_logger_plugins`` entry: installs :class:`CamCollector` in the API server.

        vLLM's stat-logger hook is where a plugin gets the engine's config in the process serving
        ``/metrics``; the per-step ``record`` only feeds :data:`RUNNING` (our other counts come
        from the files).
        """

        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index
            install_collector(vllm_config)

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:  # noqa: ANN001
            if scheduler_stats is not None:
                RUNNING.observe(engine_idx, int(scheduler_stats.num_running_reqs))

        def log_engine_initialized(self) -> None:
            return None

    CamStatLogger.__module__ = __name__
    CamStatLogger.__qualname__ = "CamStatLogger"
    return CamStatLogger


def __getattr__(name: str) -> Any:
    if name == "CamStatLogger":  # the entry point's target, made once
        cls = _make_stat_logger()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
