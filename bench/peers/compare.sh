#!/usr/bin/env bash
# Side by side on this machine, one run: vidya, vLLM's CPU build (offline and served) and
# llama.cpp's llama-server (served, continuous batching over 64 slots, the same GGUF), on the
# tutor-64 workload, plus transformers' generate() one request at a time as the naive baseline.
#
#   bench/peers/compare.sh [OUTDIR]      (default /tmp/vidya-compare)
#
# Each peer runs if installed (`vllm_cpu.sh install`, `llama_server.sh install`). Prints the
# table and writes OUTDIR/*.json and OUTDIR/table.md.
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
PEERS="${PEERS_DIR:-/work/peers}"
HAVE_VLLM=$(ls "${VLLM_VENV:-$PEERS/vllm-venv}"/.installed-* >/dev/null 2>&1 && echo 1 || echo 0)
HAVE_LLAMA=$([ -x "$PEERS/llama-server/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server" ] && echo 1 || echo 0)
rm -f "$OUT"/vllm-*.json "$OUT"/llamacpp-*.json
if [ "$HAVE_VLLM" = 1 ]; then
    echo "== offline: vLLM"
    "$HERE/vllm_cpu.sh" offline --json "$OUT/vllm-offline.json"
fi

echo "== served: vidya serve, 64 concurrent streams"
"$VIDYA" serve --port "$PORT_V" --disable-uvicorn-access-log >"$OUT/vidya-serve.log" 2>&1 &
pid=$!
wait_ready "http://127.0.0.1:$PORT_V" "$pid"
"$VIDYA" bench serve --base-url "http://127.0.0.1:$PORT_V" --concurrency 64 --json "$OUT/vidya-serve.json"
kill -TERM "$pid"; wait "$pid" || true

serve_peer() {  # LABEL SCRIPT NAME: start SCRIPT serve, load it at 64 streams into OUT/NAME-serve.json
    echo "== served: $1, 64 concurrent streams"
    "$HERE/$2" serve "$PORT_L" >"$OUT/$3-serve.log" 2>&1 &
    local pid=$!
    wait_ready "http://127.0.0.1:$PORT_L" "$pid"
    "$VIDYA" bench serve --base-url "http://127.0.0.1:$PORT_L" --concurrency 64 --json "$OUT/$3-serve.json"
    kill -TERM "$pid"; wait "$pid" || true
}
[ "$HAVE_VLLM" = 1 ] && serve_peer "vLLM OpenAI server" vllm_cpu.sh vllm
[ "$HAVE_LLAMA" = 1 ] && serve_peer "llama.cpp llama-server -np 64" llama_server.sh llamacpp

"$REPO/.venv/bin/python" "$HERE/table.py" "$OUT" | tee "$OUT/table.md"
