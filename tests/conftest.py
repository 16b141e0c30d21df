"""Shared fixtures: tiny random-weight Llama / Mistral / Qwen2 checkpoints written to disk as
Hugging Face directories (with the default model's tokenizer), and engine helpers."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub

import pytest
import torch

if not torch.cuda.is_available():  # the Triton attention kernels run interpreted, in numpy
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
SLIDING_WINDOW = 8  # tiny Gemma 3: prompts of 9..57 tokens and 12 more cross it
# the ISA levels vidya's C++ kernels have paths for, lowest first (vidya/platform.py's names)
KERNEL_ISAS = ("avx2", "avx512", "avx512_bf16", "amx")


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


@pytest.fixture(params=KERNEL_ISAS)
def isa(request):
    """Each ISA level this CPU can run, bound in the kernels for the test (then the CPU's best
    again); a level above this CPU skips, saying so."""
    from vidya.kernels import cpu as kernels
    if not kernels.available():
        pytest.skip("vidya's C++ kernels did not build here (no compiler?)")
    have = kernels.cpu_level()
    if have not in KERNEL_ISAS or not isa_at_least(have, request.param):
        pytest.skip(f"this CPU offers {have}, not {request.param}")
    assert kernels.bind_isa(request.param) == request.param
    yield request.param
    kernels.bind_isa(have)


def tiny_config(arch: str, vocab_size: int):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-6, initializer_range=0.5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=2, tie_word_embeddings=arch in ("qwen2", "gemma3"))
    if arch == "llama":
        return LlamaConfig(architectures=["LlamaForCausalLM"], **common,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 64})
    if arch == "mistral":
        return MistralConfig(architectures=["MistralForCausalLM"], sliding_window=None, head_dim=16, **common)
    if arch == "qwen3":  # q/k RMSNorm; head_dim 32 x 4 heads is wider than the hidden size
        return Qwen3Config(architectures=["Qwen3ForCausalLM"], head_dim=32, **common)
    if arch == "gemma3":  # three layers: sliding (local RoPE base), sliding, global (its own base)
        return Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], **{**common, "num_hidden_layers": 3, "initializer_range": 0.05},
                                head_dim=16, query_pre_attn_scalar=24, sliding_window=SLIDING_WINDOW,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                hidden_activation="gelu_pytorch_tanh",
                                rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                 "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                    "rope_theta": 1000000.0}})
    return Qwen2Config(architectures=["Qwen2ForCausalLM"], **common)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from vidya.models import loader
    return loader.load_tokenizer(loader.resolve("smollm2"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, smollm2_tokenizer):
    """{arch: (directory, transformers model in float32)}"""
    from transformers import AutoModelForCausalLM
    out = {}
    for arch in ARCHS:
        torch.manual_seed(1234)
        config = tiny_config(arch, len(smollm2_tokenizer))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        if arch in ("qwen3", "gemma3"):  # their norms start at identity (Gemma's w = 0): make them count
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.add_(torch.randn_like(p) * 0.3)
        d = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(d)
        smollm2_tokenizer.save_pretrained(d)
        out[arch] = (str(d), model)
    return out


def make_engine(model_dir: str, **kwargs):
    """An engine on a model directory; backend "triton" means the torch ops with Triton attention."""
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
