"""Quantized projections on vidya's C++ CPU kernels (issue 34): `vidya::linear_q8` multiplies 4- and
8-bit codes by activations quantized to int8 at run time, in integers (AVX2 vpmaddubsw, AVX-512
VNNI vpdpbusd), in an order of float arithmetic fixed by kernels/csrc/quant_gemm.h, so every ISA
level (on this CPU, or emulated: the `kernel` fixture) gives the portable tile's bits exactly, and
those are the reference (quantize the activations as models/quant.py's quantize_activations does,
dequantize the weights, multiply in float64) within the float32 bound stated below. Then engines:
a tiny Llama quantized online, from a GPTQ and a W8A8 checkpoint, and from a GGUF file, served on
the kernels, token for token against transformers running the same weights with the same int8
activation quantization hooked in front of each projection."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import isa_at_least, make_engine, write_gguf
from test_quantization import PROJ, greedy_tokens, online_reference, prompts, quantized_checkpoint
from vidya.kernels import cpu as kernels
from vidya.models.quant import GGUF, QuantConfig, QuantLinear, quantize_activations
from vidya.ops.cpu import pack_q8

pytestmark = pytest.mark.skipif(not kernels.available(), reason="vidya's C++ kernels did not build here")

# float32 sums of up to K products, each rounded once, and the sub-block / zero-term order: the
# kernel is within 2^-18 of sum |x' w| (+ |b|) of the exact product (K <= 1536 here)
BOUND = 2.0 ** -18


def random_linear(bits: int, group: int, n: int, k: int, float_zeros: bool, seed: int) -> QuantLinear:
    """Random codes, scales and zero points (float ones as a GGUF's, else whole codes)."""
    g = torch.Generator().manual_seed(seed)
    qc = QuantConfig(GGUF if float_zeros else "int4", bits, group, False)
    lin = QuantLinear(k, n, True, qc)
    top = (1 << bits) - 1
    codes = torch.randint(0, top + 1, (n, k), generator=g)
    with torch.no_grad():
        if bits == 4:
            lin.qweight.copy_((codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8))
        else:
            lin.qweight.copy_(codes.to(torch.uint8))
        lin.scales.copy_(torch.rand(lin.scales.shape, generator=g) * 0.02 + 1e-4)
        zeros = torch.rand(lin.zeros.shape, generator=g) * top
        lin.zeros.copy_(zeros if float_zeros else zeros.round().to(torch.uint8))
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin


CASES = [  # bits, group (K: per channel), N, K, float zeros
    (8, 64, 40, 64, False), (8, 16, 33, 48, True), (4, 32, 96, 96, True), (4, 128, 50, 256, False),
    (8, 32, 17, 1536, False), (4, 64, 16, 1536, True),
]


@pytest.mark.parametrize("bits,group,n,k,float_zeros", CASES)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_q8_gives_the_portable_bits_at_every_level_within_the_bound_of_the_reference(
        kernel, bits, group, n, k, float_zeros, per_token, dtype):
    ops = kernel.ops
    lin = random_linear(bits, group, n, k, float_zeros, seed=bits * 1000 + n)
    packed = pack_q8(lin)
    x = (torch.randn(9, k, generator=torch.Generator().manual_seed(k)) * 3).to(dtype)  # 9 rows: tiles of 4 + 1
    x[2] = 0  # a zero row (scale 1e-10 / 127)
    with torch.inference_mode():
        y = ops.linear_q8(x, *packed, lin.bias, n, bits, group, per_token)
        level = kernels.cpu_level(ops) if kernel.isa == "generic" else kernel.isa
        kernels.bind_isa("generic", ops)
        portable = ops.linear_q8(x, *packed, lin.bias, n, bits, group, per_token)
        kernels.bind_isa(kernel.isa, ops)
    assert y.dtype == dtype and y.shape == (9, n) and level
    assert torch.equal(y, portable)
    xq = quantize_activations(x.float(), 0 if per_token else min(group, 32)).double()
    w = lin.dequantize(torch.float32).double()
    ref = F.linear(xq, w, lin.bias.double())
    bound = BOUND * (xq.abs() @ w.abs().t() + lin.bias.double().abs()) + 1e-30
    if dtype == torch.bfloat16:  # (y rounded once to bf16)
        bound = bound + ref.abs() * 2.0 ** -8
    assert ((y.double() - ref).abs() <= bound).all(), float(((y.double() - ref).abs() / bound).max())


@pytest.mark.parametrize("kernel", ["generic", "avx2"], indirect=True)
def test_linear_q8_rejects_what_it_cannot_run(kernel):
    ops = kernel.ops
    lin = random_linear(4, 32, 16, 64, False, seed=1)
    packed = pack_q8(lin)
    x = torch.randn(2, 64)
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        ops.linear_q8(x, *packed, None, 16, 3, 32, False)
    with pytest.raises(RuntimeError, match="must divide K"):
        ops.linear_q8(x, *packed, None, 16, 4, 24, False)
    with pytest.raises(RuntimeError, match="pack_q8"):  # 8 bits read from a 4-bit packing
        ops.linear_q8(x, *packed, None, 16, 8, 32, False)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        ops.linear_q8(x.half(), *packed, None, 16, 4, 32, False)
    with pytest.raises(RuntimeError, match="bias"):
        ops.linear_q8(x, *packed, torch.zeros(15), 16, 4, 32, False)


# ---- engines ------------------------------------------------------------------------------------
def int8_inputs(group_of):
    """A forward pre-hook quantizing a projection's input to int8 as the kernels do: per group of
    `group_of(K)` (0: per token)."""
    def hook(module, args):
        x = args[0]
        flat = x.reshape(-1, x.shape[-1]).float()
        return (quantize_activations(flat, group_of(x.shape[-1])).view(x.shape),)
    return hook


def with_int8_inputs(ref, group_of):
    ref = copy.deepcopy(ref)
    for name, m in ref.named_modules():
        if name.rpartition(".")[2] in PROJ:
            m.register_forward_pre_hook(int8_inputs(group_of))
    return ref


def hf_tokens(ref, batch):
    from test_quantization import hf_greedy
    return [hf_greedy(ref, p) for p in batch]


CPU_LEVELS = ["avx2", "avx512", "avx512_bf16", "amx"]


@pytest.mark.parametrize("backend", CPU_LEVELS)
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_online_quantization_on_the_kernels_is_token_exact_with_int8_activations(tiny_models, backend, method):
    """On each level this CPU has (the others: the kernel tests above, emulated): int8 per channel
    and int4 in groups, activations in blocks of 32, plain, chunked and with prefix hits."""
    if not isa_at_least(kernels.cpu_level(), backend):
        pytest.skip(f"this CPU offers {kernels.cpu_level()}, not {backend} (its tiles run emulated in the kernel tests)")
    model_dir, hf = tiny_models["llama"]
    ref = with_int8_inputs(online_reference(hf, method), lambda k: 32)
    batch = prompts(hf.config.vocab_size)
    want = hf_tokens(ref, batch)
    engine = make_engine(model_dir, quantization=method, backend=backend)
    assert engine.platform.backend == "cpu" and engine.platform.isa == backend
    assert f"W{8 if method == 'int8' else 4}A8" in engine.platform.describe()
    assert greedy_tokens(engine, batch) == want
    assert greedy_tokens(make_engine(model_dir, quantization=method, backend=backend, max_num_batched_tokens=7),
                         batch) == want
    cached = make_engine(model_dir, quantization=method, backend=backend)
    assert greedy_tokens(cached, batch, stagger=True) == want and cached.kv.prefix_hits > 0


@pytest.mark.parametrize("fmt,bits,group,sym", [("gptq", 4, 32, False), ("w8a8", 8, -1, True),
                                                ("compressed-tensors", 8, 16, False)])
def test_a_quantized_checkpoint_on_the_kernels_is_token_exact_with_int8_activations(tiny_models, tmp_path, fmt, bits,
                                                                                    group, sym):
    """W8A8's activations stay per token (as calibrated); the others' go in blocks of 32 (16 where
    the weights' groups are)."""
    model_dir, hf = tiny_models["llama"]
    ref = quantized_checkpoint(model_dir, hf, tmp_path / "q", fmt, bits, group, sym)
    if fmt != "w8a8":  # (w8a8's reference has its per-token hooks already)
        ref = with_int8_inputs(ref, lambda k: min(group, 32) if group > 0 else 32)
    batch = prompts(hf.config.vocab_size)
    engine = make_engine(str(tmp_path / "q"))
    assert engine.platform.backend == "cpu" and engine.quant.act_bits == 8
    assert engine.quant.act_per_group == (fmt != "w8a8")
    qkv = engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.stride() == (0, 0) and qkv.q8[0].dtype == torch.uint8  # packed once, the layout released
    assert greedy_tokens(engine, batch) == hf_tokens(ref, batch)


def test_a_gguf_on_the_kernels_gives_the_tokens_of_the_reference_with_int8_activations(tiny_models, tmp_path):
    """A GGUF with a different type per projection (float zero points, 4- and 8-bit codes):
    --quantization gguf on the kernels against the torch reference ops given the same int8
    activation quantization (the dequantized weights are the file's; the kernels' integer
    products are those weights' exactly)."""
    path = str(tmp_path / "tiny.gguf")
    write_gguf(tiny_models["llama"][1], path, types={"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0",
                                                      "attn_output": "Q5_0", "ffn_gate": "Q5_1", "ffn_up": "Q4_0",
                                                      "ffn_down": "Q4_1"})
    tok = tiny_models["llama"][0]
    batch = prompts(tiny_models["llama"][1].config.vocab_size)
    engine = make_engine(path, tokenizer=tok, quantization="gguf")
    assert engine.quant.describe().endswith("W4/8A8 (activations in blocks of 32)")
    ref = make_engine(path, tokenizer=tok, quantization="gguf", backend="torch")
    for m in ref.runner.model.modules():  # the kernels' activation quantization, in the reference ops
        if isinstance(m, QuantLinear):
            m.act_bits, m.act_per_group = 8, True
    assert greedy_tokens(engine, batch) == greedy_tokens(ref, batch)


def test_the_server_serves_a_quantized_model_on_the_kernels_and_says_how(tiny_models):
    import httpx
    import openai
    from serverutil import LiveServer
    s = LiveServer("--model", tiny_models["llama"][0], "--served-model-name", "tiny", "--max-model-len", "256",
                   "--no-tutor-warmup", "--kv-cache-memory", "1", "--quantization", "int4")
    try:
        backend = httpx.get(s.url + "/version").json()["backend"]
        assert backend["backend"] == "cpu"
        assert backend["quantization"] == "int4 W4A8 g128 asym (activations in blocks of 32)"
        assert "int4 W4A8 g128 asym (activations in blocks of 32) weights" in s.log()  # the start-up line
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        out = client.completions.create(model="tiny", prompt="w5 w6", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4
    finally:
        s.terminate()


@pytest.mark.parametrize("ops_class,dtype", [("CpuOps", torch.float32), ("Wide16Ops", torch.float32),
                                             ("OneDnnOps", torch.bfloat16)])
def test_every_cpu_ops_class_packs_quantized_projections_and_runs_them_on_linear_q8(ops_class, dtype):
    """Whichever way a class holds its 16-bit weights, `prepare` packs a QuantLinear once (its own
    tensors released) and `linear` / `gated_act` run it through vidya::linear_q8."""
    from torch import nn
    import vidya.ops.cpu as cpu_ops
    from vidya.platform import Platform
    weight_dtype = torch.bfloat16 if ops_class == "Wide16Ops" else dtype
    ops = getattr(cpu_ops, ops_class)(Platform(torch.device("cpu"), "cpu", "avx2", dtype, weight_dtype, weight_dtype,
                                               attention="cpu"))
    model = nn.Module()  # an MLP's shape: oneDNN splits a SiLU MLP's 16-bit gate_up, never a quantized one
    model.gate_up_proj, model.act = random_linear(4, 32, 64, 96, True, seed=7), "silu"
    want_packed = pack_q8(model.gate_up_proj)
    ops.prepare(model)
    lin = model.gate_up_proj
    assert lin.qweight.stride() == (0, 0) and all(torch.equal(a, b) for a, b in zip(lin.q8, want_packed))
    x = torch.randn(5, 96).to(dtype)
    with torch.inference_mode():
        want = torch.ops.vidya.linear_q8(x, *want_packed, lin.bias, 64, 4, 32, not lin.act_per_group)
        assert torch.equal(ops.linear(lin, x), want)
        gate, up = want.float().chunk(2, dim=-1)
        torch.testing.assert_close(ops.gated_act(lin, x, "silu").float(), F.silu(gate) * up, atol=2e-2, rtol=2e-2)
