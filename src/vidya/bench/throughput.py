"""`vidya bench throughput`: a fixed workload through the offline engine; output tokens/s,
requests/s, KV-cache waste; with `--baseline hf`, transformers' plain generate() one request at
a time on the same weights and dtype, in the same run, and the ratio."""
from __future__ import annotations

import dataclasses

import json
import platform
import subprocess
import time

import torch

from vidya import LLM, __version__
from vidya.bench.workload import load_workload


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run_vidya(llm: LLM, prompts: list[list[int]], params) -> dict:
    llm.generate([prompts[0]], type(params)(max_tokens=4), use_tqdm=False)  # warm up kernels
    engine = llm.engine
    engine.stats.__init__()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    dt = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttfts = sorted(t for _, t, _ in engine.stats.finished if t is not None)
    return {"system": "vidya (offline LLM.generate)", "requests": len(outs), "output_tokens": n_out,
            "seconds": dt, "output_tok_s": n_out / dt, "requests_s": len(outs) / dt,
            "kv_waste": engine.stats.kv_waste, "preemptions": engine.scheduler.num_preemptions,
            "ttft_p50_s": ttfts[len(ttfts) // 2] if ttfts else None}


def hf_model_from(llm: LLM):
    """transformers' own model class with the engine's weights (same values, same dtype)."""
    from transformers import AutoModelForCausalLM
    engine = llm.engine
    model = AutoModelForCausalLM.from_config(engine.model_config, dtype=engine.dtype).eval()
    model.load_state_dict(engine.runner.model.hf_state_dict(), strict=False)
    if getattr(engine.model_config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def run_hf(llm: LLM, prompts: list[list[int]], max_tokens: int) -> dict:
    model = hf_model_from(llm)
    n_out, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 pad_token_id=llm.engine.eos_token_id)
            n_out += out.shape[1] - len(p)
    dt = time.perf_counter() - t0
    return {"system": "transformers generate(), one request at a time", "requests": len(prompts),
            "output_tokens": n_out, "seconds": dt, "output_tok_s": n_out / dt, "requests_s": len(prompts) / dt}


def main(args) -> int:
    workload = load_workload(args.workload, args.num_prompts)
    from vidya.cli import engine_args
    llm = LLM(**dataclasses.asdict(engine_args(args)))
    tok = llm.get_tokenizer()
    prompts = [tok(llm.engine.apply_chat_template(c), add_special_tokens=False).input_ids
               for c in workload.conversations]
    params = workload.sampling_params()
    rows = [run_vidya(llm, prompts, params)]
    if args.baseline == "hf":
        rows.append(run_hf(llm, prompts[:args.baseline_requests], workload.max_tokens))
        rows[0]["x_vs_hf"] = rows[0]["output_tok_s"] / rows[1]["output_tok_s"]
    report = {
        "workload": workload.name, "prompt_tokens": sum(map(len, prompts)), "model": args.model,
        "dtype": str(llm.engine.dtype).removeprefix("torch."), "device": str(llm.engine.device),
        "platform": llm.engine.platform.as_dict(), "backend": llm.engine.platform.describe(),
        "threads": torch.get_num_threads(), "machine": f"{platform.processor() or platform.machine()}",
        "vidya": __version__, "commit": _commit(), "torch": torch.__version__, "rows": rows,
    }
    print(f"\nworkload {workload.name}: {len(prompts)} requests, {report['prompt_tokens']} prompt tokens, "
          f"{workload.max_tokens} output tokens each; {args.model} {report['dtype']} on {report['device']}, "
          f"{report['threads']} threads, torch {torch.__version__}, commit {report['commit']}\n"
          f"backend: {report['backend']}")
    print(f"{'system':<50} {'reqs':>5} {'out tok/s':>10} {'req/s':>7} {'seconds':>8} {'KV waste':>9}")
    for r in rows:
        waste = f"{100 * r['kv_waste']:.2f}%" if "kv_waste" in r else "-"
        print(f"{r['system']:<50} {r['requests']:>5} {r['output_tok_s']:>10.1f} {r['requests_s']:>7.2f} "
              f"{r['seconds']:>8.1f} {waste:>9}")
    if "x_vs_hf" in rows[0]:
        print(f"vidya / transformers: {rows[0]['x_vs_hf']:.1f}x output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0
