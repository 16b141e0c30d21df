"""Quantized weights: one layout in the engine, read from the checkpoint formats that ship it, or
made at load from a 16-bit checkpoint (online).

The layout (`QuantLinear`), for a projection y = x W^T + b with W [N, K] (N outputs, K inputs):

    qweight  uint8 [N, K * bits / 8]   codes, unsigned; 4 bits: two a byte, even k in the low nibble
    scales   [N, K / G]                float32 (a checkpoint's fp16 scales kept exactly); G is the
                                       group size along K (K: one group a row, "per channel")
    zeros    uint8 [N, K / G]          the code of 0.0 (2^(bits-1) for a symmetric format);
                                       float32 for GGUF, whose offsets are not whole codes

    W[n, k] = (code[n, k] - zeros[n, k // G]) * scales[n, k // G]

N comes first in every tensor, so that fused projections (q/k/v, gate/up) stack their parts by
rows as the 16-bit weights do, and tensor parallelism cuts them by rows (column-parallel) or along
K on group boundaries (row-parallel). The projections of the decoder layers are quantized; the
embeddings and the output layer never are (as the formats below leave them).

Served (`QuantConfig.method`):
    int8                online: per output channel, symmetric (W8A16)
    int4                online: groups of 128 along K (64, 32 or 16 where K is not a multiple of
                        128, else per channel), asymmetric (W4A16)
    gptq                4 or 8 bits, any group size, symmetric or not, without act order
                        (`qweight` int32 packed along K, `qzeros` packed along N and stored minus
                        one in the v1 format, `scales`, `g_idx`)
    awq                 4 bits, GEMM layout (`qweight`/`qzeros` int32 packed along N in AWQ's
                        order 0 2 4 6 1 3 5 7, `scales`), with zero points
    compressed-tensors  `pack-quantized` int weights (W4A16, W8A16), group or channel strategy,
                        symmetric or not (`weight_packed` int32 packed along K with codes offset
                        by 2^(bits-1), `weight_scale`, `weight_zero_point` packed along N);
                        `int-quantized` W8A8 (`weight` int8, `weight_scale`, `weight_zero_point`
                        int8) with activations quantized per token, dynamic and symmetric
    gguf                a GGUF file's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K projections kept as
                        they are stored (models/gguf_blocks.py: what maps how, what is lost);
                        each projection has its own bits and group (`layouts`), the widest of
                        its parts where it fuses two or three tensors of different types
Anything else found in a checkpoint (FP8, bitsandbytes, act order, static activation scales, ...)
is refused at start-up with one line, never loaded as if it were 16-bit.

Activations (W8A8, `act_bits` 8) are quantized per token as the checkpoint was calibrated for
(`quantize_activations`: scale = max |x| / 127, round to nearest even, clamp to int8). vidya's
C++ CPU kernels multiply in integers (kernels/csrc/quant_gemm.h), so on them every quantized
projection runs with 8-bit activations (`int8_activations`: per block of 32 k unless the
checkpoint says per token). The torch reference takes the product with the dequantized
weights: the numbers the integer kernel gives, not its speed (int8 tensor cores on a GPU are not
used yet).

The forward multiplies by the weights dequantized to the activation dtype (`dequantize`): the
reference, on any device. Kernels that fuse the dequantization into the product are other
implementations of the same op.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import torch
from torch import nn

ONLINE = ("int8", "int4")
CHECKPOINT_METHODS = ("gptq", "awq", "compressed-tensors")
GGUF = "gguf"
METHODS = ONLINE + CHECKPOINT_METHODS + (GGUF,)
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")  # ours (quantized)
CHECKPOINT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # which column of eight each nibble of an AWQ int32 holds
ONLINE_INT4_GROUP = 128
ACT_BLOCK = 32  # k per activation scale with act_per_group (smaller where the weights' group is; the kernels' kQSub)


class QuantError(ValueError):
    """A quantization the engine does not serve, or a checkpoint that does not match its own
    quantization_config; the message says what was found and what is served."""


@dataclass(frozen=True, slots=True)
class QuantConfig:
    method: str  # one of METHODS
    bits: int  # 4 or 8
    group_size: int  # along K; 0: one group a row (per channel)
    symmetric: bool = True
    zeros_offset: int = 0  # added to a stored zero point (GPTQ v1 stores zero - 1)
    act_bits: int = 16  # 8: activations quantized to int8 at run time (W8A8), else not
    act_per_group: bool = False  # 8-bit activations: a scale per block of ACT_BLOCK k (else per token)
    # gguf: (our projection's name, bits, group) for each, and the file's types, e.g. "Q4_K+Q6_K"
    layouts: tuple[tuple[str, int, int], ...] = ()
    types: str = ""

    def __post_init__(self) -> None:
        if self.act_bits not in (8, 16):
            raise ValueError(f"act_bits {self.act_bits}: activations are 16-bit or quantized to 8 bits")

    def for_module(self, name: str) -> "QuantConfig":
        """The layout of the projection `name` (ours, e.g. model.layers.0.self_attn.qkv_proj):
        the model's, or for a GGUF that projection's own bits and group."""
        if not self.layouts:
            return self
        for module, bits, group in self.layouts:
            if module == name:
                return dataclasses.replace(self, bits=bits, group_size=group, layouts=())
        raise QuantError(f"{name}: the GGUF file has no quantized tensors for this projection")

    def describe(self) -> str:
        groups = {g for _, _, g in self.layouts} if self.layouts else {self.group_size}
        blocks = "/".join(str(b) for b in sorted({min(g or ACT_BLOCK, ACT_BLOCK) for g in groups}))
        per_block = f" (activations in blocks of {blocks})" if self.act_per_group else ""
        if self.method == GGUF:  # e.g. "gguf Q4_K+Q6_K W4/8A16": each projection has its own bits
            bits = '/'.join(str(b) for b in sorted({b for _, b, _ in self.layouts}))
            return f"gguf {self.types} W{bits}A{self.act_bits}{per_block}"
        group = f"g{self.group_size}" if self.group_size else "per channel"
        return f"{self.method} W{self.bits}A{self.act_bits} {group}{'' if self.symmetric else ' asym'}{per_block}"

    def group_of(self, k: int) -> int:
        """The group size along K for a projection of K inputs. Online, where K is not a multiple
        of the group size, the largest power-of-two fraction of it that divides K (down to 16),
        else per channel (SmolLM2's 576: groups of 64)."""
        if not self.group_size:
            return k
        g = self.group_size
        if self.method in ONLINE:
            while k % g and g > 16:
                g //= 2
            return g if k % g == 0 else k
        return g


def int8_activations(qc: QuantConfig) -> QuantConfig:
    """`qc` as an integer matmul runs it (vidya's C++ CPU kernels): activations quantized to int8 at
    run time, per token where the checkpoint was calibrated so (W8A8), else per block of ACT_BLOCK
    k (or of the weights' group where it is smaller), as llama.cpp quantizes activations for its
    formats in blocks of 32: per token lost 7% perplexity on Gemma 3 270M in int8 (its activations
    have outliers), blocks of 32 lose what the weights lose (bench/quant_quality.py --engine)."""
    return dataclasses.replace(qc, act_bits=8, act_per_group=qc.act_bits != 8)


def _refuse(found: str) -> QuantError:
    return QuantError(f"{found} is not served: vidya serves checkpoints quantized with "
                      f"{', '.join(CHECKPOINT_METHODS)} (see vidya/models/quant.py for which layouts), "
                      f"or a 16-bit checkpoint quantized at load (--quantization int8 or int4)")


def from_checkpoint(raw: dict) -> QuantConfig | None:
    """The checkpoint's quantization, from its config.json (`quantization_config`, or the older
    `compression_config`; in `text_config` for a multimodal wrapper), or None for a 16-bit one."""
    quant = None
    for where in (raw, raw.get("text_config") or {}):
        quant = quant or where.get("quantization_config") or where.get("compression_config")
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise _refuse("a quantization_config that is not an object")
    method = str(quant.get("quant_method") or quant.get("format") or "unnamed method").lower()
    if method == "gptq":
        return _gptq(quant)
    if method == "awq":
        return _awq(quant)
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise _refuse(f"a checkpoint quantized with {method}")


def _bits(quant: dict, key: str = "bits") -> int:
    bits = quant.get(key)
    if bits not in (4, 8):
        raise _refuse(f"{bits}-bit weights")
    return bits


def _group(value) -> int:
    group = -1 if value is None else int(value)
    if group != -1 and group < 1:
        raise _refuse(f"group size {group}")
    return 0 if group == -1 else group


def _gptq(q: dict) -> QuantConfig:
    if q.get("desc_act"):
        raise _refuse("GPTQ with act order (desc_act: true)")
    if q.get("lm_head"):
        raise _refuse("GPTQ with a quantized output layer (lm_head: true)")
    fmt = str(q.get("checkpoint_format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise _refuse(f"GPTQ in the {fmt} checkpoint format")
    return QuantConfig("gptq", _bits(q), _group(q.get("group_size")), bool(q.get("sym", True)),
                       zeros_offset=1 if fmt == "gptq" else 0)


def _awq(q: dict) -> QuantConfig:
    version = str(q.get("version") or "gemm").lower()
    if version != "gemm":
        raise _refuse(f"AWQ in its {version} layout (the GEMM layout is served)")
    if not q.get("zero_point", True):
        raise _refuse("AWQ without zero points")
    if q.get("modules_to_not_convert"):
        raise _refuse(f"AWQ with unquantized layers ({q['modules_to_not_convert']})")
    bits = q.get("bits", q.get("w_bit"))
    if bits != 4:
        raise _refuse(f"AWQ with {bits}-bit weights (its GEMM layout is 4-bit)")
    return QuantConfig("awq", 4, _group(q.get("group_size", q.get("q_group_size"))), False)


def _compressed_tensors(q: dict) -> QuantConfig:
    groups = q.get("config_groups") or {}
    if len(groups) != 1:
        raise _refuse(f"compressed-tensors with {len(groups)} config groups")
    (scheme,) = groups.values()
    fmt = scheme.get("format") or q.get("format")
    weights = scheme.get("weights") or {}
    if fmt not in ("pack-quantized", "int-quantized") or weights.get("type", "int") != "int":
        raise _refuse(f"compressed-tensors {fmt} ({weights.get('type')} weights)")
    act_bits = _activations(scheme.get("input_activations"), fmt)
    if weights.get("actorder"):
        raise _refuse("compressed-tensors with act order")
    if weights.get("dynamic"):
        raise _refuse("compressed-tensors with dynamic weight scales")
    if set(scheme.get("targets") or ["Linear"]) != {"Linear"}:
        raise _refuse(f"compressed-tensors targeting {scheme.get('targets')}")
    ignore = [i for i in q.get("ignore") or [] if i != "lm_head"]
    if ignore:
        raise _refuse(f"compressed-tensors leaving layers unquantized ({ignore[:3]})")
    strategy = weights.get("strategy")
    if strategy not in ("group", "channel"):
        raise _refuse(f"compressed-tensors with the {strategy} strategy")
    group = _group(weights.get("group_size")) if strategy == "group" else 0
    return QuantConfig("compressed-tensors", _bits(weights, "num_bits"), group, bool(weights.get("symmetric", True)),
                       act_bits=act_bits)


def _activations(act: dict | None, fmt: str) -> int:
    """compressed-tensors' input_activations: none (W4A16/W8A16, pack-quantized), or 8-bit ints
    per token, dynamic and symmetric (W8A8, int-quantized), as llm-compressor's W8A8 recipes write."""
    if not act:
        if fmt == "int-quantized":
            raise _refuse("compressed-tensors int-quantized without quantized activations")
        return 16
    if fmt != "int-quantized":
        raise _refuse(f"compressed-tensors {fmt} with quantized activations")
    scheme = (act.get("num_bits"), act.get("type", "int"), act.get("strategy"), bool(act.get("dynamic")),
              bool(act.get("symmetric", True)))
    if scheme != (8, "int", "token", True, True):
        raise _refuse("compressed-tensors W8A8 with activations quantized other than per token, dynamic and "
                      f"symmetric ({act.get('strategy')}, dynamic {act.get('dynamic')}, symmetric "
                      f"{act.get('symmetric', True)})")
    return 8


def online(method: str) -> QuantConfig:
    if method == "int8":
        return QuantConfig("int8", 8, 0, True)
    return QuantConfig("int4", 4, ONLINE_INT4_GROUP, False)


def resolve(model_dir: str | None, asked: str | None) -> QuantConfig | None:
    """What the engine serves: the checkpoint's own quantization, or `asked` (--quantization:
    an online method for a 16-bit checkpoint, or the checkpoint's method named)."""
    if asked == GGUF:
        raise QuantError("--quantization gguf: the model is not a GGUF file; pass a .gguf file (or leave "
                         "--quantization out)")
    raw = {}
    if model_dir is not None:
        try:
            with open(os.path.join(model_dir, "config.json")) as f:
                raw = json.load(f)
        except (OSError, ValueError):
            raw = {}
    found = from_checkpoint(raw)
    asked = None if asked in (None, "none") else asked
    if asked is not None and asked not in METHODS:
        raise QuantError(f"--quantization {asked} is not served; use one of none, {', '.join(METHODS)}")
    if found is not None:
        if asked is not None and asked != found.method:
            raise QuantError(f"--quantization {asked}: the checkpoint is quantized with {found.method}; "
                             f"leave --quantization out (or name {found.method})")
        return found
    if asked in CHECKPOINT_METHODS:
        raise QuantError(f"--quantization {asked}: the checkpoint has no {asked} quantization_config; "
                         f"for a 16-bit checkpoint use --quantization int8 or int4")
    return online(asked) if asked else None


# ---- the layout ------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A decoder projection in the engine's quantized layout (see the module's docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, qc: QuantConfig,
                 full_in_features: int | None = None) -> None:
        """`full_in_features`: K of the whole projection where this is a tensor-parallel rank's part
        of it along K (row-parallel): the groups are the whole projection's."""
        super().__init__()
        group = qc.group_of(full_in_features or in_features)
        if in_features % group or (qc.bits == 4 and in_features % 2):
            raise QuantError(f"{qc.describe()}: a projection of {in_features} inputs does not divide into groups "
                             f"of {group}" + (" (its tensor-parallel part; use a tensor-parallel size that cuts "
                                              "it on group boundaries)" if full_in_features else ""))
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, qc.bits, group
        self.act_bits, self.act_per_group = qc.act_bits, qc.act_per_group
        frozen = lambda *shape, dtype: nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)  # noqa: E731
        self.qweight = frozen(out_features, in_features * qc.bits // 8, dtype=torch.uint8)
        self.scales = frozen(out_features, in_features // group, dtype=torch.float32)
        self.zeros = frozen(out_features, in_features // group, dtype=torch.float32 if qc.method == GGUF else torch.uint8)
        self.bias = frozen(out_features, dtype=torch.float32) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, qc: QuantConfig, bias: torch.Tensor | None = None) -> "QuantLinear":
        """A projection of W [N, K] (and its bias), quantized by `quantize`."""
        n, k = weight.shape
        lin = cls(k, n, bias is not None, qc)
        with torch.no_grad():
            for param, value in zip((lin.qweight, lin.scales, lin.zeros), quantize(weight, qc)):
                param.copy_(value)
            if bias is not None:
                lin.bias.copy_(bias)
        return lin

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """W [N, K] in `dtype`, computed in float32."""
        n, groups = self.scales.shape
        codes = unpack_codes(self.qweight, self.bits).view(n, groups, self.group_size).float()
        w = (codes - self.zeros.float().unsqueeze(-1)) * self.scales.float().unsqueeze(-1)
        return w.view(n, self.in_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, W{self.bits}A{self.act_bits} g{self.group_size}"

    def act_group(self) -> int:
        """The activations' quantization block along K for quantize_activations (0: per token)."""
        return min(self.group_size, ACT_BLOCK) if self.act_per_group else 0


def quantize_activations(x: torch.Tensor, group: int = 0) -> torch.Tensor:
    """x [M, K] as a W8A8 projection's integer product sees it: each row (token), or each group of
    `group` along K, quantized to int8 with scale max |x| / 127 (round half to even, as vLLM's
    dynamic per-token int8 quantization), then multiplied back, in x's dtype; computed in float32."""
    m, k = x.shape
    xf = x.float().view(m, k // group, group) if group else x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
    return ((xf / scale).round().clamp(-128, 127) * scale).view(m, k).to(x.dtype)


ROW_PARALLEL = ("o_proj", "down_proj")  # cut along K under tensor parallelism


def quantize_linears(model: nn.Module, qc: QuantConfig, world: int = 1) -> None:
    """Put QuantLinear in place of every decoder projection (on whatever device the model is);
    `world`: the tensor-parallel size the model is a rank's part of."""
    for name, m in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf in PROJECTIONS and isinstance(m, nn.Linear):
            parent = model.get_submodule(name.rpartition(".")[0])
            # a row-parallel rank's groups are the whole projection's; per channel, each rank's
            # part of a row shares the row's one scale (the same scales on every rank)
            full = m.in_features * world if leaf in ROW_PARALLEL and qc.group_size else None
            q = QuantLinear(m.in_features, m.out_features, m.bias is not None, qc.for_module(name),
                            full).to(m.weight.device)
            setattr(parent, leaf, q)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[N, K] codes (0 .. 2^bits - 1) -> the layout's uint8 qweight."""
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return qweight
    return torch.stack((qweight & 0xF, qweight >> 4), dim=-1).reshape(qweight.shape[0], -1)


# ---- online quantization ---------------------------------------------------------------------
def quantize(weight: torch.Tensor, qc: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A 16/32-bit W [N, K] -> (qweight, scales, zeros) in the layout: round to nearest, per group
    of `qc.group_of(K)` along K (symmetric: scale = max |w| / (2^(bits-1) - 1), zero 2^(bits-1);
    else over [min(w, 0), max(w, 0)]: scale = range / (2^bits - 1), zero = round(-min / scale),
    as GPTQ's round-to-nearest quantizer). (Clipping each group's range to the least squared
    error was tried: SmolLM2's Hindi perplexity in int4 g128 went from +29% to +75% over 16-bit:
    the outliers it clips matter more than the step it refines.)"""
    w = weight.float()
    n, k = w.shape
    group = qc.group_of(k)
    g = w.reshape(n, k // group, group)
    top = (1 << qc.bits) - 1
    if qc.symmetric:
        half = 1 << (qc.bits - 1)
        scales = g.abs().amax(-1).clamp_min(1e-8) / (half - 1)
        zeros = torch.full_like(scales, half)
    else:
        lo, hi = g.amin(-1).clamp_max(0), g.amax(-1).clamp_min(0)
        scales = ((hi - lo) / top).clamp_min(1e-8)
        zeros = (-lo / scales).round().clamp(0, top)
    codes = (g / scales.unsqueeze(-1) + zeros.unsqueeze(-1)).round().clamp(0, top)
    return pack_codes(codes.reshape(n, k), qc.bits), scales, zeros.to(torch.uint8)


# ---- reading the checkpoint formats ----------------------------------------------------------
def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32 / bits codes each, lowest bits first, packed along `dim` -> the
    codes (int32, 0 .. 2^bits - 1), that dimension 32 / bits times longer."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    packed = packed.to(torch.int32)
    if dim == 0:
        codes = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
        return codes.reshape(-1, packed.shape[1])
    codes = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
    return codes.reshape(packed.shape[0], -1)


def _awq_columns(codes: torch.Tensor) -> torch.Tensor:
    """Columns of AWQ-packed codes back in their order: nibble j of word i is column 8i + ORDER[j]."""
    n = codes.shape[1]
    where = (torch.arange(n) // 8) * 8 + torch.tensor(AWQ_ORDER)[torch.arange(n) % 8]
    out = torch.empty_like(codes)
    out[:, where] = codes
    return out


def convert(name: str, tensor: torch.Tensor, qc: QuantConfig) -> list[tuple[str, torch.Tensor]]:
    """One checkpoint tensor -> the layout's tensors it holds, under our leaf names (qweight,
    scales, zeros); tensors of modules that are not quantized pass as they are."""
    module, _, leaf = name.rpartition(".")
    if module.rpartition(".")[2] not in CHECKPOINT_PROJECTIONS or leaf == "bias":
        return [(name, tensor)]
    if qc.method == GGUF:
        return _gguf(module, leaf, tensor, qc)
    bits = qc.bits
    if qc.method in ONLINE:
        if leaf != "weight":
            return [(name, tensor)]
        q, s, z = quantize(tensor, qc)
        return [(f"{module}.qweight", q), (f"{module}.scales", s), (f"{module}.zeros", z)]
    if qc.method == "gptq":
        if leaf == "qweight":  # [K * bits / 32, N]
            return [(f"{module}.qweight", pack_codes(unpack_int32(tensor, bits, 0).t(), bits))]
        if leaf == "qzeros":  # [K / G, N * bits / 32], stored zero - zeros_offset
            zeros = (unpack_int32(tensor, bits, 1) + qc.zeros_offset) & ((1 << bits) - 1)
            return [(f"{module}.zeros", zeros.t().to(torch.uint8).contiguous())]
        if leaf == "scales":
            return [(f"{module}.scales", tensor.t().contiguous())]
        if leaf == "g_idx":  # without act order: k // G; anything else would need a permutation
            k = tensor.shape[0]
            if not torch.equal(tensor.long(), torch.arange(k) // qc.group_of(k)):
                raise _refuse(f"GPTQ with act order ({name} is not k // group_size)")
            return []
    elif qc.method == "awq":
        if leaf in ("qweight", "qzeros"):  # [K or K / G, N / 8], AWQ's column order
            codes = _awq_columns(unpack_int32(tensor, bits, 1)).t()
            if leaf == "qweight":
                return [(f"{module}.qweight", pack_codes(codes, bits))]
            return [(f"{module}.zeros", codes.to(torch.uint8).contiguous())]
        if leaf == "scales":
            return [(f"{module}.scales", tensor.t().contiguous())]
    else:  # compressed-tensors: pack-quantized, or int-quantized (int8 tensors)
        half = 1 << (bits - 1)
        if leaf == "weight" and tensor.dtype == torch.int8:  # int-quantized: signed codes
            return [(f"{module}.qweight", pack_codes(tensor.to(torch.int16) + half, bits))]
        if leaf == "weight_zero_point" and tensor.dtype == torch.int8:  # int-quantized: [N, K / G], signed
            return [] if qc.symmetric else [(f"{module}.zeros", (tensor.to(torch.int16) + half).to(torch.uint8))]
        if leaf == "weight_packed":  # [N, ceil(K * bits / 32)], codes + 2^(bits-1)
            return [(f"{module}.qweight", pack_codes(unpack_int32(tensor, bits, 1), bits))]
        if leaf == "weight_scale":
            out = [(f"{module}.scales", tensor)]
            if qc.symmetric:  # no zero points stored: the offset's code
                out.append((f"{module}.zeros", torch.full(tensor.shape, 1 << (bits - 1), dtype=torch.uint8)))
            return out
        if leaf == "weight_zero_point":  # [ceil(N * bits / 32), K / G], zero + 2^(bits-1)
            if qc.symmetric:  # (some writers store zeros for a symmetric scheme: 0 by definition)
                return []
            return [(f"{module}.zeros", unpack_int32(tensor, bits, 0).to(torch.uint8))]
        if leaf == "weight_shape":
            return []
    raise QuantError(f"{name}: a tensor a {qc.method} checkpoint does not have; the checkpoint does not "
                     f"match its quantization_config")



GGUF_UNIT = 16  # the finest group of a served GGUF type (Q6_K): decoded scales come at this group


def fused_name(module: str) -> str:
    """A checkpoint projection's module -> ours (q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    from vidya.models.llama import PACKED
    owner, _, proj = module.rpartition(".")
    return f"{owner}.{PACKED[proj][0]}" if proj in PACKED else module


def _gguf(module: str, leaf: str, tensor: torch.Tensor, qc: QuantConfig) -> list[tuple[str, torch.Tensor]]:
    """A decoded GGUF projection (gguf_file.weights: codes uint8 [N, K]; scales and zeros float32
    [N, K / GGUF_UNIT], each group's value repeated over its type's group) -> the layout of the
    projection it fuses into (the widest of its parts): codes packed at its bits, one scale and
    zero a group of its size."""
    target = qc.for_module(fused_name(module))
    if leaf == "codes":
        return [(f"{module}.qweight", pack_codes(tensor, target.bits))]
    if leaf in ("scales", "zeros"):
        return [(f"{module}.{leaf}", tensor[:, ::target.group_size // GGUF_UNIT].contiguous())]
    raise QuantError(f"{module}.{leaf}: not a tensor of a GGUF projection")
