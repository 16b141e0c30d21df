"""The ops every model is written against, and the one place that binds their implementation.

A model's forward (vidya/models/llama.py, gemma3.py) calls only these, so it exists once:

    embed         token ids -> rows (in the activation dtype)
    linear        x W^T + b, over whatever copy of W the backend keeps (packed, 16-bit, ...)
    add_rms_norm  residual += x; x = RMSNorm(residual)     (the first layer: residual = x)
    gated_act     act(x W_gate^T) * (x W_up^T) from the fused gate_up projection
    qk_norm       RMSNorm over each head of q and k (Qwen3, Gemma 3)
    rope_attention  RoPE on q and k, K/V written to the paged cache, paged attention (causal,
                  or over the last `attn.sliding_window` positions)
    logits / argmax   the sampling head (argmax: the greedy pick without [rows, vocab] logits)
    first_max     the argmax of logits rows (the sampler's greedy pick)
    decoder_stack every layer of a step at once, where a backend builds one from the same layers

`TorchOps` (ops/torch_ops.py) is the reference and runs anywhere; `CpuOps` and its ISA variants
(ops/cpu.py) run vidya's C++ kernels; `TritonOps` (ops/triton_ops.py) runs vidya's Triton kernels
beside torch's matmuls, the GPU's backend (the "triton" attention backend brings it). `make_ops`
is called once, with the platform vidya/platform.py decided.
"""
from __future__ import annotations

from vidya.ops.torch_ops import TorchOps


def make_ops(platform) -> TorchOps:
    if platform.backend == "cpu":
        from vidya.ops.cpu import cpu_ops
        return cpu_ops(platform)
    if platform.attention == "triton":  # its kernels come together: attention, norms, RoPE, activation
        from vidya.ops.triton_ops import TritonOps
        return TritonOps(platform)
    return TorchOps(platform)


__all__ = ["TorchOps", "make_ops"]
