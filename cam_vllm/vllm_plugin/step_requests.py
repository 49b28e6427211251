"""What vLLM's model runner knows about a step's requests, told to the attention builders.

The attention layers and their metadata builders see a batch of rows, not requests. Two wrappers
on ``GPUModelRunner`` (the CPU runner inherits both) publish what the builders need:

* after ``_prepare_inputs`` (the step's rows are in their final order, reordered in
  ``_update_states``, and no attention metadata is built yet): each row's request id, its
  ``SamplingParams.seed``, its length at the end of the step and its prompt length (the end of
  a held prompt) (:class:`StepRequests`);
* in ``_update_states``: the requests that finished or were aborted, to every registered
  listener (the builders' deferred-scoring stash drops their queries, ``query_stash.py``).

A request that asked for the full cache (``vllm_xargs={"kv_policy": "none"}``,
``request_policy.py``) is flagged per row; the builders then keep all of its tokens.

A request's own ``seed`` keys its merge draws (CaM's Bernoulli draws and target choices); a
request without one uses the policy's ``--kv-seed``. Draws are keyed by (seed, layer, position,
KV head), so a request's merges depend on its own seed only: never on the batch it runs in, its
chunking, or a preemption.

Metadata built without ``_prepare_inputs`` (warm-up, profiling, data-parallel dummy batches)
finds no publication that matches its rows (:func:`current` checks the row count and every row's
length) and gets None: builders then use the policy's seed and score every query at once.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from cam_vllm.policies import hold_options
from cam_vllm.vllm_plugin.process_state import WORKER
from cam_vllm.vllm_plugin.request_policy import (
    WINDOW_POLICY,
    request_hold,
    request_window,
    wants_full_cache,
)

logger = logging.getLogger("cam_vllm")


@dataclass(frozen=True)
class StepRequests:
    """The rows of one published step (``serial`` tells one publication from the next)."""

    serial: int
    req_ids: tuple[str, ...]
    seeds: tuple[int | None, ...]
    seq_lens: tuple[int, ...]  # tokens with KV at the end of the step, per row
    # per row: the request's SamplingParams (its vllm_xargs: full cache, own window; request_policy.py)
    params: tuple[Any, ...] = ()
    prompt_lens: tuple[int, ...] = ()  # per row: the request's prompt length (the prompt hold's end)


_serials = itertools.count(1)
_installed = False
_listeners: weakref.WeakSet[Any] = weakref.WeakSet()


def publish(
    req_ids: Iterable[str],
    seeds: Iterable[int | None],
    seq_lens: Iterable[int],
    params: Iterable[Any] = (),
    prompt_lens: Iterable[int] = (),
) -> None:
    WORKER.step = StepRequests(
        next(_serials),
        tuple(req_ids),
        tuple(seeds),
        tuple(int(n) for n in seq_lens),
        tuple(params),
        tuple(int(n) for n in prompt_lens),
    )


def current(num_reqs: int, seq_lens: torch.Tensor) -> StepRequests | None:
    """The publication of the step whose metadata is being built (None: not a published step)."""
    step: StepRequests | None = WORKER.step
    if step is None or len(step.req_ids) != num_reqs:
        return None
    if tuple(seq_lens[:num_reqs].tolist()) != step.seq_lens:
        return None
    return step


def seeds_of(step: StepRequests | None) -> list[int | None] | None:
    """Each row's seed of the merge draws, None when no row has its own (the policy's seed)."""
    if step is None or not any(s is not None for s in step.seeds):
        return None
    return list(step.seeds)


def full_of(step: StepRequests | None) -> torch.Tensor | None:
    """[R] bool, True for the rows whose request keeps the full cache; None when no row does."""
    if step is None or not step.params:
        return None
    full = [wants_full_cache(p) for p in step.params]
    return torch.tensor(full, dtype=torch.bool) if any(full) else None


def windows_of(step: StepRequests | None, policy_name: str, window: int, block: int) -> torch.Tensor | None:
    """[R] int64, each row's own smaller window (0: the policy's); None when no row has one."""
    if step is None or not step.params:
        return None
    own = [request_window(p, policy_name, window, block) for p in step.params]
    return torch.tensor(own, dtype=torch.int64) if any(own) else None


def own_windows(policy: Any, step: StepRequests | None) -> tuple[torch.Tensor | None, Any]:
    """(each row's own smaller window or None, the policy's block layout that places it) for a step."""
    eviction = policy.eviction
    window = int(getattr(eviction, "window_tokens", 0) or 0)
    if policy.name != WINDOW_POLICY or not window or policy.token_exact:
        return None, None
    return windows_of(step, policy.name, window, int(eviction.block_size)), eviction.layout


def holds_of(step: StepRequests | None, policy: Any, allow: bool = False) -> torch.Tensor | None:
    """[R] int64, each row's prompt length where its prompt is held (``EvictionPolicy.kept``), 0
    where not: the policy's hold, or the request's own choice (``request_policy.request_hold``;
    ``allow``: the server lets requests keep more than the policy). None when no row holds, or
    the step was not published (warm-up rows: no hold)."""
    if step is None or not step.prompt_lens:
        return None
    default = bool(policy.eviction.holds_prompt)
    options = hold_options(policy)
    if not options[0] or not step.params:  # no request may choose: the policy's hold for all
        return torch.tensor(step.prompt_lens, dtype=torch.int64) if default else None
    rows = []
    for params, prompt in zip(step.params, step.prompt_lens, strict=True):
        own = request_hold(params, options, allow)
        rows.append(prompt if (default if own is None else own) else 0)
    return torch.tensor(rows, dtype=torch.int64) if any(rows) else None


def on_finished(listener: Any) -> None:
    """Call ``listener.finished(req_ids)`` whenever the runner drops finished requests."""
    _listeners.add(listener)


def finished(req_ids: Iterable[str]) -> None:
    ids = set(req_ids)
    if ids:
        for listener in list(_listeners):
            listener.finished(ids)


def _after(original: Any, after: Callable[..., None]) -> Any:
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        after(self, *args, **kwargs)
        return out

    return wrapper


def _after_prepare_inputs(runner: Any, scheduler_output: Any, num_scheduled_tokens: Any, *_: Any) -> None:
    batch = runner.input_batch
    n = batch.num_reqs
    ids = batch.req_ids[:n]
    lens = batch.num_computed_tokens_cpu[:n] + num_scheduled_tokens[:n]
    states = [runner.requests.get(rid) for rid in ids]
    params = [getattr(s, "sampling_params", None) for s in states]
    prompts = [getattr(s, "num_prompt_tokens", 0) or 0 for s in states]
    publish(ids, (getattr(p, "seed", None) for p in params), lens.tolist(), params, prompts)


def _after_update_states(runner: Any, scheduler_output: Any, *_: Any) -> None:
    finished(scheduler_output.finished_req_ids)


def wrap_prepare_inputs(original: Any) -> Any:
    """``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it): publish the step's rows."""
    return _after(original, _after_prepare_inputs)


def wrap_update_states(original: Any) -> Any:
    """``GPUModelRunner._update_states``: tell the listeners which requests finished."""
    return _after(original, _after_update_states)
