"""KV budgets of an evaluation: a fraction of a sequence's length, turned into sinks + window.

The paper states budgets as a fraction of the sequence (10%..90%, Table 1 at 20%). Its
zero-shot code takes the fraction of the whole input of one request (context + continuation,
the sequence it runs in one forward); long-text runs take it of the evaluated length. Prompts of
the zero-shot tasks are short (tens of tokens), so a 20% budget is a handful of tokens and the
usual 4 sinks would eat all of it. :func:`resolve_budget` therefore shrinks the sinks:

    total  = max(1, int(budget * length))          # int() as the authors' code does
    sinks  = min(sink_tokens, (total - 1) // 2)    # fewer sinks than window tokens, always
    window = total - sinks

so a 3-token budget is 1 sink + 2 recent tokens and a 1-token budget is the newest token only.
With a block size B > 1 the window is rounded down to whole blocks (at least one block) and the
sinks are capped below it (the block-granular policy keeps the sinks' block as well); a
token-exact window (``token_exact``) is not rounded, only raised to one block.

Score-driven policies (h2o, tova, scissorhands, corm) split what the sinks leave in half, as the
H2O and CaM papers do: ``heavy = (total - sinks) // 2`` (whole blocks), the window the rest. An
explicit ``heavy_tokens`` is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

from cam_vllm.config import KVPolicyConfig, split_heavy


@dataclass(frozen=True)
class Budget:
    """What one sequence is allowed: ``sinks`` + ``window`` tokens of ``length``."""

    sinks: int
    window: int
    length: int
    heavy: int = 0

    @property
    def total(self) -> int:
        return self.sinks + self.heavy + self.window


def split_budget(total: int, sink_tokens: int, block_size: int = 1) -> tuple[int, int]:
    """(sinks, window) for a budget of ``total`` tokens, as the module docstring says."""
    total = max(1, total)
    sinks = min(sink_tokens, (total - 1) // 2)
    window = total - sinks
    if block_size > 1:
        window = max(block_size, window // block_size * block_size)
        sinks = min(sinks, window - 1)
    return sinks, window


def resolve_budget(cfg: KVPolicyConfig, length: int) -> KVPolicyConfig:
    """``cfg`` with an explicit window for a sequence of ``length`` tokens (see module docstring).

    ``cfg.budget`` (a fraction) is taken of ``length``; an explicit ``window_tokens`` is kept as
    it is; the full cache (``policy="none"``) is returned unchanged.
    """
    if not cfg.evicts or cfg.budget is None:
        return cfg.resolve(length)
    total = int(cfg.budget * length)
    if cfg.score_driven:
        b = cfg.block_size
        sinks = min(cfg.sink_tokens, max(total - 1, 0) // 2)
        heavy, window = split_heavy(max(total, 1) - sinks, b, cfg.heavy_tokens)
        window = max(b, window)
        update = {"sink_tokens": sinks, "heavy_tokens": heavy, "window_tokens": window, "budget": None}
        return cfg.model_copy(update=update)
    sinks, window = split_budget(total, cfg.sink_tokens, 1 if cfg.token_exact else cfg.block_size)
    window = max(window, cfg.block_size)
    return cfg.model_copy(update={"sink_tokens": sinks, "window_tokens": window, "budget": None})


def budget_of(cfg: KVPolicyConfig, length: int) -> Budget:
    """The sinks and window ``cfg`` gives a sequence of ``length`` tokens (full cache: all of it)."""
    r = resolve_budget(cfg, length)
    if not r.evicts:
        return Budget(0, length, length)
    return Budget(r.sink_tokens, r.window_tokens or 0, length, r.heavy_tokens or 0)
