"""Builds and loads vidya's C++ CPU kernels (csrc/) with torch's own extension tooling, once per
machine (cached under ~/.cache/torch_extensions). The sources are one translation unit:
csrc/registry.cpp includes each job's files (attention, elementwise, GEMM), which run the kernels
of csrc/dispatch.h's table: a row per ISA level, filled from the x86 files (csrc/x86/, one file per
ISA where kernels differ) only on x86; adding an ISA is adding its files and its row. Where no compiler is available, `available()` is False (with one
warning) and vidya/platform.py picks the torch reference ops instead. Nothing here decides which
ISA runs: platform.py binds that once (`bind_isa`).

For the tests, `emulated_ops()` builds the same sources a second time with csrc/x86/emulated.h:
the AVX-512 BF16 / VNNI and AMX (BF16, INT8) paths with those instructions done in software, registered as
torch.ops.vidya_emu (the C++ namespace renamed too, so the two builds share no symbol), so that
every kernel path is compared with the torch reference on any x86 CPU with AVX2."""
from __future__ import annotations

import glob
import hashlib
import os
import sys
import threading

import torch

from vidya.platform import ISAS

_lock = threading.Lock()
_state: dict[str, bool] = {}
CSRC = os.path.join(os.path.dirname(__file__), "csrc")
SOURCE = os.path.join(CSRC, "registry.cpp")
# ISA levels as the kernels number them (csrc/common.h's enum Isa: generic 0 up to amx), by
# vidya/platform.py's names (best first there)
LEVELS = {name: n for n, name in enumerate(reversed(ISAS))}


def available() -> bool:
    """Whether torch.ops.vidya.* exist (building them on first call)."""
    with _lock:
        if "ok" not in _state:
            _state["ok"] = _build()
        return _state["ok"]


def emulated_ops():
    """torch.ops.vidya_emu: the kernels with AVX-512 and AMX emulated (tests only; slow), whose
    CPU offers every level; None where they cannot build (not x86, no AVX2, no compiler)."""
    with _lock:
        if "emulated" not in _state:
            from vidya.platform import cpu_isa
            _state["emulated"] = ISAS.index(cpu_isa()) <= ISAS.index("avx2") and _build(emulated=True)
        return torch.ops.vidya_emu if _state["emulated"] else None


def cpu_level(ops=None) -> str:
    """The best ISA level the kernels can use here (AMX only where the OS granted tile state);
    `ops`: another build's namespace (emulated_ops())."""
    level = int((ops or torch.ops.vidya).cpu_isa())
    return next(name for name, n in LEVELS.items() if n == level)


def bind_isa(isa: str, ops=None) -> str:
    """Bind the level every kernel may use (at most what the CPU has); returns the bound one."""
    level = int((ops or torch.ops.vidya).bind_isa(LEVELS[isa]))
    return next(name for name, n in LEVELS.items() if n == level)


def _build(emulated: bool = False) -> bool:
    try:
        from torch.utils.cpp_extension import load
        # torch rebuilds when the .cpp changes but not the headers it includes: name the build
        # after a hash of every source file instead
        digest = hashlib.sha1()
        for path in sorted(glob.glob(os.path.join(CSRC, "**", "*.*"), recursive=True)):
            with open(path, "rb") as f:
                digest.update(path.removeprefix(CSRC).encode() + f.read())
        flags = ["-O3", "-fopenmp", "-std=c++17", "-ffp-contract=off"]
        if emulated:  # `vidya` is the op library's name and the C++ namespace: both become vidya_emu
            flags += ["-DVIDYA_EMULATE=1", "-Dvidya=vidya_emu", "-mavx2", "-mfma", "-mf16c", "-Wno-psabi"]
        load(name=f"vidya_cpu_kernels_{'emulated_' if emulated else ''}{digest.hexdigest()[:12]}", sources=[SOURCE],
             extra_include_paths=[CSRC], is_python_module=False, verbose=False, with_cuda=False,
             extra_cflags=flags, extra_ldflags=["-fopenmp"])
        return True
    except Exception as e:  # no compiler, no headers: the reference still serves, slower
        what = "the emulated kernels did not build" if emulated else "C++ CPU kernels unavailable"
        print(f"vidya: warning: {what} ({type(e).__name__}: {str(e)[:200]})"
              f"{'' if emulated else '; using the torch reference ops'}", file=sys.stderr)
        return False


if __name__ == "__main__":  # `python -m vidya.kernels.cpu`: build now (make install does)
    sys.exit(0 if available() else 1)
