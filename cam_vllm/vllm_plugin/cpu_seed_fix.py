"""Seeded sampling during chunked prefill on vLLM's CPU build: rewind by state, not by offset.

A step that runs a chunk of a prompt (not its last) still samples a token for that request, then
discards it. vLLM 0.32's model runner undoes the draw with ``gen.set_offset(gen.get_offset() - 4)``
(``GPUModelRunner._bookkeeping_sync``): right for CUDA's Philox generators, but a CPU generator
has no offset and raises ``RuntimeError: CPU Generator does not use offset``. The worker dies,
the engine core with it, and every in-flight request of the server gets an HTTP 500. It takes one
request with a ``seed`` (``temperature > 0``) whose prompt is longer than
``--max-num-batched-tokens``, or that is chunked beside others: any server, with or without a KV
policy. The load test (``cam-vllm load-test``) found it.

The fix wraps ``CPUModelRunner.sample_tokens``: before sampling it saves the state of every
generator whose row will be discarded, hides those generators from the rewind loop (it reads
``input_batch.generators``; the sampler reads the dict its ``sampling_metadata`` captured, which
is left alone), and afterwards puts the saved states back. The discarded draw leaves no trace, as
intended upstream, so a seeded request samples the same tokens however its prompt was chunked.
Installed only on the CPU platform, only where CPU generators have no offset.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def cpu_generators_lack_offset() -> bool:
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def _discarded_generators(runner: Any) -> dict[int, torch.Generator]:
    batch = runner.input_batch
    if not batch.generators:
        return {}
    num_reqs = batch.num_reqs
    rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return {int(i): batch.generators[int(i)] for i in rows if int(i) in batch.generators}


def needed() -> bool:
    """On vLLM's CPU platform, with CPU generators that cannot report their offset."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu()) and cpu_generators_lack_offset()


def wrap_sample_tokens(original: Any) -> Any:
    """``CPUModelRunner.sample_tokens``: the generators of requests whose sample is discarded
    (a prefill chunk) are set back after sampling (``patches.py``)."""

    def sample_tokens(self: Any, *args: Any, **kwargs: Any) -> Any:
        discarded = _discarded_generators(self)
        if not discarded:
            return original(self, *args, **kwargs)
        states = {i: g.get_state() for i, g in discarded.items()}
        batch = self.input_batch
        generators = batch.generators
        batch.generators = {i: g for i, g in generators.items() if i not in discarded}
        try:
            return original(self, *args, **kwargs)
        finally:
            batch.generators = generators
            for i, state in states.items():
                generators[i].set_state(state)

    return sample_tokens
