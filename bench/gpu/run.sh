#!/usr/bin/env bash
# The GPU engine's checks and figures in one run (see run.py): the engine's sections in under 7
# minutes on one GPU, then the 24 GB sweep and plan; at most 9 minutes (what ran is kept on a timeout):
#   bench/gpu/run.sh [OUT.json]        (default: $OUT/gpu.json where the device tool sets OUT, else bench/results/gpu.json)
# Runs from the source tree (PYTHONPATH=src) on the GPU image's torch, Triton and transformers; the
# server's packages the image lacks travel as wheels (bench/gpu/wheels.sh makes them here; the
# device call carries bench/gpu/wheels) and are installed first into /tmp/site, without the network.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-bench/results}/gpu.json}"
mkdir -p "$(dirname "$out")"
python="${PYTHON:-python3}"  # the image's python3 holds its torch
"$python" -V
site=""
if compgen -G "bench/gpu/wheels/*.whl" >/dev/null; then
    # (not fatal: the engine's sections need none of them; only the served sweep would fail)
    if "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site bench/gpu/wheels/*.whl; then
        site=":/tmp/site"
        # the server's imports, checked here: the sweep would report a failure only after the rest
        PYTHONPATH="src$site" "$python" -c "import vidya.server.app" || echo "run.sh: vidya.server.app does not import: sweep_24gb will fail" >&2
    else
        echo "run.sh: the server's wheels did not install (they are built for Python 3.12): sweep_24gb will fail" >&2
    fi
fi
export VIDYA_COMMIT="${VIDYA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
# SIGINT first (Python's finally blocks stop the sweep's server and free the GPU), SIGKILL 20 s later
PYTHONPATH="src$site" timeout -s INT -k 20 540 "$python" bench/gpu/run.py --json "$out" "${@:2}"
