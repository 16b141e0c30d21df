"""An 8-bit KV cache (issue 33, item 3; --kv-cache-dtype fp8 / fp8_e4m3 / fp8_e5m2, vLLM's names):
the reference attention over a float8 cache equals it over a float32 cache holding the same values
rounded through float8 (K / k_scale and V / v_scale, saturated), decode and prefill; and the tiny
Llama served with it gives the tokens transformers gives when its own K (after RoPE) and V are
rounded the same way: plain, chunked, with prefix hits, under preemption."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import make_engine
from test_quantization import greedy_tokens, hf_greedy, prompts
from vidya.attention import AttentionMetadata
from vidya.attention.paged import paged_attention

FP8 = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def rounded(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    top = torch.finfo(dtype).max
    return (x / scale).clamp(-top, top).to(dtype).float() * scale


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_reference_attention_over_an_8_bit_cache_reads_the_rounded_values(dtype):
    torch.manual_seed(0)
    bs, kvh, h, d = 4, 2, 4, 16
    q_lens, ctx = [1, 1, 7], [9, 3, 12]  # two decodes, then a prefill chunk of 7 over 12
    tables = [[0, 1, 2], [3], [4, 5, 6]]
    meta = AttentionMetadata.for_sequences(q_lens, ctx, tables, bs, "cpu")
    t = sum(q_lens)
    q, k, v = torch.randn(t, h, d), torch.randn(t, kvh, d) * 40, torch.randn(t, kvh, d)
    k[0, 0, 0] = 1e6  # saturates (e4m3: 448 x k_scale), as vLLM's cache write does
    scales = (0.5, 0.25)
    # the earlier positions' K/V already in both caches, the 8-bit one as it would have written them
    prior_k, prior_v = torch.randn(7 * bs, kvh, d) * 40, torch.randn(7 * bs, kvh, d)
    k8, v8 = (torch.zeros(7, bs, kvh, d, dtype=dtype) for _ in range(2))
    k8.view(-1, kvh, d).copy_((prior_k / scales[0]).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype))
    v8.view(-1, kvh, d).copy_((prior_v / scales[1]).to(dtype))
    k32, v32 = k8.float() * scales[0], v8.float() * scales[1]
    got = paged_attention(q, k, v, k8, v8, meta, 0.25, kv_scales=scales)
    want = paged_attention(q, rounded(k, dtype, scales[0]), rounded(v, dtype, scales[1]), k32, v32, meta, 0.25)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k8.float() * scales[0], k32)  # (the step's K/V landed, rounded, in both)
    assert k8.view(-1, kvh, d)[meta.slot_mapping[0], 0, 0].float() == torch.finfo(dtype).max


def rounding_reference(hf, dtype: torch.dtype):
    """transformers' Llama with K (after RoPE) and V rounded through `dtype` before attention."""
    import copy
    from transformers.models.llama import modeling_llama
    ref = copy.deepcopy(hf)
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_round(q, k, cos, sin, *a, **kw):
        q, k = rope(q, k, cos, sin, *a, **kw)
        return q, k.to(dtype).to(k.dtype)
    for layer in ref.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: out.to(dtype).to(out.dtype))
    return ref, rope_then_round


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
def test_the_tiny_llama_with_an_8_bit_cache_gives_transformers_tokens_with_the_same_rounding(tiny_models, name,
                                                                                             monkeypatch):
    from transformers.models.llama import modeling_llama
    model_dir, hf = tiny_models["llama"]
    ref, rope = rounding_reference(hf, FP8[name])
    batch = prompts(hf.config.vocab_size)
    with monkeypatch.context() as mp:
        mp.setattr(modeling_llama, "apply_rotary_pos_emb", rope)
        want = [hf_greedy(ref, p) for p in batch]
    assert want != [hf_greedy(hf, p) for p in batch]  # (the rounding changed the answers)
    plain = make_engine(model_dir, kv_cache_dtype=name)  # (the C++ kernels where they built, else the torch ops)
    assert plain.runner.kv_caches[0][0].dtype == FP8[name]
    assert f"{str(FP8[name]).removeprefix('torch.')} KV cache" in plain.platform.describe()
    assert greedy_tokens(plain, batch) == want
    assert greedy_tokens(make_engine(model_dir, kv_cache_dtype=name, max_num_batched_tokens=7), batch) == want
    cached = make_engine(model_dir, kv_cache_dtype=name)
    assert greedy_tokens(cached, batch, stagger=True) == want and cached.kv.prefix_hits > 0
    tight = make_engine(model_dir, kv_cache_dtype=name, num_gpu_blocks_override=20, max_num_batched_tokens=16)
    assert greedy_tokens(tight, batch) == want and tight.scheduler.num_preemptions > 0


@pytest.mark.parametrize("name", ["fp8", "fp8_e5m2"])
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_the_kernels_write_and_read_an_8_bit_cache_as_the_reference_does(tiny_models, name, backend):
    """RoPE + the cache write and the paged attention in vidya's C++ kernels (the CPU's best level;
    every level against the reference in test_cpu_kernels.py) and in Triton (interpreted here,
    float32 math) over a float8 cache, with scales other than 1: the tiny Llama's tokens equal the
    torch ops'."""
    if backend == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed here")
    else:
        from vidya.kernels import cpu
        if not cpu.available():
            pytest.skip("vidya's C++ kernels did not build here")
    model_dir, hf = tiny_models["llama"]
    batch = prompts(hf.config.vocab_size)[:4]
    outs = []
    for b in ("torch", backend):
        engine = make_engine(model_dir, kv_cache_dtype=name, backend=b)
        assert engine.runner.kv_caches[0][0].dtype == FP8[name] and engine.platform.backend == b.replace("triton", "torch")
        for layer in engine.runner.model.model.layers:
            layer.self_attn.k_scale, layer.self_attn.v_scale = 0.5, 0.25
        outs.append(greedy_tokens(engine, batch))
    assert outs[0] == outs[1]


def test_an_8_bit_cache_halves_the_bytes_a_block_takes(tiny_models):
    """The same --kv-cache-memory holds twice the blocks of a 16-bit cache (bf16 on the torch ops)."""
    model_dir = tiny_models["llama"][0]
    b16 = make_engine(model_dir, dtype="bfloat16", backend="torch", kv_cache_memory=0.01)
    b8 = make_engine(model_dir, dtype="bfloat16", kv_cache_dtype="fp8", kv_cache_memory=0.01)
    assert b8.kv.num_blocks // 2 == b16.kv.num_blocks  # (the budget's bytes // a block's, twice as many)


def test_a_checkpoints_kv_scales_are_read_and_used_by_an_8_bit_cache(tiny_models, tmp_path, monkeypatch):
    """vLLM's self_attn.k_scale / v_scale tensors in a checkpoint: an 8-bit cache holds K / k_scale
    and V / v_scale (here 8 and 4: values that would saturate e4m3 without them come through), and
    the tokens are transformers' with K and V rounded at those scales; a 16-bit cache ignores them."""
    import shutil
    from safetensors.torch import load_file, save_file
    from transformers.models.llama import modeling_llama
    model_dir, hf = tiny_models["llama"]
    dest = tmp_path / "scaled"
    shutil.copytree(model_dir, dest)
    state = load_file(str(dest / "model.safetensors"))
    for i in range(hf.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(8.0)
        state[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(4.0)
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    dtype = torch.float8_e4m3fn
    import copy
    ref = copy.deepcopy(hf)
    rope = modeling_llama.apply_rotary_pos_emb

    def rope_then_round(q, k, cos, sin, *a, **kw):
        q, k = rope(q, k, cos, sin, *a, **kw)
        return q, rounded(k, dtype, 8.0).to(k.dtype)
    for layer in ref.model.layers:
        layer.self_attn.v_proj.register_forward_hook(lambda m, i, out: rounded(out, dtype, 4.0).to(out.dtype))
    batch = prompts(hf.config.vocab_size)
    with monkeypatch.context() as mp:
        mp.setattr(modeling_llama, "apply_rotary_pos_emb", rope_then_round)
        want = [hf_greedy(ref, p) for p in batch]
    engine = make_engine(str(dest), kv_cache_dtype="fp8")
    attn = engine.runner.model.model.layers[1].self_attn
    assert (attn.k_scale, attn.v_scale) == (8.0, 4.0)
    assert greedy_tokens(engine, batch) == want
    unscaled = [hf_greedy(hf, p) for p in batch]
    for backend in ("auto", "torch", "triton"):  # a 16/32-bit cache: the scales change nothing, in any ops
        if backend == "triton" and importlib.util.find_spec("triton") is None:
            continue
        assert greedy_tokens(make_engine(str(dest), backend=backend), batch) == unscaled, backend
