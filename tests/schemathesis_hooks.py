"""Schemathesis hooks for the OpenAPI fuzz run (``SCHEMATHESIS_HOOKS=schemathesis_hooks``).

Random model names only ever reach vLLM's 404, so most bodies name the served model; lengths
that would make a case slow (``max_tokens``, ``n``, ...) are capped when they are plausible,
while out-of-range values (negative, huge, wrong type) pass untouched: they must get a 4xx.
"""

from __future__ import annotations

import os

import schemathesis

MODEL = os.environ.get("FUZZ_MODEL", "tiny")
SLOW_FIELDS = {"max_tokens": 16, "max_completion_tokens": 16, "min_tokens": 16, "n": 2, "best_of": 2}


@schemathesis.hook
def map_body(ctx, body):  # noqa: ANN001, ANN201 - schemathesis' hook signature
    if isinstance(body, dict):
        if "model" in body or "messages" in body or "prompt" in body:
            body["model"] = MODEL
        for name, cap in SLOW_FIELDS.items():
            value = body.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and cap < value < 10**6:
                body[name] = cap
    return body
