"""The Triton backend's elementwise kernels (vidya/ops/triton_kernels.py) against the torch
reference ops (vidya/ops/torch_ops.py), in fp32; on CPU under TRITON_INTERPRET=1 (conftest), on
a GPU compiled (bf16 too). The engine's token-exact tests run them inside whole models with the
triton attention backend (test_gpu_engine.py, test_triton_attention.py)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the triton package is not installed here")

from vidya.models.rope import apply_rotary  # noqa: E402
from vidya.ops import triton_kernels as tk  # noqa: E402
from vidya.ops.torch_ops import ACTIVATIONS, rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def close(got, want, dtype):
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [64, 96, 576, 2500])  # rows packed 32, 16, 2 and 1 to a program; tails masked
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_rms_norm(dtype, n, with_residual):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    x = torch.randn(37, n, generator=g, device=DEVICE).to(dtype)
    r = torch.randn(37, n, generator=g, device=DEVICE).to(dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(n, generator=g, device=DEVICE)).to(dtype)
    want_r = x + r if with_residual else x
    want = rms_norm(want_r, w, 1e-6)
    x_in, r_in = x.clone(), (r.clone() if with_residual else None)
    got, got_r = tk.add_rms_norm(x_in, r_in, w, 1e-6)
    close(got, want, dtype)
    close(got_r, want_r, dtype)
    if with_residual:  # in place, as the C++ op: x holds the norm, the residual the sum
        assert got.data_ptr() == x_in.data_ptr() and got_r.data_ptr() == r_in.data_ptr()
    else:  # x is the residual and stays as it was
        assert got_r is x_in and torch.equal(x_in, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("n", [48, 1500])  # inside one block; over two, with a tail
def test_gated_act(dtype, act, n):
    g = torch.Generator(device=DEVICE).manual_seed(n)
    gate_up = (3 * torch.randn(9, 2 * n, generator=g, device=DEVICE)).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    close(tk.gated_act(gate_up, act), ACTIVATIONS[act](gate) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,kvh,d", [(4, 2, 16), (9, 3, 64), (4, 1, 256), (6, 2, 48)])  # 48: a half of 24, padded
def test_rotary_cache(dtype, h, kvh, d):
    t, bs, blocks = 6, 4, 8
    g = torch.Generator(device=DEVICE).manual_seed(d)
    qkv = torch.randn(t, (h + 2 * kvh) * d, generator=g, device=DEVICE).to(dtype)
    angles = torch.rand(t, d // 2, generator=g, device=DEVICE) * 6
    cos = torch.cat([angles.cos(), angles.cos()], dim=-1).to(dtype)
    sin = torch.cat([angles.sin(), angles.sin()], dim=-1).to(dtype)
    slots = torch.tensor([5, 0, -1, 17, 30, 6], device=DEVICE)  # -1: a padded row writes nothing
    k_cache = torch.full((blocks, bs, kvh, d), 7.0, device=DEVICE).to(dtype)
    v_cache = torch.full((blocks, bs, kvh, d), 7.0, device=DEVICE).to(dtype)

    q, k, v = qkv.split([h * d, kvh * d, kvh * d], dim=-1)
    want_q, want_k = apply_rotary(q.reshape(t, h, d), k.reshape(t, kvh, d), cos.unsqueeze(1), sin.unsqueeze(1))
    want_kc, want_vc = k_cache.clone().view(-1, kvh, d), v_cache.clone().view(-1, kvh, d)
    keep = slots >= 0
    want_kc[slots[keep]] = want_k[keep]
    want_vc[slots[keep]] = v.reshape(t, kvh, d)[keep]

    got = qkv.clone()
    tk.rotary_cache(got, cos, sin, h, kvh, d, k_cache, v_cache, slots)
    close(got[:, :h * d].view(t, h, d), want_q, dtype)
    close(got[:, h * d:(h + kvh) * d].view(t, kvh, d), want_k, dtype)
    assert torch.equal(got[:, (h + kvh) * d:], qkv[:, (h + kvh) * d:])  # v is read, not changed
    close(k_cache.view(-1, kvh, d), want_kc, dtype)
    close(v_cache.view(-1, kvh, d), want_vc, dtype)
