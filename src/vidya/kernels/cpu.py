"""Builds and loads vidya's C++ CPU kernels (csrc/) with torch's own extension tooling, once per
machine (cached under ~/.cache/torch_extensions). The sources are one translation unit:
csrc/registry.cpp includes each job's files (attention, elementwise, GEMM), and the x86 ones
(csrc/x86/, one file per ISA where kernels differ) only on x86; adding an ISA is adding files
there and their includes. Where no compiler is available, `available()` is False (with one
warning) and vidya/platform.py picks the torch reference ops instead. Nothing here decides which
ISA runs: platform.py binds that once (`bind_isa`)."""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading

import torch

_lock = threading.Lock()
_state: dict[str, bool] = {}
CSRC = os.path.join(os.path.dirname(__file__), "csrc")
SOURCE = os.path.join(CSRC, "registry.cpp")
# ISA levels as the kernels number them (csrc/common.h), by vidya/platform.py's names
LEVELS = {"generic": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3, "amx": 4}


def available() -> bool:
    """Whether torch.ops.vidya.* exist (building them on first call)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def cpu_level() -> str:
    """The best ISA level the kernels can use here (AMX only where the OS granted tile state)."""
    level = int(torch.ops.vidya.cpu_isa())
    return next(name for name, n in LEVELS.items() if n == level)


def bind_isa(isa: str) -> str:
    """Bind the level every kernel may use (at most what the CPU has); returns the bound one."""
    level = int(torch.ops.vidya.bind_isa(LEVELS[isa]))
    return next(name for name, n in LEVELS.items() if n == level)


def _build() -> bool:
    try:
        from torch.utils.cpp_extension import load
        # torch rebuilds when the .cpp changes but not the headers it includes: name the build
        # after a hash of every source file instead
        digest = hashlib.sha1()
        for path in sorted(glob.glob(os.path.join(CSRC, "**", "*.*"), recursive=True)):
            with open(path, "rb") as f:
                digest.update(path.removeprefix(CSRC).encode() + f.read())
        load(name=f"vidya_cpu_kernels_{digest.hexdigest()[:12]}", sources=[SOURCE], extra_include_paths=[CSRC],
             is_python_module=False, verbose=False, with_cuda=False,
             extra_cflags=["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"], extra_ldflags=["-fopenmp"])
        return True
    except Exception as e:  # no compiler, no headers: the reference still serves, slower
        print(f"vidya: warning: C++ CPU kernels unavailable ({type(e).__name__}: {str(e)[:200]}); "
              f"using the torch reference ops", file=sys.stderr)
        return False


if __name__ == "__main__":  # `python -m vidya.kernels.cpu`: build now (make install does)
    sys.exit(0 if available() else 1)
