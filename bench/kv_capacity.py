"""How many sequences of a given context fit in the KV room of an A10, per cache layout (issue 33).

    PYTHONPATH=src python bench/kv_capacity.py [--context 4096] [--json out.json]

Arithmetic, not a measurement: the engine's own layout (vidya/engine/kv_layout.py) and block
accounting (KVCacheManager.max_blocks: what a decoding sequence holds) over each model's published
shape. The KV room is the engine's sizing on an A10 (24 GB x --gpu-memory-utilization 0.9, less
the weights (bf16, or W4A16 g128 with 16-bit embeddings and output layer), the CUDA-graph margin, and the activations a profiling pass measured for the 8B shape
on the H200 held to 24 GB, 1.1 GiB, taken for both models). "8-bit" halves the bytes a block
takes (an fp8 cache, vLLM's --kv-cache-dtype fp8); vidya's CPU/Triton kernels for it are not built
yet, so those rows are projections.
"""
from __future__ import annotations

import argparse
import json
import sys

from vidya.engine.kv_cache_manager import KVCacheManager
from vidya.engine.kv_layout import kv_layout

GB, GiB = 10**9, 2**30
A10_BYTES = 24 * GB
ACTIVATIONS = 1.1 * GiB
GRAPH_MARGIN = 256 << 20

# published shapes: layers, KV heads, head_dim, sliding window and pattern (every Nth layer full),
# parameters, of which embeddings and output layer (16-bit whatever the decoder's quantization)
MODELS = {
    "Gemma-3-4B": dict(layers=34, kv_heads=4, head_dim=256, window=1024, every=6, params=3.88e9,
                       embed_params=262144 * 2560),  # (tied)
    "Llama-3-8B": dict(layers=32, kv_heads=8, head_dim=128, window=None, every=1, params=8.03e9,
                       embed_params=2 * 128256 * 4096),
}
W4A16_BITS = 4 + (32 + 8) / 128  # codes, and a float32 scale and uint8 zero a group of 128


def capacity(shape: dict, context: int, hybrid: bool, kv_bytes: int, weight_bits: int = 16,
             block_size: int = 16, utilization: float = 0.9) -> dict:
    windows = [None if shape["window"] is None or (i + 1) % shape["every"] == 0 else shape["window"]
               for i in range(shape["layers"])]
    layout = kv_layout(windows, hybrid)
    blocks_per_seq = KVCacheManager(1, block_size, windows=layout.windows).max_blocks(context, 1)
    block_bytes = 2 * layout.slots * shape["kv_heads"] * shape["head_dim"] * block_size * kv_bytes
    decoder = shape["params"] - shape["embed_params"]
    weights = decoder * (W4A16_BITS if weight_bits == 4 else weight_bits) / 8 + shape["embed_params"] * 2
    room = A10_BYTES * utilization - weights - ACTIVATIONS - GRAPH_MARGIN
    per_seq = blocks_per_seq * block_bytes
    return {"layout": layout.describe(), "kv_bytes": kv_bytes, "weight_bits": weight_bits,
            "room_gib": room / GiB, "per_sequence_mib": per_seq / 2**20, "sequences": int(room // per_seq)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    print(f"sequences of {args.context} tokens in an A10's KV room; x: against today (bf16 weights, uniform "
          f"bf16 cache)")
    print(f"{'model':12} {'weights':8} {'cache':28} {'room GiB':>8} {'MiB/seq':>8} {'seqs':>6} {'x':>5}")
    for name, shape in MODELS.items():
        base = None
        for weight_bits in (16, 4):
            for hybrid, kv_bytes, label in ((False, 2, "uniform bf16"), (True, 2, "hybrid bf16"),
                                            (True, 1, "hybrid 8-bit (projected)")):
                if shape["window"] is None and hybrid and kv_bytes == 2:
                    continue  # no sliding layers: hybrid is the uniform cache
                c = capacity(shape, args.context, hybrid, kv_bytes, weight_bits)
                base = base or c["sequences"]
                label = label if shape["window"] is not None else label.replace("hybrid", "uniform")
                rows.append({"model": name, "cache": label, "context": args.context, **c,
                             "vs_today": c["sequences"] / base})
                print(f"{name:12} {'bf16' if weight_bits == 16 else 'W4A16':8} {label:28} {c['room_gib']:8.1f} "
                      f"{c['per_sequence_mib']:8.1f} {c['sequences']:6d} {c['sequences'] / base:5.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
