"""vLLM's offline `LLM.chat` on the tutor-64 workload: the peer of `vidya bench throughput`.

Runs inside the vLLM venv (see vllm_cpu.sh offline). One warm-up request, then all prompts
submitted at once and timed; prints output tokens/s, optionally writes a JSON report whose row
has the same keys as vidya's throughput rows. The chat template is applied by LLM.chat inside
the timed call (a few ms for 64 chats; vidya tokenizes before its timer).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time


def load_workload(path: str, num_prompts: int | None) -> tuple[dict, list[list[dict]]]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    convs = [r["messages"] for r in data["requests"]]
    if num_prompts:  # cycle, as vidya's load_workload does
        convs = (convs * (num_prompts // len(convs) + 1))[:num_prompts]
    return data, convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face directory (export_hf.py output)")
    parser.add_argument("--workload", required=True, help="tutor-64.json format")
    parser.add_argument("--num-prompts", type=int, default=None, help="default: all in the workload")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    data, convs = load_workload(args.workload, args.num_prompts)
    # KV cache size on CPU comes from VLLM_CPU_KVCACHE_SPACE (GiB), set by vllm_cpu.sh.
    llm = LLM(model=args.model, dtype="bfloat16", max_model_len=args.max_model_len, seed=0)
    max_tokens = int(data.get("max_tokens", 128))
    params = SamplingParams(temperature=float(data.get("temperature", 0.0)), max_tokens=max_tokens,
                            min_tokens=int(data.get("min_tokens", 0)),
                            ignore_eos=bool(data.get("ignore_eos", True)))

    llm.chat([convs[0]], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm up
    t0 = time.perf_counter()
    outs = llm.chat(convs, params, use_tqdm=False)
    dt = time.perf_counter() - t0

    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_prompt = sum(len(o.prompt_token_ids) for o in outs)
    row = {"system": "vLLM CPU (offline LLM.chat)", "requests": len(outs), "output_tokens": n_out,
           "seconds": dt, "output_tok_s": n_out / dt, "requests_s": len(outs) / dt}
    report = {"workload": data.get("name"), "prompt_tokens": n_prompt, "model": args.model,
              "dtype": "bfloat16", "device": "cpu", "threads": torch.get_num_threads(),
              "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
              "kvcache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
              "machine": platform.processor() or platform.machine(),
              "vllm": vllm.__version__, "torch": torch.__version__, "rows": [row]}
    short = [i for i, o in enumerate(outs) if len(o.outputs[0].token_ids) != max_tokens]
    print(f"\nworkload {report['workload']}: {len(outs)} requests, {n_prompt} prompt tokens, "
          f"{max_tokens} output tokens each; vllm {vllm.__version__}, torch {torch.__version__}")
    print(f"{row['system']}: {n_out} output tokens in {dt:.2f} s = {row['output_tok_s']:.1f} out tok/s, "
          f"{row['requests_s']:.2f} req/s")
    if short:
        print(f"warning: {len(short)} requests did not produce {max_tokens} tokens (first: #{short[0]})")
    print(f"first output: {outs[0].outputs[0].text[:80]!r}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
