"""cam-vllm without a server: ``vllm.LLM`` with the policy in ``additional_config``.

    python examples/offline.py MODEL

The plugin is loaded by vLLM itself (entry point ``vllm.general_plugins``); the settings are the
flags' keys (README, "Flags").
"""

from __future__ import annotations

import sys


def main(model: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(
        model,
        max_model_len=2048,
        gpu_memory_utilization=0.3,  # of the GPU's memory; on vLLM's CPU build, of the RAM
        additional_config={"kv_policy": {"policy": "snapkv", "window_tokens": 256, "heavy_tokens": 256}},
    )
    filler = " ".join(f"Day {i}: the weather was mild and nothing happened." for i in range(60))
    document = f"{filler} The special magic number is 4711. {filler}"
    question = [{"role": "user", "content": f"{document}\n\nWhat is the special magic number?"}]
    out = llm.chat(question, SamplingParams(temperature=0, max_tokens=16))
    print(out[0].outputs[0].text)


if __name__ == "__main__":  # vLLM starts its engine in a new process, which imports this file
    main(sys.argv[1])
