"""The `vidya` command: `chat` (a terminal conversation with the offline engine) and `bench`."""
from __future__ import annotations

import argparse
import sys


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2", help="smollm2 (default), a HF model directory, a .gguf file or a hub id")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory", type=float, default=None, help="GiB of KV cache on CPU (default 4)")
    p.add_argument("--no-prefix-caching", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vidya", description="vidya: LLM serving engine and Hindi study tutor")
    sub = parser.add_subparsers(dest="command", required=True)
    chat = sub.add_parser("chat", help="talk to the tutor in the terminal (offline engine)")
    add_engine_args(chat)
    chat.add_argument("--system", default="You are a helpful Hindi study tutor. Answer in the student's language.")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7)
    bench = sub.add_parser("bench", help="benchmarks")
    bsub = bench.add_subparsers(dest="bench", required=True)
    tp = bsub.add_parser("throughput", help="offline throughput on a fixed workload")
    add_engine_args(tp)
    tp.add_argument("--workload", default=None, help="workload JSON (default: the packaged tutor-64.json)")
    tp.add_argument("--num-prompts", type=int, default=None)
    tp.add_argument("--baseline", choices=["none", "hf"], default="none")
    tp.add_argument("--baseline-requests", type=int, default=8,
                    help="requests the transformers baseline runs (one at a time; default 8)")
    tp.add_argument("--json", default=None, help="also write the report here")
    return parser


def run_chat(args) -> int:
    from vidya import LLM, SamplingParams
    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching)
    engine = llm.engine
    messages = [{"role": "system", "content": args.system}]
    print("vidya chat: type a question (Hindi or English); empty line or Ctrl-D to quit.")
    while True:
        try:
            line = input("\nछात्र> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        prompt = engine.tokenizer(engine.apply_chat_template(messages), add_special_tokens=False).input_ids
        try:
            rid = engine.add_request(None, prompt, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens))
        except ValueError as e:
            print(f"(conversation too long: {e}; starting over)")
            messages = messages[:1]
            continue
        sent = ""
        print("शिक्षक> ", end="", flush=True)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid:
                    text = out.outputs[0].text
                    print(text[len(sent):], end="", flush=True)
                    sent = text
        print()
        messages.append({"role": "assistant", "content": sent})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "chat":
            return run_chat(args)
        if args.command == "bench" and args.bench == "throughput":
            from vidya.bench.throughput import main as bench_main
            return bench_main(args)
    except ValueError as e:  # user-fixable: bad flag values, model not found, ...
        print(f"vidya: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 1


if __name__ == "__main__":
    sys.exit(main())
