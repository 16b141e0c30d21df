"""Compile the Triton attention kernels for GPUs without one: the launches the engine makes
(`triton_paged.attend_launch`, and `triton_kernels.rotary_launch`: RoPE with the KV-cache write)
at real models' attention shapes, in the serving dtypes, for each architecture named, through
Triton's own compiler to PTX and cubin.
Prints each kernel's shared memory and fails on one over the architecture's per-block limit;
where the ptxas that Triton carries knows the architecture, its register and spill counts too
(more than SPILL_LIMIT bytes spilled fails).

    PYTHONPATH=src python bench/gpu/compile.py [--arch 80 86 90] [--dtype bf16 fp16] [--models ...]
        [--kv-cache-dtype auto|fp8_e4m3|fp8_e5m2] [--json FILE]

It must run without TRITON_INTERPRET (under it the kernels are interpreted, not compiled)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

SHAPES = {  # (query heads, KV heads, head_dim)
    "llama-3-8b": (32, 8, 128),
    "qwen2.5-7b": (28, 4, 128),  # a group of 7, padded to 8
    "gemma-3-4b": (8, 4, 256),
    "gemma-3-270m": (4, 1, 256),
    "smollm2-135m": (9, 3, 64),
}
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # bytes per block (opt-in maximum)
BLOCK_SIZE = 16
# bytes of registers spilled that pass: Hopper's decode tile of 64 keys spills ~100 B at head_dim
# 128 and still ran 9% faster than the 32-key tile that spills none (H200, bench/gpu/profile_decode.py)
SPILL_LIMIT = 128


def signature(fn, types: dict[str, str], constants: dict) -> dict[str, str]:
    """Every argument's type: constants, named types, the other pointers as i32s (strides, counts)."""
    return {name: "constexpr" if name in constants else types.get(name, "i32") for name in fn.arg_names}


KV_TYPES = {"auto": None, "fp8_e4m3": "fp8e4nv", "fp8_e5m2": "fp8e5"}  # --kv-cache-dtype -> Triton's pointer type


def compile_all(archs: list[int], dtypes: list[str], models: list[str], kv_cache_dtype: str = "auto") -> list[dict]:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from vidya.attention import triton_paged as tp
    from vidya.ops import triton_kernels as tk
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}
    out = []
    for arch in archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in dtypes:
            for model in models:
                h, kvh, d = SHAPES[model]
                launch = tp.attend_launch(h, kvh, d, BLOCK_SIZE, torch_dtype[dtype], arch)
                kv_type = f"*{KV_TYPES[kv_cache_dtype] or dtype}"
                ptr = {n: f"*{dtype}" for n in ("out_ptr", "q_ptr")}
                ptr.update(kc_ptr=kv_type, vc_ptr=kv_type)
                # as the engine passes them: block tables and lengths int64 (AttentionMetadata), tile maps int32
                ptr.update({"bt_ptr": "*i64", "seq_lens_ptr": "*i64"})
                ptr.update({n: "*i32" for n in ("qstart_ptr", "tile_seq_ptr", "tile_q0_ptr")})
                ptr.update(scale="fp32", v_scale="fp32")
                tiles = {"attend decode": launch.decode, "attend prefill": launch.prefill}
                launches = [(name, tp._attend_kernel, ptr,
                             {**dict(launch.constants), "BLOCK_Q": tile.block_q, "BLOCK_N": tile.block_n},
                             tile.num_warps, tile.num_stages) for name, tile in tiles.items()]
                rotary, warps = tk.rotary_launch(h, kvh, d, BLOCK_SIZE)
                launches.append(("rotary_cache", tk._rotary_cache_kernel,
                                 {**{n: f"*{dtype}" for n in ("qkv_ptr", "cos_ptr", "sin_ptr")}, "kc_ptr": kv_type,
                                  "vc_ptr": kv_type, "slot_ptr": "*i64", "k_scale": "fp32", "v_scale": "fp32",
                                  "top": "fp32"},
                                 {**rotary, "FP8": kv_cache_dtype != "auto"}, warps, None))
                for name, fn, types, constants, num_warps, stages in launches:
                    row = {"arch": arch, "dtype": dtype, "kv_cache_dtype": kv_cache_dtype, "model": model,
                           "kernel": name, "num_warps": num_warps,
                           "num_stages": stages, **constants}
                    options = {"num_warps": num_warps, **({} if stages is None else {"num_stages": stages})}
                    try:
                        src = ASTSource(fn, signature(fn, types, constants), constexprs=constants)
                        k = triton.compile(src, target=target, options=options)
                        row["shared_bytes"] = k.metadata.shared
                        row.update(ptxas_usage(k.asm["ptx"], arch))
                        row["ok"] = (k.metadata.shared <= SMEM_LIMIT.get(arch, 48 * 1024)
                                     and row.get("spill_bytes", 0) <= SPILL_LIMIT)
                    except Exception as e:  # a compile error is the finding: report it, go on
                        row.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
                    out.append(row)
                    print(json.dumps(row), flush=True)
    return out


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spills from Triton's own ptxas, where it takes this PTX ({} where it cannot:
    e.g. a newer PTX version, or Hopper's sm_90a target that plain sm_90 refuses)."""
    import triton
    gpu = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        for name in ("ptxas", "ptxas-blackwell"):  # Triton 3.9 carries a newer one beside the first
            ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
            if not os.path.exists(ptxas):
                continue
            r = subprocess.run([ptxas, "-v", f"--gpu-name={gpu.group(1) if gpu else f'sm_{arch}'}", f.name,
                                "-o", os.devnull], capture_output=True, text=True)
            regs = re.search(r"Used (\d+) registers", r.stderr)
            spills = re.search(r"(\d+) bytes spill stores", r.stderr)
            if r.returncode == 0 and regs:
                return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1)) if spills else 0}
    return {}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90], help="compute capabilities (default 80 86 90)")
    ap.add_argument("--dtype", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16"])
    ap.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_TYPES))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: under it the kernels are interpreted, not compiled", file=sys.stderr)
        return 2
    rows = compile_all(args.arch, args.dtype, args.models, args.kv_cache_dtype)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} kernels compiled within their limits", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
