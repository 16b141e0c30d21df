"""What quantized weights cost in quality: perplexity on Hindi text of the real models vidya ships,
16/32-bit against vidya's online int8 (per channel) and int4 (groups of 128).

    .venv/bin/python bench/quant_quality.py [smollm2] [gemma3-270m] [--json OUT]

The text is the tutor's own Hindi (its system prompt parts, subject and class lines, example
questions: bench/hindi_tokens.py's `hindi_texts`, 17 texts, 2,484 characters), each scored as one
sequence from its first token. The weights are the ones vidya serves: the engine loads the model
with each quantization and every decoder projection is dequantized from its layout into
transformers' own model of the same GGUF file, which then scores the text in float32 (vidya's
forward over those weights is token-exact against transformers', tests/test_quantization.py).
The 16-bit row is the file's weights as dequantized at load (the GGUF's own 4/5/6/8-bit K-quants:
"16-bit" means no further quantization by vidya).

`--engine` scores through vidya's engine instead (bench/kv_quality.py's perplexity: the text fed
16 tokens a forward through the KV cache), so that what the forward does to activations counts:
on vidya's C++ CPU kernels every quantized projection multiplies in integers, its activations
quantized to int8 at run time (issue 34); each quantization is scored on the torch reference ops
(16-bit activations) and on the kernels, against the kernels' own 16/32-bit weights.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform as host
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hindi_tokens import hindi_texts  # noqa: E402

SPLIT = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def transformers_model(path: str):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()


def served_projections(name: str, quantization: str | None) -> dict[str, torch.Tensor]:
    """{transformers parameter name: weight} of every decoder projection as vidya serves it."""
    from vidya import LLM
    llm = LLM(name, dtype="float32", quantization=quantization, max_model_len=256, kv_cache_memory=0.05,
              show_progress=False, backend="torch")
    out = {}
    for mname, m in llm.engine.runner.model.named_modules():
        leaf = mname.rpartition(".")[2]
        if leaf not in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            continue
        w = m.dequantize(torch.float32) if quantization else m.weight.float()
        owner = llm.engine.runner.model.get_submodule(mname.rpartition(".")[0])
        parts = getattr(owner, "parts", {}).get(leaf)
        names = SPLIT.get(leaf, (leaf,))
        for part, rows in zip(names, parts or (w.shape[0],)):
            out[f"{mname.rpartition('.')[0]}.{part}.weight"] = w[:rows].clone()
            w = w[rows:]
    return out


def perplexity(model, tok, texts: list[str]) -> tuple[float, int]:
    nll, n = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text).input_ids])
            logits = model(ids).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            n += ids.shape[1] - 1
    return math.exp(nll / n), n


ENGINE_ROWS = [(None, "cpu"), ("int8", "torch"), ("int8", "cpu"), ("int4", "torch"), ("int4", "cpu"),
               ("gguf", "torch"), ("gguf", "cpu")]


def engine_rows(name: str, texts: list[str]) -> list[dict]:
    from kv_quality import perplexity as engine_perplexity
    from vidya import LLM
    rows, base = [], None
    for q, backend in ENGINE_ROWS:
        llm = LLM(name, dtype="float32", quantization=q, backend=backend, max_model_len=2048, kv_cache_memory=0.25,
                  show_progress=False, hybrid_kv_cache=False)
        ppl = engine_perplexity(llm, texts)
        base = base or ppl
        p = llm.engine.platform
        label = p.quantization or "16/32-bit"
        rows.append({"model": name, "quantization": label, "ops": p.backend, "isa": p.isa, "perplexity": round(ppl, 3),
                     "vs_16_bit": round(ppl / base - 1, 4)})
        print(f"{name:12s} {p.backend:5s} {label:48s} perplexity {ppl:9.3f}  ({ppl / base - 1:+.2%})", flush=True)
        del llm
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", default=["smollm2", "gemma3-270m"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--int4-groups", type=int, nargs="+", default=[128],
                    help="group sizes to score int4 at (default 128, what --quantization int4 uses)")
    ap.add_argument("--engine", action="store_true", help="score through vidya's engine: the torch reference ops "
                    "and the C++ kernels (int8 activations)")
    args = ap.parse_args(argv)
    from vidya.models import loader, quant
    texts = hindi_texts()
    rows = []
    for name in args.models:
        if args.engine:
            rows += engine_rows(name, texts)
            continue
        src = loader.resolve(name)
        t0 = time.perf_counter()
        hf = transformers_model(src.path)
        tok = loader.load_tokenizer(src)
        own, n = perplexity(hf, tok, texts)
        params = dict(hf.named_parameters())
        base = None
        for q, group in [(None, 0), ("int8", 0)] + [("int4", g) for g in args.int4_groups]:
            quant.ONLINE_INT4_GROUP = group or quant.ONLINE_INT4_GROUP
            weights = served_projections(name, q)
            with torch.no_grad():
                for pname, w in weights.items():
                    params[pname].copy_(w)
            ppl, _ = perplexity(hf, tok, texts)
            base = base or ppl
            label = f"int4 g{group}" if q == "int4" else q or "16-bit"
            rows.append({"model": name, "quantization": label, "perplexity": round(ppl, 3),
                         "vs_16_bit": round(ppl / base - 1, 4), "tokens": n,
                         "transformers_own_16_bit": round(own, 3)})
            print(f"{name:12s} {label:9s} perplexity {ppl:9.3f}  ({ppl / base - 1:+.2%} vs 16-bit; "
                  f"{n} tokens)", flush=True)
        print(f"  ({name}: transformers' own 16-bit load {own:.3f}; {time.perf_counter() - t0:.0f} s)", flush=True)
    report = {"rows": rows, "machine": host.processor() or host.machine(), "torch": torch.__version__,
              "text": "tutor Hindi (bench/hindi_tokens.py hindi_texts)"}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
