"""Reads the JSON reports compare.sh wrote and prints one markdown table with ratios."""
import json
import os
import sys


def load(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def main(out: str) -> None:
    vo, lo = load(out, "vidya-offline.json"), load(out, "vllm-offline.json")
    vs, ls = load(out, "vidya-serve.json"), load(out, "vllm-serve.json")
    vid, hf = vo["rows"][0], vo["rows"][1]
    vllm_off = lo["rows"][0] if "rows" in lo else lo
    print(f"machine: {vo['machine']}, {vo['threads']} threads, {vo['dtype']}, torch {vo['torch']}, "
          f"vidya {vo['vidya']} commit {vo['commit']}; workload {vo['workload']}\n")
    print("| system | output tok/s | vs vLLM (same mode) | vs naive HF | TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|")
    print(f"| transformers generate(), one request at a time ({hf['requests']} requests) | "
          f"{hf['output_tok_s']:.1f} | | 1.0x | |")
    for label, row, ref in (("vidya, offline", vid, vllm_off), ("vLLM CPU 0.32.0, offline", vllm_off, vllm_off)):
        print(f"| {label} | {row['output_tok_s']:.1f} | {row['output_tok_s'] / ref['output_tok_s']:.2f}x | "
              f"{row['output_tok_s'] / hf['output_tok_s']:.1f}x | |")
    for label, row in (("vidya serve, 64 streams", vs), ("vLLM CPU 0.32.0 server, 64 streams", ls)):
        print(f"| {label} | {row['output_tok_s']:.1f} | {row['output_tok_s'] / ls['output_tok_s']:.2f}x | "
              f"{row['output_tok_s'] / hf['output_tok_s']:.1f}x | "
              f"{row['ttft_p50_ms'] / 1e3:.2f} / {row['ttft_p99_ms'] / 1e3:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
