"""Loading: the embedded default model with no network, and clear errors for what users get wrong."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from vidya import LLM, SamplingParams
from vidya.models.loader import ModelLoadError


@pytest.fixture(scope="module")
def default_llm():
    return LLM("smollm2", show_progress=False, max_model_len=2048)


def test_default_model_answers_photosynthesis_on_topic(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is photosynthesis?"}],
                           SamplingParams(temperature=0, max_tokens=60), use_tqdm=False)[0]
    text = out.outputs[0].text.lower()
    assert "photosynthesis" in text
    assert any(w in text for w in ("light", "plant", "energy", "sun")), text


def test_default_model_streams_hindi_without_broken_characters(default_llm):
    engine = default_llm.engine
    prompt = engine.apply_chat_template([{"role": "system", "content": "You are a Hindi study tutor."},
                                         {"role": "user", "content": "प्रकाश संश्लेषण समझाइए"}])
    rid = engine.add_request(None, engine.tokenizer(prompt, add_special_tokens=False).input_ids,
                             SamplingParams(temperature=0, max_tokens=40))
    texts = []
    while engine.has_unfinished_requests():
        texts += [o.outputs[0] for o in engine.step() if o.request_id == rid]
    final = texts[-1]
    assert final.finished and len(texts) > 10
    for t in texts:  # never a half character, not even when max_tokens cuts one
        assert "\ufffd" not in t.text
    full = engine.tokenizer.decode(final.token_ids, skip_special_tokens=True)
    assert final.text == full.rstrip("\ufffd")  # the whole decode, less a character left incomplete
    assert any("\u0900" <= ch <= "\u097f" for ch in final.text)


def test_default_model_holds_16_bits_on_every_cpu_class(default_llm):
    """bf16 throughout where the CPU has bf16 math; elsewhere fp32 math over bf16 weights and KV
    cache (the C++ kernels widen them in registers); fp32 only on the torch reference ops."""
    import torch
    from vidya.platform import cpu_isa
    p = default_llm.engine.platform
    assert p.isa == cpu_isa() or "AMX" in p.note
    if p.isa in ("amx", "avx512_bf16"):
        assert (p.dtype, p.weight_dtype, p.kv_dtype) == (torch.bfloat16,) * 3
    elif p.isa in ("avx512", "avx2") and p.backend == "cpu":
        assert (p.dtype, p.weight_dtype, p.kv_dtype) == (torch.float32, torch.bfloat16, torch.bfloat16)
        model = default_llm.engine.runner.model
        assert model.lm_head.w16.dtype == torch.bfloat16 and model.lm_head.released
    else:
        assert p.backend == "torch" and p.dtype == torch.float32
    assert default_llm.engine.runner.kv_caches[0][0].dtype == p.kv_dtype


def expect_error(match: str, model: str, **kw):
    with pytest.raises(ModelLoadError, match=match):
        LLM(model, show_progress=False, **kw)


def test_missing_path():
    expect_error("does not exist", "/no/such/model/dir")
    expect_error("does not exist", "./missing.gguf")


def test_hub_id_without_network_says_how_to_pass_a_directory():
    expect_error("pass its local directory", "meta-llama/Llama-3-8B-Instruct")


def test_unsupported_architecture_names_the_supported_ones(tiny_models, tmp_path):
    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models["llama"][0], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    expect_error("GPT2LMHeadModel", str(d))
    expect_error("LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, "
                 "Gemma3ForConditionalGeneration", str(d))


def test_truncated_weights(tiny_models, tmp_path):
    d = tmp_path / "truncated"
    shutil.copytree(tiny_models["llama"][0], d)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    expect_error("corrupt or truncated", str(d))


def test_missing_tokenizer(tiny_models, tmp_path):
    d = tmp_path / "notok"
    os.makedirs(d)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_models["llama"][0], f), d / f)
    expect_error("tokenizer", str(d))


def test_bad_engine_arguments():
    with pytest.raises(ValueError, match="dtype must be one of"):
        LLM("smollm2", dtype="float8")
    with pytest.raises(ValueError, match="block_size"):
        LLM("/nonexistent-but-block-size-first", block_size=0, show_progress=False)


def test_generation_config_end_tokens_end_a_generation(tiny_models, tmp_path):
    """Llama 3's <|eot_id|>, Gemma's <end_of_turn>: every eos id of generation_config.json stops."""
    d = tmp_path / "two-eos"
    shutil.copytree(tiny_models["llama"][0], d)
    gen = json.loads((d / "generation_config.json").read_text())
    gen["eos_token_id"] = [2, 7]
    (d / "generation_config.json").write_text(json.dumps(gen))
    llm = LLM(str(d), dtype="float32", show_progress=False, max_model_len=256)
    forced = SamplingParams(temperature=0, max_tokens=5, logit_bias={7: 100})
    out = llm.generate([[5, 6, 8]], forced, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [7] and out.finish_reason == "stop"
    ignored = SamplingParams(temperature=0, max_tokens=5, logit_bias={7: 100}, ignore_eos=True)
    assert llm.generate([[5, 6, 8]], ignored, use_tqdm=False)[0].outputs[0].token_ids == [7] * 5
    plain = LLM(tiny_models["llama"][0], dtype="float32", show_progress=False, max_model_len=256)
    assert len(plain.generate([[5, 6, 8]], forced, use_tqdm=False)[0].outputs[0].token_ids) == 5
