"""Shared fixtures: tiny random-weight Llama / Mistral / Qwen2 checkpoints written to disk as
Hugging Face directories (with the default model's tokenizer), and engine helpers."""
from __future__ import annotations

import os
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

import pytest
import torch

if not torch.cuda.is_available():  # the Triton attention kernels run interpreted, in numpy
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vidya.models.tiny import ARCHS, SLIDING_WINDOW, tiny_config, tiny_model  # noqa: E402,F401
from vidya.platform import ISAS  # noqa: E402

# the ISA levels of vidya's C++ kernels, lowest first (vidya/platform.py's names; generic: the
# portable C++ alone, the dispatch table's first row, which every other level builds on)
KERNEL_ISAS = tuple(reversed(ISAS))


def isa_at_least(isa: str, level: str) -> bool:
    return KERNEL_ISAS.index(isa) >= KERNEL_ISAS.index(level)


@pytest.fixture(autouse=True)
def cpu_best_isa_bound():
    """The kernels' ISA binding is process-wide (an engine binds its platform's): each test starts
    from the CPU's best level, whatever the one before it bound."""
    import sys
    kernels = sys.modules.get("vidya.kernels.cpu")
    if kernels is not None and kernels._state.get("ok"):
        kernels.bind_isa(kernels.cpu_level())
    yield


class KernelLevel(NamedTuple):
    isa: str  # the ISA level bound for the test
    ops: object  # torch.ops.vidya, or torch.ops.vidya_emu (emulated)


@pytest.fixture(params=KERNEL_ISAS)
def kernel(request):
    """Each ISA level of the kernels' dispatch table, bound for the test (then the best again): on
    this CPU where it has the level, else in the emulated build (AVX-512 and AMX in software,
    vidya/kernels/cpu.py's emulated_ops()), so every path runs on every x86 machine with AVX2.
    Skips, saying why, only where neither can run."""
    from vidya.kernels import cpu as kernels
    if not kernels.available():
        pytest.skip("vidya's C++ kernels did not build here (no compiler?)")
    have = kernels.cpu_level()
    ops = torch.ops.vidya
    if not isa_at_least(have, request.param):
        ops = kernels.emulated_ops()
        if ops is None:
            pytest.skip(f"this CPU offers {have}, not {request.param}, and the emulated kernels did not build")
    have = kernels.cpu_level(ops)
    assert kernels.bind_isa(request.param, ops) == request.param
    yield KernelLevel(request.param, ops)
    kernels.bind_isa(have, ops)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from vidya.models import loader
    return loader.load_tokenizer(loader.resolve("smollm2"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer):
    """{arch: (directory, transformers model in float32)}"""
    out = {}
    for arch in ARCHS:
        model = tiny_model(arch, len(smollm2_tokenizer))
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(d)
        smollm2_tokenizer.save_pretrained(d)
        out[arch] = (str(d), model)
    return out


GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def write_gguf(hf, path: str, types: dict | None = None, extra: dict | None = None) -> None:
    """A transformers Llama written as llama.cpp writes a GGUF (q/k rows in its interleaved rotary
    order); `types`: GGUF projection name (attn_q, ffn_down, ...) -> a type gguf's own quantizer
    writes (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), else float32; `extra`: more tensors (rope_freqs.weight)."""
    import gguf
    import numpy as np
    from gguf.quants import quantize
    cfg = hf.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, p in hf.state_dict().items():
        t = p.float().numpy()
        top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
        gname, kind = top.get(name), None
        if gname is None:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, leaf = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{GGUF_NAMES[module]}.{leaf}"
            if module in ("self_attn.q_proj", "self_attn.k_proj"):
                t = permute(t, heads if "q_proj" in module else kv_heads)
            kind = (types or {}).get(GGUF_NAMES[module])
        t = np.ascontiguousarray(t)
        if kind is None:
            w.add_tensor(gname, t)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(gname, quantize(t, qtype), raw_dtype=qtype)
    for gname, t in (extra or {}).items():
        w.add_tensor(gname, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_engine(model_dir: str, **kwargs):
    """An engine on a model directory; backend "triton" means the Triton ops (attention and the rest)."""
    from vidya.config import EngineArgs
    from vidya.engine.llm_engine import LLMEngine
    args = dict(model=model_dir, dtype="float32", block_size=4, show_progress=False, max_model_len=512)
    args.update(kwargs)
    if args.get("backend") == "triton":
        pytest.importorskip("triton", reason="the triton package is not installed here")
        args.update(backend="torch", attention_backend="triton")
    return LLMEngine(EngineArgs(**args))


def run_to_completion(engine, check: bool = True, max_steps: int = 100_000) -> dict:
    """Step until every request is done, checking invariants after each step."""
    done = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if check:
            engine.check()
    assert not engine.has_unfinished_requests(), "engine did not finish"
    return done


def assert_all_blocks_free(engine) -> None:
    engine.check()
    pool = engine.kv.pool
    assert pool.num_free_blocks == pool.num_blocks, f"{pool.num_blocks - pool.num_free_blocks} blocks still held"


@pytest.fixture(scope="session")
def server():
    """One `vidya serve` on the embedded default model, shared by the server tests."""
    from serverutil import LiveServer
    s = LiveServer("--max-num-seqs", "128", "--max-model-len", "2048")
    yield s
    s.terminate()


@pytest.fixture
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
