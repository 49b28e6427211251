"""Per-request settings, sent in vLLM's ``vllm_xargs`` field.

    python examples/per_request.py [BASE_URL]   # default http://127.0.0.1:8000

* ``{"kv_policy": "none"}``: this request keeps the full KV cache, where the server allows it
  (``--kv-allow-full-cache-requests``);
* ``{"kv_window_tokens": 256}``: a smaller window, on a ``streaming`` server;
* ``{"kv_prompt_hold": True}``: the prompt is read before the heavy region is chosen, on an h2o,
  tova, scissorhands or corm server that allows it (``--kv-allow-full-cache-requests``).

What the server cannot honour is an HTTP 400 whose message names the problem; this script prints
the answer or that message for each.
"""

from __future__ import annotations

import os
import sys

import openai

base = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BASE_URL", "http://127.0.0.1:8000")
client = openai.OpenAI(base_url=base + "/v1", api_key=os.environ.get("VLLM_API_KEY", "unused"))
model = os.environ.get("MODEL") or client.models.list().data[0].id

for xargs in ({}, {"kv_policy": "none"}, {"kv_window_tokens": 256}, {"kv_prompt_hold": True}):
    try:
        out = client.completions.create(
            model=model,
            prompt="The three primary colours are",
            max_tokens=12,
            temperature=0,
            extra_body={"vllm_xargs": xargs} if xargs else None,
        )
        print(f"{xargs or 'server policy'}: ok: {out.choices[0].text!r}")
    except openai.BadRequestError as exc:
        print(
            f"{xargs}: refused (HTTP 400): {exc.body.get('message') if isinstance(exc.body, dict) else exc}"
        )
