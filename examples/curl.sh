#!/usr/bin/env bash
# Plain HTTP against a vLLM server running cam-vllm: a completion, a chat turn, the active policy
# and cam-vllm's metrics.
#
#   bash examples/curl.sh [BASE_URL]      # default http://127.0.0.1:8000; MODEL: the first served model
set -euo pipefail
base="${1:-${BASE_URL:-http://127.0.0.1:8000}}"
model="${MODEL:-$(curl -fsS "$base/v1/models" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"][0]["id"])')}"

echo "== completion"
curl -fsS "$base/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"prompt\": \"The capital of France is\", \"max_tokens\": 8, \"temperature\": 0}"
echo
echo "== chat"
curl -fsS "$base/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"$model\", \"max_tokens\": 16, \"temperature\": 0,
         \"messages\": [{\"role\": \"user\", \"content\": \"Name three colours.\"}]}"
echo
echo "== policy (GET /v1/kv_policy: served where VLLM_PLUGINS names cam_vllm)"
curl -fsS "$base/v1/kv_policy" || echo "(no /v1/kv_policy here)"
echo
echo "== metrics"
curl -fsS "$base/metrics" | grep '^cam_vllm:' | awk 'NR <= 20'  # (awk reads to the end: no SIGPIPE)
