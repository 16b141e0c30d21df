"""run.py's serving sections: an 8B-shaped Llama (random weights) serving offline on the GPU,
with the bookkeeping that turns its steps into figures: output tok/s, TTFT and inter-token
percentiles, decode steps against the memory-bandwidth floor, the host's part of a step, and
serving's steady state (waiting requests joining beside decodes)."""
from __future__ import annotations

import os
import random
import statistics
import time
from collections import deque

import torch

GiB = 1 << 30
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
TOY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, rope_theta=10000.0)


def model_dir(config, tokenizer, path: str, model=None) -> str:
    os.makedirs(path, exist_ok=True)
    (model.save_pretrained(path) if model is not None else config.save_pretrained(path))
    tokenizer.save_pretrained(path)
    return path


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p99": None}
    xs = sorted(xs)
    return {"p50": xs[len(xs) // 2], "p99": xs[min(len(xs) - 1, int(0.99 * len(xs)))]}


def serve_8b(device: torch.device, workdir: str, smoke: bool, gb_s: float, memory_gib: float | None,
             steady: bool = False, deadline_s: float = 150.0, async_scheduling: bool | None = None,
             quantization: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    """The 8B shape serving n_req requests offline (figures in the module's docstring). Past
    deadline_s seconds of serving the rest are left unfinished and `truncated` is set, so that a
    slow engine leaves the run time for the sections after it."""
    from transformers import LlamaConfig

    from vidya.config import EngineArgs
    from vidya.engine.llm_engine import LLMEngine
    from vidya.models.tiny import word_tokenizer
    from vidya.sampling_params import SamplingParams
    shape = TOY if smoke else LLAMA3_8B
    n_req, p_len, o_len = (6, 24, 8) if smoke else (256, 512, 256)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         tie_word_embeddings=False, **shape)
    path = model_dir(config, word_tokenizer(shape["vocab_size"]), os.path.join(workdir, "llama3-8b-shape"))
    util = 0.9
    if memory_gib is not None and device.type == "cuda":
        util = memory_gib * GiB / torch.cuda.get_device_properties(device).total_memory
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    engine = LLMEngine(EngineArgs(model=path, load_format="dummy", dtype="bfloat16", device=str(device),
                                  max_model_len=p_len + o_len, max_num_seqs=256,  # the default token budget
                                  gpu_memory_utilization=util, kv_cache_memory=0.1, show_progress=True,
                                  quantization=quantization,  # (online int8/int4 over the dummy weights)
                                  # (a smoke run on a CPU: the reference ops' W?A16, as a GPU serves it, not
                                  # the CPU kernels' int8 activations)
                                  backend="torch" if quantization and device.type == "cpu" else "auto",
                                  kv_cache_dtype=kv_cache_dtype,
                                  # (smoke: the GPU's defaults and their bookkeeping, on CPU)
                                  overlap_outputs=True if smoke else None,
                                  async_scheduling=True if smoke and async_scheduling is None else async_scheduling))
    startup = time.perf_counter() - t0
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=o_len, ignore_eos=True)
    steps: list = []  # [SchedulerOutput, seconds of the step() call that applied it], in order
    contexts: dict[int, int] = {}  # step number -> tokens of context its sequences hold after it (KV it reads)
    host: dict[int, float] = {}  # step number -> seconds of the host's own work in its step() call
    hidden: dict[int, float] = {}  # step number -> seconds of output work done while the GPU runs
    planned: deque = deque()  # (SchedulerOutput, context after it), as the scheduler made them
    schedule, schedule_ahead = engine.scheduler.schedule, engine.scheduler.schedule_ahead
    prepare, advance, process = engine.runner.prepare, engine._advance, engine._process

    def on_host(fn, into=host):
        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            into[len(steps) + 1] = into.get(len(steps) + 1, 0.0) + time.perf_counter() - t0
            return out
        return timed

    def recorded(fn):
        def plan(*a):
            sched = fn(*a)
            if sched is not None and not sched.is_empty:
                # a request's counts move on after its step (a step planned ahead starts one past
                # them), and a finished one's are never reset
                planned.append((sched, sum((s.start if s.start >= 0 else s.request.num_computed_tokens) + s.num_new_tokens
                                           for s in sched.scheduled)))
            return sched
        return on_host(plan)
    engine.runner.prepare, engine._advance = on_host(prepare), on_host(advance)
    engine.scheduler.schedule, engine.scheduler.schedule_ahead = recorded(schedule), recorded(schedule_ahead)
    engine._process = on_host(process, hidden if engine.overlap_outputs else host)

    def applied(seconds: float) -> None:
        """The step() call just made applied the oldest step planned (with async scheduling the
        one planned by the call before; it planned the next)."""
        if planned:
            sched, context = planned.popleft()
            steps.append([sched, seconds])
            contexts[len(steps)] = context
    t_start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    gaps: list[float] = []
    produced: dict[str, int] = {}  # request -> output tokens so far
    for _ in range(n_req):
        engine.add_request(None, [rng.randrange(3, shape["vocab_size"]) for _ in range(p_len)], params)
    truncated = False
    while engine.has_unfinished_requests():
        if time.perf_counter() - t_start > deadline_s:
            truncated = True
            break
        s0 = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        applied(now - s0)
        for o in outs:
            n = len(o.outputs[0].token_ids)
            produced[o.request_id] = n
            if o.request_id not in first and n:
                first[o.request_id] = now - t_start
            elif o.request_id in last:
                gaps.append(now - last[o.request_id])
            last[o.request_id] = now
    wall = time.perf_counter() - t_start
    model = engine.runner.model
    # what a decode step reads: every weight but an untied input embedding (it looks up a row a token)
    embed = model.model.embed_tokens.weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters()
                  if p is not embed or model.lm_head.weight is embed)
    kv_token = (2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * (shape["hidden_size"] // shape["num_attention_heads"])
                * engine.platform.kv_dtype.itemsize)  # (an 8-bit cache: a byte a value)
    decode = []
    for i, (sched, seconds) in enumerate(steps, start=1):
        if all(s.num_new_tokens == 1 for s in sched.scheduled):
            floor = (weights + contexts[i] * kv_token) / (gb_s * 1e9)
            decode.append((len(sched.scheduled), seconds, floor, host.get(i, 0.0), hidden.get(i, 0.0)))
    full = [d for d in decode if d[0] >= 0.9 * max((d[0] for d in decode), default=0)]
    out = {"requests": n_req, "prompt_tokens": p_len, "output_tokens": o_len, "shape": shape,
           "gpu_memory_utilization": util, "startup_s": startup, "num_kv_blocks": engine.kv.pool.num_blocks,
           "cuda_graphs": engine.runner.graphs is not None, "overlap_outputs": engine.overlap_outputs,
           "async_scheduling": engine.async_scheduling, "backend": engine.platform.describe(),
           "quantization": engine.platform.quantization, "weight_bytes": weights,
           "kv_cache_dtype": engine.platform.as_dict()["kv_cache_dtype"],
           "wall_s": wall, "truncated": truncated,
           "output_tok_s": sum(produced.values()) / wall, "preemptions": engine.scheduler.num_preemptions,
           "ttft_s": percentiles(list(first.values())), "itl_s": percentiles(gaps),
           "weights_gib": weights / GiB, "decode_steps": len(decode),
           "profiled_activation_bytes": engine.profiled_activation_bytes}
    if full:
        out.update(decode_batch=statistics.median(d[0] for d in full),
                   decode_step_ms=1e3 * statistics.median(d[1] for d in full),
                   bandwidth_floor_ms=1e3 * statistics.median(d[2] for d in full),
                   fraction_of_floor=statistics.median(d[2] / d[1] for d in full),
                   host_ms_per_step=1e3 * statistics.median(d[3] for d in full),
                   overlapped_host_ms_per_step=1e3 * statistics.median(d[4] for d in full))
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GiB,
                   used_gib=(total - free) / GiB)
    if steady:
        out["steady"] = steady_state(engine, steps, applied, shape["vocab_size"], p_len, o_len, 300 if smoke else 384)
    del engine
    return out


def steady_state(engine, steps: list, applied, vocab: int, p_len: int, o_len: int, n_req: int,
                 deadline_s: float = 90.0) -> dict:
    """Serving's steady state on the same engine: more requests than max_num_seqs, answer lengths
    spread, so as one finishes a waiting one joins and most steps carry a prompt beside the
    decodes (a decode-only step replays a CUDA graph; a mixed one runs eagerly). The step time of
    each kind at a near-full batch, and how often each came."""
    from vidya.sampling_params import SamplingParams
    rng = random.Random(1)
    for _ in range(n_req):
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(max(1, o_len // 8), o_len), ignore_eos=True)
        engine.add_request(None, [rng.randrange(3, vocab) for _ in range(p_len)], params)
    first, tokens, t0, truncated = len(steps), 0, time.perf_counter(), False
    while engine.has_unfinished_requests():
        if time.perf_counter() - t0 > deadline_s:  # (as serve_8b's)
            truncated = True
            break
        s0 = time.perf_counter()
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
        applied(time.perf_counter() - s0)
    wall = time.perf_counter() - t0
    kinds = []  # (decodes, prompt tokens, seconds)
    for sched, seconds in steps[first:]:
        decodes = sum(1 for s in sched.scheduled if s.num_new_tokens == 1 and s.samples)
        kinds.append((decodes, sched.num_scheduled_tokens - decodes, seconds))
    top = max((k[0] for k in kinds), default=0)
    full = [k for k in kinds if k[0] >= 0.8 * top]
    mixed, pure = [k for k in full if k[1]], [k for k in full if not k[1]]
    median_ms = lambda xs: 1e3 * statistics.median(xs) if xs else None
    return {"requests": n_req, "truncated": truncated, "output_tok_s": tokens / wall, "steps": len(kinds), "near_full_batch": top,
            "near_full_steps": len(full), "mixed_fraction": len(mixed) / len(full) if full else None,
            "mixed_step_ms": median_ms([k[2] for k in mixed]), "decode_only_step_ms": median_ms([k[2] for k in pure]),
            "mixed_prompt_tokens": statistics.median(k[1] for k in mixed) if mixed else None}
