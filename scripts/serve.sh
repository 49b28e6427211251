#!/usr/bin/env bash
# The main job: set up, prepare SmolLM2-135M-Instruct offline, and serve it with CaM on CPU.
#
#   bash scripts/serve.sh                       # http://127.0.0.1:8000/v1, model name "smollm2"
#   PORT=9000 bash scripts/serve.sh --kv-window-tokens 512   # extra args go to `vllm serve`
#
# Environment: PORT (8000), KV_POLICY (cam-streaming), KV_SINK_TOKENS (4), KV_WINDOW_TOKENS (1024),
# VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
model="$(.venv/bin/cam-vllm prepare-model)"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
exec .venv/bin/vllm serve "$model" \
    --host 127.0.0.1 --port "${PORT:-8000}" --served-model-name smollm2 \
    --dtype bfloat16 --max-model-len 8192 --gpu-memory-utilization 0.3 \
    --kv-policy "${KV_POLICY:-cam-streaming}" \
    --kv-sink-tokens "${KV_SINK_TOKENS:-4}" \
    --kv-window-tokens "${KV_WINDOW_TOKENS:-1024}" \
    "$@"
