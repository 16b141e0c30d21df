#!/usr/bin/env bash
# The GPU engine's checks and figures in one run, under 7 minutes on one GPU (see run.py):
#   bench/gpu/run.sh [OUT.json]        (default: $OUT/gpu.json where the device tool sets OUT, else bench/results/gpu.json)
# Runs from the source tree (PYTHONPATH=src): the GPU image's torch, Triton and transformers are
# enough; wheels carried in bench/gpu/wheels/ (if any) are installed first, without the network.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-${OUT:-bench/results}/gpu.json}"
mkdir -p "$(dirname "$out")"
if compgen -G "bench/gpu/wheels/*.whl" >/dev/null; then
    python -m pip install -q --no-index --no-deps bench/gpu/wheels/*.whl
fi
export VIDYA_COMMIT="${VIDYA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
PYTHONPATH=src timeout 420 python bench/gpu/run.py --json "$out" "${@:2}"
