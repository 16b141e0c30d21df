"""vidya's C++ CPU kernels as the ops backend (see vidya/ops/__init__.py), one class per way of
holding the weights; which one runs is decided once, by `cpu_ops(platform)`:

    CpuOps       weights in the activation dtype, torch's matmul; C++ norms, RoPE + cache
                 write, paged attention, SiLU*up, argmax (any ISA the kernels support)
    Wide16Ops    fp32 math over bf16 weights and KV cache (AVX2, AVX-512 without BF16)
    OneDnnOps    bf16, weights prepacked for oneDNN (AVX-512 BF16)
    AmxOps       bf16, small batches on vidya's AMX matmul, every decode layer in one call

In every one, a quantized projection (models/quant.py's QuantLinear) is packed once (`pack_q8`)
and multiplied in integers (`vidya::linear_q8`: activations quantized to int8 per the layer's
act_group, as the torch reference's quantize_activations does them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vidya.attention.paged import kv_scales, prefill_attention
from vidya.models.quant import QuantLinear, unpack_codes
from vidya.ops.torch_ops import TorchOps
from vidya.platform import return_freed_memory


def cpu_ops(platform) -> "CpuOps":
    if platform.dtype == torch.float32 and platform.weight_dtype == torch.bfloat16:
        return Wide16Ops(platform)
    if platform.dtype == torch.bfloat16 and platform.isa == "amx":
        return AmxOps(platform)
    if platform.dtype == torch.bfloat16 and platform.isa == "avx512_bf16":
        return OneDnnOps(platform)
    return CpuOps(platform)


def release(param: nn.Parameter) -> None:
    """Give a weight's memory back once a packed copy serves every call: the parameter keeps its
    shape as a stride-0 view of one element (the module's `plain_weight` rebuilds it)."""
    param.data = param.data.new_zeros(()).expand(param.shape)


class CpuOps(TorchOps):
    # Prefill chunks of at least this many rows go to torch's fused SDPA (over the chunk's K/V
    # gathered from the cache) where the kernels have no tiles for them: measured 3.5-4.7x faster
    # than row-by-row on AVX2. (The engine tests mix both in one step: decodes and short chunks
    # row by row, long chunks on SDPA, token-exact against transformers in fp32.)
    SDPA_MIN_ROWS = 8

    def __init__(self, platform, kernels=None) -> None:
        """`kernels`: the op library to call, torch.ops.vidya (the tests pass the emulated build's)."""
        super().__init__(platform)
        self.kernels = kernels if kernels is not None else torch.ops.vidya
        tiles = platform.dtype == torch.bfloat16 and platform.isa in ("amx", "avx512_bf16")
        self.sdpa_prefill = not tiles

    def prepare(self, model) -> None:
        """Every quantized projection in linear_q8's layout (`q8`), its own tensors released; then
        the 16/32-bit ones as the class holds them (`prepare_dense`)."""
        for m in model.modules():
            if isinstance(m, QuantLinear) and not hasattr(m, "q8"):
                m.q8 = pack_q8(m)
                for p in (m.qweight, m.scales, m.zeros):
                    release(p)
        self.prepare_dense(model)
        return_freed_memory()

    def prepare_dense(self, model) -> None:
        pass

    def linear(self, lin, x):
        if isinstance(lin, QuantLinear):
            return self.kernels.linear_q8(x, *lin.q8, lin.bias, lin.out_features, lin.bits, lin.group_size,
                                          not lin.act_per_group)
        return self.dense_linear(lin, x)

    def dense_linear(self, lin, x):
        return super().linear(lin, x)

    def add_rms_norm(self, x, residual, norm):
        if residual is None:
            return self.kernels.rms_norm(x, norm.weight, norm.eps), x
        self.kernels.add_rms_norm_(x, residual, norm.weight, norm.eps)  # both in place
        return x, residual

    def gated_act(self, gate_up, x, act):
        if act != "silu":
            return super().gated_act(gate_up, x, act)
        return self.kernels.silu_and_mul(self.linear(gate_up, x))

    def rope_attention(self, attn, qkv, rope, kv_cache, meta):
        """RoPE on q and k in place and K/V written to the cache in one op, then attention reading
        q straight from the qkv buffer."""
        h, d = attn.num_heads, attn.head_dim
        scales = kv_scales(attn, kv_cache[0])  # (an 8-bit cache's; its K scale folds into the softmax
        # scale and its V scale multiplies the output: the kernels read the stored values as they are)
        self.kernels.rotary_cache_(qkv, rope[0], rope[1], h, attn.num_kv_heads, d, kv_cache[0], kv_cache[1],
                                   meta.slot_mapping, *scales)
        q = qkv[:, :h * d].view(qkv.shape[0], h, d)
        window = attn.sliding_window or 0  # (a sliding-window layer's rows see their last `window` keys)
        scale = attn.scale * scales[0]
        if not self.sdpa_prefill and not window:
            out = self.kernels.paged_attention(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.row_seq,
                                               meta.row_ctx, scale)
            if scales[1] != 1.0:
                out.mul_(scales[1])
            return out.view(qkv.shape[0], h * d)
        # rows before `cut` (decodes and short chunks) row by row in C++; long chunks on SDPA (and
        # in a sliding-window layer, where the kernels' tiles do not apply)
        starts, long = meta.query_starts, []
        for i in range(len(starts) - 2, meta.num_decodes - 1, -1):
            if starts[i + 1] - starts[i] < self.SDPA_MIN_ROWS:
                break
            long.append(i)
        cut = starts[long[-1]] if long else qkv.shape[0]
        out = q.new_empty(q.shape)
        if cut:
            out[:cut] = self.kernels.paged_attention(q[:cut], kv_cache[0], kv_cache[1], meta.block_tables,
                                                     meta.row_seq[:cut], meta.row_ctx[:cut], scale, window)
            if scales[1] != 1.0:
                out[:cut].mul_(scales[1])
        for i in long:
            a, b = starts[i], starts[i + 1]
            out[a:b] = prefill_attention(q[a:b], kv_cache[0], kv_cache[1], meta.block_tables[i],
                                         int(meta.row_ctx[b - 1]), attn.scale, attn.sliding_window, scales)
        return out.view(qkv.shape[0], h * d)

    def first_max(self, logits):
        return self.kernels.argmax_rows(logits)


# The strip layout of `vidya::linear_w16` (kernels/csrc/x86/gemm_avx2.h): weights in strips of 16
# output columns, k-major, position p of each 16 holding column W16_ORDER[p].
W16_ORDER = [8, 0, 9, 1, 10, 2, 11, 3, 12, 4, 13, 5, 14, 6, 15, 7]
W16_POSITION = [W16_ORDER.index(c) for c in range(16)]


def pack_w16(w: torch.Tensor) -> torch.Tensor:
    """[N, K] -> bf16 [ceil(N / 16), K, 16] (zero columns pad the last strip)."""
    n, k = w.shape
    strips = -(-n // 16)
    padded = w.new_zeros((strips * 16, k), dtype=torch.bfloat16)
    padded[:n] = w
    return padded.view(strips, 16, k)[:, W16_ORDER, :].transpose(1, 2).contiguous()


def unpack_w16(packed: torch.Tensor, n: int) -> torch.Tensor:
    """pack_w16's input back, as bf16 [n, K]."""
    strips, k, _ = packed.shape
    return packed[:, :, W16_POSITION].transpose(1, 2).reshape(strips * 16, k)[:n]


class Wide16Ops(CpuOps):
    """fp32 activations over bf16 weights: every projection packed once into linear_w16's strips
    (`w16`), the embedding held in bf16 (a tied one is read from the lm_head's strips), all
    widened to fp32 in registers; the fp32 weights are released."""

    def prepare_dense(self, model) -> None:
        packed: dict[int, torch.Tensor] = {}
        for m in model.modules():
            if isinstance(m, nn.Linear):
                if id(m.weight) not in packed:
                    packed[id(m.weight)] = pack_w16(m.weight.detach())
                m.w16 = packed[id(m.weight)]
        for m in model.modules():
            if isinstance(m, nn.Embedding):  # tied to a projection: gather rows from its strips
                m.w16 = packed.get(id(m.weight))
                if m.w16 is None:
                    m.w16 = m.weight.detach().to(torch.bfloat16)
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)) and not getattr(m, "released", False):
                release(m.weight)
                m.released = True
        return_freed_memory()

    def embed(self, embedding, ids):
        if embedding.w16.dim() == 3:  # row n is strip n // 16, position W16_POSITION[n % 16]
            pos = torch.tensor(W16_POSITION, device=ids.device)[ids % 16]
            return embedding.w16[ids // 16, :, pos].float()
        return F.embedding(ids, embedding.w16).float()

    def dense_linear(self, lin, x):
        return self.kernels.linear_w16(x, lin.w16, lin.bias, lin.out_features)


class OneDnnOps(CpuOps):
    """bf16 with every projection prepacked for oneDNN (re-laying out the weight on every call
    dominates the decode steps of a small model); big batches run gate and up as two oneDNN
    matmuls with SiLU and the product in their epilogues."""
    batch_hint = 64

    def prepare_dense(self, model) -> None:
        reorder = lambda w: torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), self.batch_hint)
        # a SiLU-gated MLP's gate_up only ever runs through gated_act: its two halves, not the whole
        halved = {id(m.gate_up_proj) for m in model.modules() if getattr(m, "act", None) == "silu"}
        for m in model.modules():
            if not isinstance(m, nn.Linear):
                continue
            w = m.weight.detach()
            if id(m) in halved:
                i = m.out_features // 2
                m.halves = (reorder(w[:i]), reorder(w[i:]))
            else:
                m.packed = reorder(w)

    def dense_linear(self, lin, x):
        return torch.ops.mkldnn._linear_pointwise(x, lin.packed, lin.bias, "none", [], "")

    def gated_act(self, gate_up, x, act):
        if act != "silu" or isinstance(gate_up, QuantLinear):
            return super().gated_act(gate_up, x, act)
        b, i = gate_up.bias, gate_up.out_features // 2
        gate = torch.ops.mkldnn._linear_pointwise(x, gate_up.halves[0], None if b is None else b[:i], "swish", [], "")
        return torch.ops.mkldnn._linear_pointwise.binary(x, gate, gate_up.halves[1], None if b is None else b[i:], "mul")


class AmxOps(OneDnnOps):
    """Batches of up to MAX_ROWS rows (decode steps) on vidya's AMX matmul, weights packed once
    into B tiles (oneDNN reaches ~60% of memory bandwidth at that shape); oneDNN, laid out for
    prefill-sized batches, runs the rest. Once both copies exist the plain weights are released,
    so weights are held twice, not three times. Decode steps run every layer in one C++ call."""
    batch_hint = 4096
    MAX_ROWS = 64

    def __init__(self, platform, kernels=None) -> None:
        super().__init__(platform, kernels)
        self.stack: tuple | None = None

    def prepare_dense(self, model) -> None:
        super().prepare_dense(model)  # oneDNN's copies, for prefill-sized batches
        self.pack_tiles(model)

    def pack_tiles(self, model) -> None:
        """The AMX copy of every projection that tiles, and the decode stack over them; then the
        plain weights go (oneDNN's copies and the tiles serve every call)."""
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight.detach()
                m.amx = self.kernels.amx_pack(w) if w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0 else None
        self.stack = self._build_stack(model)
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.amx is not None and not (tied and m is model.lm_head):
                release(m.weight)
                m.released = True
        return_freed_memory()

    @staticmethod
    def _build_stack(model) -> tuple | None:
        """The per-layer weights `vidya::decode_layers` takes, read off the model's own layers
        (pre-norm attention + SiLU-gated MLP, one eps, bias only on q/k/v); None where a layer is
        anything else (then the layers run one op at a time)."""
        layers = list(model.model.layers)
        if any(lay.kind != "llama" or lay.mlp.act != "silu" for lay in layers):
            return None
        eps = {n.eps for lay in layers for n in (lay.input_layernorm, lay.post_attention_layernorm)}
        if eps != {model.model.norm.eps}:
            return None
        lins = [lin for lay in layers for lin in (lay.self_attn.qkv_proj, lay.self_attn.o_proj,
                                                  lay.mlp.gate_up_proj, lay.mlp.down_proj)]
        if any(getattr(lin, "amx", None) is None for lin in lins):  # (a quantized one has none)
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

    def _small(self, lin, x) -> bool:
        return getattr(lin, "amx", None) is not None and x.shape[0] <= self.MAX_ROWS

    def dense_linear(self, lin, x):
        if self._small(lin, x):
            return self.kernels.amx_linear(x, lin.amx, lin.bias)
        return super().dense_linear(lin, x)

    def gated_act(self, gate_up, x, act):
        if act == "silu" and self._small(gate_up, x) and gate_up.bias is None:
            return self.kernels.amx_linear_silu(x, gate_up.amx)
        return super().gated_act(gate_up, x, act)

    def argmax(self, lm_head, hidden):
        if self._small(lm_head, hidden) and lm_head.bias is None:
            return self.kernels.amx_linear_argmax(hidden, lm_head.amx)
        return None

    def decoder_stack(self, model, x, rope, kv_caches, meta):
        if (self.stack is None or x.shape[0] > self.MAX_ROWS or meta.by_layer is not None
                or kv_caches[0][0].dtype.itemsize == 1):  # (its fused layers read 16/32-bit caches)
            return None
        attn = model.layers[0].self_attn
        return self.kernels.decode_layers(
            x, rope[0], rope[1], *self.stack, [kv[0] for kv in kv_caches], [kv[1] for kv in kv_caches],
            meta.slot_mapping, meta.block_tables, meta.row_seq, meta.row_ctx, attn.num_heads, attn.num_kv_heads,
            attn.head_dim, model.norm.eps, attn.scale)


def pack_q8(lin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A QuantLinear's codes, scales and zero points -> vidya::linear_q8's (packed, scales,
    scales * zeros), in strips of 16 output columns (kernels/csrc/quant_gemm.h has the layout)."""
    n, k, bits = lin.out_features, lin.in_features, lin.bits
    strips = -(-n // 16)
    codes = torch.zeros(strips * 16, k, dtype=torch.uint8)
    codes[:n] = unpack_codes(lin.qweight.detach(), bits)
    if bits == 8:  # [S][K / 4][16][4]
        packed = codes.view(strips, 16, k // 4, 4).permute(0, 2, 1, 3)
    else:  # [S][K / 8][16][4], k 8j + i in the low nibble of byte i, 8j + 4 + i in the high one
        c = codes.view(strips, 16, k // 8, 2, 4)
        packed = (c[:, :, :, 0] | (c[:, :, :, 1] << 4)).permute(0, 2, 1, 3)

    def by_strip(t: torch.Tensor) -> torch.Tensor:  # [N, G] -> [S][G][16], zero for padding columns
        padded = t.new_zeros((strips * 16, t.shape[1]), dtype=torch.float32)
        padded[:n] = t
        return padded.view(strips, 16, -1).transpose(1, 2).contiguous()

    scales = lin.scales.detach().float()
    return packed.reshape(strips, -1).contiguous(), by_strip(scales), by_strip(scales * lin.zeros.detach().float())
