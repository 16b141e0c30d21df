"""Builds and loads vidya's C++ CPU kernels (csrc/cpu_kernels.cpp) with torch's own extension
tooling, once per machine (cached under ~/.cache/torch_extensions). Where no compiler is
available the pure-torch reference is used instead, with one warning; `VIDYA_CPU_KERNELS=0`
forces the reference; `VIDYA_AMX=0` keeps the rest but not the AMX matmul."""
from __future__ import annotations

import os
import sys
import threading

_lock = threading.Lock()
_state: dict[str, bool] = {}
SOURCE = os.path.join(os.path.dirname(__file__), "csrc", "cpu_kernels.cpp")


def available() -> bool:
    """Whether torch.ops.vidya.* exist (building them on first call)."""
    if os.environ.get("VIDYA_CPU_KERNELS", "1") == "0":
        return False
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def amx_available() -> bool:
    """Whether the AMX small-batch matmul can run here (the kernels built, the CPU has AMX and
    Linux granted the tile state); `VIDYA_AMX=0` turns it off (oneDNN then runs every matmul,
    and prefill attention tiles run on AVX-512 instead of AMX)."""
    if os.environ.get("VIDYA_AMX", "1") == "0" or not available():
        return False
    import torch
    return bool(torch.ops.vidya.amx_available())


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import load
        load(name="vidya_cpu_kernels", sources=[SOURCE], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"], extra_ldflags=["-fopenmp"])
        return True
    except Exception as e:  # no compiler, no headers: the reference still serves, slower
        print(f"vidya: warning: C++ CPU kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
              f"using the pure-torch attention", file=sys.stderr)
        return False


if __name__ == "__main__":  # `python -m vidya.attention.cpu_kernels`: build now (make install does)
    sys.exit(0 if available() else 1)
