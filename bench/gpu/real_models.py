"""Real weights on the GPU (issue 31, item 8): no real model had generated on the GPU (its runs used
tiny random models and dummy 8B weights). This section runs the default model (SmolLM2-135M-Instruct)
and Gemma 3 270M from their GGUF files in bf16 with the engine's defaults there (Triton ops, CUDA
graphs, async scheduling) against transformers in bf16 on the same GPU, greedy, over Hindi and
English prompts short and tutor-length: per prompt whether the tokens agree, where they first
diverge, and both texts side by side. bf16 on different kernels may part after a near tie; a
garbage answer (a model misread, a wrong kernel) parts at once and reads as garbage.

The GGUF files (94 and 241 MiB) exceed a device call's carry (64 MiB in all): they are looked for
in $VIDYA_GPU_MODELS (default bench/gpu/models/, git-ignored): bench/gpu/models.sh splits them
into chunks here, and calls that each carry one chunk leave them joined there while the machine
stays warm. A model whose file is absent is reported as skipped, not failed."""
from __future__ import annotations

import glob
import os

import torch

PROMPTS = [
    "The capital of India is",
    "Photosynthesis is the process by which",
    "प्रकाश संश्लेषण वह प्रक्रिया है जिसमें",
    "भारत की राजधानी",
    "Question: What is 12 times 12?\nAnswer:",
    "प्रश्न: पानी का रासायनिक सूत्र क्या है?\nउत्तर:",
    "Explain Newton's second law of motion to a class 8 student. Use one simple example from "
    "daily life, such as pushing a cart in a market, and say what force, mass and acceleration are.",
    "कक्षा 8 के विद्यार्थी को न्यूटन का गति का दूसरा नियम समझाइए। रोज़मर्रा के जीवन से एक सरल उदाहरण "
    "दीजिए, जैसे बाज़ार में ठेला धकेलना, और बताइए कि बल, द्रव्यमान और त्वरण क्या हैं।",
    "Write three sentences about the monsoon in Kerala.",
    "मानसून के बारे में तीन वाक्य लिखिए।",
    "The water cycle has four stages: evaporation,",
    "जल चक्र के चार चरण हैं:",
]
FILES = {"smollm2": "SmolLM2-135M-Instruct*.gguf", "gemma3-270m": "gemma-3-270m*.gguf"}


def model_files(smoke: bool) -> dict[str, str | None]:
    """{model: its GGUF path or None}: from $VIDYA_GPU_MODELS; with --smoke (on CPU, here) the
    default model's installed file alone (transformers reads Gemma's 262k-token GGUF for a minute)."""
    if smoke:
        from vidya.models import loader
        return {"smollm2": loader.resolve("smollm2").path}
    where = os.environ.get("VIDYA_GPU_MODELS", os.path.join(os.path.dirname(__file__), "models"))
    return {name: next(iter(sorted(glob.glob(os.path.join(where, pattern)))), None) for name, pattern in FILES.items()}


def transformers_model(path: str, dtype: torch.dtype, device: torch.device):
    """transformers' own model over the GGUF, read and dequantized by transformers (from_config and
    its GGUF reader: from_pretrained would want accelerate, which the GPU image lacks)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    config = AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=shell)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # (lm_head: tied to the embeddings)
        raise RuntimeError(f"transformers' model from {path}: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.to(device=device, dtype=dtype).eval()


def compare(name: str, path: str, device: torch.device, smoke: bool) -> dict:
    from vidya import LLM, SamplingParams
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    new = 4 if smoke else 48
    prompts = PROMPTS[:2] if smoke else PROMPTS
    llm = LLM(path, dtype="bfloat16" if device.type == "cuda" else "float32", device=str(device),
              max_model_len=1024, show_progress=False, kv_cache_memory=0.25,
              gpu_memory_utilization=0.3 if device.type == "cuda" else 0.9)
    tok = llm.engine.tokenizer
    ids = [tok(p).input_ids for p in prompts]
    got = [o.outputs[0].token_ids for o in llm.generate(
        ids, SamplingParams(temperature=0.0, max_tokens=new, min_tokens=new), use_tqdm=False)]
    engine = {"platform": llm.engine.platform.describe(), "cuda_graphs": llm.engine.runner.graphs is not None,
              "async_scheduling": llm.engine.async_scheduling}
    del llm
    hf = transformers_model(path, dtype, device)
    rows = []
    with torch.no_grad():
        for p, prompt_ids, g in zip(prompts, ids, got):
            x = torch.tensor([prompt_ids], device=device)
            w = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=new,
                            min_new_tokens=new)[0, len(prompt_ids):].tolist()
            first = next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), None)
            rows.append({"prompt": p[:80], "prompt_tokens": len(prompt_ids), "agree": g == w,
                         "first_divergence": first, "vidya": tok.decode(g), "transformers": tok.decode(w)})
    del hf
    agree = sum(r["agree"] for r in rows)
    diverged = [r["first_divergence"] for r in rows if r["first_divergence"] is not None]
    return {"model": name, "file": os.path.basename(path), "dtype": str(dtype), **engine,
            "prompts": len(rows), "agree": agree, "earliest_divergence": min(diverged, default=None),
            "new_tokens": new, "rows": rows}


def real_models(device: torch.device, smoke: bool) -> list[dict]:
    out = []
    for name, path in model_files(smoke).items():
        if path is None:
            out.append({"model": name, "skipped": "its GGUF file was not carried (see bench/gpu/real_models.py)"})
            continue
        out.append(compare(name, path, device, smoke))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out
