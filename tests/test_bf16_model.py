"""The bf16 fast path end to end: a tiny random Llama with SmolLM2's head size, run by the engine
with vidya's C++ kernels (tiled prefill attention, fused RoPE + cache write, AMX matmuls where
the CPU has them) against the same engine on the pure-torch reference path and against
transformers in bf16. bf16 is not token-exact across implementations, so this compares the
logprobs the engine reports, within a tolerance."""
from __future__ import annotations

import random

import pytest
import torch

from conftest import make_engine, run_to_completion
from vidya import SamplingParams
from vidya.attention import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no C++ compiler here")


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, smollm2_tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig
    torch.manual_seed(99)
    config = LlamaConfig(architectures=["LlamaForCausalLM"], vocab_size=len(smollm2_tokenizer), hidden_size=256,
                         intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("bf16-llama")
    model.save_pretrained(d)
    smollm2_tokenizer.save_pretrained(d)
    return str(d), model.to(torch.bfloat16)


def first_logprobs(engine, prompts):
    """{prompt index: (token, logprob)} of the first greedy token of each prompt, in one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=1)
    ids = [engine.add_request(None, p, params) for p in prompts]
    done = run_to_completion(engine)
    out = {}
    for i, rid in enumerate(ids):
        c = done[rid].outputs[0]
        out[i] = (c.token_ids[0], c.logprobs[0][c.token_ids[0]].logprob)
    return out


def test_kernels_match_reference_and_transformers_in_bf16(bf16_llama):
    model_dir, hf = bf16_llama
    rng = random.Random(5)
    # 40 and 70 tokens: prefill tiles of 16 and their remainders; 9 short prompts make a batch
    prompts = [[rng.randrange(3, 49000) for _ in range(n)] for n in (40, 70, 3, 5, 8, 13, 21, 2, 1, 30, 17)]
    fast = first_logprobs(make_engine(model_dir, dtype="bfloat16", block_size=16, attention_backend="cpu"), prompts)
    ref = first_logprobs(make_engine(model_dir, dtype="bfloat16", block_size=16, attention_backend="torch"), prompts)
    with torch.no_grad():
        hf_lp = [torch.log_softmax(hf(torch.tensor([p])).logits[0, -1].float(), -1) for p in prompts]
    # logits are bf16: one rounding step near |6| is 0.031, so the bound is a few of those
    for i in range(len(prompts)):
        tok, lp = fast[i]
        assert abs(lp - ref[i][1]) < 0.07, (i, lp, ref[i])
        assert abs(lp - float(hf_lp[i][tok])) < 0.1, (i, lp, float(hf_lp[i][tok]))
        # the greedy pick is transformers' pick, or as likely there within bf16 rounding
        assert float(hf_lp[i].max()) - float(hf_lp[i][tok]) < 0.07, i
