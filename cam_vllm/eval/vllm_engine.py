"""The evaluation protocol on the vLLM plugin: a real ``vllm.LLM`` with the KV policy on.

What differs from the reference rows, and why:

* **Blocks.** vLLM evicts whole KV blocks (the CPU build's smallest block is 32 tokens): the
  sinks are rounded up to one block and the window is the last ``window / B`` blocks, so a
  sequence holds between ``window`` and ``window + B - 1`` recent tokens. The reference rows
  with the same ``block_size`` (ablation ``block32``) are the token-by-token oracle of that.
* **Chunks.** A prompt is prefilled in chunks of ``chunk`` tokens (``max_num_batched_tokens``,
  one request at a time): inside a chunk every token also sees the chunk's earlier tokens, and
  evictions and merges happen at the end of each chunk, not after every token. With
  ``chunk = 1`` the vLLM run is the per-token path; larger chunks are what serving does.
* **Perplexity** comes from vLLM's prompt log-probabilities (``prompt_logprobs=0``), i.e. the
  same forward that serving runs, not from a separate scoring path.

The policy is engine-wide (absolute sink and window tokens, one seed), so one engine is built
per (resolved policy, seed) and reused while those stay the same. The zero-shot tasks define
the budget per request (a fraction of each short prompt), which would need one engine per
prompt length; :meth:`VllmBackend.loglikelihoods` refuses them with that reason.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from cam_vllm.config import KVPolicyConfig
from cam_vllm.errors import CamVllmError
from cam_vllm.eval.budget import resolve_budget
from cam_vllm.eval.engines import EngineStats, ScoreRequest
from cam_vllm.policies import build_policy, merge_rule_of

CPU_BLOCK_SIZE = 32  # vLLM's CPU attention backend refuses smaller blocks
NO_ZERO_SHOT = (
    "the zero-shot tasks take the budget as a fraction of each request, but a vLLM engine has "
    "one absolute sink/window setting; run them with --engine parallel or reference"
)


class VllmBackend:
    """Runs each sequence alone through a ``vllm.LLM`` built for its resolved KV policy."""

    def __init__(
        self,
        model_path: str | Path,
        block_size: int = CPU_BLOCK_SIZE,
        chunk: int = 16,
        dtype: str = "float32",
        max_model_len: int = 4096,
        batch: int = 1,
    ) -> None:
        if chunk < 1:
            raise CamVllmError(f"the prefill chunk must be at least 1 token, got {chunk}")
        self.name = f"vllm-chunk{chunk}"  # rows of other chunk sizes are other rows
        self.model_path = str(model_path)
        self.block_size = block_size
        self.chunk = chunk
        self.dtype = dtype
        self.max_model_len = max_model_len
        self.batch = batch  # sequences in flight together (generate_batch); 1: each alone
        self.stats = EngineStats()
        self._key: tuple | None = None
        self._llm = None
        self._seen: dict[str, float] | None = None  # the plugin's counters after the last sequence

    # --- engines ------------------------------------------------------------------------------

    def _resolve(self, cfg: KVPolicyConfig, length: int) -> KVPolicyConfig:
        if cfg.block_size not in (1, self.block_size):
            raise CamVllmError(
                f"block size {cfg.block_size} asked for, but this vLLM engine evicts blocks of "
                f"{self.block_size} tokens (drop the block ablations with --engine vllm)"
            )
        return resolve_budget(cfg.model_copy(update={"block_size": self.block_size}), length)

    def _engine(self, cfg: KVPolicyConfig, seed: int):
        key = (cfg.model_dump_json(exclude={"seed"}), seed if merge_rule_of(cfg.policy, cfg.merge) else 0)
        if key == self._key:
            return self._llm
        self.close()
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from vllm import LLM

        policy = cfg.model_dump(mode="json", exclude={"block_size", "budget"})
        policy["seed"] = seed
        self._llm = LLM(
            self.model_path,
            dtype=self.dtype,
            enforce_eager=True,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            # one sequence at a time: its chunks are exactly `chunk` tokens (generate_batch: more)
            max_num_seqs=self.batch,
            max_num_batched_tokens=self.chunk,
            enable_chunked_prefill=True,
            enable_prefix_caching=False,  # a merged block is request-private anyway
            disable_log_stats=True,
            seed=0,
            additional_config={"kv_policy": policy},
        )
        self._key = key
        return self._llm

    def close(self) -> None:
        """Shut the current engine down (its memory and engine-core process)."""
        if self._llm is not None:
            with contextlib.suppress(Exception):
                self._llm.llm_engine.engine_core.shutdown()
            self._llm = None
            self._key = None
            gc.collect()

    # --- what the cache did -------------------------------------------------------------------

    @staticmethod
    def _counters() -> dict[str, float]:
        from cam_vllm.vllm_plugin import metrics

        time.sleep(3 * metrics.FLUSH_SECONDS)  # the engine core flushes its counts periodically
        return metrics.read_totals()["counters"]

    def _run(self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, params, progress: bool = False):  # noqa: ANN001
        """One sequence alone through the engine of its resolved policy, with what the cache did
        added to :attr:`stats` (the plugin's counters are cumulative: one read per sequence)."""
        rcfg = self._resolve(cfg, len(ids))
        llm = self._engine(rcfg, seed)
        if self._seen is None:
            self._seen = self._counters()
        out = llm.generate([{"prompt_token_ids": list(ids)}], params, use_tqdm=progress)[0]
        self._account(rcfg, [len(ids)])
        return out

    def _account(self, rcfg: KVPolicyConfig, lengths: Sequence[int]) -> None:
        """Add what the cache did for sequences of ``lengths`` since the last read to :attr:`stats`."""
        before, after = self._seen, self._counters()
        assert before is not None
        self._seen = after
        kept = build_policy(rcfg).eviction.max_retained_tokens() if rcfg.evicts else None
        for n in lengths:
            self.stats.sequences += 1
            self.stats.tokens += n
            self.stats.kept_tokens += min(n, kept or n)
        self.stats.evicted += int(after["kv_tokens_evicted"] - before["kv_tokens_evicted"])
        self.stats.merge_decisions += int(after["merge_decisions"] - before["merge_decisions"])
        self.stats.merged += int(after["merges_accepted"] - before["merges_accepted"])
        self.stats.growth_sum += after["merge_value_growth_sum"] - before["merge_value_growth_sum"]
        self.stats.growth_count += int(after["merge_value_growth_count"] - before["merge_value_growth_count"])

    # --- the protocol -------------------------------------------------------------------------

    def loglikelihoods(
        self, requests: Sequence[ScoreRequest], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> list[float]:
        raise CamVllmError(NO_ZERO_SHOT)

    def token_nlls(
        self, ids: Sequence[int], cfg: KVPolicyConfig, seed: int, progress: bool = False
    ) -> torch.Tensor:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        out = self._run(ids, cfg, seed, params, progress)
        nlls = [-step[ids[i]].logprob for i, step in enumerate(out.prompt_logprobs[1:], start=1)]
        return torch.tensor(nlls, dtype=torch.float64)

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: KVPolicyConfig, seed: int
    ) -> list[list[int]]:
        """Greedy continuations of several prompts, ``batch`` in flight at a time (a request's
        output does not depend on the requests beside it: tested in the engine). The budget is a
        fraction of the longest prompt, so that one engine serves them all."""
        from vllm import SamplingParams

        rcfg = self._resolve(cfg, max(len(p) for p in prompts))
        llm = self._engine(rcfg, seed)
        if self._seen is None:
            self._seen = self._counters()
        params = SamplingParams(max_tokens=max_new_tokens, temperature=0.0)
        outs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        self._account(rcfg, [len(p) for p in prompts])
        return [list(o.outputs[0].token_ids) for o in outs]

    def generate(
        self, prompt_ids: Sequence[int], max_new_tokens: int, cfg: KVPolicyConfig, seed: int
    ) -> list[int]:
        from vllm import SamplingParams

        out = self._run(prompt_ids, cfg, seed, SamplingParams(max_tokens=max_new_tokens, temperature=0.0))
        return list(out.outputs[0].token_ids)
