"""Where a decode step's time goes on the GPU, for tuning it (run.py measures; this explains):

    attention   the Triton attention kernel alone on decode rows (batch x context, Llama-3-8B's
                heads) in each launch variant (keys per iteration, warps, pipeline stages):
                time and the KV bytes it reads per second, against the device's copy bandwidth
    gemms       the step's matrix products alone at the batch (bf16, torch): time and TFLOP/s
    kernels     one eager decode step of the 8B-shaped engine (dummy weights) under
                torch.profiler: the GPU time of each kind of kernel, largest first
    served      decode steps as the engine serves them (CUDA graphs, async scheduling on and
                off): clock time a step, GPU time a step, the GPU's idle time between steps, and
                the host's time in the engine's parts and in CUDA runtime calls

    PYTHONPATH=src python bench/gpu/profile_decode.py [--batch 256] [--context 640] [--json FILE]

`--smoke` runs it at toy sizes on CPU (Triton interpreted) so that the script is tested where
no GPU is; its numbers mean nothing."""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from serving import LLAMA3_8B, TOY, model_dir


def cuda_ms(fn, device: torch.device, repeat: int) -> float:
    """Mean milliseconds of fn() over `repeat` runs after two warm-ups."""
    for _ in range(2):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(repeat):
            fn()
        return 1e3 * (time.perf_counter() - t0) / repeat
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeat


def decode_meta(batch: int, context: int, block_size: int, device: torch.device):
    from vidya.attention.metadata import AttentionMetadata
    rng = random.Random(0)
    ctx = [rng.randrange(context // 2, 3 * context // 2) for _ in range(batch)]
    per_seq = [-(-c // block_size) for c in ctx]
    blocks = list(range(1, sum(per_seq) + 1))
    rng.shuffle(blocks)  # scattered, as a served cache's are
    tables = [[blocks.pop() for _ in range(n)] for n in per_seq]
    return AttentionMetadata.for_sequences([1] * batch, ctx, tables, block_size, device), sum(per_seq) + 1, sum(ctx)


def attention(device: torch.device, dtype: torch.dtype, batch: int, context: int, gb_s: float, smoke: bool) -> list[dict]:
    import triton

    from vidya.attention import triton_paged as tp
    h, kvh, d, bs = 32, 8, 128, 16
    meta, nb, tokens = decode_meta(batch, context, bs, device)
    k_cache = torch.randn(nb, bs, kvh, d, device=device).to(dtype)
    v_cache = torch.randn(nb, bs, kvh, d, device=device).to(dtype)
    q = torch.randn(batch, h, d, device=device).to(dtype)
    launch = tp.attend_launch(h, kvh, d, bs, dtype, tp.device_arch(device))
    starts, parts = tp.tile_maps(meta, launch, device)
    (tile, tile_seq, tile_q0), = parts
    want = tp.attend(q, k_cache, v_cache, meta, d ** -0.5)
    kv_bytes = 2 * tokens * kvh * d * k_cache.element_size()
    variants = [(32, 4, None)] if smoke else [
        (bn, w, s) for bn in (16, 32, 64, 128) for w in (2, 4, 8) for s in (None, 2, 4)]
    out = []
    for block_n, warps, stages in variants:
        o = torch.empty_like(q)
        consts = {**dict(launch.constants), "BLOCK_N": block_n, "BLOCK_Q": tile.block_q}
        extra = {} if stages is None else {"num_stages": stages}

        def run():
            tp._attend_kernel[(tile_seq.shape[0], kvh)](
                o, q, k_cache, v_cache, meta.block_tables, meta.seq_lens, starts, tile_seq, tile_q0,
                d ** -0.5, tp.NO_WINDOW, 1.0, q.stride(0), q.stride(1), o.stride(0), o.stride(1),
                k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
                num_warps=warps, **extra, **consts)
        row = {"block_n": block_n, "num_warps": warps, "num_stages": stages,
               "default": (block_n, warps, stages) == (tile.block_n, tile.num_warps, tile.num_stages)}
        try:
            ms = cuda_ms(run, device, 3 if smoke else 50)
            err = (o.float() - want.float()).abs().max().item()
            row.update(ms=ms, kv_gb_s=kv_bytes / ms / 1e6, of_copy_bandwidth=kv_bytes / ms / 1e6 / gb_s, max_abs_err=err)
        except Exception as e:  # a variant the compiler refuses (registers, shared memory) is a finding
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return out


def gemms(device: torch.device, dtype: torch.dtype, batch: int, shape: dict, smoke: bool) -> dict:
    hd = shape["hidden_size"] // shape["num_attention_heads"]
    hid, inter, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    mats = {"qkv": (hid, (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * hd),
            "o": (shape["num_attention_heads"] * hd, hid), "gate_up": (hid, 2 * inter), "down": (inter, hid),
            "lm_head": (hid, shape["vocab_size"])}
    out, total = {}, 0.0
    for name, (k, n) in mats.items():
        x = torch.randn(batch, k, device=device).to(dtype)
        w = torch.randn(n, k, device=device).to(dtype)
        ms = cuda_ms(lambda: torch.nn.functional.linear(x, w), device, 3 if smoke else 50)
        times = 1 if name == "lm_head" else layers
        out[name] = {"ms": ms, "tflops": 2 * batch * k * n / ms / 1e9, "per_step_ms": ms * times}
        total += ms * times
    out["step_ms"] = total
    return out


def to_decoding(engine, batch: int, context: int, vocab_size: int) -> None:
    """`batch` greedy requests of context/2 prompt tokens, stepped through their prefill and on
    until their context is ~3/4 of `context`: the engine is then decoding all of them."""
    from vidya.sampling_params import SamplingParams
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=context, ignore_eos=True)
    for _ in range(batch):
        engine.add_request(None, [rng.randrange(3, vocab_size) for _ in range(context // 2)], params)
    for _ in range(context // 4):
        engine.step()


def kernels(device: torch.device, batch: int, context: int, smoke: bool, workdir: str) -> dict:
    from transformers import LlamaConfig

    from vidya.config import EngineArgs
    from vidya.engine.llm_engine import LLMEngine
    from vidya.models.tiny import word_tokenizer
    shape = TOY if smoke else LLAMA3_8B
    config = LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **shape)
    path = model_dir(config, word_tokenizer(shape["vocab_size"]), os.path.join(workdir, "llama3-8b-shape"))
    results = {}
    for eager in (True, False):
        engine = LLMEngine(EngineArgs(model=path, load_format="dummy", dtype="bfloat16", device=str(device),
                                      max_model_len=2 * context + 64, max_num_seqs=batch, enforce_eager=eager,
                                      gpu_memory_utilization=0.5, kv_cache_memory=0.1, show_progress=False))
        to_decoding(engine, batch, context, shape["vocab_size"])
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            engine.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(1e3 * (time.perf_counter() - t0))
        key = "eager" if eager else "graphs"
        results[f"{key}_step_ms"] = sorted(times)[len(times) // 2]
        if eager:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            with profile(activities=acts) as prof:
                for _ in range(5):
                    engine.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            rows = []
            for e in prof.key_averages():  # the kernels themselves (the ops above them would count twice)
                us = getattr(e, "self_device_time_total", 0)
                if us and "CUDA" in str(getattr(e, "device_type", "")):
                    rows.append((us / 5, e.key[:90], e.count // 5))
            rows.sort(reverse=True)
            total = sum(r[0] for r in rows) or 1.0
            results["gpu_ms_per_step"] = total / 1e3
            results["top"] = [{"kernel": k, "ms": us / 1e3, "share": us / total, "calls": n} for us, k, n in rows[:25]]
        del engine
        import gc
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def served(device: torch.device, batch: int, context: int, smoke: bool, workdir: str) -> dict:
    """The engine's decode steps as it serves them (CUDA graphs; async scheduling on and off):
    the clock's time a step, the GPU's time a step (events around each graph replay) and the GPU's
    idle time between steps; then a few steps under torch.profiler, with the engine's parts
    labelled, to name what the host was doing while the GPU idled, and the CUDA runtime calls
    that made the host wait."""
    from transformers import LlamaConfig

    from vidya.config import EngineArgs
    from vidya.engine.llm_engine import LLMEngine
    from vidya.models.tiny import word_tokenizer
    shape = TOY if smoke else LLAMA3_8B
    config = LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **shape)
    path = model_dir(config, word_tokenizer(shape["vocab_size"]), os.path.join(workdir, "llama3-8b-shape"))
    cuda = device.type == "cuda"

    def one(planned: bool) -> dict:  # (its own frame: nothing of the engine outlives it)
        engine = LLMEngine(EngineArgs(model=path, load_format="dummy", dtype="bfloat16", device=str(device),
                                      max_model_len=2 * context + 64, max_num_seqs=batch,
                                      gpu_memory_utilization=0.5, kv_cache_memory=0.1, show_progress=False,
                                      overlap_outputs=None if cuda else True, async_scheduling=planned))
        marks: list = []  # (start event, end event) around each graph replay
        graphs = engine.runner.graphs
        if graphs is not None:
            replay = graphs.replay

            def timed_replay(*a, replay=replay):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = replay(*a)
                end.record()
                marks.append((start, end))
                return out
            graphs.replay = timed_replay
        labelled = [(engine.scheduler, "schedule"), (engine.scheduler, "schedule_ahead"),
                    (engine.scheduler, "update_from_output"), (engine.runner, "prepare"),
                    (engine.runner, "execute"), (engine.runner, "to_host"), (engine, "_process"),
                    (engine, "_launch_ahead")]
        for obj, name in labelled:
            fn = getattr(obj, name)

            def label(*a, fn=fn, name=name, **k):
                with torch.profiler.record_function(f"vidya.{name}"):
                    return fn(*a, **k)
            setattr(obj, name, label)
        to_decoding(engine, batch, context, shape["vocab_size"])
        if cuda:
            torch.cuda.synchronize(device)
        marks.clear()
        n = 20
        t0 = time.perf_counter()
        for _ in range(n):
            engine.step()
        if cuda:
            torch.cuda.synchronize(device)
        row = {"step_ms": 1e3 * (time.perf_counter() - t0) / n, "replays": len(marks),
               "async_scheduling": engine.async_scheduling}
        if len(marks) > 2:
            gpu = [a.elapsed_time(b) for a, b in marks]
            idle = [marks[i][1].elapsed_time(marks[i + 1][0]) for i in range(len(marks) - 1)]
            row.update(gpu_step_ms=statistics.median(gpu), idle_between_ms=statistics.median(idle),
                       idle_max_ms=max(idle))
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        k = 5
        with profile(activities=acts) as prof:
            for _ in range(k):
                engine.step()
            if cuda:
                torch.cuda.synchronize(device)
        host = {}
        for e in prof.key_averages():
            if e.key.startswith("vidya.") or e.key.startswith("cuda"):
                host[e.key] = {"ms": round(e.cpu_time_total / 1e3 / k, 3), "calls": e.count / k}
        row["host_per_step"] = dict(sorted(host.items(), key=lambda kv: -kv[1]["ms"])[:20])
        return row

    results = {}
    for planned in (True, False):
        try:
            results["async" if planned else "sync"] = one(planned)
        except Exception:
            import traceback
            results["async" if planned else "sync"] = {"error": traceback.format_exc()[-2000:]}
        import gc
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--context", type=int, default=640)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch, context = (8, 64) if args.smoke else (args.batch, args.context)
    gb_s = 1.0
    if device.type == "cuda":
        src = torch.empty(2 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        gb_s = 2 * src.numel() / cuda_ms(lambda: dst.copy_(src), device, 10) / 1e6
        del src, dst
    result = {"batch": batch, "context": context, "copy_gb_s": gb_s}
    sections = {"attention": lambda: attention(device, dtype, batch, context, gb_s, args.smoke),
                "gemms": lambda: gemms(device, dtype, batch, TOY if args.smoke else LLAMA3_8B, args.smoke),
                "kernels": lambda: kernels(device, batch, context, args.smoke, workdir),
                "served": lambda: served(device, batch, context, args.smoke, workdir)}
    with tempfile.TemporaryDirectory() as workdir:
        for name, fn in sections.items():
            if args.only is not None and name not in args.only:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            try:
                result[name] = fn()
            except Exception:
                import traceback
                result[name] = {"error": traceback.format_exc()[-3000:]}
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(result, f, indent=1)
            print(json.dumps(result[name])[:4000], file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
