"""Quantized weights (issue 32). Checkpoints in each served format are made here from the tiny
random Llama, packed as the format's own packer writes them (GPTQ v1: qweight int32 packed along
K, qzeros packed along N and stored minus one; AWQ GEMM: int32 packed along N in the order 0 2 4 6
1 3 5 7; compressed-tensors pack-quantized: int32 packed along K, codes offset by 2^(bits-1), zero
points packed along N), and must give the same greedy tokens as transformers running the same
model with the dequantized weights in float32: plain, chunked prefill, prefix hits, preemption,
and tensor parallelism. compressed-tensors int-quantized W8A8 (int8 weights, activations quantized per
token at run time) against transformers with the same per-token quantization hooked in front of each
projection. Online int8 / int4 quantize a 16-bit checkpoint at load by the rule the module states.
What is not served (FP8, bitsandbytes, act order, static activation scales) is refused with one line."""
from __future__ import annotations

import copy
import json
import random
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_all_blocks_free, make_engine, run_to_completion
from vidya import SamplingParams
from vidya.models.loader import ModelLoadError

NEW = 10
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


# ---- quantizing and packing, as the formats' packers do ----------------------------------------
def quantize(w: torch.Tensor, bits: int, group: int, sym: bool):
    """codes [N, K] (0 .. 2^bits - 1), zero points [N, K/G] (codes of 0.0), scales [N, K/G] in
    float16 (as the formats store them), round to nearest."""
    n, k = w.shape
    group = group if group > 0 else k
    g = w.float().reshape(n, k // group, group)
    top = (1 << bits) - 1
    if sym:
        scales = (g.abs().amax(-1) / ((1 << (bits - 1)) - 1)).half()
        zeros = torch.full(scales.shape, 1 << (bits - 1), dtype=torch.int64)
    else:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
        scales = ((hi - lo) / top).half()
        zeros = (-lo / scales.float()).round().clamp(0, top).long()
    codes = (g / scales.float().unsqueeze(-1) + zeros.unsqueeze(-1)).round().clamp(0, top).long()
    return codes.reshape(n, k), zeros, scales


def dequantize(codes, zeros, scales, group: int) -> torch.Tensor:
    group = group if group > 0 else codes.shape[1]
    z = zeros.float().repeat_interleave(group, 1)
    s = scales.float().repeat_interleave(group, 1)
    return (codes.float() - z) * s


def pack_int32(codes: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """32 / bits codes a word along `dim`, the first in the lowest bits (as GPTQ, AWQ and
    compressed-tensors write them), as int32 (two's complement)."""
    per = 32 // bits
    c = codes.long() if dim == 1 else codes.long().t()
    r, n = c.shape
    words = torch.zeros(r, n // per, dtype=torch.int64)
    for j in range(per):
        words |= c[:, j::per] << (bits * j)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return words if dim == 1 else words.t().contiguous()


def gptq_tensors(codes, zeros, scales, bits, group):
    k = codes.shape[1]
    mask = (1 << bits) - 1
    return {"qweight": pack_int32(codes.t(), bits, 0), "qzeros": pack_int32((zeros.t() - 1) & mask, bits, 1),
            "scales": scales.t().contiguous(), "g_idx": (torch.arange(k) // (group if group > 0 else k)).int()}


def awq_tensors(codes, zeros, scales, bits, group):
    def awq_order(m):  # word i, nibble j <- column 8i + ORDER[j]
        cols = torch.arange(m.shape[1])
        return m[:, (cols // 8) * 8 + torch.tensor(AWQ_ORDER)[cols % 8]]
    return {"qweight": pack_int32(awq_order(codes.t()), 4, 1), "qzeros": pack_int32(awq_order(zeros.t()), 4, 1),
            "scales": scales.t().contiguous()}


def ct_tensors(codes, zeros, scales, bits, group, sym):
    out = {"weight_packed": pack_int32(codes, bits, 1), "weight_scale": scales,
           "weight_shape": torch.tensor(list(codes.shape))}
    if not sym:
        out["weight_zero_point"] = pack_int32(zeros, bits, 0)
    return out


def int_quantized_tensors(codes, zeros, scales, bits, sym):
    """compressed-tensors int-quantized: the codes as int8 (code - 2^(bits-1)), zero points the same."""
    half = 1 << (bits - 1)
    out = {"weight": (codes - half).to(torch.int8), "weight_scale": scales}
    if not sym:
        out["weight_zero_point"] = (zeros - half).to(torch.int8)
    return out


def quant_config(fmt: str, bits: int, group: int, sym: bool) -> dict:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym, "desc_act": False,
                "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": bits, "group_size": group, "zero_point": True, "version": "gemm"}
    weights = {"num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group > 0 else "channel",
               "group_size": group if group > 0 else None, "actorder": None, "dynamic": False}
    acts = None
    if fmt == "w8a8":  # llm-compressor's W8A8 scheme: int8 weights per channel, int8 tokens, dynamic
        acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    return {"quant_method": "compressed-tensors", "format": "int-quantized" if acts else "pack-quantized",
            "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


def per_token_int8(module, args):
    """The reference's activation quantization (a forward pre-hook): per row, scale max|x| / 127."""
    x = args[0].float()
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-10) / 127
    return ((x / s).round().clamp(-128, 127) * s,)


def quantized_checkpoint(model_dir: str, hf, dest, fmt: str, bits: int, group: int, sym: bool):
    """`dest`: the tiny model's checkpoint with every decoder projection in `fmt`; returns the
    transformers model holding the dequantized weights (float32), the reference."""
    shutil.copytree(model_dir, dest)
    state = load_file(str(dest / "model.safetensors"))
    ref = copy.deepcopy(hf)
    ref_params = dict(ref.named_parameters())
    for name in list(state):
        module, _, leaf = name.rpartition(".")
        if module.rpartition(".")[2] not in PROJ or leaf != "weight":
            continue
        codes, zeros, scales = quantize(state.pop(name), bits, group, sym)
        with torch.no_grad():
            ref_params[name].copy_(dequantize(codes, zeros, scales, group))
        if fmt == "gptq":
            tensors = gptq_tensors(codes, zeros, scales, bits, group)
        elif fmt == "awq":
            tensors = awq_tensors(codes, zeros, scales, bits, group)
        elif fmt == "w8a8":
            tensors = int_quantized_tensors(codes, zeros, scales, bits, sym)
            ref.get_submodule(module).register_forward_pre_hook(per_token_int8)
        else:
            tensors = ct_tensors(codes, zeros, scales, bits, group, sym)
        state.update({f"{module}.{leaf2}": t for leaf2, t in tensors.items()})
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dest / "config.json").read_text())
    cfg["quantization_config"] = quant_config(fmt, bits, group, sym)
    (dest / "config.json").write_text(json.dumps(cfg))
    return ref


# ---- the references and the runs ---------------------------------------------------------------
def hf_greedy(model, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, eos_token_id=2, pad_token_id=2)
    return out[0, len(prompt):].tolist()


def prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(5)
    system = [rng.randrange(3, vocab) for _ in range(12)]
    return ([[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 9, 23, 57)]
            + [system + [rng.randrange(3, vocab) for _ in range(k)] for k in (3, 8)])


def reference_engine(path: str, **kwargs):
    """An engine on the torch reference ops, whose quantized projections take 16-bit activations
    unless the checkpoint says 8 (vidya's C++ kernels quantize every one: tests/test_cpu_quant.py)."""
    return make_engine(path, backend="torch", **kwargs)


def greedy_tokens(engine, batch, stagger: bool = False) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW)
    ids = []
    for p in batch:
        ids.append(engine.add_request(None, p, params))
        if stagger:  # later prompts find the earlier ones' blocks in the prefix cache
            engine.step()
    done = run_to_completion(engine)
    assert_all_blocks_free(engine)
    return [done[i].outputs[0].token_ids for i in ids]


FORMATS = [  # (format, bits, group (-1: per channel), symmetric)
    ("gptq", 4, 16, True), ("gptq", 8, 32, False), ("gptq", 4, -1, False),
    ("awq", 4, 32, False),
    ("compressed-tensors", 4, 16, True), ("compressed-tensors", 4, 32, False), ("compressed-tensors", 8, -1, True),
    ("w8a8", 8, -1, True), ("w8a8", 8, 32, False),  # compressed-tensors int-quantized
]


@pytest.mark.parametrize("fmt,bits,group,sym", FORMATS)
def test_a_quantized_checkpoint_is_token_exact_against_its_dequantized_model(tiny_models, tmp_path, fmt, bits,
                                                                              group, sym):
    model_dir, hf = tiny_models["llama"]
    ref = quantized_checkpoint(model_dir, hf, tmp_path / "q", fmt, bits, group, sym)
    batch = prompts(hf.config.vocab_size)
    want = [hf_greedy(ref, p) for p in batch]
    assert want != [hf_greedy(hf, p) for p in batch]  # (the quantization changed the model)
    path = str(tmp_path / "q")
    plain = reference_engine(path)
    assert plain.quant.method == ("compressed-tensors" if fmt == "w8a8" else fmt)
    assert plain.quant.describe() in plain.platform.describe() and ("W8A8" in plain.quant.describe()) == (fmt == "w8a8")
    qkv = plain.runner.model.model.layers[0].self_attn.qkv_proj
    assert qkv.qweight.dtype == torch.uint8 and qkv.qweight.numel() == qkv.in_features * qkv.out_features * bits // 8
    assert greedy_tokens(plain, batch) == want
    assert greedy_tokens(reference_engine(path, max_num_batched_tokens=7), batch) == want  # chunked prefill
    cached = reference_engine(path)
    assert greedy_tokens(cached, batch, stagger=True) == want and cached.kv.prefix_hits > 0
    tight = reference_engine(path, num_gpu_blocks_override=20, max_num_batched_tokens=16)
    assert greedy_tokens(tight, batch) == want and tight.scheduler.num_preemptions > 0


def test_tensor_parallel_cuts_a_quantized_checkpoint_on_group_boundaries(tiny_models, tmp_path):
    model_dir, hf = tiny_models["llama"]
    ref = quantized_checkpoint(model_dir, hf, tmp_path / "q", "gptq", 4, 16, False)
    batch = prompts(hf.config.vocab_size)
    engine = make_engine(str(tmp_path / "q"), tensor_parallel_size=2)
    try:
        down = engine.runner.model.model.layers[0].mlp.down_proj  # row-parallel: half of K, whole groups
        assert (down.in_features, down.scales.shape[1]) == (64, 4)
        assert greedy_tokens(engine, batch) == [hf_greedy(ref, p) for p in batch]
    finally:
        engine.close()


def online_reference(hf, method: str):
    """transformers' model with each projection quantized by the rule vidya/models/quant.py
    states for `method` and dequantized, in float32."""
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            module, _, leaf = name.rpartition(".")
            if module.rpartition(".")[2] not in PROJ or leaf != "weight":
                continue
            n, k = p.shape
            w = p.float()
            if method == "int8":  # per channel, symmetric: scale = max|w| / 127, zero 128
                s = w.abs().amax(1, keepdim=True).clamp_min(1e-8) / 127
                p.copy_(((w / s + 128).round().clamp(0, 255) - 128) * s)
            else:  # groups of min(128, K) here, asymmetric over [min(w, 0), max(w, 0)]
                g = w.reshape(n, k // min(128, k), min(128, k))
                lo, hi = g.amin(-1, keepdim=True).clamp_max(0), g.amax(-1, keepdim=True).clamp_min(0)
                s = ((hi - lo) / 15).clamp_min(1e-8)
                z = (-lo / s).round().clamp(0, 15)
                p.copy_((((g / s + z).round().clamp(0, 15) - z) * s).reshape(n, k))
    return ref


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_online_quantization_of_a_16_bit_checkpoint_is_token_exact_against_its_rule(tiny_models, method):
    model_dir, hf = tiny_models["llama"]
    ref = online_reference(hf, method)
    batch = prompts(hf.config.vocab_size)
    engine = reference_engine(model_dir, quantization=method)
    assert engine.quant.method == method and f"{method} W{8 if method == 'int8' else 4}A16" in engine.platform.describe()
    assert greedy_tokens(engine, batch) == [hf_greedy(ref, p) for p in batch]


def with_quantization_config(model_dir: str, dest, qc: dict) -> str:
    shutil.copytree(model_dir, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    return str(dest)


@pytest.mark.parametrize("qc,named", [
    ({"quant_method": "fp8", "activation_scheme": "dynamic"}, "quantized with fp8"),
    ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "quantized with bitsandbytes"),
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}, "act order"),
    ({"quant_method": "gptq", "bits": 3, "group_size": 128}, "3-bit weights"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "gemv layout"),
    ({"quant_method": "awq", "bits": 8, "group_size": 128, "version": "gemm"}, "AWQ with 8-bit weights"),
    ({"quant_method": "compressed-tensors", "format": "float-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}}}, "float-quantized"),
    ({"quant_method": "compressed-tensors", "format": "int-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "strategy": "channel"},
                              "input_activations": {"num_bits": 8, "type": "int", "strategy": "tensor",
                                                    "dynamic": False}}}}, "other than per token, dynamic"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "strategy": "channel"},
                              "input_activations": {"num_bits": 8, "type": "int"}}}}, "pack-quantized with quantized"),
])
def test_an_unserved_quantization_is_refused_at_start_up_in_one_line(tiny_models, tmp_path, qc, named):
    path = with_quantization_config(tiny_models["llama"][0], tmp_path / "m", qc)
    with pytest.raises(ModelLoadError) as e:
        make_engine(path)
    msg = str(e.value)
    assert named in msg and "vidya serves checkpoints quantized with gptq, awq, compressed-tensors" in msg
    assert "\n" not in msg


def test_quantization_flag_mismatches_say_what_to_do(tiny_models, tmp_path):
    with pytest.raises(ModelLoadError, match="has no gptq quantization_config"):
        make_engine(tiny_models["llama"][0], quantization="gptq")
    model_dir, hf = tiny_models["llama"]
    quantized_checkpoint(model_dir, hf, tmp_path / "q", "awq", 4, 32, False)
    with pytest.raises(ModelLoadError, match="the checkpoint is quantized with awq"):
        make_engine(str(tmp_path / "q"), quantization="int8")


def test_the_server_names_the_quantization_on_its_start_up_line_and_version(tiny_models):
    import httpx
    import openai
    from serverutil import LiveServer
    s = LiveServer("--model", tiny_models["llama"][0], "--served-model-name", "tiny", "--max-model-len", "256",
                   "--no-tutor-warmup", "--kv-cache-memory", "1", "--quantization", "int8", "--backend", "torch")
    try:
        assert httpx.get(s.url + "/version").json()["backend"]["quantization"] == "int8 W8A16 per channel"
        assert "int8 W8A16 per channel weights" in s.log()  # the start-up line
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="none")
        assert client.completions.create(model="tiny", prompt="w5 w6", max_tokens=4).usage.completion_tokens == 4
    finally:
        s.terminate()


def test_a_benchmark_result_line_names_the_servers_quantization():
    from vidya.bench.serve import backend_line
    backend = {"device": "cuda", "isa": "cuda", "backend": "cuda", "dtype": "bfloat16", "weight_dtype": "bfloat16",
               "kv_cache_dtype": "bfloat16", "quantization": "awq W4A16 g128 asym"}
    assert "awq W4A16 g128 asym weights" in backend_line(backend)
    assert "bfloat16 weights" in backend_line({**backend, "quantization": None})


def test_online_quantization_under_tensor_parallelism_equals_one_rank_or_is_refused(tiny_models):
    """Per channel (int8) each rank's part of a row keeps the row's scale: TP=2 gives TP=1's
    tokens. Grouped (int4) a rank's groups are the whole projection's, so a part that would cut a
    group is refused (the tiny model's o_proj: K 64 in one group, 32 a rank), never quantized
    with other groups than one rank would use."""
    model_dir, hf = tiny_models["llama"]
    batch = prompts(hf.config.vocab_size)
    want = greedy_tokens(reference_engine(model_dir, quantization="int8"), batch)
    engine = make_engine(model_dir, quantization="int8", tensor_parallel_size=2)
    try:
        assert greedy_tokens(engine, batch) == want
    finally:
        engine.close()
    with pytest.raises(ModelLoadError, match="tensor-parallel part"):
        make_engine(model_dir, quantization="int4", tensor_parallel_size=2)
