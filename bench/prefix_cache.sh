#!/usr/bin/env bash
# Time to first token with the prefix cache on and off, in one run, on the tutor-prefix workload
# (16 chats x 4 turns, every request repeating one ~400-token system prompt and earlier turns).
#   bench/prefix_cache.sh [CONCURRENCY]     (default 8)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VIDYA="$REPO/.venv/bin/vidya"
C="${1:-8}"
OUT="${OUT:-/tmp/vidya-prefix}"
mkdir -p "$OUT"
for mode in on off; do
    port=$((18500 + RANDOM % 1000))
    flags=()
    [ "$mode" = off ] && flags=(--no-enable-prefix-caching)
    "$VIDYA" serve --port "$port" --disable-uvicorn-access-log "${flags[@]}" >"$OUT/serve-$mode.log" 2>&1 &
    pid=$!
    for _ in $(seq 300); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 1; done
    echo "== prefix caching $mode"
    "$VIDYA" bench serve --base-url "http://127.0.0.1:$port" --workload tutor-prefix --concurrency "$C" \
        --json "$OUT/prefix-$mode.json"
    kill -TERM "$pid"; wait "$pid" || true
done
"$REPO/.venv/bin/python" - "$OUT" <<'PY'
import json, sys
on, off = (json.load(open(f"{sys.argv[1]}/prefix-{m}.json")) for m in ("on", "off"))
for q in ("p50", "p99"):
    a, b = on[f"ttft_{q}_ms"], off[f"ttft_{q}_ms"]
    print(f"TTFT {q}: caching on {a:.0f} ms, off {b:.0f} ms -> {b / a:.1f}x")
hits = on["server_metrics"]
print(f"prefix cache hit rate (on): {hits['prefix_cache_hits_total'] / hits['prefix_cache_queries_total']:.1%}")
PY
