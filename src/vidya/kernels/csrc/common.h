// What every kernel file shares: headers, dtype helpers, and the ISA level the kernels may use.
//
// The level is bound once at start-up (`vidya::bind_isa`, called by vidya/platform.py, which
// alone decides what this machine runs); until then it is the best this CPU offers. Ops read the
// bound level's row of the dispatch table (dispatch.h), never the CPU directly, so an override
// (e.g. VIDYA_BACKEND=avx2 on an AMX machine) runs exactly the paths that CPU class would.
#pragma once
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Float8_e5m2.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

// (VIDYA_NOT_X86: compile as a CPU without x86 would, to check that build on x86; tests only)
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(VIDYA_NOT_X86)
#define VIDYA_X86 1
#include <immintrin.h>
#if VIDYA_EMULATE
#include "x86/emulated.h"  // the tests' build: AVX-512 and AMX in software (vidya/kernels/cpu.py)
#endif
#include <sys/syscall.h>
#include <unistd.h>
#else
#define VIDYA_X86 0
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <omp.h>

namespace vidya {

// ISA levels, in the order of vidya/platform.py's ISAS (best last here)
enum Isa : int64_t { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// The best level this CPU (and, for AMX, the OS) offers.
inline int64_t cpu_isa() {
  static const int64_t level = [] {
#if VIDYA_EMULATE
    return int64_t(kAmx);  // every level, in software
#elif VIDYA_X86
    if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return int64_t(kGeneric);
    if (!(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")))
      return int64_t(kAvx2);
    if (!(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vnni"))) return int64_t(kAvx512);
    if (!(__builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("amx-int8") && __builtin_cpu_supports("amx-tile")))
      return int64_t(kAvx512Bf16);
    // Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return int64_t(syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? kAmx : kAvx512Bf16);
#else
    return int64_t(kGeneric);
#endif
  }();
  return level;
}

inline std::atomic<int64_t>& bound_isa() {
  static std::atomic<int64_t> level{cpu_isa()};
  return level;
}

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <>
inline float to_f<at::BFloat16>(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}


template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

// An 8-bit cache (float8 e4m3 / e5m2): K / k_scale and V / v_scale, saturated to the format's
// largest finite value, then rounded to nearest even by c10's conversion (as torch's .to() does;
// attention/paged.py's to_cache is the reference)
template <typename T>
inline constexpr bool is_fp8_v = std::is_same_v<T, c10::Float8_e4m3fn> || std::is_same_v<T, c10::Float8_e5m2>;

// float8 -> float through a 256-entry table (1 KiB, in L1 while a row's K/V are read): c10's
// conversion is bit arithmetic per value, ~2x slower in the attention rows (measured, AVX2 EPYC)
template <typename T>
struct Fp8Table {
  float v[256];
  Fp8Table() {
    for (int i = 0; i < 256; ++i) v[i] = static_cast<float>(T(static_cast<uint8_t>(i), T::from_bits()));
  }
};
template <typename T>
inline const Fp8Table<T> fp8_table{};

template <>
inline float to_f<c10::Float8_e4m3fn>(c10::Float8_e4m3fn x) { return fp8_table<c10::Float8_e4m3fn>.v[x.x]; }
template <>
inline float to_f<c10::Float8_e5m2>(c10::Float8_e5m2 x) { return fp8_table<c10::Float8_e5m2>.v[x.x]; }

template <typename T>
inline T to_fp8(float x, float scale) {
  const float top = std::is_same_v<T, c10::Float8_e4m3fn> ? 448.f : 57344.f;
  x = x / scale;
  return static_cast<T>(x > top ? top : (x < -top ? -top : x));
}

// Round through T (what storing an intermediate in T does), so fused ops match unfused torch.
template <typename T>
inline float round_as(float x) { return to_f<T>(from_f<T>(x)); }

constexpr int kMaxGroup = 32;
constexpr int kMaxDim = 256;
// consecutive rows of one sequence below this count run row by row, not as a tile
constexpr int64_t kMinTileRows = 4;

}  // namespace vidya
