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
    # (1 GiB of KV cache: these requests need a few MB, and faulting in the default 4 GiB is most of a load)
    return LLM("smollm2", show_progress=False, max_model_len=2048, kv_cache_memory=1)


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
    else:  # a CPU without AVX2, or kernels that did not build: the start-up line says which
        assert p.backend == "torch" and p.dtype == torch.float32
        assert p.isa == "generic" or "did not build" in p.note, p.describe()
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


def test_weights_load_in_the_serving_dtype(tiny_models):
    """Every parameter lands in the serving dtype: its bytes are the bf16 size, and its values are
    the checkpoint's cast once (no float32 copy in between)."""
    import torch
    model_dir, hf = tiny_models["llama"]
    llm = LLM(model_dir, dtype="bfloat16", backend="torch", show_progress=False, max_model_len=64,
              kv_cache_memory=0.01)
    model = llm.engine.runner.model
    params = list(model.parameters())
    assert {p.dtype for p in params} == {torch.bfloat16}
    assert sum(p.numel() * p.element_size() for p in params) == 2 * sum(p.numel() for p in params)
    ours = model.hf_state_dict()
    for name, want in hf.state_dict().items():
        assert torch.equal(ours[name], want.to(torch.bfloat16)), name


RSS_PROBE = """
import json, resource, sys, torch
from vidya.models import loader
src = loader.resolve(sys.argv[1])
config = loader.load_config(src)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = loader.load_model(src, config, torch.bfloat16, torch.device("cpu"), 256, load_format="dummy")
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak_growth": after - before, "bf16_bytes": size}))
"""


def test_loading_never_holds_a_float32_copy(tiny_models, tmp_path):
    """Peak memory while loading a ~290M-parameter model in bf16 grows by at most 1.2x its bf16
    size plus 64 MiB (a float32 copy first, as before, would be 3x)."""
    import subprocess
    import sys
    d = tmp_path / "shape-only"
    os.makedirs(d)
    cfg = json.loads(open(os.path.join(tiny_models["llama"][0], "config.json")).read())
    cfg.update(hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=16,
               num_key_value_heads=4, tie_word_embeddings=False)
    (d / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(d)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["bf16_bytes"] > 500e6
    assert r["peak_growth"] < 1.2 * r["bf16_bytes"] + 64 * 2**20, r


def test_dummy_weights_serve_a_model_from_its_config_alone(tiny_models, tmp_path):
    """--load-format dummy (vLLM's name): a directory with a config and a tokenizer but no weights
    serves random text of the right shape; without it the missing weights are an error."""
    import torch
    d = tmp_path / "no-weights"
    shutil.copytree(tiny_models["llama"][0], d)
    os.remove(d / "model.safetensors")
    expect_error("no \\*.safetensors weights", str(d))
    llm = LLM(str(d), load_format="dummy", dtype="float32", show_progress=False, max_model_len=64)
    norms = [p for n, p in llm.engine.runner.model.named_parameters() if n.endswith("norm.weight")]
    assert norms and all(torch.all(p == 1) for p in norms)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=6, min_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="load_format must be one of"):
        LLM(str(d), load_format="npcache")


def test_gguf_header_reader_matches_the_gguf_library(tmp_path):
    """vidya's GGUF header reader (vidya.models.gguf_file.reader, which steps over the vocabulary
    instead of building an array per entry) gives the gguf library's tensors and metadata."""
    import numpy as np
    from gguf import GGUFReader
    from vidya.models import gguf_file, loader
    path = loader.resolve("smollm2").path
    ours, theirs = gguf_file.reader(path), GGUFReader(path)
    assert [(t.name, t.tensor_type) for t in ours.tensors] == [(t.name, t.tensor_type) for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors):
        assert a.data.shape == b.data.shape and np.array_equal(a.data, b.data), a.name
    for key, f in theirs.fields.items():
        if not key.startswith("GGUF.") and not isinstance(f.contents(), list):
            assert ours.fields[key] == f.contents(), key
    assert ours.fields["tokenizer.ggml.tokens"] == len(theirs.fields["tokenizer.ggml.tokens"].contents())
    with open(path, "rb") as f:
        head = f.read(4096)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(head)
    with pytest.raises(ValueError, match="truncated"):
        gguf_file.reader(str(truncated))


def test_a_llama_31_gguf_keeps_its_rope_scaling(tiny_models, tmp_path):
    """Issue 32, item 8: llama.cpp writes Llama 3.1's llama3 RoPE scaling as a `rope_freqs`
    tensor (a divisor per frequency), not as config; ignoring it served other positions. The tiny
    Llama (llama3 scaling, factor 8) written as such a GGUF must give transformers' tokens for the
    original checkpoint."""
    import torch
    from conftest import write_gguf
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    model_dir, hf = tiny_models["llama"]
    cfg = hf.config
    d = cfg.hidden_size // cfg.num_attention_heads
    base = torch.tensor(1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, d, 2).float() / d)))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    factors = (base / scaled).float().numpy()
    assert factors.max() > 7.9 and factors.min() == 1.0  # the scaling does something here
    path = str(tmp_path / "tiny-llama31.gguf")
    write_gguf(hf, path, extra={"rope_freqs.weight": factors})

    from vidya import LLM
    llm = LLM(path, tokenizer=model_dir, dtype="float32", max_model_len=256, kv_cache_memory=0.05,
              show_progress=False)
    prompt = list(range(3, 60))  # long enough that the scaled low frequencies move the answer
    got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, min_tokens=8),
                       use_tqdm=False)[0].outputs[0].token_ids
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                           do_sample=False, max_new_tokens=8, min_new_tokens=8, eos_token_id=2,
                           pad_token_id=2)[0, len(prompt):].tolist()
    assert got == want
