"""A GGUF's projections kept quantized (issue 32, item 8; models/gguf_blocks.py): each served block
type decodes to what the gguf library dequantizes; a tiny Llama written as a GGUF with a different
type in each projection (q/k/v fused from 4- and 8-bit types) gives, kept quantized, the tokens of
the same file served dequantized: plain, chunked, with prefix hits, under preemption, at TP=2 (the
dequantized file at TP=2 too) and
through the Triton ops; the default model (Q4_1) likewise. The real Gemma 3 270M (Q4_K, Q6_K, Q5_0,
Q8_0) kept quantized is checked against transformers in test_gemma3.py."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import make_engine, write_gguf
from test_quantization import greedy_tokens, prompts
from vidya.models import gguf_blocks
from vidya.models.loader import ModelLoadError
from vidya.models.quant import QuantLinear

TYPES = {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q5_1", "ffn_gate": "Q5_0",
         "ffn_up": "Q4_0", "ffn_down": "Q4_1"}


@pytest.mark.parametrize("name", list(gguf_blocks.LAYOUTS))
def test_each_block_type_decodes_to_what_the_gguf_library_dequantizes(name):
    """Random blocks (any bytes are a valid block, given finite fp16 scales), one with a zero scale."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    block, size, bits, group = gguf_blocks.LAYOUTS[name]
    rng = np.random.default_rng(7)
    n, k = 5, 512
    b = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    halves = [208] if name == "Q6_K" else [0, 2] if name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K") else [0]
    for at in halves:  # d (and m / dmin): finite, of either sign
        b[:, at:at + 2] = (rng.standard_normal(len(b)) * 0.02).astype(np.float16).view(np.uint8).reshape(-1, 2)
    b[1, (208 if name == "Q6_K" else 0):][:2] = 0  # a block whose scale d is 0
    raw = b.reshape(n, -1)
    want = dequantize(raw, GGMLQuantizationType[name]).reshape(n, k)
    codes, scales, zeros = gguf_blocks.decode(name, raw, k)
    assert codes.dtype == np.uint8 and int(codes.max()) < (1 << bits) and scales.shape == (n, k // group)
    got = (codes.reshape(n, k // group, group).astype(np.float32) - zeros[..., None]) * scales[..., None]
    np.testing.assert_allclose(got.reshape(n, k), want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny-mixed.gguf")
    write_gguf(tiny_models["llama"][1], path, types=TYPES)
    return path, tiny_models["llama"][0]


def test_a_gguf_kept_quantized_gives_the_tokens_of_its_dequantized_self(tiny_gguf, tiny_models):
    path, tok = tiny_gguf
    batch = prompts(tiny_models["llama"][1].config.vocab_size)
    dequantized = make_engine(path, tokenizer=tok)
    assert dequantized.quant is None  # a CPU's default: the 16/32-bit copy
    want = greedy_tokens(dequantized, batch)
    plain = make_engine(path, tokenizer=tok, quantization="gguf", backend="torch")
    assert plain.quant.describe() == "gguf Q4_0+Q4_1+Q5_0+Q5_1+Q8_0 W4/8A16"
    layer = plain.runner.model.model.layers[0]
    assert isinstance(layer.self_attn.qkv_proj, QuantLinear)
    assert (layer.self_attn.qkv_proj.bits, layer.self_attn.qkv_proj.group_size) == (8, 32)  # Q8_0's v widens it
    assert (layer.mlp.down_proj.bits, layer.mlp.gate_up_proj.bits, layer.self_attn.o_proj.bits) == (4, 8, 8)
    assert layer.mlp.down_proj.qweight.numel() == layer.mlp.down_proj.in_features * layer.mlp.down_proj.out_features // 2
    assert greedy_tokens(plain, batch) == want
    assert greedy_tokens(make_engine(path, tokenizer=tok, quantization="gguf", backend="torch", max_num_batched_tokens=7), batch) == want
    cached = make_engine(path, tokenizer=tok, quantization="gguf", backend="torch")
    assert greedy_tokens(cached, batch, stagger=True) == want and cached.kv.prefix_hits > 0
    tight = make_engine(path, tokenizer=tok, quantization="gguf", backend="torch", num_gpu_blocks_override=20, max_num_batched_tokens=16)
    assert greedy_tokens(tight, batch) == want and tight.scheduler.num_preemptions > 0
    for quantization in ("gguf", None):  # (a rank unpermuted q/k rows by its own head count: wrong either way)
        tp = make_engine(path, tokenizer=tok, quantization=quantization, tensor_parallel_size=2)
        try:
            assert greedy_tokens(tp, batch) == want
        finally:
            tp.close()


def test_a_gguf_kept_quantized_through_the_triton_ops_equals_the_torch_ops(tiny_gguf, tiny_models):
    pytest.importorskip("triton", reason="the triton package is not installed here")
    path, tok = tiny_gguf
    batch = prompts(tiny_models["llama"][1].config.vocab_size)[:3]
    want = greedy_tokens(make_engine(path, tokenizer=tok, quantization="gguf", backend="torch"), batch)
    assert greedy_tokens(make_engine(path, tokenizer=tok, quantization="gguf", backend="triton"), batch) == want


def test_the_default_model_kept_quantized_gives_its_dequantized_tokens():
    from vidya import LLM, SamplingParams
    params = SamplingParams(temperature=0, max_tokens=12, min_tokens=12)
    texts = ["नमस्ते, आज हम पढ़ेंगे", "The capital of France is"]
    outs = []
    for quantization in (None, "gguf"):
        llm = LLM("smollm2", quantization=quantization, dtype="float32", backend="torch", max_model_len=256,
                  kv_cache_memory=0.05, show_progress=False)
        assert (llm.engine.quant is None) == (quantization is None)
        outs.append([o.outputs[0].token_ids for o in llm.generate(texts, params, use_tqdm=False)])
    assert outs[0] == outs[1]


def test_gguf_quantization_errors_say_what_to_do(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        make_engine(tiny_models["llama"][0], quantization="gguf")
    path = str(tmp_path / "f32.gguf")
    write_gguf(tiny_models["llama"][1], path)  # float32 projections: nothing to keep quantized
    with pytest.raises(ModelLoadError, match="F32 tensors .* leave --quantization out") as e:
        make_engine(path, tokenizer=tiny_models["llama"][0], quantization="gguf")
    assert "\n" not in str(e.value)


def test_a_gpu_keeps_a_gguf_quantized_unless_told_none(tiny_gguf):
    """Where the engine decides (loader.load_quant, given the platform's device): on a GPU a GGUF's
    projections stay quantized by default, --quantization none dequantizes; on a CPU the 16-bit copy
    unless --quantization gguf."""
    from vidya.models import loader
    src = loader.resolve(tiny_gguf[0])
    assert loader.load_quant(src, None, on_gpu=True).method == "gguf"
    assert loader.load_quant(src, "none", on_gpu=True) is None
    assert loader.load_quant(src, None, on_gpu=False) is None
    assert loader.load_quant(src, "gguf", on_gpu=False).method == "gguf"
    assert loader.load_quant(src, "int8", on_gpu=True).method == "int8"  # online, from the dequantized file
