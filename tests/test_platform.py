"""The one backend choice (vidya/platform.py): the ISA level from the CPU's flags, the override
(`--backend` / `VIDYA_BACKEND`) and its errors, the dtypes each CPU class gets, and a CPU without
AVX2 serving on the torch reference ops with a start-up line that says so."""
from __future__ import annotations

import asyncio

import pytest
import torch

from vidya import SamplingParams
from vidya import platform as plat

AVX2 = {"avx2", "fma", "f16c"}


@pytest.fixture
def on_cpu(monkeypatch):
    """Device auto means the CPU in these tests, on a machine with a GPU too (the GPU's branch has
    its own test below)."""
    real = plat.resolve_device
    monkeypatch.setattr(plat, "resolve_device", lambda device="auto": real("cpu" if device == "auto" else device))
AVX512 = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}


@pytest.mark.parametrize("flags,want", [
    (set(), "generic"), ({"sse4_2", "avx"}, "generic"), (AVX2, "avx2"), (AVX512, "avx512"),
    (AVX512 | {"avx512_bf16", "avx512_vnni"}, "avx512_bf16"),
    (AVX512 | {"avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"}, "amx"),
    (AVX512 | {"avx512_bf16"}, "avx512"),  # (no such CPU is known: the level's 8-bit matmul needs VNNI)
    ({"amx_tile", "amx_bf16"} | AVX2, "avx2"),  # AMX flags without AVX-512 BF16: not an AMX path
])
def test_isa_level_from_cpu_flags(flags, want, monkeypatch):
    monkeypatch.setattr(plat._host, "machine", lambda: "x86_64")
    assert plat.cpu_isa(flags) == want


def test_not_x86_is_generic(monkeypatch):
    monkeypatch.setattr(plat._host, "machine", lambda: "aarch64")
    assert plat.cpu_isa(AVX512) == "generic"


def test_override_errors_say_what_to_do(on_cpu, monkeypatch):
    with pytest.raises(ValueError, match="--backend must be one of"):
        plat.resolve_platform(backend="sse")
    monkeypatch.setenv("VIDYA_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VIDYA_BACKEND must be one of"):
        plat.resolve_platform()
    with monkeypatch.context() as m:  # (on any CPU: one without AMX, and one without AVX2)
        m.setattr(plat, "cpu_isa", lambda flags=None: "avx2")
        m.setenv("VIDYA_BACKEND", "amx")
        with pytest.raises(ValueError, match="VIDYA_BACKEND amx: this CPU has only avx2; use auto or one of avx2"):
            plat.resolve_platform()
        m.setattr(plat, "cpu_isa", lambda flags=None: "generic")
        with pytest.raises(ValueError, match="--backend cpu: vidya's C\\+\\+ kernels need an x86 CPU with AVX2"):
            plat.resolve_platform(backend="cpu")
        with pytest.raises(ValueError, match="VIDYA_BACKEND amx: this CPU has only generic; use auto or torch"):
            plat.resolve_platform()
    monkeypatch.setenv("VIDYA_BACKEND", "torch")
    p = plat.resolve_platform()
    assert p.backend == "torch" and "torch reference ops" in p.describe()


def test_each_cpu_class_gets_its_dtypes(on_cpu, monkeypatch):
    """bf16 math where the CPU has it; fp32 math over 16-bit weights and KV cache where not."""
    for isa in ("avx2", "avx512"):
        if plat.ISAS.index(isa) >= plat.ISAS.index(plat.cpu_isa()):
            p = plat.resolve_platform(backend=isa)
            assert (p.backend, p.isa, p.dtype, p.weight_dtype, p.kv_dtype) == \
                ("cpu", isa, torch.float32, torch.bfloat16, torch.bfloat16)
    p = plat.resolve_platform(backend="avx2" if plat.cpu_isa() != "generic" else "torch", dtype="float32")
    assert (p.dtype, p.weight_dtype, p.kv_dtype) == (torch.float32,) * 3  # asked for: all fp32


def test_float16_on_a_cpu_serves_the_cpus_own_16_bit_layout_and_says_so(on_cpu):
    """No CPU has fast float16 math (~7x slower than the default on AVX2): --dtype float16 there
    gets what auto gets (weights and KV cache in 16 bits where the C++ kernels run), with a note."""
    auto, half = plat.resolve_platform(), plat.resolve_platform(dtype="float16")
    assert (half.backend, half.isa, half.dtype, half.weight_dtype, half.kv_dtype) == \
        (auto.backend, auto.isa, auto.dtype, auto.weight_dtype, auto.kv_dtype)
    assert torch.float16 not in (half.dtype, half.weight_dtype, half.kv_dtype)
    assert "--dtype float16" in half.describe() and "--dtype float16" not in half.describe(note=False)


def test_a_cpu_without_avx2_serves_on_the_torch_reference(tiny_models, on_cpu, monkeypatch, capsys):
    """...with one start-up line that says so: `vidya serve`'s loading path (launcher.load_engine,
    the platform resolved once before the port opens) prints the reason once."""
    from vidya.config import EngineArgs
    from vidya.engine import llm_engine
    from vidya.engine.llm_engine import engine_platform
    from vidya.server import launcher
    from vidya.server.app import ServerSettings, ServerState
    monkeypatch.setattr(plat, "cpu_isa", lambda flags=None: "generic")
    args = EngineArgs(model=tiny_models["llama"][0], block_size=4, max_model_len=512, show_progress=True)
    p = engine_platform(args)
    assert (p.backend, p.isa, p.dtype) == ("torch", "generic", torch.float32)
    assert "no AVX2" in p.describe() and "no AVX2" not in p.describe(note=False)
    monkeypatch.setattr(llm_engine, "resolve_platform", lambda *a, **k: pytest.fail("the platform was resolved twice"))
    state = ServerState()
    launcher.load_engine(args, p, ServerSettings(served_model_names=["tiny"], warm_tutor_prompts=False), state,
                         server=None)  # (the server is touched only when loading fails)
    assert state.load_error is None and state.llm is not None
    async def answer():
        async for out in state.llm.generate([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4, min_tokens=4)):
            last = out
        return last
    try:
        assert state.llm.engine.platform is p
        assert len(asyncio.run(answer()).outputs[0].token_ids) == 4
    finally:
        state.llm.shutdown(timeout=30)
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("vidya: serving tiny on cpu generic, torch reference ops") for line in err), err
    said = [line for line in err if "no AVX2" in line]
    assert len(said) == 1 and said[0].startswith("vidya: backend:"), err


def test_a_gpu_refuses_a_cpu_backend_and_takes_torch_for_the_reference(monkeypatch):
    """On CUDA, --backend / VIDYA_BACKEND naming a CPU kernel level is an error (not silently
    ignored); torch means the reference ops throughout, attention included."""
    monkeypatch.setattr(plat, "resolve_device", lambda device="auto": torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(plat, "triton_usable", lambda: True)
    with pytest.raises(ValueError, match="--backend avx2 names vidya's CPU kernels.*--device cpu"):
        plat.resolve_platform(backend="avx2")
    monkeypatch.setenv("VIDYA_BACKEND", "cpu")
    with pytest.raises(ValueError, match="VIDYA_BACKEND cpu names vidya's CPU kernels"):
        plat.resolve_platform()
    monkeypatch.delenv("VIDYA_BACKEND")
    assert (plat.resolve_platform().backend, plat.resolve_platform().attention) == ("cuda", "triton")
    p = plat.resolve_platform(backend="torch")
    assert (p.backend, p.attention, p.dtype) == ("cuda", "torch", torch.bfloat16)
    assert plat.resolve_platform(tensor_parallel=True).attention == "triton"  # (split on the GPU's own ops)


def test_tensor_parallelism_runs_on_the_torch_ops(on_cpu, monkeypatch):
    p = plat.resolve_platform(tensor_parallel=True)
    assert (p.backend, p.attention) == ("torch", "torch")
    with pytest.raises(ValueError, match="--backend avx2 cannot be split"):
        plat.resolve_platform(backend="avx2", tensor_parallel=True)
    monkeypatch.setenv("VIDYA_BACKEND", "cpu")  # read there too (it was not, before)
    with pytest.raises(ValueError, match="VIDYA_BACKEND cpu cannot be split"):
        plat.resolve_platform(tensor_parallel=True)


def test_attention_backend_choice_and_its_errors(on_cpu, monkeypatch):
    """`--attention-backend` / VIDYA_ATTENTION_BACKEND, read once: the C++ kernels bring their own
    attention; torch and triton run beside the torch ops; triton on CPU only interpreted."""
    auto = plat.resolve_platform()
    assert auto.attention == ("cpu" if auto.backend == "cpu" else "torch")
    assert f"{auto.attention} attention" in auto.describe() and auto.as_dict()["attention_backend"] == auto.attention
    p = plat.resolve_platform(backend="torch")
    assert (p.backend, p.attention) == ("torch", "torch")
    with pytest.raises(ValueError, match="--attention-backend must be one of"):
        plat.resolve_platform(attention="flash")
    monkeypatch.setenv("VIDYA_ATTENTION_BACKEND", "FLASH")
    with pytest.raises(ValueError, match="VIDYA_ATTENTION_BACKEND must be one of"):
        plat.resolve_platform()
    monkeypatch.setenv("VIDYA_ATTENTION_BACKEND", "torch")  # beside the torch ops, chosen for it
    assert (plat.resolve_platform().backend, plat.resolve_platform().attention) == ("torch", "torch")
    monkeypatch.delenv("VIDYA_ATTENTION_BACKEND")
    with pytest.raises(ValueError, match="cpu runs inside vidya's C\\+\\+ kernels"):
        plat.resolve_platform(backend="torch", attention="cpu")
    if auto.backend == "cpu":
        with pytest.raises(ValueError, match="add --backend torch"):
            plat.resolve_platform(backend="cpu", attention="torch")
    pytest.importorskip("triton", reason="the triton package is not installed here")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton needs a CUDA GPU"):
        plat.resolve_platform(attention="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    p = plat.resolve_platform(attention="triton")
    assert (p.backend, p.attention) == ("torch", "triton")


def test_triton_interpreted_on_a_cpu_runs_in_float32_and_refuses_16_bits(on_cpu, monkeypatch):
    """Issue 31: Triton's interpreter computes tl.dot on bf16 operands wrongly, so the Triton
    attention answered garbage on a CPU whose dtype auto is bf16 (AVX-512 BF16, AMX). There auto
    now means float32 throughout, with a note; an explicit 16-bit dtype is an error naming float32."""
    pytest.importorskip("triton", reason="the triton package is not installed here")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(plat, "cpu_flags", lambda: AVX512 | {"avx512_bf16", "avx512_vnni"})  # a Zen 4's
    assert plat.resolve_platform(backend="torch").dtype == torch.bfloat16  # (what such a CPU gets otherwise)
    p = plat.resolve_platform(attention="triton")
    assert (p.attention, p.dtype, p.weight_dtype, p.kv_dtype) == ("triton",) + (torch.float32,) * 3
    assert "float32 throughout" in p.describe()
    for dtype in ("bfloat16", "float16"):
        with pytest.raises(ValueError, match=f"wrong on {dtype} operands: use dtype float32"):
            plat.resolve_platform(attention="triton", dtype=dtype)


@pytest.mark.parametrize("value", ["0", "-3", "inf", "nan", "soon", "1e9"])
def test_the_collectives_timeout_from_the_environment_is_checked_once_with_one_clear_error(on_cpu, monkeypatch,
                                                                                          value):
    monkeypatch.setenv("VIDYA_TP_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="VIDYA_TP_TIMEOUT_S must be a number of seconds above 0"):
        plat.resolve_platform()
    monkeypatch.setenv("VIDYA_TP_TIMEOUT_S", "7.5")
    assert plat.resolve_platform().tp_timeout_s == 7.5
