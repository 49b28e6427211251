"""Score-driven eviction in a paged cache: sinks | heavy region | recent window.

The memory layout is positional, like StreamingLLM with a larger kept prefix: a sequence keeps
its sink blocks, the ``heavy_tokens`` positions after them (the *heavy region*) and the recent
window, so vLLM's scheduler frees blocks from positions alone (at most sinks + heavy + window +
one block per request) and never needs to hear about scores. The *contents* of the heavy region
are score-driven: whenever tokens leave the window (a block at a time in vLLM, one token at a
time with block size 1), the heavy tokens and the leaving ones compete, per layer and per KV head,
on the policy's score (``core.scores``), and the best ``heavy_tokens`` of them are kept in the
heavy slots (``core.selection``). Keys are cached after RoPE, so a token copied into a heavy slot
keeps its rotary position, and every heavy token is older than every query that sees it.

With block size 1 and no sinks this is the published per-token algorithm: H2O keeps the heavy
hitters plus the recent window, and evicts the lowest-scored non-recent token at every step.

A step of several tokens (a prefill chunk) is processed in *waves* (:meth:`HeavyPolicy.waves`):
the chunk is cut wherever a block leaves the window, and the heavy region is chosen between the
waves, so the later queries of the chunk see the region as token-by-token decoding would have
left it. Results therefore do not depend on how a prompt was split into chunks, and a request's
output does not depend on the requests batched beside it.

With the *prompt hold* (``prompt_hold``) a sequence keeps every prompt token until its prompt has
been read (:meth:`EvictionPolicy.kept`): the first choice happens at the end of the step that
computes the prompt's last token, when the heavy region and every prompt token outside the sinks
and the window compete, so the choice can follow what the question at the end of the prompt
attends to (SnapKV; h2o, tova, ... with the hold). From then on the memory bound is as without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cam_vllm.core.scores import TokenScore
from cam_vllm.policies.streaming import StreamingPolicy


@dataclass(frozen=True)
class HeavyPolicy(StreamingPolicy):
    """Sinks, a score-selected heavy region of ``heavy_tokens``, and the recent window."""

    heavy_tokens: int = 0
    score: TokenScore | None = None
    prompt_hold: bool = False

    def __post_init__(self) -> None:
        self._check_blocks()
        b = self.block_size
        if self.score is None:
            raise ValueError("a heavy-region policy needs a score")
        if self.score.observation_window is not None and not self.prompt_hold:
            raise ValueError(
                f"{self.score.name} scores the prompt with its last queries, so it needs the prompt "
                "hold (prompt_hold true, --kv-prompt-hold)"
            )
        if self.token_exact:
            raise ValueError("token_exact applies to streaming eviction, not to a heavy-region policy")
        if self.heavy_tokens < 0 or self.heavy_tokens % b:
            raise ValueError(
                f"heavy tokens ({self.heavy_tokens}) must be a non-negative multiple of the block size "
                f"{b}; use {self.heavy_tokens // b * b} or {(self.heavy_tokens // b + 1) * b}"
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.score.name if self.score is not None else "heavy"

    @property
    def prefix_end(self) -> int:
        return self.sink_end + self.heavy_tokens

    @property
    def heavy_start(self) -> int:
        return self.sink_end

    @property
    def holds_prompt(self) -> bool:
        return self.prompt_hold
