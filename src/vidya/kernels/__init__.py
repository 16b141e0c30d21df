"""vidya's compiled kernels: `cpu` builds and loads the C++ CPU kernels (csrc/, split by job and
ISA behind one dispatch table, csrc/registry.cpp)."""
