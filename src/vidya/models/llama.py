"""The Llama family (Llama, Mistral, Qwen2) for flat batches: every token of a step in one
`[num_tokens, hidden]` tensor, no padding. Parameter names are Hugging Face's, except that q/k/v
and gate/up run as one matmul each (`qkv_proj`, `gate_up_proj`): `checkpoint_slices` maps a
checkpoint's tensor names to where they go, and `hf_state_dict` gives the checkpoint view back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidya.attention import AttentionMetadata, paged_attention, rope_cache_attention
from vidya.models.rope import RotaryEmbedding, apply_rotary

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
# checkpoint projection -> (our fused projection, its part index)
PACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class Linear(nn.Linear):
    """nn.Linear that can run on copies of its weight prepacked for the CPU (`pack`, bf16 only):
    for oneDNN, which skips re-laying out the weight on every call (that dominates decode steps of
    a small model), and, on CPUs with AMX, for vidya's small-batch AMX kernel, which runs the
    batches of up to AMX_MAX_ROWS rows of a decode step (oneDNN reaches ~60% of memory bandwidth
    there). The plain weight is the parameter for loading; once the packed copies serve every
    batch size it is released (`release_weight`) and `hf_state_dict` rebuilds it."""

    AMX_MAX_ROWS = 64
    packed: torch.Tensor | None = None
    amx: torch.Tensor | None = None
    released = False  # the plain weight's memory was given back (see release_weight)

    def pack(self, batch_hint: int, amx: bool, onednn: bool = True) -> None:
        w = self.weight.detach()
        if onednn:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint)
        if amx and w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0:
            self.amx = torch.ops.vidya.amx_pack(w)

    def release_weight(self) -> None:
        """Once the packed copies serve every batch size, the plain weight is never read: keep
        the parameter's shape (a stride-0 view of one element) and give its memory back, so the
        weights are held twice, not three times. `plain_weight` rebuilds it from the AMX copy."""
        assert self.amx is not None
        self.weight.data = self.weight.data.new_zeros(()).expand(self.weight.shape)
        self.released = True

    def plain_weight(self) -> torch.Tensor:
        if not self.released:
            return self.weight
        n16, k32 = self.amx.shape[:2]  # amx_pack's layout: [N/16][K/32][16 k-pairs][16 n][2]
        return self.amx.view(n16, k32, 16, 16, 2).permute(0, 3, 1, 2, 4).reshape(n16 * 16, k32 * 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.amx is not None and x.shape[0] <= self.AMX_MAX_ROWS:
            return torch.ops.vidya.amx_linear(x, self.amx, self.bias)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    def __init__(self, config, qkv_bias: bool) -> None:
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
        self.scale = d ** -0.5

    def forward(self, x, rope, kv_cache, meta, fused: bool):
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        if fused:  # RoPE, the cache write and attention on the one qkv buffer, in C++
            out = rope_cache_attention(qkv, rope[0], rope[1], self.num_heads, self.num_kv_heads, self.head_dim,
                                       kv_cache[0], kv_cache[1], meta, self.scale)
            return self.o_proj(out.view(t, self.num_heads * self.head_dim))
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = q.view(t, self.num_heads, self.head_dim), k.view(t, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, k, rope[0].unsqueeze(1), rope[1].unsqueeze(1))
        v = v.view(t, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, self.scale)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False))
        self.intermediate_size = i
        self.gate_up_proj = Linear(h, 2 * i, bias=bias)
        self.parts = {"gate_up_proj": (i, i)}
        self.down_proj = Linear(i, h, bias=bias)
        self.gate_packed: torch.Tensor | None = None  # oneDNN copies of the two halves (`pack`)
        self.up_packed: torch.Tensor | None = None

    def pack(self, batch_hint: int, amx: bool) -> None:
        """Small batches run gate_up on AMX, then silu_and_mul; big ones (prefill) run gate and up
        as two oneDNN matmuls with SiLU and the product fused into their epilogues, so the
        [tokens, 2 x intermediate] activation never goes through memory."""
        self.gate_up_proj.pack(batch_hint, amx, onednn=False)
        w, i = self.gate_up_proj.weight.detach(), self.intermediate_size
        self.gate_packed = torch.ops.mkldnn._reorder_linear_weight(w[:i].contiguous(), batch_hint)
        self.up_packed = torch.ops.mkldnn._reorder_linear_weight(w[i:].contiguous(), batch_hint)
        self.down_proj.pack(batch_hint, amx)

    def forward(self, x, fused: bool):
        if fused:
            gu = self.gate_up_proj
            if self.gate_packed is not None and not (gu.amx is not None and x.shape[0] <= gu.AMX_MAX_ROWS):
                b, i = gu.bias, self.intermediate_size
                gate = torch.ops.mkldnn._linear_pointwise(x, self.gate_packed, None if b is None else b[:i],
                                                          "swish", [], "")
                h = torch.ops.mkldnn._linear_pointwise.binary(x, gate, self.up_packed,
                                                              None if b is None else b[i:], "mul")
                return self.down_proj(h)
            return self.down_proj(torch.ops.vidya.silu_and_mul(gu(x)))
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool) -> None:
        super().__init__()
        self.self_attn = Attention(config, qkv_bias)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, rope, kv_cache, meta, fused: bool):
        """Returns (x, residual). Fused: the residual stream is carried separately and each
        norm adds into it in place (`add_rms_norm_`); the sum is what the reference computes."""
        if not fused:
            x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, False)
            return x + self.mlp(self.post_attention_layernorm(x), False), None
        eps = self.input_layernorm.eps
        if residual is None:
            residual, x = x, torch.ops.vidya.rms_norm(x, self.input_layernorm.weight, eps)
        else:
            torch.ops.vidya.add_rms_norm_(x, residual, self.input_layernorm.weight, eps)
        x = self.self_attn(x, rope, kv_cache, meta, True)
        torch.ops.vidya.add_rms_norm_(x, residual, self.post_attention_layernorm.weight, eps)
        return self.mlp(x, True), residual


class LlamaModel(nn.Module):
    packed_stack: tuple | None = None  # set by LlamaForCausalLM.pack_linears (see decode_stack)

    def __init__(self, config, max_positions: int, qkv_bias: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qkv_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config, head_dim_of(config), max_positions)

    def decode_stack(self) -> tuple | None:
        """The per-layer weights `vidya::decode_layers` takes, when every projection has its AMX
        copy and only q/k/v may carry a bias; else None (the Python layers run)."""
        layers = list(self.layers)
        lins = [lin for lay in layers for lin in (lay.self_attn.qkv_proj, lay.self_attn.o_proj,
                                                  lay.mlp.gate_up_proj, lay.mlp.down_proj)]
        if any(lin.amx is None for lin in lins):
            return None
        if any(lin.bias is not None for lay in layers for lin in (lay.self_attn.o_proj, lay.mlp.gate_up_proj,
                                                                  lay.mlp.down_proj)):
            return None
        biased = [lay.self_attn.qkv_proj.bias is not None for lay in layers]
        if any(biased) and not all(biased):
            return None
        return ([lay.input_layernorm.weight for lay in layers],
                [lay.self_attn.qkv_proj.amx for lay in layers],
                [lay.self_attn.qkv_proj.bias for lay in layers] if all(biased) else [],
                [lay.self_attn.o_proj.amx for lay in layers],
                [lay.post_attention_layernorm.weight for lay in layers],
                [lay.mlp.gate_up_proj.amx for lay in layers],
                [lay.mlp.down_proj.amx for lay in layers])

    def forward(self, input_ids, positions, kv_caches, meta, fused: bool = False):
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        if fused and self.packed_stack is not None and x.shape[0] <= Linear.AMX_MAX_ROWS:
            # small batches (decode steps): every layer in one C++ call
            attn = self.layers[0].self_attn
            r = meta.rows
            x, residual = torch.ops.vidya.decode_layers(
                x, rope[0], rope[1], *self.packed_stack, [kv[0] for kv in kv_caches], [kv[1] for kv in kv_caches],
                meta.slot_mapping, r.block_tables, r.row_seq, r.row_ctx, attn.num_heads, attn.num_kv_heads,
                attn.head_dim, self.norm.eps, attn.scale)
            torch.ops.vidya.add_rms_norm_(x, residual, self.norm.weight, self.norm.eps)
            return x
        residual = None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rope, kv, meta, fused)
        if fused:
            torch.ops.vidya.add_rms_norm_(x, residual, self.norm.weight, self.norm.eps)
            return x
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """Also serves MistralForCausalLM and Qwen2ForCausalLM (bias on q/k/v)."""

    def __init__(self, config, max_positions: int) -> None:
        super().__init__()
        arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
        self.config = config
        self.model = LlamaModel(config, max_positions, qkv_bias=arch == "Qwen2ForCausalLM")
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata,
                fused: bool = False) -> torch.Tensor:
        """`fused`: use vidya's C++ CPU kernels for RMSNorm (+ residual add), RoPE and SiLU*up."""
        return self.model(input_ids, positions, kv_caches, meta, fused)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype; the sampler converts to float32 where it needs to."""
        return self.lm_head(hidden)

    def can_argmax(self, hidden: torch.Tensor) -> bool:
        return self.lm_head.amx is not None and hidden.shape[0] <= Linear.AMX_MAX_ROWS and self.lm_head.bias is None

    def compute_argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """The greedy token of each row: argmax of compute_logits(hidden), first maximum, without
        writing the [rows, vocab] logits (AMX; see can_argmax)."""
        return torch.ops.vidya.amx_linear_argmax(hidden, self.lm_head.amx)

    def pack_linears(self, batch_hint: int = 64, amx: bool = False) -> None:
        """Prepack every projection and the lm_head for oneDNN and, with `amx`, for vidya's AMX
        kernel (CPU, bf16 only)."""
        mlps = [m for m in self.modules() if isinstance(m, MLP)]
        in_mlps = {id(lin) for m in mlps for lin in (m.gate_up_proj, m.down_proj)}
        for m in mlps:
            m.pack(batch_hint, amx)
        for m in self.modules():
            if isinstance(m, Linear) and id(m) not in in_mlps:
                m.pack(batch_hint, amx)
        eps = {lay.input_layernorm.eps for lay in self.model.layers} | {lay.post_attention_layernorm.eps
                                                                        for lay in self.model.layers}
        if amx and eps == {self.model.norm.eps}:
            self.model.packed_stack = self.model.decode_stack()
        # plain weights no forward reads any more (not the lm_head's when it is the embedding)
        tied = self.lm_head.weight is self.model.embed_tokens.weight
        for m in mlps:
            if m.gate_packed is not None and m.gate_up_proj.amx is not None:
                m.gate_up_proj.release_weight()
        for m in self.modules():
            if isinstance(m, Linear) and m.packed is not None and m.amx is not None and not (tied and m is self.lm_head):
                m.release_weight()

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
        for name, m in self.named_modules():
            if isinstance(m, Linear) and m.released:
                params[f"{name}.weight"] = m.plain_weight()
        return {ck: params[name][start:start + n] for ck, (name, start, n) in self.checkpoint_slices().items()}
