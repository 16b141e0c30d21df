"""The one place that decides what this machine runs: the device, the CPU's instruction set, the
ops backend and the dtypes of activations, weights and KV cache. Decided once at start-up from
what the machine has (and `--backend` / `VIDYA_BACKEND`, `--attention-backend` /
`VIDYA_ATTENTION_BACKEND`, `VIDYA_TP_TIMEOUT_S`, `VIDYA_REQUIRE_GPU`, read here and nowhere else); the result is printed in `vidya serve`'s
start-up line, `GET /version` and every `vidya bench` result.

    ISA            ops backend        activations  weights  KV cache
    amx            C++ (AMX+oneDNN)   bf16         bf16     bf16
    avx512_bf16    C++ (oneDNN)       bf16         bf16     bf16
    avx512, avx2   C++ (16-bit store) fp32         bf16     bf16    bf16 -> fp32 is a shift, in registers
    generic        torch reference    fp32         fp32     fp32    (no AVX2, or not x86)
    cuda           torch + Triton     bf16/fp16                     matmuls in torch, the rest in Triton

The attention backend: "cpu" (inside the C++ kernels), "torch" (the reference in
attention/paged.py) or "triton" (attention/triton_paged.py: on CUDA, or on CPU only under
TRITON_INTERPRET=1, for the tests; it brings vidya's other Triton kernels with it: ops/triton_ops.py).
"""
from __future__ import annotations

import dataclasses
import os
import platform as _host
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ISAS = ("amx", "avx512_bf16", "avx512", "avx2", "generic")  # best first
BACKENDS = ("auto", "torch", "cpu") + ISAS[:-1]  # cpu: the best C++ ISA here; an ISA name: that one
ENV_VAR = "VIDYA_BACKEND"
ATTENTION_BACKENDS = ("auto", "torch", "cpu", "triton")
ATTENTION_ENV_VAR = "VIDYA_ATTENTION_BACKEND"
# set in the CUDA image: --device auto with no GPU visible is an error there, not a quiet CPU server
REQUIRE_GPU_ENV_VAR = "VIDYA_REQUIRE_GPU"
TP_TIMEOUT_ENV_VAR = "VIDYA_TP_TIMEOUT_S"  # seconds a collective inside a step waits for a rank (default 120)
# /proc/cpuinfo flags each ISA level needs
_NEEDS = {
    "amx": {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx512bw", "avx512vl",
            "avx512dq"},
    # (every CPU with AVX-512 BF16 has VNNI too; the 8-bit matmul at this level needs it)
    "avx512_bf16": {"avx512_bf16", "avx512_vnni", "avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"},
    "avx2": {"avx2", "fma", "f16c"},
}


@dataclass(frozen=True, slots=True)
class Platform:
    device: torch.device
    backend: str  # "cpu" (vidya's C++ kernels), "torch" (the reference ops) or "cuda"
    isa: str  # one of ISAS, or "cuda"
    dtype: torch.dtype  # activations
    weight_dtype: torch.dtype  # projection weights and embeddings as stored
    kv_dtype: torch.dtype
    note: str = ""  # why a faster path is not used, when one is not
    attention: str = "torch"  # "cpu" (in the C++ kernels), "torch" (the reference) or "triton"
    quantization: str | None = None  # the weights' quantization (models/quant.py), described
    tp_timeout_s: float = 120.0  # a tensor-parallel collective waiting longer on a rank fails

    @property
    def int8_activations(self) -> bool:
        """Whether quantized projections multiply in integers here (vidya's C++ CPU kernels), their
        activations quantized to int8 at run time (models/quant.py's int8_activations)."""
        return self.backend == "cpu"

    @property
    def distributed_backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"

    def for_rank(self, rank: int) -> "Platform":
        """The platform of tensor-parallel rank `rank`: on GPUs, its own device (and the current one)."""
        if self.device.type != "cuda":
            return self
        device = torch.device("cuda", rank)  # (one GPU per rank; untested: no machine with several was lent)
        torch.cuda.set_device(device)
        return dataclasses.replace(self, device=device)

    def describe(self, note: bool = True) -> str:
        """One line; `note`: with why a faster path is not used (printed once at start-up)."""
        name = lambda t: str(t).removeprefix("torch.")
        kernels = {"cpu": "C++ kernels", "torch": "torch reference ops", "cuda": "torch on CUDA"}[self.backend]
        if self.attention == "triton":  # (ops/__init__.py: the Triton kernels come together)
            kernels = "torch matmuls + Triton kernels" if self.device.type == "cuda" else "torch matmuls + Triton kernels (interpreted)"
        weights = f"{self.quantization} weights" if self.quantization else f"{name(self.weight_dtype)} weights"
        s = (f"{self.device.type} {self.isa}, {kernels}, {self.attention} attention: {name(self.dtype)} math, "
             f"{weights}, {name(self.kv_dtype)} KV cache")
        return s + (f" ({self.note})" if self.note and note else "")

    def as_dict(self) -> dict:
        name = lambda t: str(t).removeprefix("torch.")
        return {"device": self.device.type, "backend": self.backend, "isa": self.isa,
                "attention_backend": self.attention, "dtype": name(self.dtype),
                "weight_dtype": name(self.weight_dtype), "kv_cache_dtype": name(self.kv_dtype),
                "quantization": self.quantization}


@dataclass(frozen=True, slots=True)
class TPGroup:
    """This process's place in a tensor-parallel group (vidya/engine/tensor_parallel.py)."""
    rank: int = 0
    world_size: int = 1


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isa(flags: set[str] | None = None) -> str:
    """The best ISA level this CPU has by its flags (AMX also needs the OS's permission, which the
    kernels check when they load)."""
    if _host.machine().lower() not in ("x86_64", "amd64"):
        return "generic"
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa in ISAS[:-1] if _NEEDS[isa] <= flags), "generic")


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if os.environ.get(REQUIRE_GPU_ENV_VAR) == "1":
            raise ValueError(no_gpu_in_the_gpu_image())
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return dev


def no_gpu_in_the_gpu_image() -> str:
    cuda = torch.version.cuda or "none"
    driver = "580" if cuda.startswith("13") else "570 (or 525+, with CUDA's minor-version compatibility)" \
        if cuda.startswith("12.8") else "one that supports it"
    return (f"this is vidya's GPU image ({REQUIRE_GPU_ENV_VAR}=1; torch {torch.__version__}, CUDA {cuda}) and no "
            f"GPU is visible to it: start the container with --gpus all (the NVIDIA container toolkit), and "
            f"check that the host's driver supports CUDA {cuda} (driver >= {driver}; `nvidia-smi` shows it; "
            f"for older drivers build the image with --build-arg TORCH_VERSION=2.9.1, CUDA 12.8), or pass "
            f"--device cpu to serve on the CPU")


# --kv-cache-dtype, vLLM's names: "auto" the activations' dtype (bf16/fp16 on a GPU, the C++
# kernels' bf16 on a CPU), else 8-bit floats, kept with a scale per layer for K and for V
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn,
                   "fp8_e5m2": torch.float8_e5m2}


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def resolve_platform(device: str = "auto", dtype: str = "auto", backend: str = "auto",
                     attention: str = "auto", tensor_parallel: bool = False,
                     quantization: str | None = None, kv_cache_dtype: str = "auto") -> Platform:
    """Everything the engine needs to know about this machine, decided once (the engine calls
    this once and hands the result to whatever else needs it: tensor-parallel ranks included).
    `tensor_parallel`: the engine splits the model across ranks, which runs on the torch ops on
    CPU (the C++ kernels fuse the output layer's argmax, which would skip the all-gather)."""
    backend, source = (backend, "--backend") if backend != "auto" else (os.environ.get(ENV_VAR) or "auto", ENV_VAR)
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if tensor_parallel and backend not in ("auto", "torch"):
        raise ValueError(f"tensor parallelism runs on the torch ops; {source} {backend} cannot be split: "
                         f"use auto or torch")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, got {kv_cache_dtype!r}")
    fp8 = KV_CACHE_DTYPES[kv_cache_dtype]
    attention, attention_source = ((attention, "--attention-backend") if attention != "auto" else
                                   ((os.environ.get(ATTENTION_ENV_VAR) or "auto").lower(), ATTENTION_ENV_VAR))
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"{attention_source} must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention!r}")
    if dtype != "auto" and dtype not in _DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}, got {dtype!r}")
    dev = resolve_device(device)
    if dev.type == "cuda":
        if backend not in ("auto", "torch"):
            raise ValueError(f"{source} {backend} names vidya's CPU kernels, and this engine runs on {dev}: use "
                             f"auto (Triton kernels) or torch (the reference ops), or --device cpu")
        if backend == "torch" and attention == "auto":
            attention = "torch"  # the reference ops throughout
        if fp8 == torch.float8_e4m3fn and attention != "torch" and torch.cuda.get_device_capability(dev) < (8, 9):
            raise ValueError(f"--kv-cache-dtype {kv_cache_dtype}: Triton converts float8 e4m3 only on compute "
                             f"capability 8.9 and newer (this GPU: {'.'.join(map(str, torch.cuda.get_device_capability(dev)))}, "
                             f"e.g. an A10); use --kv-cache-dtype fp8_e5m2 (or --attention-backend torch)")
        dt = _DTYPES[dtype] if dtype != "auto" else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
        p = Platform(dev, "cuda", "cuda", dt, dt, dt)
    else:
        if backend == "auto" and (attention in ("torch", "triton") or tensor_parallel):
            backend = "torch"  # that attention (tensor parallelism) runs beside the torch ops
        p = _cpu_platform(dev, dtype, backend, source)
    p = dataclasses.replace(p, attention=_attention_backend(p, attention, attention_source), tp_timeout_s=_tp_timeout(),
                            quantization=quantization)
    if fp8 is not None:
        p = dataclasses.replace(p, kv_dtype=fp8)
    if quantization and p.device.type == "cpu" and p.backend == "torch":
        p = dataclasses.replace(p, note="; ".join(filter(None, (p.note, (
            "quantized weights on the torch reference ops are dequantized every step: memory saved, "
            "several times slower than vidya's C++ kernels")))))
    if p.attention == "triton" and p.device.type == "cpu" and (
            p.dtype != torch.float32 or (p.kv_dtype != torch.float32 and not is_fp8(p.kv_dtype))):
        # Triton's interpreter computes tl.dot on 16-bit operands wrongly (3.9: a 16x16 bf16 dot off
        # by ~1e10; fp32 exact), so its attention answers garbage in bf16 (compiled, on a GPU, it is right)
        if dtype != "auto":
            raise ValueError(f"{attention_source} triton on the CPU runs in Triton's interpreter, whose tl.dot is "
                             f"wrong on {dtype} operands: use dtype float32 (or auto) there")
        f32 = torch.float32
        p = dataclasses.replace(p, dtype=f32, weight_dtype=f32, kv_dtype=p.kv_dtype if is_fp8(p.kv_dtype) else f32,
                                note="; ".join(filter(None, (p.note, "Triton's interpreter: float32 throughout (its "
                                                                     "tl.dot is wrong on 16-bit operands)"))))
    return p


def _tp_timeout() -> float:
    value = os.environ.get(TP_TIMEOUT_ENV_VAR)
    if not value:
        return 120.0
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 7 * 86400:
        raise ValueError(f"{TP_TIMEOUT_ENV_VAR} must be a number of seconds above 0 and at most a week, got {value!r}")
    return seconds


def _attention_backend(p: Platform, asked: str, source: str) -> str:
    if asked == "auto":
        if p.backend == "cpu":
            return "cpu"
        return "triton" if p.device.type == "cuda" and triton_usable() else "torch"
    if asked == "cpu" and p.backend != "cpu":
        raise ValueError(f"{source} cpu runs inside vidya's C++ kernels, which this platform does not use "
                         f"({p.backend} ops); use auto, torch or triton")
    if asked in ("torch", "triton") and p.backend == "cpu":
        raise ValueError(f"{source} {asked} runs beside the torch ops: add --backend torch (the C++ kernels "
                         f"bring their own attention)")
    if asked == "triton":
        if not triton_usable():
            raise ValueError(f"{source} triton needs the triton package: pip install triton")
        if p.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"{source} triton needs a CUDA GPU (on CPU it runs only under "
                             f"TRITON_INTERPRET=1, slowly, for tests)")
    return asked


def triton_usable() -> bool:
    """Whether the triton package is installed (found, not imported: importing it is slow)."""
    import importlib.util
    return importlib.util.find_spec("triton") is not None


def _cpu_platform(dev: torch.device, dtype: str, backend: str, source: str) -> Platform:
    have = cpu_isa()
    isa, note = have, ""
    if backend in ISAS:
        if ISAS.index(backend) < ISAS.index(have):
            lower = ISAS[ISAS.index(have):-1]
            raise ValueError(f"{source} {backend}: this CPU has only {have}; use auto or "
                             + (f"one of {', '.join(lower)}" if lower else "torch (the reference ops)"))
        isa = backend
    if backend == "cpu" and have == "generic":
        raise ValueError(f"{source} cpu: vidya's C++ kernels need an x86 CPU with AVX2, and this one has "
                         f"neither; use auto or torch (the reference ops)")
    use_kernels = backend != "torch" and isa != "generic"
    if backend != "torch" and isa == "generic":
        note = "no AVX2 here (or not x86): vidya's C++ kernels need it; the torch reference ops serve"
    if use_kernels:
        from vidya.kernels import cpu as kernels  # builds them on first use
        if not kernels.available():
            if backend != "auto":
                raise ValueError(f"{source} {backend} needs vidya's C++ kernels, which failed to build "
                                 f"(is a C++ compiler installed?); use auto or torch")
            use_kernels, note = False, "vidya's C++ kernels did not build: the torch reference ops serve"
    if use_kernels:
        bound = kernels.bind_isa(isa)  # at most what the kernels find here (AMX needs the OS's grant)
        if bound != isa:
            isa, note = bound, f"{isa} is not usable here (the OS did not grant AMX tile state)"
    kind = "cpu" if use_kernels else "torch"
    bf16_math = isa in ("amx", "avx512_bf16")
    if dtype == "float16":  # (a GPU deployment's flags on a CPU should not cost 7x)
        dtype, note = "auto", "; ".join(filter(None, (note, "--dtype float16: no CPU has fast float16 math, "
                                                      "~7x slower on AVX2; serving auto's dtypes")))
    if dtype != "auto":
        dt = _DTYPES[dtype]
        return Platform(dev, kind, isa, dt, dt, dt, note)
    if not use_kernels or bf16_math:  # bf16 where the CPU has bf16 math, else fp32
        dt = torch.bfloat16 if bf16_math else torch.float32
        return Platform(dev, kind, isa, dt, dt, dt, note)
    # no bf16 math: compute in fp32, hold weights and KV cache in 16 bits (half the memory and
    # the memory traffic; widened to fp32 in registers)
    return Platform(dev, kind, isa, torch.float32, torch.bfloat16, torch.bfloat16, note)


def return_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc keeps freed blocks for reuse, e.g. the
    plain weights dropped once packed copies exist: ~200 MB for SmolLM2). No-op elsewhere."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
