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
