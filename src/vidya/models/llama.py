"""The Llama family (Llama, Mistral, Qwen2, Qwen3) for flat batches: every token of a step in one
`[num_tokens, hidden]` tensor, no padding. Written once, against the ops of `vidya.ops`: the
same forward runs the torch reference, the C++ CPU kernels, or any other backend. Parameter names are Hugging Face's, except that q/k/v
and gate/up run as one matmul each (`qkv_proj`, `gate_up_proj`): `checkpoint_slices` maps a
checkpoint's tensor names to where they go, and `hf_state_dict` gives the checkpoint view back.
"""
from __future__ import annotations

import torch
from torch import nn

from vidya.attention import AttentionMetadata
from vidya.models.rope import RotaryEmbedding

# checkpoint projection -> (our fused projection, its part index)
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Linear(nn.Linear):
    """nn.Linear whose weight the ops backend may hold in another form (prepacked, 16-bit):
    `vidya.ops` sets those copies in `prepare` and may release the plain weight (`released`);
    `plain_weight` rebuilds it for `hf_state_dict`. The model never calls forward on it."""

    packed: torch.Tensor | None = None  # oneDNN layout
    amx: torch.Tensor | None = None  # AMX B tiles: [N/16][K/32][16 k-pairs][16 n][2]
    w16: torch.Tensor | None = None  # bf16 strips under fp32 math (vidya.ops.cpu.pack_w16)
    released = False

    def plain_weight(self) -> torch.Tensor:
        return plain_weight(self)


def plain_weight(m: nn.Module) -> torch.Tensor:
    """A module's weight as loaded, rebuilt from the copy the backend kept if it was released."""
    if not getattr(m, "released", False):
        return m.weight
    if getattr(m, "w16", None) is not None:  # bf16 under fp32 math (vidya.ops.cpu.Wide16Ops)
        from vidya.ops.cpu import unpack_w16
        w = m.w16 if m.w16.dim() == 2 else unpack_w16(m.w16, m.weight.shape[0])
        return w.to(m.weight.dtype)
    n16, k32 = m.amx.shape[:2]
    return m.amx.view(n16, k32, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(n16 * 16, k32 * 32)


class RMSNorm(nn.Module):
    """Holds the weight and eps; `ops.add_rms_norm` computes it. `offset` 1 for models whose
    checkpoints store w of x * (1 + w) (Gemma): the loader adds it to the weight, once."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.offset = offset


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    """q/k/v in one projection; `q_norm`/`k_norm` (RMSNorm over each head, before RoPE) where the
    family has them (Qwen3, Gemma 3); `sliding_window` set on a layer that attends only to its
    last that many positions (Gemma 3's local layers)."""

    def __init__(self, config, qkv_bias: bool, qk_norm: bool = False, layer_type: str | None = None,
                 norm_offset: float = 0.0) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        h, d = config.hidden_size, self.head_dim
        bias = qkv_bias or bool(getattr(config, "attention_bias", False))
        self.q_size, self.kv_size = self.num_heads * d, self.num_kv_heads * d
        self.qkv_proj = Linear(h, self.q_size + 2 * self.kv_size, bias=bias)
        self.parts = {"qkv_proj": (self.q_size, self.kv_size, self.kv_size)}
        self.o_proj = Linear(self.num_heads * d, h, bias=bool(getattr(config, "attention_bias", False)) and not qkv_bias)
        self.scale = (getattr(config, "query_pre_attn_scalar", None) or d) ** -0.5
        self.q_norm = RMSNorm(d, config.rms_norm_eps, norm_offset) if qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps, norm_offset) if qk_norm else None
        self.sliding_window = config.sliding_window if layer_type == "sliding_attention" else None
        # an 8-bit KV cache holds K / k_scale and V / v_scale (vLLM's per-layer scales: a
        # checkpoint's self_attn.k_scale / v_scale where it has them, the loader sets; else 1.0)
        self.k_scale = self.v_scale = 1.0

    def forward(self, x, rope, kv_cache, meta, ops):
        qkv = ops.linear(self.qkv_proj, x)
        if self.q_norm is not None:
            qkv = ops.qk_norm(self, qkv)
        return ops.all_reduce(ops.linear(self.o_proj, ops.rope_attention(self, qkv, rope, kv_cache, meta)))


class MLP(nn.Module):
    def __init__(self, config, act: str | None = None) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.act = act or getattr(config, "hidden_act", "silu")
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)
        self.parts = {"gate_up_proj": (i, i)}
        self.down_proj = Linear(i, h, bias=bias)

    def forward(self, x, ops):
        return ops.all_reduce(ops.linear(self.down_proj, ops.gated_act(self.gate_up_proj, x, self.act)))


class DecoderLayer(nn.Module):
    """Pre-norm: x -> norm -> attention -> + -> norm -> MLP -> +, with the residual stream
    carried beside x so each norm adds into it (`ops.add_rms_norm`)."""

    def __init__(self, config, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.kind = "qwen3" if qk_norm else "llama"  # what a backend's fused decoder stack checks it can run
        self.self_attn = Attention(config, qkv_bias, qk_norm)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, meta, ops):
        x, residual = ops.add_rms_norm(x, residual, self.input_layernorm)
        x = self.self_attn(x, rope, kv_cache, meta, ops)
        x, residual = ops.add_rms_norm(x, residual, self.post_attention_layernorm)
        return self.mlp(x, ops), residual


class LlamaModel(nn.Module):
    def __init__(self, config, max_positions: int, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias, qk_norm) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), max_positions)

    def forward(self, input_ids, positions, kv_caches, meta, ops):
        x = ops.embed(self.embed_tokens, input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        stacked = ops.decoder_stack(self, x, rope, kv_caches, meta)
        if stacked is not None:
            x, residual = stacked
        else:
            residual = None
            for i, (layer, kv) in enumerate(zip(self.layers, kv_caches)):
                x, residual = layer(x, residual, rope, kv, meta.for_layer(i), ops)
        return ops.add_rms_norm(x, residual, self.norm)[0]


class CausalLM(nn.Module):
    """What every model gives the loader and the runner: `model` (embeddings, layers, final
    norm), `lm_head`, and the map between checkpoint names and its fused parameters."""

    model: nn.Module
    lm_head: Linear
    # whether the layers attend within `config.sliding_window` where the config says so (else a
    # model with a window is served only up to the window's length)
    implements_sliding_window = False

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata, ops) -> torch.Tensor:
        """The final hidden rows of a flat batch, every op run by `ops` (vidya.ops)."""
        return self.model(input_ids, positions, kv_caches, meta, ops)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """A checkpoint tensor's name as this model calls it; None for tensors it does not use."""
        return name

    def norm_offsets(self) -> dict[str, float]:
        """Parameter name -> what the loader adds to the checkpoint's value (Gemma's 1 + w)."""
        return {f"{name}.weight": m.offset for name, m in self.named_modules()
                if isinstance(m, RMSNorm) and m.offset}

    def checkpoint_slices(self) -> dict[str, tuple[str, int, int]]:
        """Checkpoint tensor name -> (our parameter name, first row, number of rows)."""
        out = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            module_name, _, leaf = name.rpartition(".")
            owner_name, _, proj = module_name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            sizes = getattr(owner, "parts", {}).get(proj)
            if sizes is None:
                out[name] = (name, 0, p.shape[0])
                continue
            start = 0
            for ckpt_proj, (fused, index) in PACKED.items():
                if fused == proj:
                    out[f"{owner_name}.{ckpt_proj}.{leaf}"] = (name, start, sizes[index])
                    start += sizes[index]
        return out

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the checkpoint's names (q/k/v, gate/up split again)."""
        params = dict(self.named_parameters(remove_duplicate=False))
        for name, m in self.named_modules(remove_duplicate=False):
            if getattr(m, "released", False):
                params[f"{name}.weight"] = plain_weight(m)
        offsets = self.norm_offsets()
        return {ck: params[name][start:start + n] - offsets.get(name, 0)
                for ck, (name, start, n) in self.checkpoint_slices().items()}


class LlamaForCausalLM(CausalLM):
    """Also serves MistralForCausalLM, Qwen2ForCausalLM (bias on q/k/v) and Qwen3ForCausalLM
    (q/k RMSNorm)."""

    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        if getattr(config, "use_sliding_window", False):
            raise ValueError(f"{arch} with use_sliding_window is not supported")
        self.config = config
        self.model = LlamaModel(config, max_positions, qkv_bias=arch == "Qwen2ForCausalLM",
                                qk_norm=arch == "Qwen3ForCausalLM")
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
