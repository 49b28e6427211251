"""User-facing settings of a KV policy, validated once, shared by every engine.

The same model is read from ``vllm serve --kv-policy ...`` flags, from vLLM's
``--additional-config``, from the evaluation CLI and from tests, so a bad setting gets the same
message everywhere.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cam_vllm.core.scores import MAX_HISTORY
from cam_vllm.policies import is_score_driven, resolve_merge


def short_reason(exc: BaseException) -> str:
    """One line per problem of a failed validation (the error or its cause), without pydantic's
    boilerplate (links, input echoes)."""
    for err_exc in (exc, exc.__cause__):
        errors = getattr(err_exc, "errors", None)
        if not callable(errors):
            continue
        parts = []
        for err in errors():
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            loc = ".".join(str(x) for x in err.get("loc", ()) if x != "__root__")
            if err.get("type") == "extra_forbidden":
                msg = f"unknown setting {loc!r}"
            elif loc:
                msg = f"{loc}: {msg}"
            parts.append(msg)
        return "; ".join(parts) or str(exc)
    return str(exc)


def split_heavy(rest: int, block_size: int, heavy_tokens: int | None = None) -> tuple[int, int]:
    """(heavy, window) tokens of what the sinks leave of a budget: half each, whole blocks (an
    explicit ``heavy_tokens`` is kept; the window gets the rest, rounded down)."""
    b = block_size
    heavy = heavy_tokens if heavy_tokens is not None else max(rest, 0) // 2 // b * b
    return heavy, (rest - heavy) // b * b


class KVPolicyConfig(BaseModel):
    """A KV policy and its budget.

    The budget is either absolute (``window_tokens``) or a fraction of a length (``budget``:
    sinks + window = budget * length); :meth:`resolve` turns a fraction into tokens once the
    length is known (vLLM: ``max_model_len``; evaluations: the prompt length, as the paper does).

    Score-driven policies (h2o, tova, scissorhands, corm) also keep a heavy region. Default split,
    as in the H2O and CaM papers: half heavy, half recent. With a budget, what is left after the
    sinks is halved (heavy rounded down to whole blocks, the window gets the rest, rounded down);
    with an explicit window and no ``heavy_tokens``, the heavy region equals the window.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fields with a ``cli`` entry are ``vllm serve`` flags (``--kv-<field in kebab case>``, the
    # description their help, the entry their metavar; booleans are --flag/--no-flag). One source:
    # ``vllm_plugin.cli`` builds the flags from here.
    policy: str = Field(
        "none", description="KV-cache policy (default: none, plain vLLM)", json_schema_extra={"cli": ""}
    )
    merge: str | None = Field(
        None,
        description=(
            "merge rule for evicted tokens (default: the one the policy name gives, e.g. cam-streaming)"
        ),
        json_schema_extra={"cli": ""},
    )
    sink_tokens: int = Field(
        4, ge=0, description="first tokens always kept (default: 4)", json_schema_extra={"cli": "N"}
    )
    window_tokens: int | None = Field(
        None,
        ge=1,
        description="recent tokens kept, a multiple of the block size",
        json_schema_extra={"cli": "N"},
    )
    budget: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="sinks + window as a fraction of max_model_len (instead of --kv-window-tokens)",
        json_schema_extra={"cli": "FRACTION"},
    )
    block_size: int = Field(1, ge=1, description="eviction granularity in tokens (vLLM: its block size)")
    merge_targets: int = Field(
        16,
        ge=1,
        description="CaM: oldest window tokens that receive a merge (default: 16)",
        json_schema_extra={"cli": "M"},
    )
    merge_clamp: tuple[float, float] = Field((0.0, 1.0), description="CaM: clamp interval of Eq. 14")
    merge_target_mode: Literal["even", "random-single"] = "even"
    merge_similarity: float = Field(
        0.8,
        ge=-1.0,
        le=1.0,
        description="kvmerger: key cosine joining adjacent evicted tokens into a merging set (default: 0.8)",
        json_schema_extra={"cli": "COS"},
    )
    heavy_tokens: int | None = Field(
        None,
        ge=0,
        description=(
            "h2o, tova, scissorhands, corm, snapkv: heavy tokens kept, a multiple of the block size "
            "(default: half of the budget, or the window)"
        ),
        json_schema_extra={"cli": "N"},
    )
    score_history: int = Field(
        32,
        ge=1,
        le=MAX_HISTORY,
        description="scissorhands, corm: recent queries whose importance counts (1..62, default: 32)",
        json_schema_extra={"cli": "N"},
    )
    score_threshold: float = Field(
        1.0,
        gt=0.0,
        description="scissorhands, corm: important = attention >= ALPHA / tokens the query sees (default: 1)",
        json_schema_extra={"cli": "ALPHA"},
    )
    prompt_hold: bool | None = Field(
        None,
        description=(
            "h2o, tova, scissorhands, corm, snapkv: keep the whole prompt until it has been read, then "
            "choose the heavy tokens (the prompt occupies its full size until then; default: true for "
            "snapkv, false for the others)"
        ),
        json_schema_extra={"cli": ""},
    )
    prompt_hold_tokens: int | None = Field(
        None,
        ge=1,
        description=(
            "h2o, tova, scissorhands, corm, snapkv: bound the prompt hold to N tokens per request (a "
            "multiple of the block size above sinks + heavy + window): the heavy tokens are chosen each "
            "time a prompt being read reaches N, and once more at its end (implies --kv-prompt-hold; "
            "default: the whole prompt is held)"
        ),
        json_schema_extra={"cli": "N"},
    )
    observation_window: int = Field(
        32,
        ge=1,
        description=(
            "snapkv: the last N prompt queries choose the heavy tokens (at most the window; default: 32)"
        ),
        json_schema_extra={"cli": "N"},
    )
    pooling_kernel: int = Field(
        31,
        ge=1,
        le=255,
        description="snapkv: scores are pooled over K neighbouring positions (odd, 1..255; default: 31)",
        json_schema_extra={"cli": "K"},
    )
    token_exact: bool = Field(
        False,
        description=(
            "streaming (with a merge rule or not): attend to exactly the per-token sinks and window inside "
            "the held blocks; holds about one block more per request and computes attention itself "
            "(default: false)"
        ),
        json_schema_extra={"cli": ""},
    )
    score_mode: Literal["accumulated", "current"] = "accumulated"
    seed: int = Field(
        0, description="CaM: default seed of the merge draws (default: 0)", json_schema_extra={"cli": "SEED"}
    )
    allow_full_cache_requests: bool = Field(
        False,
        description=(
            'a request may ask for the full KV cache with vllm_xargs {"kv_policy": "none"}, or on a '
            'score-driven server to hold its prompt until read, {"kv_prompt_hold": true} (default: false)'
        ),
        json_schema_extra={"cli": ""},
    )

    @model_validator(mode="after")
    def _check(self) -> KVPolicyConfig:
        base, _ = resolve_merge(self.policy, self.merge)  # raises on unknown names and contradictions
        if self.heavy_tokens is not None and not is_score_driven(base):
            raise ValueError(
                f"heavy_tokens applies to score-driven policies (h2o, tova, scissorhands, corm), "
                f"not {self.policy!r}"
            )
        if self.prompt_hold and not is_score_driven(base):
            raise ValueError(
                f"prompt_hold applies to score-driven policies (h2o, tova, scissorhands, corm, snapkv), "
                f"not {self.policy!r}"
            )
        if self.prompt_hold_tokens is not None and (self.prompt_hold is False or not is_score_driven(base)):
            raise ValueError(
                f"prompt_hold_tokens bounds the prompt hold of a score-driven policy (h2o, tova, "
                f"scissorhands, corm, snapkv); policy {self.policy!r}"
                + (" with prompt_hold false" if is_score_driven(base) else "")
                + " holds no prompt"
            )
        if base == "snapkv" and self.prompt_hold is False:
            raise ValueError(
                "snapkv scores the prompt with its last queries, so it always holds the prompt; "
                "drop prompt_hold false (--no-kv-prompt-hold)"
            )
        if self.pooling_kernel % 2 == 0:
            raise ValueError(
                f"pooling_kernel must be odd (centred on the token), got {self.pooling_kernel}; "
                f"use {self.pooling_kernel - 1} or {self.pooling_kernel + 1}"
            )
        if self.window_tokens is not None and self.budget is not None:
            raise ValueError("give either window_tokens or budget, not both")
        lo, hi = self.merge_clamp
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"merge_clamp must satisfy 0 <= lo <= hi <= 1, got {self.merge_clamp}")
        if self.token_exact and base != "streaming":
            raise ValueError(
                f"token_exact applies to streaming eviction (with or without a merge rule), not to "
                f"policy {self.policy!r}"
            )
        return self

    @property
    def evicts(self) -> bool:
        return self.policy != "none"

    @property
    def score_driven(self) -> bool:
        return is_score_driven(resolve_merge(self.policy, self.merge)[0])

    @property
    def base_policy(self) -> str:
        return resolve_merge(self.policy, self.merge)[0]

    def resolve(self, length: int | None = None) -> KVPolicyConfig:
        """Return a copy with ``window_tokens`` set (from ``budget`` * ``length`` if needed).

        The window is rounded down to whole blocks; a budget that leaves less than one block
        (or no more than the sinks) is an error naming the numbers. SnapKV's observation window
        must fit in the window (the question it reads stays visible while it is answered).
        """
        out = self._resolve(length)
        window = out.window_tokens
        if out.base_policy == "snapkv" and window is not None and out.observation_window > window:
            raise ValueError(
                f"observation window of {out.observation_window} queries is longer than the window "
                f"of {window} tokens. Fix: lower observation_window (--kv-observation-window) to at "
                f"most {window}, or raise the window"
            )
        return out

    def _resolve(self, length: int | None = None) -> KVPolicyConfig:
        if not self.evicts:
            return self
        if self.window_tokens is not None:
            if self.score_driven and self.heavy_tokens is None:
                return self.model_copy(update={"heavy_tokens": self.window_tokens})
            return self
        if self.budget is None:
            raise ValueError(f"policy {self.policy!r} needs window_tokens or budget")
        if length is None:
            raise ValueError("a fractional budget needs the length it is a fraction of")
        total = int(self.budget * length)
        b = self.block_size
        if self.score_driven:
            rest = total - self.sink_tokens
            heavy, window = split_heavy(rest, b, self.heavy_tokens)
            if window < b or heavy < b:
                raise ValueError(
                    f"budget {self.budget} of {length} tokens is {total} tokens, which leaves "
                    f"{max(rest, 0)} tokens after {self.sink_tokens} sinks for the heavy region "
                    f"({heavy}) and the window ({max(window, 0)}); each needs at least one block of "
                    f"{b} tokens. Fix: raise the budget or lower the sinks"
                )
            return self.model_copy(update={"window_tokens": window, "heavy_tokens": heavy, "budget": None})
        window = total - self.sink_tokens
        if not self.token_exact:  # token-exact windows need not be whole blocks
            window = window // b * b
        if window < b or window <= self.sink_tokens:
            raise ValueError(
                f"budget {self.budget} of {length} tokens is {total} tokens, which leaves a window of "
                f"{max(window, 0)} tokens after {self.sink_tokens} sinks; it must exceed the sinks and "
                f"hold at least one block of {b} tokens"
            )
        return self.model_copy(update={"window_tokens": window, "budget": None})
