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

A *bounded* hold (``prompt_hold_tokens`` = T) holds at most T tokens while the prompt is read: the
window start moves in steps of ``hold_span`` = T - (sinks + heavy + window) + one block, so the
held tokens grow from the policy's bound to T, and each time the next block would pass T the heavy
region is chosen among it and the tokens leaving (one compression), with the newest queries as
the observation window; at the end of the prompt the last compression brings it back to the
bound. An observation-window score (SnapKV) starts afresh after each compression inside the
prompt, so each choice follows its own window's queries (:meth:`HeavyPolicy.restarts_scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cam_vllm.core.scores import TokenScore
from cam_vllm.policies.layout import in_held_prompt
from cam_vllm.policies.streaming import StreamingPolicy


@dataclass(frozen=True)
class HeavyPolicy(StreamingPolicy):
    """Sinks, a score-selected heavy region of ``heavy_tokens``, and the recent window."""

    heavy_tokens: int = 0
    score: TokenScore | None = None
    prompt_hold: bool = False
    prompt_hold_tokens: int = 0  # a bounded hold: most tokens held while the prompt is read (0: all)

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
        t = self.prompt_hold_tokens
        if t:
            bound = self.prefix_end + self.window_tokens
            if not self.prompt_hold:
                raise ValueError("prompt_hold_tokens bounds the prompt hold; it needs prompt_hold on")
            if t <= bound or t % b:
                raise ValueError(
                    f"prompt_hold_tokens ({t}) must be a multiple of the block size {b} above what the "
                    f"policy keeps (sinks + heavy + window = {bound} tokens). Fix: use "
                    f"{max(bound + b, -(-t // b) * b)} or more (--kv-prompt-hold-tokens), or drop it "
                    "to hold the whole prompt"
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

    @property
    def hold_span(self) -> int:
        t = self.prompt_hold_tokens
        return t - self.prefix_end - self.window_tokens + self.block_size if t else 0

    def observed(self, q_positions: torch.Tensor, hold_end: int | torch.Tensor) -> torch.Tensor:
        """Bool per query: does its attention count? Every query's, unless the score has an
        observation window (SnapKV): then the last ``w`` queries before each choice inside the
        held prompt (``hold_end``: its sequence's prompt length), the prompt's end among them."""
        w = self.score.observation_window if self.score is not None else None
        if w is None:
            return torch.ones_like(q_positions, dtype=torch.bool)
        end = hold_end if isinstance(hold_end, torch.Tensor) else torch.full_like(q_positions, hold_end)
        out = q_positions >= end - w
        if self.hold_span:  # a compression within the next w queries (the window start moves)
            ahead = torch.minimum(q_positions + 1 + w, end)
            out = out | (self.held_window_start(ahead) != self.held_window_start(q_positions + 1))
        return out & (q_positions < end)

    def restarts_scores(
        self, num_tokens: int | torch.Tensor, hold_end: int | torch.Tensor
    ) -> bool | torch.Tensor:
        """Whether a choice made for a next query that sees ``num_tokens`` tokens is a bounded
        hold's compression inside the prompt after which an observation-window score starts
        afresh (every retained token's accumulated attention back to 0)."""
        if not self.hold_span or self.score is None or self.score.observation_window is None:
            return False
        return in_held_prompt(num_tokens, hold_end)

    def max_held_tokens(self) -> int:
        """Most cached tokens a sequence holds in whole blocks: a bounded hold's size when there
        is one (a whole-prompt hold holds the prompt: see the prompt's length)."""
        return max(super().max_held_tokens(), self.prompt_hold_tokens)
