"""Reading a GGUF file: metadata -> a transformers config, and tensors -> Hugging Face names,
dequantized, or (a GPU's default, `--quantization gguf`) with the decoder's projections kept
quantized in the engine's layout (models/gguf_blocks.py). The tokenizer and chat template are read
by transformers from the same file."""
from __future__ import annotations

import functools
import mmap
import struct
from dataclasses import dataclass

import numpy as np
import torch

from vidya.models import gguf_blocks, quant

_ARCHS = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral"),
          "qwen2": ("Qwen2ForCausalLM", "qwen2"), "qwen3": ("Qwen3ForCausalLM", "qwen3"),
          "gemma3": ("Gemma3ForCausalLM", "gemma3_text")}

_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
}
# Gemma 3's four norms per layer: llama.cpp calls the pre-feed-forward one ffn_norm
_GEMMA3_NAMES = {**_NAMES, "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    tensor_type: int  # gguf.GGMLQuantizationType
    data: np.ndarray  # a view of the file: typed for float/int tensors, bytes per row for quantized ones


@dataclass(frozen=True, slots=True)
class Reader:
    fields: dict  # key -> value; arrays of strings are kept as their length only (a vocabulary)
    tensors: list[Tensor]

    def get(self, key: str, default=None):
        return self.fields.get(key, default)


# GGUF value types: struct format of the scalars; 8 string, 9 array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_FLOATS = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16,
           "I32": np.int32, "I64": np.int64}


@functools.lru_cache(maxsize=4)
def reader(path: str) -> Reader:
    """The file's metadata and tensor views. gguf's GGUFReader builds an array per vocabulary
    entry (262k of them for Gemma 3: ~20 s); this reads the same header and steps over string
    arrays, keeping their length (well under a second)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    pos = 0

    def take(fmt: str):
        nonlocal pos
        (v,) = struct.unpack_from(fmt, mm, pos)
        pos += struct.calcsize(fmt)
        return v

    def string(keep: bool = True) -> str | None:
        nonlocal pos
        n = take("<Q")
        pos += n
        return mm[pos - n:pos].decode("utf-8", errors="replace") if keep else None

    def value(vtype: int):
        if vtype in _SCALARS:
            return take(_SCALARS[vtype])
        if vtype == 8:
            return string()
        if vtype != 9:
            raise ValueError(f"{path}: unknown GGUF value type {vtype}")
        itype, count = take("<I"), take("<Q")
        if itype == 8:  # a vocabulary: stepped over, its length kept
            for _ in range(count):
                string(keep=False)
            return count
        return [value(itype) for _ in range(count)]

    try:
        if take("<I") != 0x46554747:  # "GGUF"
            raise ValueError(f"{path} is not a GGUF file")
        if take("<I") < 2:
            raise ValueError(f"{path}: GGUF version 1 is not supported")
        n_tensors, n_fields = take("<Q"), take("<Q")
        fields = {}
        for _ in range(n_fields):
            key = string()
            fields[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = [take("<Q") for _ in range(take("<I"))]
            infos.append((name, dims, take("<I"), take("<Q")))
    except struct.error:
        raise ValueError(f"{path}: the GGUF header is truncated") from None
    align = int(fields.get("general.alignment", 32))
    data_start = -(-pos // align) * align
    data = np.frombuffer(mm, dtype=np.uint8)
    tensors = []
    for name, dims, ttype, offset in infos:
        qtype = GGMLQuantizationType(ttype)
        shape = tuple(reversed(dims))
        block, type_size = GGML_QUANT_SIZES[qtype]
        start = data_start + offset
        raw = data[start:start + int(np.prod(dims)) * type_size // block]
        if qtype.name in _FLOATS:
            view = raw.view(_FLOATS[qtype.name]).reshape(shape)
        else:  # quantized (and BF16): the bytes of each row's blocks
            view = raw.reshape(*shape[:-1], shape[-1] // block * type_size)
        tensors.append(Tensor(name, qtype, view))
    return Reader(fields, tensors)


def _field(r: Reader, key: str, default=None):
    return r.get(key, default)


def architecture(path: str) -> str:
    return str(_field(reader(path), "general.architecture"))


def config_from_gguf(path: str):
    from transformers import AutoConfig
    r = reader(path)
    arch = architecture(path)
    if arch not in _ARCHS:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(_ARCHS)}")
    hf_arch, model_type = _ARCHS[arch]
    g = lambda k, d=None: _field(r, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or _field(r, "tokenizer.ggml.tokens", 0)
    rope = {"rope_type": "default", "rope_theta": float(g("rope.freq_base", 10000.0))}
    if g("rope.scaling.type") == "linear":
        rope.update(rope_type="linear", factor=float(g("rope.scaling.factor")))
    names = {t.name for t in r.tensors}
    freqs = next((t for t in r.tensors if t.name == "rope_freqs.weight"), None)
    kwargs = dict(
        architectures=[hf_arch], vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(g("feed_forward_length")), num_hidden_layers=int(g("block_count")),
        num_attention_heads=heads, num_key_value_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("attention.key_length", hidden // heads)),
        max_position_embeddings=int(g("context_length", 2048)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(r, "tokenizer.ggml.bos_token_id"), eos_token_id=_field(r, "tokenizer.ggml.eos_token_id"),
        rope_parameters=rope, rope_theta=rope["rope_theta"],
    )
    if freqs is not None:
        # llama.cpp writes a Llama 3.1 file's llama3 RoPE scaling as a tensor of divisors, one per
        # frequency (what the HF config's factor / low / high / original length work out to)
        from gguf.quants import dequantize
        kwargs["rope_freq_factors"] = [float(f) for f in dequantize(freqs.data, freqs.tensor_type).reshape(-1)]
    if model_type == "qwen2":
        kwargs.pop("head_dim")
    if model_type == "gemma3_text":
        # The file keeps the global RoPE base and the window; the local base, the layer pattern
        # (five sliding, one global) and query_pre_attn_scalar are Gemma 3's defaults, as
        # transformers takes them.
        kwargs.pop("rope_theta")
        kwargs.update(sliding_window=int(g("attention.sliding_window", 4096)), hidden_activation="gelu_pytorch_tanh",
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": rope}, tie_word_embeddings=True)
    return AutoConfig.for_model(model_type, **kwargs)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's reordering of q/k rows (it interleaves the rotary halves)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    parts = gguf_name.split(".")
    top = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    names = _GEMMA3_NAMES if arch == "gemma3" else _NAMES
    if parts[0] in top:
        return f"{top[parts[0]]}.{parts[-1]}"
    if parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[-1]}"
    return None


def _projections(path: str) -> dict[str, list[Tensor]]:
    """Our decoder projection (e.g. model.layers.0.self_attn.qkv_proj) -> the file's tensors in it."""
    arch = architecture(path)
    out: dict[str, list[Tensor]] = {}
    for t in reader(path).tensors:
        name = hf_name(t.name, arch)
        module = (name or "").rpartition(".")[0]
        if name and name.endswith(".weight") and module.rpartition(".")[2] in quant.CHECKPOINT_PROJECTIONS:
            out.setdefault(quant.fused_name(module), []).append(t)
    return out


def quant_config(path: str) -> tuple[quant.QuantConfig | None, str]:
    """The file's projections kept quantized: a QuantConfig whose layouts give each projection the
    widest bits and the smallest group of its tensors' types (gguf_blocks.LAYOUTS); or None and the
    reason, where a projection holds a type not read that way (16/32-bit, Q2_K, IQ...)."""
    layouts, types = [], set()
    for module, tensors in _projections(path).items():
        names = [t.tensor_type.name for t in tensors]
        unserved = [n for n in names if not gguf_blocks.served(n)]
        if unserved:
            return None, f"{unserved[0]} tensors ({tensors[names.index(unserved[0])].name})"
        types.update(names)
        layouts.append((module, max(gguf_blocks.LAYOUTS[n][2] for n in names),
                        min(gguf_blocks.LAYOUTS[n][3] for n in names)))
    if not layouts:
        return None, "no quantized decoder projections"
    return quant.QuantConfig(quant.GGUF, max(b for _, b, _ in layouts), min(g for _, _, g in layouts), False,
                             layouts=tuple(layouts), types="+".join(sorted(types))), ""


def weights(path: str, config, keep_quantized: bool = False):
    """(hf_name, float32 tensor) for every tensor the model uses; `keep_quantized` (quant_config
    says the file can): a decoder projection as its codes, scales and zeros instead
    (quant.convert takes them into the layout), the scales and zeros at quant.GGUF_UNIT."""
    from gguf.quants import dequantize
    arch = architecture(path)
    permute = arch in ("llama", "mistral")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for t in reader(path).tensors:
        name = hf_name(t.name, arch)
        if name is None:
            continue
        unpermute = permute and name.endswith(("q_proj.weight", "k_proj.weight"))
        # heads from the tensor's rows: `config` may be a tensor-parallel rank's (fewer heads),
        # the file's tensor is always the whole projection
        heads = t.data.shape[0] // head_dim
        module = name.rpartition(".")[0]
        if keep_quantized and name.endswith(".weight") and module.rpartition(".")[2] in quant.CHECKPOINT_PROJECTIONS:
            codes, scales, zeros = gguf_blocks.decode(t.tensor_type.name, t.data, _columns(t))
            unit = codes.shape[1] // scales.shape[1] // quant.GGUF_UNIT
            parts = [torch.from_numpy(codes), torch.from_numpy(scales).repeat_interleave(unit, 1),
                     torch.from_numpy(zeros).repeat_interleave(unit, 1)]
            for leaf, part in zip(("codes", "scales", "zeros"), parts):
                yield f"{module}.{leaf}", _unpermute(part, heads) if unpermute else part
            continue
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())
        if arch == "gemma3" and name.endswith("norm.weight"):
            w = w - 1  # llama.cpp stores Gemma's 1 + w; the checkpoint convention is w
        if unpermute:
            w = _unpermute(w, heads)
        yield name, w


def _columns(t: Tensor) -> int:
    """K of a quantized 2-D tensor (its data holds each row's blocks as bytes)."""
    from gguf.constants import GGML_QUANT_SIZES
    block, size = GGML_QUANT_SIZES[t.tensor_type]
    return t.data.shape[-1] // size * block
