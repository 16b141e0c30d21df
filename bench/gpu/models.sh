#!/usr/bin/env bash
# The real models' GGUF files for the GPU section real_models (bench/gpu/real_models.py), cut into
# chunks that each fit a device call's carry (64 MiB in all): bench/gpu/models/chunks/NAME.partNN
# (git-ignored). Carry one chunk a call (`carry: ["bench/gpu/models/chunks/FILE.partNN"]` keeps it
# on the warm machine: ignored paths already there stay between calls); then, on the machine,
#   bench/gpu/models.sh join
# puts the files together in bench/gpu/models/ (checked against the sha256 recorded here).
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-split}" = join ]; then
    for sum in models/chunks/*.sha256; do
        name="$(basename "$sum" .sha256)"
        cat "models/chunks/$name".part* > "models/$name"
        (cd models && sha256sum -c "chunks/$name.sha256")
    done
    exit 0
fi
mkdir -p models/chunks
py=../../.venv/bin/python
for model in smollm2 gemma3-270m; do
    path="$("$py" -c "from vidya.models import loader; print(loader.resolve('$model').path)")"
    name="$(basename "$path")"
    split -b 60m -d "$path" "models/chunks/$name.part"
    (cd "$(dirname "$path")" && sha256sum "$name") > "models/chunks/$name.sha256"
done
ls -la models/chunks
