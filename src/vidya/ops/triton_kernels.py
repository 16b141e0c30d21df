"""The Triton backend's elementwise kernels (ops/triton_ops.py calls them; attention is in
attention/triton_paged.py). Each replaces several torch kernels of the reference with one pass:

    add_rms_norm    residual += x (rounded to the activation dtype, as torch adds), then
                    RMSNorm(residual) * weight; one program per row (several where rows are short)
    gated_act       act(gate) * up over the fused gate_up projection's output (SiLU, or GELU
                    with the tanh approximation); one program per (row, 1,024 columns), likewise
    rotary_cache    RoPE (rotate-half) on q and k in place in the qkv buffer, and k, v written
                    to the paged cache at the token's slot (a negative slot, a padded row of a
                    CUDA-graph bucket, writes nothing); one program per token and all its heads, likewise

Their roundings follow the reference (ops/torch_ops.py) step by step: in bf16 each product and
sum the reference rounds is rounded here too, so a step computes what the torch ops compute, up
to the last bit of a transcendental. On CPU they run only under TRITON_INTERPRET=1 (the tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# the row and token counts change every step: not specialised on (Triton would compile a variant
# for 1, multiples of 16 and the rest, the last two mid-run when steps run eagerly)
@triton.jit(do_not_specialize=["rows"])
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, rows, n, eps,
                         HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (row < rows) & (cols < n)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=1) / n
    h = (h * (1.0 / tl.sqrt(var + eps))[:, None]).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=cols < n, other=0.0)
    y = h.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


TILE = 2048  # elements a program of the row kernels takes: short rows are packed several to a program


def _rows_per_program(block: int) -> int:
    return max(1, TILE // block)


def _warps(elements: int) -> int:
    return max(1, min(16, elements // 256))


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) * weight, residual + x). With a residual both are updated in place
    (x gets the norm, residual the sum); without one x is left as it is and becomes the residual."""
    n = x.shape[-1]
    assert x.stride(-1) == 1 and (residual is None or residual.stride(-1) == 1), "rows must be contiguous"
    x2 = x.view(-1, n)
    rows = x2.shape[0]
    out = x2 if residual is not None else torch.empty_like(x2)
    r2 = residual.view(-1, n) if residual is not None else x2
    if rows:
        block = triton.next_power_of_2(n)
        per = _rows_per_program(block)
        _add_rms_norm_kernel[(triton.cdiv(rows, per),)](
            x2, r2, weight, out, x2.stride(0), r2.stride(0), out.stride(0), rows, n, eps,
            HAS_RESIDUAL=residual is not None, ROWS=per, BLOCK=block, num_warps=_warps(per * block))
    return out.view(x.shape), (residual if residual is not None else x)


@triton.jit(do_not_specialize=["rows"])
def _gated_act_kernel(gu_ptr, out_ptr, stride_g, stride_o, rows, n, GELU: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)[:, None]
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK))[None, :]
    mask = (row < rows) & (cols < n)
    g = tl.load(gu_ptr + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(gu_ptr + row * stride_g + n + cols, mask=mask, other=0.0)
    if GELU:  # 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))), tanh(z) = 1 - 2 / (e^2z + 1)
        z = tl.minimum(0.7978845608028654 * (g + 0.044715 * g * g * g), 20.0)  # tanh(20) is 1 in fp32
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * z) + 1.0))
    else:  # SiLU
        a = g / (1.0 + tl.exp(-g))
    a = a.to(out_ptr.dtype.element_ty).to(tl.float32)  # the activation's output, then the product, rounded
    tl.store(out_ptr + row * stride_o + cols, (a * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=mask)


GATED_ACTS = ("silu", "gelu_pytorch_tanh")


def gated_act(gate_up: torch.Tensor, act: str) -> torch.Tensor:
    """[T, 2 I] (gate, then up) -> act(gate) * up, [T, I]."""
    t, two_i = gate_up.shape
    n = two_i // 2
    out = gate_up.new_empty((t, n))
    if t:
        block = min(1024, triton.next_power_of_2(n))
        per = _rows_per_program(block)
        _gated_act_kernel[(triton.cdiv(t, per), triton.cdiv(n, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), t, n, GELU=act == "gelu_pytorch_tanh",
            ROWS=per, BLOCK=block, num_warps=_warps(per * block))
    return out


@triton.jit
def _fp8_grid(x, top, MANT: tl.constexpr, SUB_STEP: tl.constexpr):
    """x (float32) rounded to the nearest float8 value (ties to even), saturated to +-top: MANT
    mantissa bits (e4m3: 3, e5m2: 2) for normal values, steps of SUB_STEP below the smallest normal
    (2^-9, 2^-16). Done in integer arithmetic, so that the cast that follows is exact whatever
    converter runs it (Triton's interpreter rounds a mantissa carry wrongly, e.g. 1.99 -> 1.0)."""
    x = tl.clamp(x, -top, top)
    bits = x.to(tl.int32, bitcast=True)
    drop: tl.constexpr = 23 - MANT
    half: tl.constexpr = (1 << (drop - 1)) - 1
    rounded = ((bits + half + ((bits >> drop) & 1)) >> drop << drop).to(tl.float32, bitcast=True)
    small = tl.abs(x) < SUB_STEP * (1 << MANT)  # below the smallest normal: fixed steps
    fixed = _rint(tl.abs(x) / SUB_STEP) * SUB_STEP
    return tl.where(small, tl.where(x < 0, -fixed, fixed), rounded)  # (a negative that rounds to 0: -0.0)


@triton.jit
def _rint(x):
    """Round to nearest, ties to even (float32 holding whole numbers below 2^23)."""
    r = tl.floor(x + 0.5)
    tie = (r - x) == 0.5
    return tl.where(tie & ((r.to(tl.int32) & 1) == 1), r - 1.0, r)


@triton.jit(do_not_specialize=["num_tokens"])
def _rotary_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, slot_ptr, num_tokens,
                         stride_t, stride_cos, stride_cb, stride_cs, stride_ch, k_scale, v_scale, top,
                         H: tl.constexpr, KVH: tl.constexpr, HEADS_PAD: tl.constexpr, D: tl.constexpr,
                         HALF_PAD: tl.constexpr, BS: tl.constexpr, TOKENS: tl.constexpr, FP8: tl.constexpr,
                         MANT: tl.constexpr = 3, SUB_STEP: tl.constexpr = 2.0 ** -9):
    # a [TOKENS, HEADS_PAD, HALF_PAD] tile: tokens x (q heads 0..H-1, then k heads) x half a head
    t = (tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)).to(tl.int64)[:, None, None]
    head = tl.arange(0, HEADS_PAD)[None, :, None]
    i = tl.arange(0, HALF_PAD)[None, None, :]
    t_ok = t < num_tokens
    half = t_ok & (i < D // 2)
    ok = half & (head < H + KVH)
    base = qkv_ptr + t * stride_t + head * D
    x1 = tl.load(base + i, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(base + D // 2 + i, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_cos + i, mask=half, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cos + D // 2 + i, mask=half, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_cos + i, mask=half, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_cos + D // 2 + i, mask=half, other=0.0).to(tl.float32)
    dt = qkv_ptr.dtype.element_ty
    # x cos + rotate_half(x) sin, rotate_half(x) = (-x2, x1): each product rounded, then the sum
    y1 = ((x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)).to(dt)
    y2 = ((x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)).to(dt)
    tl.store(base + i, y1, mask=ok)
    tl.store(base + D // 2 + i, y2, mask=ok)
    # the k heads' rows (and their v) into the cache at each token's slot
    slot = tl.load(slot_ptr + t, mask=t_ok, other=-1)
    kv = ok & (head >= H) & (slot >= 0)
    dst = (slot // BS) * stride_cb + (slot % BS) * stride_cs + (head - H) * stride_ch
    ct = kc_ptr.dtype.element_ty
    vbase = qkv_ptr + t * stride_t + (head + KVH) * D  # head H + j's v is at H + KVH + j
    v1 = tl.load(vbase + i, mask=kv, other=0.0)
    v2 = tl.load(vbase + D // 2 + i, mask=kv, other=0.0)
    if FP8:  # an 8-bit cache holds x / scale, saturated, rounded to nearest (attention/paged.py's to_cache)
        k1 = _fp8_grid(y1.to(tl.float32) / k_scale, top, MANT, SUB_STEP)
        k2 = _fp8_grid(y2.to(tl.float32) / k_scale, top, MANT, SUB_STEP)
        v1 = _fp8_grid(v1.to(tl.float32) / v_scale, top, MANT, SUB_STEP)
        v2 = _fp8_grid(v2.to(tl.float32) / v_scale, top, MANT, SUB_STEP)
    else:
        k1, k2 = y1, y2
    tl.store(kc_ptr + dst + i, k1.to(ct), mask=kv)
    tl.store(kc_ptr + dst + D // 2 + i, k2.to(ct), mask=kv)
    tl.store(vc_ptr + dst + i, v1.to(ct), mask=kv)
    tl.store(vc_ptr + dst + D // 2 + i, v2.to(ct), mask=kv)


def rotary_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
                 head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                 kv_scales: tuple[float, float] = (1.0, 1.0)) -> None:
    """qkv [T, (H + 2 kvh) d] (rows contiguous), cos/sin [T, d]: RoPE on q and k in place; k and
    v written to the cache [blocks, block_size, kvh, d] at slot_mapping[t] (an 8-bit cache: divided
    by `kv_scales` and saturated)."""
    t = qkv.shape[0]
    if t == 0:
        return
    assert qkv.stride(-1) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    fp8 = k_cache.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    constants, num_warps = rotary_launch(num_heads, num_kv_heads, head_dim, k_cache.shape[1])
    _rotary_cache_kernel[(triton.cdiv(t, constants["TOKENS"]),)](
        qkv, cos, sin, k_cache, v_cache, slot_mapping, t,
        qkv.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        float(kv_scales[0]), float(kv_scales[1]), float(torch.finfo(k_cache.dtype).max) if fp8 else 0.0,
        num_warps=num_warps, FP8=fp8, **constants,
        **({"MANT": 3, "SUB_STEP": 2.0 ** -9} if k_cache.dtype == torch.float8_e4m3fn else {"MANT": 2, "SUB_STEP": 2.0 ** -16}))


def rotary_launch(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int) -> tuple[dict, int]:
    """The RoPE + cache-write kernel's constants and warps for one attention shape (also what
    bench/gpu/compile.py compiles)."""
    heads_pad, half_pad = triton.next_power_of_2(num_heads + num_kv_heads), triton.next_power_of_2(head_dim // 2)
    per = _rows_per_program(heads_pad * half_pad)
    return (dict(H=num_heads, KVH=num_kv_heads, HEADS_PAD=heads_pad, D=head_dim, HALF_PAD=half_pad, BS=block_size,
                 TOKENS=per), _warps(per * heads_pad * half_pad))
