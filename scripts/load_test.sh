#!/usr/bin/env bash
# The full-size load test (docs/reliability.md): serve SmolLM2 through scripts/serve.sh on a pool
# small enough to force preemptions, run `cam-vllm load-test` against it, stop the server.
#
#   bash scripts/load_test.sh cam-streaming             # --kv-policy; extra args go to `cam-vllm load-test`
#   bash scripts/load_test.sh h2o --requests 50         # score-driven: h2o, tova, scissorhands, corm
#   KV_MERGE=cam bash scripts/load_test.sh h2o          # cam-h2o (KV_MERGE: any merge rule)
#
# Environment: PORT (8123), POOL_BLOCKS (160 blocks of 32 tokens), OUT (a JSON report, optional).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
policy="${1:?usage: load_test.sh POLICY [load-test args]}"
shift
port="${PORT:-8123}"
log="$(mktemp -t cam-vllm-load-XXXX.log)"
merge=()
[[ -n "${KV_MERGE:-}" ]] && merge=(--kv-merge "$KV_MERGE")
PORT="$port" MAX_MODEL_LEN=2048 setsid bash scripts/serve.sh --kv-policy "$policy" --kv-window-tokens 256 \
    --block-size 32 --enforce-eager --num-gpu-blocks-override "${POOL_BLOCKS:-160}" \
    --no-scheduler-reserve-full-isl --max-num-seqs 48 --max-num-batched-tokens 512 "${merge[@]}" \
    >"$log" 2>&1 &
server=$!
trap 'kill -TERM -- -$server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 300); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
    kill -0 "$server" 2>/dev/null || { tail -40 "$log"; echo "server exited (log: $log)" >&2; exit 1; }
    sleep 2
done
echo "server up (policy $policy ${merge[*]}; log $log)" >&2
out=()
[[ -n "${OUT:-}" ]] && out=(--out "$OUT")
.venv/bin/cam-vllm load-test --base-url "http://127.0.0.1:$port" --vocab 49152 "${out[@]}" "$@"
