"""The Triton ops backend (see vidya/ops/__init__.py): torch's matmuls (cuBLAS on a GPU), vidya's
Triton kernels for the rest of a layer: the fused residual add + RMSNorm and gated activation
(ops/triton_kernels.py), RoPE with the KV-cache write, paged attention reading q straight
from the qkv buffer (attention/triton_paged.py), and quantized projections with their
dequantization fused into the product (ops/triton_quant.py). Chosen with the "triton" attention backend: on
CUDA by default, on CPU only under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

from vidya.attention import triton_paged
from vidya.attention.paged import kv_scales
from vidya.models.quant import QuantLinear, quantize_activations
from vidya.ops import triton_kernels as tk
from vidya.ops import triton_quant
from vidya.ops.torch_ops import TorchOps


class TritonOps(TorchOps):
    def linear(self, lin, x):
        if isinstance(lin, QuantLinear) and triton_quant.supported(lin):
            # (W8A8: activations quantized per token by torch first; an int8 tensor-core kernel
            # that takes them as integers is not written yet)
            return triton_quant.quant_linear(quantize_activations(x, lin.act_group()) if lin.act_bits == 8 else x, lin)
        return super().linear(lin, x)

    def add_rms_norm(self, x, residual, norm):
        return tk.add_rms_norm(x, residual, norm.weight, norm.eps)

    def gated_act(self, gate_up, x, act):
        if act not in tk.GATED_ACTS:
            return super().gated_act(gate_up, x, act)
        return tk.gated_act(self.linear(gate_up, x), act)

    def rope_attention(self, attn, qkv, rope, kv_cache, meta):
        t, h, d = qkv.shape[0], attn.num_heads, attn.head_dim
        if qkv.stride(-1) != 1:
            qkv = qkv.contiguous()
        scales = kv_scales(attn, kv_cache[0])
        tk.rotary_cache(qkv, rope[0], rope[1], h, attn.num_kv_heads, d, kv_cache[0], kv_cache[1], meta.slot_mapping,
                        scales)
        q = qkv[:, :h * d].view(t, h, d)
        return triton_paged.attend(q, kv_cache[0], kv_cache[1], meta, attn.scale, attn.sliding_window,
                                   scales).view(t, h * d)
