#!/usr/bin/env bash
# The Python packages `vidya serve` needs that the GPU machine's image lacks (its image has torch,
# Triton, transformers, httpx, uvloop, prometheus-client, tqdm, jinja2, anyio, h11; fastapi also
# needs opentelemetry-api, and pydantic a typing-extensions newer than the image's), as wheels for
# its Python 3.12, into bench/gpu/wheels/ (git-ignored). Run here, where pip reaches a registry;
# then name bench/gpu/wheels in the device call's carry, and run.sh installs them there offline.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf wheels && mkdir -p wheels
# versions of this project's own .venv (tested together); pure-Python ones are any-platform wheels
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d wheels fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
    annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 typing-extensions==4.16.0 uvicorn==0.55.0 httptools==0.9.0 sniffio==1.3.1
du -sh wheels && ls wheels
