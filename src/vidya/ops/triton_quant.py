"""The quantized projection as one Triton kernel: y = x W^T (+ b) with W read in the engine's
quantized layout (vidya/models/quant.py) and dequantized in registers, tile by tile, never
written out whole: a decode step reads a quarter (4 bits) or half (8 bits) of the bytes the 16-bit
weight would take. The reference (ops/torch_ops.py: dequantize, then F.linear) is the spec;
tests/test_triton_quant.py compares the two in the interpreter (float32) and, on a GPU, in bf16.

    program (m, n): rows [m*BM, +BM) of x, outputs [n*BN, +BN)
    for each K tile of BK (BK divides the group size, so a tile has one scale and zero a row):
        codes  [BN, BK]  uint8 loads (4 bits: each byte holds k and k+1, low nibble first)
        w      = (codes - zero[n]) * scale[n]       in float32, then the activation dtype
        acc   += x_tile @ w^T                        (tl.dot, float32 accumulate)

One kernel for decode (a few rows: BM 16) and prefill (BM 64); no split-K yet, so a decode step
with few output tiles leaves SMs idle (to measure on the GPU: bench/gpu/run.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["m"])
def _quant_matmul_kernel(x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, m, n, k, group,
                         stride_x, stride_q, stride_s, stride_y,
                         BITS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    outs = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    row_ok, out_ok = rows < m, outs < n
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, k, BK):
        ks = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=row_ok[:, None], other=0.0)
        if BITS == 8:
            codes = tl.load(q_ptr + outs[:, None] * stride_q + ks[None, :], mask=out_ok[:, None], other=0)
        else:
            byte = tl.load(q_ptr + outs[:, None] * stride_q + (ks // 2)[None, :], mask=out_ok[:, None], other=0)
            codes = (byte >> ((ks % 2) * 4).to(tl.uint8)[None, :]) & 0xF
        g = k0 // group
        scale = tl.load(s_ptr + outs * stride_s + g, mask=out_ok, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + outs * stride_s + g, mask=out_ok, other=0).to(tl.float32)
        w = ((codes.to(tl.float32) - zero[:, None]) * scale[:, None]).to(x_ptr.dtype.element_ty)
        if IEEE:  # float32 activations: float32 products (not TF32, as the reference's matmul)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    if HAS_BIAS:
        acc += tl.load(b_ptr + outs, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y + outs[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=row_ok[:, None] & out_ok[None, :])


def _k_tile(group: int) -> int:
    return next(bk for bk in (64, 32, 16) if group % bk == 0)


def supported(lin) -> bool:
    """Whether the kernel takes this projection: K tiles of at least 16 inside one group."""
    return lin.group_size % 16 == 0 and lin.in_features % 16 == 0


def quant_linear(x: torch.Tensor, lin) -> torch.Tensor:
    """x [M, K] -> [M, N] through `lin` (a models.quant.QuantLinear), in x's dtype."""
    m, k = x.shape
    n = lin.out_features
    x = x.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bm = 16 if m <= 16 else 64
    bn = 64
    bias = lin.bias if lin.bias is not None else y  # (not read without HAS_BIAS)
    scales = lin.scales  # (float32: the kernel reads them as such)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _quant_matmul_kernel[grid](x, lin.qweight, scales, lin.zeros, bias, y, m, n, k, lin.group_size,
                               x.stride(0), lin.qweight.stride(0), scales.stride(0), y.stride(0),
                               BITS=lin.bits, HAS_BIAS=lin.bias is not None,
                               IEEE=x.dtype == torch.float32, BM=bm, BN=bn, BK=_k_tile(lin.group_size))
    return y
