"""Reads the JSON reports compare.sh wrote and prints one markdown table with ratios."""
import json
import os
import sys


def load(out: str, name: str) -> dict:
    with open(os.path.join(out, name)) as f:
        return json.load(f)


def main(out: str) -> None:
    """vidya's rows against the best peer that ran in the same mode (vLLM offline; vLLM's server
    or llama.cpp's llama-server at 64 streams), each peer's report present only if it ran."""
    have = lambda name: os.path.exists(os.path.join(out, name))
    vo, vs = load(out, "vidya-offline.json"), load(out, "vidya-serve.json")
    vid, hf = vo["rows"][0], vo["rows"][1]
    offline_peers = {}
    if have("vllm-offline.json"):
        lo = load(out, "vllm-offline.json")
        offline_peers["vLLM CPU 0.32.0, offline"] = lo["rows"][0] if "rows" in lo else lo
    served_peers = {label: load(out, name) for label, name in (
        ("vLLM CPU 0.32.0 server, 64 streams", "vllm-serve.json"),
        ("llama.cpp llama-server -np 64, 64 streams", "llamacpp-serve.json")) if have(name)}
    print(f"machine: {vo['machine']}, {vo['threads']} threads, {vo.get('backend', vo['dtype'])}, "
          f"torch {vo['torch']}, vidya {vo['vidya']} commit {vo['commit']}; workload {vo['workload']}\n")
    print("| system | output tok/s | vs best peer (same mode) | vs naive HF | TTFT p50 / p99 (s) |")
    print("|---|---|---|---|---|")
    print(f"| transformers generate(), one request at a time ({hf['requests']} requests) | "
          f"{hf['output_tok_s']:.1f} | | 1.0x | |")
    for rows, ours, label in ((offline_peers, vid, "vidya, offline"), (served_peers, vs, "vidya serve, 64 streams")):
        best = max((r["output_tok_s"] for r in rows.values()), default=None)
        for name, row in [(label, ours), *rows.items()]:
            ratio = f"{row['output_tok_s'] / best:.2f}x" if best else "-"
            ttft = f"{row['ttft_p50_ms'] / 1e3:.2f} / {row['ttft_p99_ms'] / 1e3:.2f}" if "ttft_p50_ms" in row else ""
            print(f"| {name} | {row['output_tok_s']:.1f} | {ratio} | {row['output_tok_s'] / hf['output_tok_s']:.1f}x | {ttft} |")


if __name__ == "__main__":
    main(sys.argv[1])
