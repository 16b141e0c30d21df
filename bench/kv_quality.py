"""What an 8-bit KV cache costs in quality (issue 33): perplexity and greedy agreement on the
tutor's Hindi text, the 16/32-bit cache against --kv-cache-dtype fp8_e4m3 and fp8_e5m2.

    PYTHONPATH=src .venv/bin/python bench/kv_quality.py [smollm2] [gemma3-270m] [--json OUT]

Everything runs through vidya's engine (torch reference ops, float32 math, the cache in the
dtype under test): perplexity scores each of the 17 texts of bench/hindi_tokens.py's
`hindi_texts` from its first token, fed to the model 16 tokens a forward so that every token
attends to the earlier ones as they were written to the cache (and read back from it: the
cache's rounding is in every score); greedy agreement generates 48 tokens from each text and
counts the tokens before the first that differs from the 16-bit cache's, over all 48 x 17.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hindi_tokens import hindi_texts  # noqa: E402

CHUNK = 16
NEW = 48


@torch.inference_mode()
def perplexity(llm, texts: list[str]) -> float:
    from vidya.attention import AttentionMetadata
    e = llm.engine
    runner, bs = e.runner, e.kv.block_size
    nll, count = 0.0, 0
    for text in texts:
        ids = e.tokenizer(text).input_ids
        table = list(range(-(-len(ids) // bs)))  # (an idle engine: its blocks are free to write)
        for start in range(0, len(ids) - 1, CHUNK):
            end = min(start + CHUNK, len(ids))
            meta = AttentionMetadata.for_sequences([end - start], [end], [table], bs, e.device)
            tensor = lambda x: torch.tensor(x, dtype=torch.long, device=e.device)  # noqa: E731
            hidden = runner.model(tensor(ids[start:end]), tensor(list(range(start, end))), runner.kv_caches, meta, e.ops)
            logp = e.ops.logits(runner.model.lm_head, hidden).float().log_softmax(-1)
            targets = ids[start + 1:end + 1]
            nll -= logp[torch.arange(len(targets)), tensor(targets)].sum().item()
            count += len(targets)
    return math.exp(nll / count)


def greedy(llm, texts: list[str]) -> list[list[int]]:
    from vidya import SamplingParams
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(texts, params, use_tqdm=False)]


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = 0
    for x, y in zip(a, b):
        same += next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), len(x))
    return same / sum(len(x) for x in a)


def main(argv: list[str] | None = None) -> int:
    from vidya import LLM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    texts = hindi_texts()
    rows = []
    for name in args.models:
        base = base_tokens = None
        for kv in ("auto", "fp8_e4m3", "fp8_e5m2"):
            # (the uniform layout: the perplexity pass writes one block table for every layer)
            llm = LLM(name, kv_cache_dtype=kv, dtype="float32", backend="torch", max_model_len=2048,
                      kv_cache_memory=0.25, show_progress=False, hybrid_kv_cache=False)
            ppl, tokens = perplexity(llm, texts), greedy(llm, texts)
            base, base_tokens = base or ppl, base_tokens or tokens
            row = {"model": name, "kv_cache_dtype": kv, "cache": llm.engine.platform.as_dict()["kv_cache_dtype"],
                   "perplexity": ppl, "vs_16_bit": ppl / base - 1, "greedy_agreement": agreement(tokens, base_tokens)}
            rows.append(row)
            print(f"{name:12s} {row['cache']:14s} perplexity {ppl:8.3f} ({row['vs_16_bit']:+.2%})  greedy agreement "
                  f"{row['greedy_agreement']:.1%}", flush=True)
            del llm
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"text": "tutor Hindi (bench/hindi_tokens.py hindi_texts)", "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
