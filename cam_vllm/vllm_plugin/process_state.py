"""What one process remembers between vLLM's calls into the plugin: all of it, in one place.

vLLM runs the plugin in several processes (the API server, one engine core per data-parallel
rank, its workers), and each has its own copy of this module: nothing here crosses a process
boundary. What must agree across processes is derived in each from the same inputs (the config,
a request's own fields), never sent. Three records, each filled by the process that owns it:

* :data:`PLUGIN`: what ``register()`` set up (registrations, the metrics directory, the API
  server's collector);
* :data:`ENGINE`: the engine core's request-policy settings, read from its own copy of the config
  at start-up, and the per-request choices of the running requests (the scheduler side);
* :data:`WORKER`: what a worker's attention layers share (the config they were built under, the
  step the model runner published, the fault-injection counter).

Tests reset a record with :func:`reset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class PluginState:
    registered: set[str] = field(default_factory=set)  # the one-time set-ups done ("plugin", "kv_spec")
    errors: list[str] = field(default_factory=list)  # what register() could not set up
    metrics_dir: Any = None  # this process tree's TemporaryDirectory of per-process metric files
    collector: Any = None  # the API server's Prometheus collector, once installed


@dataclass
class EngineState:
    allows_full: bool = False  # the policy lets requests keep the full cache
    block_size: int = 0
    policy: tuple[str, int] = ("", 0)  # (canonical name, window tokens) of this engine's policy
    hold: tuple[bool, bool, bool] = (False, False, False)  # policies.hold_options of the policy
    full_cache_requests: set[str] = field(default_factory=set)  # running requests keeping everything
    request_windows: dict[str, int] = field(default_factory=dict)  # request id -> its own smaller window
    request_holds: dict[str, bool] = field(default_factory=dict)  # request id -> its own prompt-hold choice


@dataclass
class WorkerState:
    layers_config: Any = None  # the VllmConfig this process's attention layers were built under
    step: Any = None  # the model runner's latest publication (step_requests.StepRequests)
    scored_steps: int = 0  # layer-0 scored steps, for the fault-injection test hook
    # the Triton decode-score kernel and its ``available(tensor)`` (CUDA worker side); None: torch ops
    decode_kernel: Any = None


PLUGIN = PluginState()
ENGINE = EngineState()
WORKER = WorkerState()


def reset(record: PluginState | EngineState | WorkerState) -> None:
    """Put ``record`` back to its start values, in place (modules hold it by reference)."""
    fresh = type(record)()
    for f in fields(record):
        setattr(record, f.name, getattr(fresh, f.name))
