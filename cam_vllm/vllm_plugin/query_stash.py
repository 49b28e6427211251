"""Deferred scoring of decode queries: a request's queries are scored once per block, not per step.

Accumulated scores (``Abar``, the importance bits of Scissorhands and CORM, TOVA's newest-query
attention) are *read* only when tokens leave a request's window: the merge or the heavy-region
choice at the end of the step that fills its newest block. Between two such steps nothing about
the request's cache changes but its growth: the retained blocks stay (a block-granular policy
changes the retained set only at block boundaries) and nothing is merged or re-chosen. So the
scores of the decode queries of one block can be computed together, when the block ends, with
exactly the probabilities each query had at its own step: every query sees the retained blocks,
and of its own block the tokens up to itself (a causal mask by position).

Per step, each layer copies the step's decode queries into a stash (per layer: rows of
``[length, Hq, D]`` in the query's dtype, one row per decoding request), and when a request's
block ends (or its row is full) scores the row in one batched call. At batch 8 on a 30-layer
model this replaces 30 small scoring calls per step by a few large ones per 32 steps.

:class:`StashPlanner` (one per metadata builder, host bookkeeping only) decides per step which
query goes where and which rows are scored; the impls hold the tensors. It keys rows by vLLM's
request id (``step_requests``), so it never confuses two requests that reuse a block. A row is
valid only while its request decodes in order: a request that appears with a prompt chunk
(prefill, or the recompute after a preemption) has its row scored first if the chunk continues
it, else dropped (its slots were freed and are rewritten); a finished or aborted request's row
is dropped when the runner drops the request.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from cam_vllm.vllm_plugin import step_requests
from cam_vllm.vllm_plugin.metrics import STATS
from cam_vllm.vllm_plugin.step_plan import StashStep, Wave

logger = logging.getLogger("cam_vllm")

# Queries stashed per request before they are scored (also scored whenever a block ends).
# Memory per layer and decoding request: length * Hq * D elements of the query dtype.
DEFAULT_STASH_LENGTH = 32


def defers_decodes(policy: Any) -> bool:
    """Whether ``policy``'s decode queries are stashed and scored once per block: accumulated
    scores, attended by the stock kernel (not token-exact), and not an observation-window score
    (SnapKV scores no decode at all)."""
    score = policy.score
    return (
        policy.tracks_scores
        and policy.score_mode == "accumulated"
        and not policy.token_exact  # every query is attended by the plugin in its own step
        and not (score is not None and score.observation_window is not None)
    )


class StashPlanner:
    """Which stash row each decoding request's queries go to, and when a row is scored."""

    def __init__(self, block_size: int, length: int = DEFAULT_STASH_LENGTH) -> None:
        self.block_size = block_size
        self.length = max(1, min(length, block_size))
        self.entries: dict[str, list[int]] = {}  # request id -> [row, first position, count]
        self.free: list[int] = []
        self.rows = 0
        self.last_serial = 0
        self._warned = False
        step_requests.on_finished(self)

    def finished(self, req_ids: set[str]) -> None:
        """The runner dropped these requests: so do we (their queries are never scored)."""
        for rid in req_ids & self.entries.keys():
            self.free.append(self.entries.pop(rid)[0])
        self._publish()

    def _publish(self) -> None:
        STATS.set_gauge("worker_requests_stashed", id(self), len(self.entries))

    def _row(self) -> int:
        if self.free:
            return self.free.pop()
        self.rows += 1
        return self.rows - 1

    def plan(
        self, query_lens: list[int], context_lens: list[int], step: step_requests.StepRequests
    ) -> StashStep | None:
        """The stash work of a published step (None: this step was planned already; score it now)."""
        if step.serial == self.last_serial:
            if not self._warned:
                logger.warning("cam-vllm: a step's metadata was built twice; its decodes are scored at once")
                self._warned = True
            return None
        self.last_serial = step.serial
        b, length = self.block_size, self.length
        write_q, write_at, deferred = [], [], []
        f_req, f_row, f_first, f_count = [], [], [], []
        released = []
        row_start = 0
        for r, (rid, n, p) in enumerate(zip(step.req_ids, query_lens, context_lens, strict=True)):
            e = self.entries.get(rid)
            if e is not None and p != e[1] + e[2]:
                if p > e[1] + e[2] and not self._warned:  # never expected: decodes come in order
                    logger.warning(
                        "cam-vllm: request %s skipped positions %d..%d; its stashed queries are dropped",
                        *(rid, e[1] + e[2], p - 1),
                    )
                    self._warned = True
                released.append(self.entries.pop(rid)[0])  # recomputed or reused id: its slots are rewritten
                e = None
            if n != 1:  # a prompt chunk: score what it continues, then the chunk is scored as it runs
                if e is not None:
                    f_req.append(r), f_row.append(e[0]), f_first.append(e[1]), f_count.append(e[2])
                    released.append(self.entries.pop(rid)[0])
                deferred.append(False)
                row_start += n
                continue
            if e is None:
                e = self.entries[rid] = [self._row(), p, 0]
            write_q.append(row_start)
            write_at.append(e[0] * length + e[2])
            e[2] += 1
            deferred.append(True)
            if (p + 1) % b == 0 or e[2] == length:  # its block ends (tokens may leave) or the row is full
                f_req.append(r), f_row.append(e[0]), f_first.append(e[1]), f_count.append(e[2])
                released.append(self.entries.pop(rid)[0])
            row_start += 1
        self.free.extend(released)  # reusable from the next step on (this step still reads them)
        self._publish()
        i64 = torch.int64
        return StashStep(
            write_q=torch.tensor(write_q, dtype=i64),
            write_at=torch.tensor(write_at, dtype=i64),
            flush_req=torch.tensor(f_req, dtype=i64),
            flush_row=torch.tensor(f_row, dtype=i64),
            flush_first=torch.tensor(f_first, dtype=i64),
            flush_count=torch.tensor(f_count, dtype=i64),
            deferred=torch.tensor(deferred, dtype=torch.bool),
            rows=self.rows,
            length=length,
        )


def ensure_rows(stash: torch.Tensor | None, step: StashStep, like: torch.Tensor) -> torch.Tensor:
    """The layer's stash ``[rows * length, Hq, D]`` with room for ``step.rows`` rows (grown, kept)."""
    need = step.rows * step.length
    if stash is not None and stash.shape[0] >= need and stash.shape[1:] == like.shape[1:]:
        return stash
    rows = max(need, 2 * (stash.shape[0] if stash is not None else 0))
    grown = like.new_zeros((rows, *like.shape[1:]))
    if stash is not None and stash.shape[1:] == like.shape[1:]:
        grown[: stash.shape[0]] = stash
    return grown


def stash_for_wave(stash: StashStep | None, wave: Wave) -> StashStep | None:
    """``stash`` in the rows of a step's first wave, which holds every request's first query (so
    every decode, and every request in the step's order)."""
    if stash is None:
        return None
    assert wave.requests.numel() == stash.deferred.numel(), "the first wave holds every request"
    local = torch.full((int(wave.rows.max()) + 1,), -1, dtype=torch.int64)
    local[wave.rows] = torch.arange(wave.rows.numel())
    return dataclasses.replace(stash, write_q=local[stash.write_q])
