"""Tokens per Hindi character of each tokenizer, on the tutor's own Hindi text (its system prompt
parts and example questions, each once), and the KV cache a Hindi answer then takes.

    .venv/bin/python bench/hindi_tokens.py smollm2 gemma3-270m [NAME=PATH ...] [--tiktoken NAME=FILE]

A NAME=PATH is anything transformers' AutoTokenizer reads (a model directory, or a directory with
tokenizer.json); a bare name is a vidya model (`smollm2`, `gemma3-270m`). `--tiktoken` reads a
byte-level BPE rank file (Qwen's `qwen.tiktoken`) with Qwen's split pattern. Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import base64
import sys

from vidya.tutor import prompts

ANSWER_CHARS = 1500  # a tutor answer of about a page, in Hindi characters

# KV bytes per token in bf16 of a model that uses each tokenizer: layers x 2 (K, V) x kv heads x
# head_dim x 2 bytes, from the models' published configs.
KV_MODELS = {
    "smollm2": ("SmolLM2-135M", 30 * 2 * 3 * 64 * 2),
    "gemma3-270m": ("Gemma 3 4B (34 layers, 4 KV heads x 256)", 34 * 2 * 4 * 256 * 2),
    "llama3": ("Llama 3.1 8B (32 layers, 8 KV heads x 128)", 32 * 2 * 8 * 128 * 2),
    "qwen": ("Qwen3 8B (36 layers, 8 KV heads x 128)", 36 * 2 * 8 * 128 * 2),
}
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")


def hindi_texts() -> list[str]:
    data = prompts.load()
    texts = [data["base"]] + [s["prompt"] for s in data["subjects"].values()] + list(data["classes"].values())
    return texts + list(data["examples"]["hi"])


class RankBPE:
    """Byte-level BPE over a tiktoken rank file: in each split piece, merge the adjacent pair whose
    join has the lowest rank until none has one."""

    def __init__(self, path: str) -> None:
        import regex
        with open(path, "rb") as f:
            self.ranks = {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}
        self.split = regex.compile(QWEN_SPLIT)

    def count(self, text: str) -> int:
        n = 0
        for piece in self.split.findall(text):
            parts = [bytes([b]) for b in piece.encode()]
            while len(parts) > 1:
                ranked = [(self.ranks.get(a + b, 1 << 62), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
                rank, i = min(ranked)
                if rank == 1 << 62:
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            n += len(parts)
        return n


def counter(name: str, path: str | None):
    from transformers import AutoTokenizer
    if path is None:
        from vidya.models import loader
        tok = loader.load_tokenizer(loader.resolve(name))
    else:
        tok = AutoTokenizer.from_pretrained(path)
    return lambda text: len(tok(text, add_special_tokens=False).input_ids)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tokenizers", nargs="+", help="a vidya model name, or NAME=PATH")
    ap.add_argument("--tiktoken", action="append", default=[], help="NAME=FILE, a tiktoken rank file")
    args = ap.parse_args(argv)
    texts = hindi_texts()
    chars = sum(len(t) for t in texts)
    rows = []
    for spec in args.tokenizers:
        name, _, path = spec.partition("=")
        count = counter(name, path or None)
        rows.append((name, sum(count(t) for t in texts)))
    for spec in args.tiktoken:
        name, _, path = spec.partition("=")
        bpe = RankBPE(path)
        rows.append((name, sum(bpe.count(t) for t in texts)))
    print(f"{len(texts)} Hindi texts of the tutor, {chars} characters; an answer of {ANSWER_CHARS} characters\n")
    print("| tokenizer | tokens | tokens per character | tokens per answer | model | KV per answer (bf16) |")
    print("|---|---:|---:|---:|---|---:|")
    for name, tokens in rows:
        per = tokens / chars
        model, kv = KV_MODELS.get(name, ("?", 0))
        kv_answer = f"{per * ANSWER_CHARS * kv / 2**20:.1f} MiB" if kv else "?"
        print(f"| {name} | {tokens} | {per:.2f} | {per * ANSWER_CHARS:.0f} | {model} | {kv_answer} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
