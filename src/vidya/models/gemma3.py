"""Gemma 3 (text): `Gemma3ForCausalLM`, and the language model of `Gemma3ForConditionalGeneration`
checkpoints. Written on the same ops and parts as the Llama family (vidya/models/llama.py); what
differs from Llama:

    - layers alternate sliding-window attention (window `sliding_window`, local RoPE base) and
      global attention (global RoPE base, optionally scaled), as `config.layer_types` says
    - q and k are RMS-normed per head before RoPE; the scores scale by query_pre_attn_scalar^-1/2
    - RMSNorm multiplies by (1 + weight): the loader folds the 1 into the weight, once
    - four norms per layer: before and after attention, before and after the MLP
    - GeGLU: gelu (tanh approximation) of the gate times up
    - the embeddings are scaled by sqrt(hidden) (in the activation dtype), the output layer tied
"""
from __future__ import annotations

import torch
from torch import nn

from vidya.models.llama import MLP, Attention, CausalLM, Linear, RMSNorm
from vidya.models.rope import RotaryEmbedding

class Gemma3DecoderLayer(nn.Module):
    kind = "gemma3"  # no backend builds a fused stack of these

    def __init__(self, config, layer_type: str) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = layer_type
        self.self_attn = Attention(config, qkv_bias=False, qk_norm=True, layer_type=layer_type, norm_offset=1.0)
        self.mlp = MLP(config, act=getattr(config, "hidden_activation", None) or "gelu_pytorch_tanh")
        self.input_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(h, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(h, eps, offset=1.0)

    def forward(self, x, residual, ropes, kv_cache, meta, ops):
        x, residual = ops.add_rms_norm(x, residual, self.input_layernorm)
        x = self.self_attn(x, ropes[self.layer_type], kv_cache, meta, ops)
        x = ops.add_rms_norm(x, None, self.post_attention_layernorm)[0]
        x, residual = ops.add_rms_norm(x, residual, self.pre_feedforward_layernorm)
        x = self.mlp(x, ops)
        return ops.add_rms_norm(x, None, self.post_feedforward_layernorm)[0], residual


class Gemma3Model(nn.Module):
    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        types = list(config.layer_types)
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("Gemma 3 with bidirectional attention (an embedding model) is not a causal LM")
        if getattr(config, "attn_logit_softcapping", None) is not None:
            raise ValueError("Gemma 3 attention logit soft-capping is not supported")
        self.hidden_size = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, t) for t in types)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, offset=1.0)
        d = self.layers[0].self_attn.head_dim
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(config, d, max_positions, layer_type=t) for t in sorted(set(types))})

    def forward(self, input_ids, positions, kv_caches, meta, ops):
        x = ops.embed(self.embed_tokens, input_ids)
        x = x * torch.tensor(self.hidden_size ** 0.5, dtype=x.dtype)  # as transformers: the scale in x's dtype
        ropes = {t: rotary(positions, x.dtype) for t, rotary in self.rotary.items()}
        residual = None
        for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, ropes, kv, meta.for_layer(i), ops)
        return ops.add_rms_norm(x, residual, self.norm)[0]


class Gemma3ForCausalLM(CausalLM):
    implements_sliding_window = True

    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        if getattr(config, "final_logit_softcapping", None) is not None:
            raise ValueError("Gemma 3 final logit soft-capping is not supported")
        self.config = config
        self.model = Gemma3Model(config, max_positions)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight  # always tied

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """A multimodal checkpoint's language-model tensors under the text model's names; its
        vision tower and projector are not ours."""
        for prefix, ours in (("model.language_model.", "model."), ("language_model.model.", "model."),
                             ("language_model.lm_head.", "lm_head.")):
            if name.startswith(prefix):
                return ours + name[len(prefix):]
        if name.startswith(("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.",
                            "multi_modal_projector.")):
            return None
        return name
