"""The GPU engine's checks and figures in one run (bench/gpu/run.sh calls this), written as JSON:

    versions     torch, Triton, transformers, CUDA, the GPU, vidya's commit
    bandwidth    device memory bandwidth, GB/s (a large copy: bytes read + written / time)
    kernels      the Triton paged-attention kernels against the torch reference in the serving
                 dtype: max error and time, at Llama-3-8B's and Gemma 3's attention shapes
    quant_kernels  the fused W4A16 / W8A16 projection (ops/triton_quant.py) at Llama-3-8B's shapes,
                 batch 1..256: time against the bf16 matmul and against its own bandwidth floor,
                 error against dequantize-then-matmul (quant_kernels.py)
    tiny_exact   tiny random Llama / Qwen3 / Gemma 3 models, greedy, on the device in float32:
                 vidya's tokens against transformers' generate(), token for token, with and
                 without async scheduling
    real_models  the default model and Gemma 3 270M from their GGUF files, in bf16 with the engine's
                 defaults, against transformers in bf16 on the same GPU: greedy agreement, the first
                 divergence and both texts per prompt (real_models.py; skipped where the files were
                 not carried: they exceed one call's carry, see bench/gpu/models.sh)
    serve_8b     an 8B-shaped Llama (random weights, --load-format dummy) serving N requests
                 (prompt / output lengths below) offline: output tok/s, TTFT and inter-token
                 p50/p99, decode step time against the memory-bandwidth floor (weights + KV bytes
                 a step reads / measured bandwidth), the host's part of a step (schedule, prepare,
                 apply the tokens: CPU work the GPU waits for, unless async scheduling plans the
                 next step while this one runs: the default on a GPU), peak GPU memory
    serve_8b_sync  the same with --no-async-scheduling (each step scheduled once the tokens of
                 the one before it are on the host)
    serve_8b_24gb  the same with --gpu-memory-utilization set so that only 24 GB are used (an A10)
    serve_8b_24gb_sync  that with --no-async-scheduling
    a10          the A10 projected (vidya/bench/roofline.py): the KV room 24 GB leaves Llama-3-8B in
                 bf16 (with the activations the 24 GB run profiled), the batch it holds, the decode
                 step at 600 GB/s divided by the efficiency the 24 GB run reached against its own
                 floor, output tok/s for the bench's requests and for the tutor's, against the
                 compute ceiling
    serve_8b_w4a16, serve_8b_w8a16, serve_8b_24gb_w4a16  serve_8b (and the 24 GB run) with the
                 projections quantized online (int4 g128, int8 per channel) over the dummy weights:
                 decode steps against their own, smaller, weight-bandwidth floor (last: the
                 sections before them fill run.sh's 9 minutes; name them with --only)
    serve_8b_24gb_kv8, serve_8b_24gb_w4a16_kv8  the 24 GB run with an 8-bit KV cache (fp8_e5m2, as
                 an A10's Triton converts it), alone and beside int4 weights: blocks held, decode steps
    sweep_24gb   `vidya serve` on the GPU (the 8B shape, dummy weights, 24 GB), `vidya bench sweep`
                 with the tutor's requests at concurrency 16..256, then `vidya plan` on it (sweep.py);
                 the sweep file is written beside the results
    sweep_24gb_sync  the same with --no-async-scheduling (gpu-sweep-24gb-sync.json)

`--smoke` runs every section at toy sizes (on CPU: Triton interpreted) so that the script is
tested where no GPU is; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from quant_kernels import quant_kernels
from real_models import real_models
from serving import LLAMA3_8B, TOY, model_dir, serve_8b

GiB = 1 << 30
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of fn() over `repeat` runs after one warm-up."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def versions(device: torch.device) -> dict:
    import transformers
    commit = os.environ.get("VIDYA_COMMIT")
    if not commit:  # run directly, not through run.sh
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        commit = git.stdout.strip() or "unknown"
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "commit": commit, "device": str(device)}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        out.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / GiB, 1))
    return out


def bandwidth(device: torch.device, smoke: bool) -> dict:
    n = (64 << 20) if smoke else (2 * GiB)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device, 3 if smoke else 20)
    return {"bytes": n, "seconds": seconds, "gb_s": 2 * n / seconds / 1e9}


def kernels(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict]:
    from vidya.attention import paged as reference
    from vidya.attention import triton_paged
    from vidya.attention.metadata import AttentionMetadata
    shapes = [("llama3-8b", 8, 32, 128), ("gemma3-4b", 4, 8, 256)]
    decodes, ctx, chunk = (4, 40, 24) if smoke else (64, 1024, 512)
    bs = 16
    out = []
    for name, kvh, h, d in shapes:
        rng = random.Random(0)
        q_lens = [1] * decodes + [chunk, chunk]
        ctx_lens = [rng.randrange(ctx // 2, ctx) for _ in range(decodes)] + [chunk, ctx + chunk]  # a prompt; a chunk after a prefix
        per_seq = [-(-c // bs) for c in ctx_lens]
        blocks = list(range(1, sum(per_seq) + 1))
        rng.shuffle(blocks)
        tables = [[blocks.pop() for _ in range(n)] for n in per_seq]
        meta = AttentionMetadata.for_sequences(q_lens, ctx_lens, tables, bs, device)
        nb = sum(per_seq) + 1
        k_cache = torch.randn(nb, bs, kvh, d, device=device).to(dtype)
        v_cache = torch.randn(nb, bs, kvh, d, device=device).to(dtype)
        q = torch.randn(sum(q_lens), h, d, device=device).to(dtype)
        for window in (None, 512):
            want = reference.attend(q, k_cache, v_cache, meta, d ** -0.5, window)
            got = triton_paged.attend(q, k_cache, v_cache, meta, d ** -0.5, window)
            err = (got.float() - want.float()).abs().max().item()
            # both round to bf16 (the reference its scores too): a few units in the last place of
            # the largest output (~0.016 at |x| of 2-4); a wrong kernel is off by O(1)
            bound = 2e-2 * max(1.0, want.float().abs().max().item())
            repeat = 2 if smoke else 20
            out.append({"shape": name, "kv_heads": kvh, "heads": h, "head_dim": d, "window": window,
                        "decodes": decodes, "chunks": 2, "dtype": str(dtype), "max_abs_err": err,
                        "err_bound": bound, "ok": err <= bound,
                        "triton_ms": 1e3 * timed(lambda: triton_paged.attend(q, k_cache, v_cache, meta, d ** -0.5, window), device, repeat),
                        "reference_ms": 1e3 * timed(lambda: reference.attend(q, k_cache, v_cache, meta, d ** -0.5, window), device, repeat)})
    return out


def tiny_exact(device: torch.device, workdir: str, smoke: bool) -> list[dict]:
    from vidya import LLM, SamplingParams
    from vidya.models.tiny import tiny_model, word_tokenizer
    vocab, new = 512, 16
    tok = word_tokenizer(vocab)
    rng = random.Random(7)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 9, 23, 57, 100)]
    out = []
    for arch in ("llama", "qwen3", "gemma3"):
        hf = tiny_model(arch, vocab)
        path = model_dir(hf.config, tok, os.path.join(workdir, f"tiny-{arch}"), hf)
        hf = hf.to(device)
        want = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([p], device=device)
                g = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, eos_token_id=2, pad_token_id=2)
                want.append(g[0, len(p):].tolist())
        for async_scheduling in (False, True):  # planned decode steps (graph-replayed) must change no token
            llm = LLM(path, dtype="float32", device=str(device), max_model_len=256, block_size=16, show_progress=False,
                      kv_cache_memory=0.05, gpu_memory_utilization=0.5 if device.type == "cuda" else 0.9,
                      async_scheduling=async_scheduling)
            got = [o.outputs[0].token_ids for o in llm.generate(
                prompts, SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new), use_tqdm=False)]
            out.append({"arch": arch, "attention": llm.engine.platform.attention,
                        "cuda_graphs": llm.engine.runner.graphs is not None, "async_scheduling": async_scheduling,
                        "token_exact": got == want, "prompts": len(prompts),
                        "tokens_equal": sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))})
            del llm
    return out


def a10(served: dict | None, smoke: bool) -> dict:
    """The A10 projected from the 24 GB run: its measured efficiency against the floor and its
    profiled activations (estimated when the run has none); 1.0 and the estimate without it."""
    from dataclasses import asdict

    from vidya.bench.roofline import A10, ModelShape, project
    from vidya.bench.workload import DEFAULT_WORKLOAD
    from vidya.config import DEFAULT_MAX_NUM_BATCHED_TOKENS
    shape = ModelShape(32, 4096, 14336, 32, 8, 128, 128256, False)  # Llama-3-8B
    served = served if isinstance(served, dict) and "fraction_of_floor" in served and not smoke else {}
    efficiency = min(1.0, served.get("fraction_of_floor", 1.0))
    # as served by default (the gpu-a10 overlay sets no token budget): the 24 GB run profiled that step
    activations = served.get("profiled_activation_bytes") or shape.activation_bytes(DEFAULT_MAX_NUM_BATCHED_TOKENS, 256)
    with open(DEFAULT_WORKLOAD) as f:  # the tutor's requests (tokens as SmolLM2's tokenizer counts them)
        tutor = json.load(f)
    out = {"efficiency": efficiency, "efficiency_measured": bool(served), "activation_bytes": activations}
    for name, (p_len, o_len) in {"bench_512_256": (512, 256),
                                 "tutor": (tutor["total_prompt_tokens"] / tutor["n_requests"], tutor["max_tokens"])}.items():
        for util in (0.90, 0.92):
            out[f"{name}_util{util:.2f}"] = asdict(project(A10, shape, p_len, o_len, util, activations, efficiency))
    return out


def sweep_24gb(device: torch.device, workdir: str, out_dir: str, smoke: bool, flags: tuple[str, ...] = (),
               name: str = "gpu-sweep-24gb") -> dict:
    from transformers import LlamaConfig

    import sweep
    shape = {**(TOY if smoke else LLAMA3_8B), "vocab_size": 2048 if smoke else LLAMA3_8B["vocab_size"]}
    config = LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **shape)
    path = model_dir(config, sweep.tokenizer(shape["vocab_size"]), os.path.join(workdir, "llama3-8b-shape-words"))
    return sweep.sweep_24gb(path, shape["vocab_size"], device, workdir, out_dir, smoke, flags, name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="where to write the results")
    ap.add_argument("--smoke", action="store_true", help="toy sizes: checks the script, not the GPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    args = ap.parse_args()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    result: dict = {"smoke": args.smoke}
    failed = []
    gb_s = 100.0

    def section(name, fn):
        if args.only is not None and name not in args.only:
            return None
        t0 = time.perf_counter()
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            result[name] = fn()
        except Exception:
            failed.append(name)
            result[name] = {"error": traceback.format_exc()[-3000:]}
        result.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
        # an engine's parts hold each other (and the bench's wrappers hold its methods): without a
        # collection here the 8B engine's weights and KV cache would still fill the GPU when the
        # 24 GB engine sizes its cache from what is free
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(args.json, "w") as f:  # after every section: a timeout keeps what was done
            json.dump(result, f, indent=2, default=str)
        print(json.dumps(result[name], default=str)[:2000], file=sys.stderr, flush=True)
        return result[name]

    with tempfile.TemporaryDirectory() as workdir:
        section("versions", lambda: versions(device))
        bw = section("bandwidth", lambda: bandwidth(device, args.smoke))
        if isinstance(bw, dict) and "gb_s" in bw:
            gb_s = bw["gb_s"]
        section("kernels", lambda: kernels(device, dtype, args.smoke))
        section("quant_kernels", lambda: quant_kernels(device, dtype, args.smoke, gb_s, timed))
        section("tiny_exact", lambda: tiny_exact(device, workdir, args.smoke))
        section("real_models", lambda: real_models(device, args.smoke))
        section("serve_8b", lambda: serve_8b(device, workdir, args.smoke, gb_s, None, steady=True))
        section("serve_8b_sync", lambda: serve_8b(device, workdir, args.smoke, gb_s, None, async_scheduling=False))
        served = section("serve_8b_24gb", lambda: serve_8b(device, workdir, args.smoke, gb_s, 24))
        section("serve_8b_24gb_sync", lambda: serve_8b(device, workdir, args.smoke, gb_s, 24, async_scheduling=False))
        section("a10", lambda: a10(served, args.smoke))
        out_dir = os.path.dirname(os.path.abspath(args.json))
        section("sweep_24gb", lambda: sweep_24gb(device, workdir, out_dir, args.smoke))
        section("sweep_24gb_sync", lambda: sweep_24gb(device, workdir, out_dir, args.smoke, ("--no-async-scheduling",),
                                                      "gpu-sweep-24gb-sync"))
        for q, name in (("int4", "w4a16"), ("int8", "w8a16")):
            section(f"serve_8b_{name}", lambda q=q: serve_8b(device, workdir, args.smoke, gb_s, None, quantization=q))
        section("serve_8b_24gb_w4a16", lambda: serve_8b(device, workdir, args.smoke, gb_s, 24, quantization="int4"))
        # the A10's setting (issue 33): an 8-bit cache in e5m2 (Triton converts e4m3 only from sm_89),
        # alone and beside 4-bit weights: the KV blocks 24 GB holds, and what a step costs
        section("serve_8b_24gb_kv8", lambda: serve_8b(device, workdir, args.smoke, gb_s, 24, kv_cache_dtype="fp8_e5m2"))
        section("serve_8b_24gb_w4a16_kv8", lambda: serve_8b(device, workdir, args.smoke, gb_s, 24, quantization="int4",
                                                            kv_cache_dtype="fp8_e5m2"))
    rows = lambda name: result.get(name) if isinstance(result.get(name), list) else []  # noqa: E731 (a failed section: a dict)
    checks = [k.get("ok") for k in rows("kernels") + rows("quant_kernels") if isinstance(k, dict)]
    checks += [t.get("token_exact") for t in rows("tiny_exact") if isinstance(t, dict)]
    result["all_ok"] = not failed and all(checks)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"wrote {args.json}: all_ok={result['all_ok']} failed sections={failed}", file=sys.stderr)
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
