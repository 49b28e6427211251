"""A request's own ``seed`` keys its merge draws (CaM's Bernoulli draws and target choices).

The attention layers see a batch of rows, not requests. After vLLM's model runner has put the
step's requests in their final order (``_prepare_inputs`` runs after the reordering in
``_update_states`` and before the attention metadata is built), a wrapper publishes each row's
``SamplingParams.seed`` here; the metadata builders read them for the step's merge events. A
request without a seed uses the policy's ``--kv-seed``. Runs that build metadata without
``_prepare_inputs`` (warm-up, profiling) find no seeds for their row count and use the default.

Draws are keyed by (seed, layer, position, KV head), so a request's merges depend on its own
seed only: never on the batch it runs in, its chunking, or a preemption.
"""

from __future__ import annotations

import functools
from typing import Any

_seeds: tuple[int | None, ...] = ()
_installed = False


def publish(seeds: Any) -> None:
    global _seeds
    _seeds = tuple(seeds)


def for_step(num_reqs: int) -> list[int | None] | None:
    """Seeds of this step's rows (None: this build is not the published step's)."""
    if len(_seeds) != num_reqs or not any(s is not None for s in _seeds):
        return None
    return list(_seeds)


def _seed_of(state: Any) -> int | None:
    params = getattr(state, "sampling_params", None)
    return getattr(params, "seed", None)


def install_request_seeds() -> None:
    """Wrap ``GPUModelRunner._prepare_inputs`` (the CPU runner inherits it); idempotent."""
    global _installed
    if _installed:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner._prepare_inputs

    @functools.wraps(original)
    def _prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        batch = self.input_batch
        publish(_seed_of(self.requests.get(rid)) for rid in batch.req_ids[: batch.num_reqs])
        return out

    GPUModelRunner._prepare_inputs = _prepare_inputs
    _installed = True
