"""The C++ kernels against the pure-torch reference, at every ISA level they have paths for (the
`kernel` fixture binds each in turn: on this CPU where it has the level, else in the emulated
build, which runs the AVX-512 BF16 and AMX paths in software on any x86 CPU with AVX2): paged
attention (decode rows and prefill chunks, scattered block tables, contexts that end mid-block,
every group size and head size, fp32, bf16, and fp32 rows over a bf16 cache), the prefill tiles,
the fused layer ops, argmax, the 16-bit-weight matmul, the AMX matmuls and the fused decode
stack; and, where the CPU has a level itself, the emulation against the hardware."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import isa_at_least
from vidya.attention.paged import decode_attention, prefill_attention
from vidya.kernels import cpu as kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C++ compiler here")


def case(heads: int, kv_heads: int, head_dim: int, dtype, seed: int, block_size: int = 16, q_dtype=None):
    g = torch.Generator().manual_seed(seed)
    num_blocks = 64
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return g, k_cache, v_cache


@pytest.mark.parametrize("dtype,q_dtype,tol", [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                                               (torch.bfloat16, torch.float32, 1e-5)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (8, 8, 64), (32, 8, 128), (16, 2, 64),
                                                     (4, 2, 32), (12, 1, 80)])
def test_kernel_matches_reference(kernel, dtype, q_dtype, tol, heads, kv_heads, head_dim):
    """dtype is the cache's; q_dtype the rows' (fp32 rows over a bf16 cache: CPUs without bf16 math)."""
    ops = kernel.ops
    g, k_cache, v_cache = case(heads, kv_heads, head_dim, dtype, seed=heads * 100 + head_dim)
    scale = head_dim ** -0.5
    # three decodes (contexts 1, 17 and 70) and one prefill chunk of 9 queries ending at 41
    decode_lens = [1, 17, 70]
    tables = [torch.randperm(64, generator=g)[:5] for _ in range(4)]
    q_dec = torch.randn(3, heads, head_dim, generator=g).to(dtype).to(q_dtype)
    q_pre = torch.randn(9, heads, head_dim, generator=g).to(dtype).to(q_dtype)
    ref_dec = decode_attention(q_dec, k_cache, v_cache, torch.stack(tables[:3]), torch.tensor(decode_lens),
                               max(decode_lens), scale)
    ref_pre = prefill_attention(q_pre, k_cache, v_cache, tables[3], 41, scale)
    q = torch.cat([q_dec, q_pre])
    row_seq = torch.tensor([0, 1, 2] + [3] * 9)
    row_ctx = torch.tensor(decode_lens + list(range(33, 42)))
    out = ops.paged_attention(q, k_cache, v_cache, torch.stack(tables), row_seq, row_ctx, scale)
    assert out.dtype == q_dtype
    torch.testing.assert_close(out[:3].float(), ref_dec.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out[3:].float(), ref_pre.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 4, 64)])
@pytest.mark.parametrize("chunks", [[(0, 37)], [(0, 16), (5, 3), (20, 50)], [(30, 17), (0, 1), (64, 33)]])
def test_prefill_tiles_match_reference(kernel, heads, kv_heads, head_dim, chunks):
    """Chunks of consecutive rows (tiles of 16 and their remainders, odd and even context ends,
    chunks that start after cached tokens, a 1-row and a 3-row chunk that go row by row): the
    AVX-512 BF16 tiles, and the AMX ones at that level."""
    isa, ops = kernel.isa, kernel.ops
    if not isa_at_least(isa, "avx512_bf16"):
        pytest.skip(f"prefill tiles run on AVX-512 BF16 and AMX; at {isa} bf16 rows go one by one "
                    f"(test_kernel_matches_reference covers that path)")
    dtype = torch.bfloat16
    g, k_cache, v_cache = case(heads, kv_heads, head_dim, dtype, seed=len(chunks) * 7 + head_dim)
    scale = head_dim ** -0.5
    tables = [torch.randperm(64, generator=g)[:7] for _ in chunks]
    qs, refs, row_seq, row_ctx = [], [], [], []
    for i, (start, n) in enumerate(chunks):
        q = torch.randn(n, heads, head_dim, generator=g).to(dtype)
        qs.append(q)
        refs.append(prefill_attention(q, k_cache, v_cache, tables[i], start + n, scale))
        row_seq += [i] * n
        row_ctx += list(range(start + 1, start + n + 1))
    out = ops.paged_attention(torch.cat(qs), k_cache, v_cache, torch.stack(tables),
                                          torch.tensor(row_seq), torch.tensor(row_ctx), scale)
    torch.testing.assert_close(out.float(), torch.cat(refs).float(), atol=2e-2, rtol=2e-2)


def test_kernel_rejects_bad_input():
    k = torch.zeros(4, 16, 2, 64)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        torch.ops.vidya.paged_attention(torch.zeros(1, 4, 64, dtype=torch.bfloat16), k, k,
                                        torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                        torch.ones(1, dtype=torch.long), 1.0)


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16)])
def test_fused_layer_ops_match_the_torch_ops_they_replace(kernel, dtype, cache_dtype):
    ops = kernel.ops
    import torch.nn.functional as F

    from vidya.models.rope import apply_rotary
    from vidya.ops.torch_ops import rms_norm
    g = torch.Generator().manual_seed(7)
    rows, hidden, inter, heads, kv_heads, d = 37, 576, 1536, 9, 3, 64
    x, res, w = (torch.randn(*shape, generator=g).to(dtype) for shape in ((rows, hidden), (rows, hidden), (hidden,)))
    norm = lambda h: rms_norm(h, w, 1e-5)
    x2, res2 = x.clone(), res.clone()
    ops.add_rms_norm_(x2, res2, w, 1e-5)
    assert torch.equal(res2, res + x)  # the residual sum is exact
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5  # the mean of squares is summed in another order
    torch.testing.assert_close(x2, norm(res + x), atol=tol, rtol=tol)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-5), norm(x), atol=tol, rtol=tol)

    gate_up = torch.randn(rows, 2 * inter, generator=g).to(dtype)
    gate_up[0, :inter:7], gate_up[1, :inter:5] = -100.0, 100.0  # e^-x past fp32's range, and ~0
    gate, up = gate_up.split(inter, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), F.silu(gate) * up, atol=tol, rtol=tol)

    qkv = torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g).to(dtype)
    cos, sin = torch.randn(rows, d, generator=g).to(dtype), torch.randn(rows, d, generator=g).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    ref_q, ref_k = apply_rotary(q.reshape(rows, heads, d), k.reshape(rows, kv_heads, d), cos[:, None], sin[:, None])
    out = qkv.clone()
    k_cache = torch.zeros(8, 16, kv_heads, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(8 * 16, generator=g)[:rows]
    ops.rotary_cache_(out, cos, sin, heads, kv_heads, d, k_cache, v_cache, slots)
    assert torch.equal(out[:, :heads * d].view(rows, heads, d), ref_q)
    assert torch.equal(out[:, heads * d:(heads + kv_heads) * d].view(rows, kv_heads, d), ref_k)
    assert torch.equal(out[:, (heads + kv_heads) * d:], v)  # v untouched
    # written in the cache's dtype, rounded as tensor.to() rounds
    assert torch.equal(k_cache.view(-1, kv_heads, d)[slots], ref_k.to(cache_dtype))
    assert torch.equal(v_cache.view(-1, kv_heads, d)[slots], v.reshape(rows, kv_heads, d).to(cache_dtype))
    untouched = torch.ones(8 * 16, dtype=torch.bool)
    untouched[slots] = False
    assert not k_cache.view(-1, kv_heads, d)[untouched].any() and not v_cache.view(-1, kv_heads, d)[untouched].any()
    with pytest.raises(RuntimeError, match="outside the cache"):
        ops.rotary_cache_(qkv.clone(), cos, sin, heads, kv_heads, d, k_cache, v_cache,
                                      torch.full((rows,), 8 * 16))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_argmax_rows_is_torch_max_indices(kernel, dtype):
    """First maximum of each row, ties included (greedy sampling must match argmax exactly)."""
    ops = kernel.ops
    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 49152 + 7, generator=g).to(dtype)
    x[3, 100] = x[3, 900] = x[3].max() + 1  # a tie: the first wins
    x[5, -1] = x[5].max() + 1  # in the tail past the last full vector
    x[6] = 0.0  # all equal
    x[7, :] = float("-inf")
    x[8, 9] = x[8, 16] = x[8].max() + 1  # a tie across vector lanes: the smaller index, in the later lane
    ref = x.max(dim=-1).indices
    assert torch.equal(ops.argmax_rows(x), ref)
    assert torch.equal(ops.argmax_rows(x[:, :20]), x[:, :20].max(dim=-1).indices)  # strided rows
    assert torch.equal(ops.argmax_rows(x[:, :5]), x[:, :5].max(dim=-1).indices)  # shorter than a vector


@pytest.mark.parametrize("kernel", ["avx2"], indirect=True)  # (the levels above it run the same kernels)
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 64, 96, 97, 300])
@pytest.mark.parametrize("out_features,in_features,bias", [(960, 576, False), (3072, 576, True), (576, 1536, False),
                                                           (40, 24, True), (200, 2000, True)])
def test_linear_w16_is_fp32_linear_over_the_widened_weight(kernel, rows, out_features, in_features, bias):
    """fp32 rows times bf16 weights packed in strips (CPUs without bf16 math), on both paths
    (register tiles up to 96 rows, widened chunks and torch's GEMM above) and with a last strip
    partly filled: F.linear over the widened weight, up to summation order."""
    from vidya.ops.cpu import pack_w16, unpack_w16
    g = torch.Generator().manual_seed(rows * 7 + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    ops = kernel.ops
    packed = pack_w16(w)
    assert torch.equal(unpack_w16(packed, out_features), w)
    y = ops.linear_w16(x, packed, b, out_features)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    torch.testing.assert_close(y, F.linear(x, w.float(), b), atol=1e-4, rtol=1e-4)
    with torch.inference_mode():  # the engine's mode, on every worker thread too
        torch.testing.assert_close(ops.linear_w16(x, packed, b, out_features), y, atol=0, rtol=0)
    wide = torch.cat([x, x], dim=1)[:, :in_features]  # strided rows
    torch.testing.assert_close(ops.linear_w16(wide, packed, b, out_features), y, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", ["generic", "avx2"], indirect=True)
def test_linear_w16_rejects_what_it_cannot_run(kernel):
    from vidya.ops.cpu import pack_w16
    ops = kernel.ops
    if kernel.isa == "generic":  # the dispatch table's portable row has no strip kernels
        with pytest.raises(RuntimeError, match="no 16-bit strip kernels"):
            ops.linear_w16(torch.randn(2, 8), pack_w16(torch.randn(4, 8)), None, 4)
        return
    with pytest.raises(RuntimeError, match="packed"):
        ops.linear_w16(torch.randn(2, 8), torch.randn(4, 8).to(torch.bfloat16), None, 4)
    with pytest.raises(RuntimeError, match="fp32"):
        ops.linear_w16(torch.randn(2, 8).to(torch.bfloat16), pack_w16(torch.randn(4, 8)), None, 4)
    with pytest.raises(RuntimeError, match="packed"):  # N does not match the strips
        ops.linear_w16(torch.randn(2, 8), pack_w16(torch.randn(4, 8)), None, 40)


@pytest.mark.parametrize("kernel", ["amx"], indirect=True)
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64])
@pytest.mark.parametrize("out_features,in_features,bias", [(960, 576, False), (3072, 576, True), (576, 1536, False),
                                                           (48, 64, True)])
def test_amx_linear_matches_linear(kernel, rows, out_features, in_features, bias):
    """The decode-step matmul: fp32 accumulation rounded once to bf16, as F.linear in fp32 then
    rounded (within one bf16 rounding step: the sums run in another order)."""
    ops = kernel.ops
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    w = (torch.randn(out_features, in_features, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    b = torch.randn(out_features, generator=g).to(torch.bfloat16) if bias else None
    y = ops.amx_linear(x, ops.amx_pack(w), b)
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(y.float(), ref, atol=1e-2, rtol=8e-3)
    # a strided view of x (the rows of a bigger batch) gives the same
    wide = torch.cat([x, x], dim=1)[:, :in_features]
    assert torch.equal(ops.amx_linear(wide, ops.amx_pack(w), b), y)


@pytest.mark.parametrize("kernel", ["amx"], indirect=True)
def test_amx_linear_rejects_what_it_cannot_run(kernel):
    ops = kernel.ops
    w = torch.randn(32, 64).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="N % 16 == 0"):
        ops.amx_pack(torch.randn(30, 64).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="M <= 64"):
        ops.amx_linear(torch.randn(65, 64).to(torch.bfloat16), ops.amx_pack(w), None)


@pytest.mark.parametrize("kernel", ["amx"], indirect=True)
@pytest.mark.parametrize("rows", [1, 16, 17, 40, 64])
def test_amx_linear_silu_is_silu_and_mul_of_amx_linear(kernel, rows):
    """The decode MLP's gate_up with SiLU * up in its epilogue: bit-identical to the two ops."""
    ops = kernel.ops
    g = torch.Generator().manual_seed(rows)
    w = (torch.randn(2 * 1536, 576, generator=g) * 0.05).to(torch.bfloat16)
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    x[0] *= 40  # gates far past -88 and +88 (e^-x beyond fp32's range: no NaN, as torch)
    packed = ops.amx_pack(w)
    want = ops.silu_and_mul(ops.amx_linear(x, packed, None))
    assert not want.isnan().any()
    assert torch.equal(ops.amx_linear_silu(x, packed), want)


@pytest.mark.parametrize("kernel", ["amx"], indirect=True)
@pytest.mark.parametrize("rows", [1, 16, 33, 64])
def test_amx_linear_argmax_is_argmax_of_the_bf16_logits(kernel, rows):
    """lm_head + greedy pick in one pass: the ids argmax_rows gives on the bf16 logits, ties
    (a duplicated weight row) resolved to the first column."""
    ops = kernel.ops
    g = torch.Generator().manual_seed(rows + 5)
    w = (torch.randn(49152, 576, generator=g) * 0.05).to(torch.bfloat16)
    w[40000] = w[123]  # the same logit twice: the first column wins
    x = torch.randn(rows, 576, generator=g).to(torch.bfloat16)
    x[0] = w[123] * 10  # row 0's maximum is at 123 and 40000
    packed = ops.amx_pack(w)
    want = ops.argmax_rows(ops.amx_linear(x, packed, None))
    assert want[0] == 123
    assert torch.equal(ops.amx_linear_argmax(x, packed), want)


@pytest.mark.parametrize("kernel", ["amx"], indirect=True)
@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])  # (Qwen2: bias on q/k/v)
def test_the_fused_decode_stack_is_the_models_own_forward(kernel, arch):
    """AmxOps runs every layer of a decode step in one C++ call (`vidya::decode_layers`), a
    sequence of ops of its own: held here to the model's own layers (models/llama.py) run one by
    one through the same AmxOps, bit for bit, outputs and caches (two layers, decode rows whose
    contexts start, cross and end blocks)."""
    from transformers import LlamaConfig

    from vidya.attention.metadata import AttentionMetadata
    from vidya.models.llama import LlamaForCausalLM
    from vidya.ops.cpu import AmxOps
    from vidya.platform import Platform
    bf = torch.bfloat16
    config = LlamaConfig(architectures=[arch], vocab_size=64, hidden_size=256, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                         max_position_embeddings=128)
    torch.manual_seed(11)
    model = LlamaForCausalLM(config, max_positions=128).to(bf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    ops = AmxOps(Platform(torch.device("cpu"), "cpu", "amx", bf, bf, bf, attention="cpu"), kernel.ops)
    # (prepare() also lays the weights out for oneDNN's prefill matmuls, which need the real
    # instructions; decode-sized batches never reach them)
    ops.pack_tiles(model)
    assert ops.stack is not None and len(ops.stack[2]) == (2 if arch == "Qwen2ForCausalLM" else 0)

    ctx, bs, g = [1, 7, 16, 17, 40], 16, torch.Generator().manual_seed(5)
    tables = [torch.randperm(16, generator=g)[:3].tolist() for _ in ctx]
    meta = AttentionMetadata.for_sequences([1] * len(ctx), ctx, tables, bs, "cpu")
    caches = [tuple(torch.randn(16, bs, 2, 64, generator=g).to(bf) for _ in range(2)) for _ in range(2)]
    x = torch.randn(len(ctx), 256, generator=g).to(bf)
    rope = model.model.rotary_emb(torch.tensor(ctx) - 1, bf)

    fused_caches = [(k.clone(), v.clone()) for k, v in caches]
    out, res = ops.decoder_stack(model.model, x.clone(), rope, fused_caches, meta)
    h, residual = x.clone(), None
    for layer, kv in zip(model.model.layers, caches):
        h, residual = layer(h, residual, rope, kv, meta, ops)
    assert torch.equal(out, h) and torch.equal(res, residual)
    assert all(torch.equal(a, b) for fc, c in zip(fused_caches, caches) for a, b in zip(fc, c))


@pytest.mark.parametrize("level", ["avx512_bf16", "amx"])
def test_the_emulated_kernels_agree_with_the_cpu_that_has_the_level(level):
    """Where this CPU has the level itself, the emulated build (which the `kernel` fixture uses on
    CPUs without it) gives what the hardware gives: paged attention's rows and tiles, and at AMX
    the matmul, up to the order of the hardware's sums; the 8-bit matmul bit for bit."""
    have = kernels.cpu_level()
    if not isa_at_least(have, level):
        pytest.skip(f"this CPU offers {have}, not {level}: nothing to check the emulation against")
    emu = kernels.emulated_ops()
    assert emu is not None, "the emulated kernels did not build on an x86 CPU with AVX2"
    g, k_cache, v_cache = case(8, 2, 128, torch.bfloat16, seed=5)
    tables = torch.stack([torch.randperm(64, generator=g)[:6] for _ in range(3)])
    q = torch.randn(3 + 20, 8, 128, generator=g).to(torch.bfloat16)
    row_seq = torch.tensor([0, 1, 2] + [2] * 20)
    row_ctx = torch.tensor([5, 33, 70] + list(range(71, 91)))
    from test_cpu_quant import random_linear
    from vidya.ops.cpu import pack_q8
    lin = random_linear(4, 32, 48, 256, True, seed=3)
    xq = torch.randn(21, 256, generator=g)
    outs, q8 = [], []
    for ops in (torch.ops.vidya, emu):
        assert kernels.bind_isa(level, ops) == level
        outs.append(ops.paged_attention(q, k_cache, v_cache, tables, row_seq, row_ctx, 128 ** -0.5))
        q8.append(ops.linear_q8(xq, *pack_q8(lin), lin.bias, 48, 4, 32, False))  # (VNNI, and AMX-INT8 at amx)
        if level == "amx":
            w = (torch.randn(256, 512, generator=torch.Generator().manual_seed(1)) * 0.05).to(torch.bfloat16)
            outs.append(ops.amx_linear(q.view(-1, 1024)[:, :512].contiguous(), ops.amx_pack(w), None))
        kernels.bind_isa(kernels.cpu_level(ops), ops)
    assert torch.equal(q8[0], q8[1])  # integer sums and a fixed order of float arithmetic: the same bits
    half = len(outs) // 2
    for hw, sw in zip(outs[:half], outs[half:]):
        torch.testing.assert_close(sw.float(), hw.float(), atol=1e-2, rtol=1e-2)


def test_the_sources_compile_for_a_cpu_that_is_not_x86():
    """What an ARM machine builds: every x86 file and intrinsic left out (VIDYA_X86 = 0), the
    portable kernels only. Checked here by compiling the sources as if not on x86 (syntax and
    types; -DVIDYA_NOT_X86), so an x86-only line outside its guard fails on every machine."""
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("c++") or shutil.which("g++")
    assert cxx, "the kernels built, so a C++ compiler is here"
    out = subprocess.run([cxx, "-std=c++17", "-fsyntax-only", "-fopenmp", "-DVIDYA_NOT_X86",
                          *[f"-I{p}" for p in include_paths()], f"-I{kernels.CSRC}", kernels.SOURCE],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


def test_the_sources_compile_for_arm():
    """The same sources compiled to code by GCC for aarch64 (Debian's cross compiler, which `make
    test` installs): what the syntax check above cannot see, such as x86-only attributes on
    templates, which GCC checks only when it generates their code."""
    import shutil
    import subprocess

    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("aarch64-linux-gnu-g++")
    if cxx is None:
        pytest.skip("no aarch64 cross compiler here (apt-get install g++-aarch64-linux-gnu)")
    out = subprocess.run([cxx, "-std=c++17", "-O0", "-c", "-o", "/dev/null", "-fopenmp",
                          *[f"-I{p}" for p in include_paths()], f"-I{kernels.CSRC}", kernels.SOURCE],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]


@pytest.mark.parametrize("dtype,q_dtype,tol", [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                                               (torch.bfloat16, torch.float32, 1e-5)])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (32, 8, 128), (4, 2, 32)])
@pytest.mark.parametrize("window", [1, 5, 16, 20])
def test_sliding_window_rows_match_reference(kernel, dtype, q_dtype, tol, heads, kv_heads, head_dim, window):
    """A sliding-window layer's rows (Gemma 3's local layers): each sees its last `window` keys,
    windows that start mid-block, on a block boundary, and contexts shorter than the window; a
    prefill chunk's rows go one by one (no tiles) and match the reference too."""
    ops = kernel.ops
    g, k_cache, v_cache = case(heads, kv_heads, head_dim, dtype, seed=window * 31 + head_dim)
    scale = head_dim ** -0.5
    decode_lens = [1, 4, 17, 32, 70]
    tables = [torch.randperm(64, generator=g)[:5] for _ in range(len(decode_lens) + 1)]
    q_dec = torch.randn(len(decode_lens), heads, head_dim, generator=g).to(dtype).to(q_dtype)
    q_pre = torch.randn(18, heads, head_dim, generator=g).to(dtype).to(q_dtype)
    ref_dec = decode_attention(q_dec, k_cache, v_cache, torch.stack(tables[:-1]), torch.tensor(decode_lens),
                               max(decode_lens), scale, window)
    ref_pre = prefill_attention(q_pre, k_cache, v_cache, tables[-1], 41, scale, window)
    n = len(decode_lens)
    out = ops.paged_attention(torch.cat([q_dec, q_pre]), k_cache, v_cache, torch.stack(tables),
                              torch.tensor(list(range(n)) + [n] * 18), torch.tensor(decode_lens + list(range(24, 42))),
                              scale, window)
    torch.testing.assert_close(out[:n].float(), ref_dec.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(out[n:].float(), ref_pre.float(), atol=tol, rtol=tol)
    with pytest.raises(RuntimeError, match="window"):
        ops.paged_attention(q_dec, k_cache, v_cache, torch.stack(tables[:-1]), torch.arange(n),
                            torch.tensor(decode_lens), scale, -1)


@pytest.mark.parametrize("cache_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_an_8_bit_cache_is_written_and_read_as_the_reference_does(kernel, cache_dtype, q_dtype):
    """Issue 33: float8 caches at every ISA level (the portable rows: no level has its own 8-bit
    kernel yet). The cache write divides by the K / V scales and saturates before c10's rounding,
    bit for bit as attention/paged.py's to_cache; the attention over the float8 cache, with the K
    scale folded into the softmax scale as the CPU ops pass it, equals the reference's."""
    from vidya.attention.paged import decode_attention, prefill_attention, to_cache
    from vidya.models.rope import apply_rotary
    ops = kernel.ops
    g = torch.Generator().manual_seed(11)
    rows, heads, kv_heads, d = 13, 8, 2, 64
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * d, generator=g) * 30).to(q_dtype)
    qkv[0, heads * d] = 1e5  # a K value the scale cannot bring under e4m3's 448: saturated
    cos, sin = torch.randn(rows, d, generator=g).to(q_dtype), torch.randn(rows, d, generator=g).to(q_dtype)
    k_cache = torch.zeros(8, 16, kv_heads, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.randperm(8 * 16, generator=g)[:rows]
    out = qkv.clone()
    ops.rotary_cache_(out, cos, sin, heads, kv_heads, d, k_cache, v_cache, slots, 2.0, 0.5)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    _, ref_k = apply_rotary(q.reshape(rows, heads, d), k.reshape(rows, kv_heads, d), cos[:, None], sin[:, None])
    assert torch.equal(k_cache.view(-1, kv_heads, d)[slots].view(torch.uint8), to_cache(ref_k, cache_dtype, 2.0).view(torch.uint8))
    assert torch.equal(v_cache.view(-1, kv_heads, d)[slots].view(torch.uint8),
                       to_cache(v.reshape(rows, kv_heads, d), cache_dtype, 0.5).view(torch.uint8))
    # attention over a float8 cache full of values: two decodes and a prefill chunk of 5 ending at 40
    full = lambda: (torch.randn(64, 16, kv_heads, d, generator=g) * 4).to(cache_dtype)
    k8, v8 = full(), full()
    tables = [torch.randperm(64, generator=g)[:3] for _ in range(3)]
    qs = torch.randn(7, heads, d, generator=g).to(q_dtype)
    scale, scales = d ** -0.5, (2.0, 0.5)
    got = ops.paged_attention(qs, k8, v8, torch.stack(tables), torch.tensor([0, 1] + [2] * 5),
                              torch.tensor([9, 33] + list(range(36, 41))), scale * scales[0]) * scales[1]
    # (the reference in float32: the kernels' arithmetic is float32 whatever the rows' dtype)
    want_dec = decode_attention(qs[:2].float(), k8, v8, torch.stack(tables[:2]), torch.tensor([9, 33]), 33, scale,
                                kv_scales=scales)
    want_pre = prefill_attention(qs[2:].float(), k8, v8, tables[2], 40, scale, kv_scales=scales)
    tol = 1e-4 if q_dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), torch.cat([want_dec, want_pre]).float(), atol=tol, rtol=tol)
