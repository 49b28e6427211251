"""A chat turn about a document through the openai client, streamed: the usual OpenAI API.

    python examples/chat.py [BASE_URL]     # default http://127.0.0.1:8000; MODEL: the first served model

With ``--kv-policy snapkv`` the server reads the whole prompt (document and question) before it
chooses what to keep, so the question decides which tokens of the document stay.
"""

from __future__ import annotations

import os
import sys

from openai import OpenAI

base = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("BASE_URL", "http://127.0.0.1:8000")
client = OpenAI(base_url=base + "/v1", api_key=os.environ.get("VLLM_API_KEY", "unused"))
model = os.environ.get("MODEL") or client.models.list().data[0].id

document = " ".join(f"Line {i}: the weather was mild and nothing happened." for i in range(40))
document += " The secret code is 4711. " + document
stream = client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": f"{document}\n\nWhat is the secret code?"}],
    max_tokens=24,
    temperature=0,
    stream=True,
)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
