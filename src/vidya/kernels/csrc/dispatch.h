// The one dispatch table: a Kernels row (kernels.h) per ISA level, each level starting from the
// one below it and adding what its own files offer (x86/kernels_<isa>.h: `add_<isa>`). The ops
// read `kernels()`, the row of the level bound once at start-up; nothing else asks which ISA
// this is. Adding an ISA (ARM NEON next) is adding its kernel files, its add_ function and its
// line below.
#pragma once
#include <array>
#include "kernels.h"
#if VIDYA_X86
#include "x86/kernels_avx2.h"
#include "x86/kernels_avx512bf16.h"
#include "x86/kernels_amx.h"
#endif

namespace vidya {

inline const Kernels& kernels_for(int64_t level) {
  // (a plain array: nothing to destroy at exit, while an engine thread may still be in an op)
  static const std::array<Kernels, kAmx + 1> table = [] {
    std::array<Kernels, kAmx + 1> t{};  // kGeneric: every entry nullptr, the portable C++ throughout
    // each level: the one below it, plus its own files' kernels
    [[maybe_unused]] auto level = [&](Isa l, void (*add)(Kernels&)) {
      t[l] = t[l - 1];
      if (add) add(t[l]);
    };
#if VIDYA_X86
    level(kAvx2, &add_avx2);
    level(kAvx512, nullptr);  // (AVX-512 without BF16 runs the AVX2 kernels)
    level(kAvx512Bf16, &add_avx512bf16);
    level(kAmx, &add_amx);
#endif
    return t;
  }();
  return table[level];
}

// The bound level's kernels (read once per op call).
inline const Kernels& kernels() { return kernels_for(bound_isa().load(std::memory_order_relaxed)); }

}  // namespace vidya
