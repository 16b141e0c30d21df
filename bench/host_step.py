"""The host's part of a decode step at N sequences: the engine on a toy Llama (1 layer, width 64,
dummy weights) so the forward is small, N requests decoding together; per step, the wall time
less the model's forward and logits (what is left is scheduling, preparing the batch, sampling
bookkeeping, detokenizing and building outputs: CPU work a GPU would wait for), and how much of
it is building outputs, which a GPU engine does while the next step's forward runs.

    PYTHONPATH=src python bench/host_step.py [--seqs 256] [--steps 60]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sampled (the tutor's 0.7)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=None, help="a seed per request (its own generator)")
    args = ap.parse_args()
    import torch
    from transformers import LlamaConfig

    from vidya.config import EngineArgs
    from vidya.engine.llm_engine import LLMEngine
    from vidya.models.tiny import word_tokenizer
    from vidya.sampling_params import SamplingParams
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as path:
        LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048,
                    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False).save_pretrained(path)
        word_tokenizer(512).save_pretrained(path)
        engine = LLMEngine(EngineArgs(model=path, load_format="dummy", dtype="float32", max_model_len=1024,
                                      max_num_seqs=args.seqs, show_progress=False, backend="torch", kv_cache_memory=0.5))
    rng = random.Random(0)
    for i in range(args.seqs):
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.steps + 100,
                                ignore_eos=True, seed=None if args.seed is None else args.seed + i)
        engine.add_request(None, [rng.randrange(3, 512) for _ in range(512)], params)
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running):
        engine.step()
    device_s: list[float] = []

    def timed(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            device_s.append(time.perf_counter() - t0)
            return out
        return run
    engine.runner.model.forward = timed(engine.runner.model.forward)
    engine.runner.ops.logits = timed(engine.runner.ops.logits)
    outputs_s: list[float] = []  # the part a GPU's overlap hides (engine._process)
    process = engine._process

    def timed_process(*a, **k):
        t0 = time.perf_counter()
        out = process(*a, **k)
        outputs_s.append(time.perf_counter() - t0)
        return out
    engine._process = timed_process
    host, hidden = [], []
    for _ in range(args.steps):
        n, m, t0 = len(device_s), len(outputs_s), time.perf_counter()
        engine.step()
        host.append(time.perf_counter() - t0 - sum(device_s[n:]))
        hidden.append(sum(outputs_s[m:]))
    total, outputs = 1e3 * statistics.median(host), 1e3 * statistics.median(hidden)
    print(f"host time a decode step at {len(engine.scheduler.running)} sequences: median {total:.2f} ms "
          f"over {args.steps} steps, of which building outputs {outputs:.2f} ms (overlapped on a GPU: "
          f"{total - outputs:.2f} ms left in the step) ({engine.platform.describe()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
