"""The reference implementation of every op (see vidya/ops/__init__.py): plain torch, any device.
Faster backends are tested against these."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vidya.attention.metadata import AttentionMetadata
from vidya.attention.paged import kv_scales, paged_attention
from vidya.platform import TPGroup
from vidya.models.quant import QuantLinear, quantize_activations
from vidya.models.rope import apply_rotary

ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


class TorchOps:
    # this rank's place in a tensor-parallel group (vidya/engine/tensor_parallel.py); one rank alone
    # by default, where all_reduce and the vocabulary split are no-ops
    tp = TPGroup()

    def __init__(self, platform) -> None:
        """`platform` (vidya/platform.py) says what this machine runs (the reference needs nothing of it)."""

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the tensor-parallel ranks of a row-parallel projection's partial output."""
        if self.tp.world_size > 1:
            torch.distributed.all_reduce(x)
        return x

    def prepare(self, model) -> None:
        """Lay out the model's weights for this backend, once, after loading."""

    def embed(self, embedding, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return F.embedding(ids, embedding.weight)
        rows = embedding.weight.shape[0]  # this rank's slice of the vocabulary
        local = ids - self.tp.rank * rows
        outside = (local < 0) | (local >= rows)
        x = F.embedding(local.clamp(0, rows - 1), embedding.weight)
        return self.all_reduce(x.masked_fill_(outside.unsqueeze(-1), 0))

    def linear(self, lin, x: torch.Tensor) -> torch.Tensor:
        if isinstance(lin, QuantLinear):  # the reference: dequantize, then the 16/32-bit product
            if lin.act_bits == 8:  # W8A8: the activations as the integer product would see them
                x = quantize_activations(x, lin.act_group())
            bias = None if lin.bias is None else lin.bias.to(x.dtype)
            return F.linear(x, lin.dequantize(x.dtype), bias)
        return F.linear(x, lin.weight, lin.bias)

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(residual + x), residual + x); the first layer passes residual None."""
        residual = x if residual is None else residual + x
        return rms_norm(residual, norm.weight, norm.eps), residual

    def gated_act(self, gate_up, x: torch.Tensor, act: str) -> torch.Tensor:
        gate, up = self.linear(gate_up, x).chunk(2, dim=-1)
        return ACTIVATIONS[act](gate) * up

    def qk_norm(self, attn, qkv: torch.Tensor) -> torch.Tensor:
        """qkv with q and k RMS-normed over each head (attn.q_norm, attn.k_norm), v as it was."""
        t, h, kvh, d = qkv.shape[0], attn.num_heads, attn.num_kv_heads, attn.head_dim
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q = rms_norm(q.reshape(t, h, d), attn.q_norm.weight, attn.q_norm.eps).reshape(t, h * d)
        k = rms_norm(k.reshape(t, kvh, d), attn.k_norm.weight, attn.k_norm.eps).reshape(t, kvh * d)
        return torch.cat([q, k, v], dim=-1)

    def rope_attention(self, attn, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                       kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        """qkv [T, (H + 2 kvh) d] -> attention output [T, H d]."""
        t = qkv.shape[0]
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = q.view(t, attn.num_heads, attn.head_dim), k.view(t, attn.num_kv_heads, attn.head_dim)
        q, k = apply_rotary(q, k, rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        v = v.view(t, attn.num_kv_heads, attn.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, attn.scale, attn.sliding_window,
                              kv_scales(attn, kv_cache[0]))
        return out.reshape(t, attn.num_heads * attn.head_dim)

    def logits(self, lm_head, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype; the sampler converts to float32 where it needs to. Under tensor
        parallelism every rank computes its vocabulary slice and all of them are gathered."""
        local = self.linear(lm_head, hidden)
        if self.tp.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp.world_size)]
        torch.distributed.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=-1)

    def argmax(self, lm_head, hidden: torch.Tensor) -> torch.Tensor | None:
        """The greedy token of each row without writing the logits, where this backend can; else None."""
        return None

    def first_max(self, logits: torch.Tensor) -> torch.Tensor:
        """Index of each row's first maximum (`max().indices` is ~5x faster than argmax in bf16)."""
        return logits.max(dim=-1).indices

    def decoder_stack(self, model, x, rope, kv_caches, meta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(x, residual) after every layer in one call, where this backend built a stack; else None."""
        return None
