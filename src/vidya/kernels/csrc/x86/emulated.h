// Software stand-ins for the AVX-512 (F, BW, DQ, VL, BF16, VNNI) and AMX (BF16, INT8) intrinsics the kernels use, for
// tests only. vidya/kernels/cpu.py's emulated build (VIDYA_EMULATE, on any x86 CPU with AVX2)
// includes this after <immintrin.h>: each intrinsic name becomes a macro for the function below,
// so the AVX-512 BF16 and AMX paths compile unchanged to plain C++ and run on CPUs that lack those
// instructions, and the tests compare them with the torch reference on every machine. The types
// stay GCC's own (__m512 and friends are vector types any x86 compiler handles); only the
// instructions are replaced, each written after Intel's pseudo-code for it (bf16 conversion
// rounds to nearest even with denormal inputs as zero; VDPBF16PS adds the odd, then the even
// product, as the SDM says). Where the hardware's rounding is not pinned down the results may
// differ from it in the last fp32 bits, which the tests' tolerances absorb: TDPBF16PS here adds
// one product at a time (the Intrinsics Guide's order; the SDM keeps even and odd sums apart and
// adds them at the end), and VRCP14PS returns the exact reciprocal (within the 2^-14 the
// hardware promises). Nothing checks alignment or tile shapes as the hardware would. Nothing
// here is fast, and nothing but the emulated build includes it.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

// every function of the x86 kernels may use AVX2 here (the emulated build is compiled with it)
#define VIDYA_AVX512BF16
#define VIDYA_AMX
#define VIDYA_AVX512VNNI
#define VIDYA_AMX_INT8

namespace x86emu {

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x32 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));

inline float bits_f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t f_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline bool is_denormal(float f) { return (f_bits(f) & 0x7f800000u) == 0 && (f_bits(f) & 0x7fffffffu) != 0; }
inline float daz(float f) { return is_denormal(f) ? std::copysign(0.f, f) : f; }

// VCVTNEPS2BF16: NaN stays a (quiet) NaN, denormal inputs count as zero, round to nearest even
inline uint16_t to_bf16(float f) {
  uint32_t u = f_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}
inline float from_bf16(uint16_t h) { return daz(bits_f(static_cast<uint32_t>(h) << 16)); }

// ---- set, load, store ----------------------------------------------------------------------
inline __m512 set1_ps(float x) { f32x16 r; for (int i = 0; i < 16; ++i) r[i] = x; return (__m512)r; }
inline __m512 setzero_ps() { return set1_ps(0.f); }
inline __m512i set1_epi32(int x) { i32x16 r; for (int i = 0; i < 16; ++i) r[i] = x; return (__m512i)r; }
inline __m512i setzero_si512() { return set1_epi32(0); }
inline __m512i setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9, int e10,
                          int e11, int e12, int e13, int e14, int e15) {
  const i32x16 r = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  return (__m512i)r;
}
inline __m512 loadu_ps(const void* p) { __m512 r; std::memcpy(&r, p, 64); return r; }
inline __m512i loadu_si512(const void* p) { __m512i r; std::memcpy(&r, p, 64); return r; }
inline void storeu_ps(void* p, __m512 a) { std::memcpy(p, &a, 64); }
inline void storeu_si512(void* p, __m512i a) { std::memcpy(p, &a, 64); }
inline __m512 maskz_loadu_ps(__mmask16 k, const void* p) {  // masked-off lanes are not read
  f32x16 r;
  for (int i = 0; i < 16; ++i) {
    r[i] = 0.f;
    if (k >> i & 1) std::memcpy(&r[i], static_cast<const char*>(p) + 4 * i, 4);
  }
  return (__m512)r;
}
inline void mask_storeu_ps(void* p, __mmask16 k, __m512 a) {  // masked-off lanes are not written
  const f32x16 v = (f32x16)a;
  for (int i = 0; i < 16; ++i)
    if (k >> i & 1) { const float x = v[i]; std::memcpy(static_cast<char*>(p) + 4 * i, &x, 4); }
}
inline void i32scatter_epi32(void* base, __m512i index, __m512i a, int scale) {  // in lane order
  const i32x16 idx = (i32x16)index, v = (i32x16)a;
  for (int i = 0; i < 16; ++i) {
    const int32_t x = v[i];
    std::memcpy(static_cast<char*>(base) + static_cast<int64_t>(idx[i]) * scale, &x, 4);
  }
}

// ---- arithmetic ------------------------------------------------------------------------------
inline __m512 add_ps(__m512 a, __m512 b) { return (__m512)((f32x16)a + (f32x16)b); }
inline __m512 sub_ps(__m512 a, __m512 b) { return (__m512)((f32x16)a - (f32x16)b); }
inline __m512 mul_ps(__m512 a, __m512 b) { return (__m512)((f32x16)a * (f32x16)b); }
inline __m512 max_ps(__m512 a, __m512 b) {  // the second operand when either is NaN, as MAXPS
  f32x16 x = (f32x16)a, y = (f32x16)b, r;
  for (int i = 0; i < 16; ++i) r[i] = x[i] > y[i] ? x[i] : y[i];
  return (__m512)r;
}
inline __m512 min_ps(__m512 a, __m512 b) {  // the second operand when either is NaN, as MINPS
  f32x16 x = (f32x16)a, y = (f32x16)b, r;
  for (int i = 0; i < 16; ++i) r[i] = x[i] < y[i] ? x[i] : y[i];
  return (__m512)r;
}
inline __m512 fmadd_ps(__m512 a, __m512 b, __m512 c) {
  f32x16 x = (f32x16)a, y = (f32x16)b, z = (f32x16)c, r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(x[i], y[i], z[i]);
  return (__m512)r;
}
inline __m512 fnmadd_ps(__m512 a, __m512 b, __m512 c) {
  f32x16 x = (f32x16)a, y = (f32x16)b, z = (f32x16)c, r;
  for (int i = 0; i < 16; ++i) r[i] = std::fma(-x[i], y[i], z[i]);
  return (__m512)r;
}
inline __m512 rcp14_ps(__m512 a) { return (__m512)(1.f / (f32x16)a); }
inline __m512 scalef_ps(__m512 a, __m512 b) {  // a * 2^floor(b)
  f32x16 x = (f32x16)a, y = (f32x16)b, r;
  for (int i = 0; i < 16; ++i) {
    if (std::isnan(x[i]) || std::isnan(y[i])) { r[i] = std::numeric_limits<float>::quiet_NaN(); continue; }
    const float e = std::floor(y[i]);
    r[i] = std::ldexp(x[i], static_cast<int>(std::fmax(-400.f, std::fmin(400.f, e))));
  }
  return (__m512)r;
}
inline __m512 roundscale_ps(__m512 a, int imm) {  // round to imm[7:4] fraction bits, mode imm[2:0]
  const int m = (imm >> 4) & 15, mode = imm & 7;
  const float s = std::ldexp(1.f, m);
  f32x16 x = (f32x16)a, r;
  for (int i = 0; i < 16; ++i) {
    const float v = x[i] * s;
    float t;
    switch (mode) {
      case 1: t = std::floor(v); break;
      case 2: t = std::ceil(v); break;
      case 3: t = std::trunc(v); break;
      default: t = std::nearbyint(v); break;  // 0: nearest even; 4+: MXCSR's mode (nearest even)
    }
    r[i] = t / s;
  }
  return (__m512)r;
}
inline __m512i add_epi32(__m512i a, __m512i b) { return (__m512i)((u32x16)a + (u32x16)b); }
inline __m512i mullo_epi32(__m512i a, __m512i b) { return (__m512i)((u32x16)a * (u32x16)b); }
inline __m512i slli_epi32(__m512i a, unsigned imm) {
  return imm > 31 ? setzero_si512() : (__m512i)((u32x16)a << static_cast<uint32_t>(imm));
}

// ---- compare, mask, reduce -----------------------------------------------------------------
inline __mmask16 cmp_ps_mask(__m512 a, __m512 b, int imm) {
  f32x16 x = (f32x16)a, y = (f32x16)b;
  __mmask16 k = 0;
  for (int i = 0; i < 16; ++i) {
    const bool un = std::isnan(x[i]) || std::isnan(y[i]);
    const bool lt = !un && x[i] < y[i], eq = !un && x[i] == y[i], gt = !un && x[i] > y[i];
    bool r;
    switch (imm & 15) {  // bit 4 chooses signalling or quiet, not the result
      case 0: r = eq; break;                   // EQ_OQ
      case 1: r = lt; break;                   // LT_OS
      case 2: r = lt || eq; break;             // LE_OS
      case 3: r = un; break;                   // UNORD_Q
      case 4: r = !eq; break;                  // NEQ_UQ
      case 5: r = !lt; break;                  // NLT_US
      case 6: r = !(lt || eq); break;          // NLE_US
      case 7: r = !un; break;                  // ORD_Q
      case 8: r = eq || un; break;             // EQ_UQ
      case 9: r = !(gt || eq); break;          // NGE_US
      case 10: r = !gt; break;                 // NGT_US
      case 11: r = false; break;               // FALSE_OQ
      case 12: r = !un && !eq; break;          // NEQ_OQ
      case 13: r = gt || eq; break;            // GE_OS
      case 14: r = gt; break;                  // GT_OS
      default: r = true; break;                // TRUE_UQ
    }
    k |= static_cast<__mmask16>(r) << i;
  }
  return k;
}
inline __m512 mask_mov_ps(__m512 src, __mmask16 k, __m512 a) {
  f32x16 s = (f32x16)src, x = (f32x16)a;
  for (int i = 0; i < 16; ++i) s[i] = (k >> i & 1) ? x[i] : s[i];
  return (__m512)s;
}
inline __m512 maskz_mov_ps(__mmask16 k, __m512 a) { return mask_mov_ps(setzero_ps(), k, a); }
inline __m512i mask_mov_epi32(__m512i src, __mmask16 k, __m512i a) {
  i32x16 s = (i32x16)src, x = (i32x16)a;
  for (int i = 0; i < 16; ++i) s[i] = (k >> i & 1) ? x[i] : s[i];
  return (__m512i)s;
}
// the order of GCC's _mm512_reduce_*_ps: halves, then quarters, then pairs
template <typename Op>
inline float reduce_ps(__m512 a, Op op) {
  const f32x16 x = (f32x16)a;
  float t[8], u[4];
  for (int i = 0; i < 8; ++i) t[i] = op(x[8 + i], x[i]);
  for (int i = 0; i < 4; ++i) u[i] = op(t[4 + i], t[i]);
  const float v0 = op(u[0], u[2]), v1 = op(u[1], u[3]);
  return op(v0, v1);
}
inline float reduce_add_ps(__m512 a) { return reduce_ps(a, [](float x, float y) { return x + y; }); }
inline float reduce_max_ps(__m512 a) { return reduce_ps(a, [](float x, float y) { return x > y ? x : y; }); }
inline int mask_reduce_min_epi32(__mmask16 k, __m512i a) {
  const i32x16 x = (i32x16)a;
  int r = std::numeric_limits<int>::max();
  for (int i = 0; i < 16; ++i)
    if ((k >> i & 1) && x[i] < r) r = x[i];
  return r;
}

// ---- shuffles --------------------------------------------------------------------------------
inline __m512 shuffle_f32x4(__m512 a, __m512 b, int imm) {
  const f32x16 x = (f32x16)a, y = (f32x16)b;
  f32x16 r;
  for (int q = 0; q < 4; ++q) {
    const f32x16& from = q < 2 ? x : y;
    const int sel = (imm >> (2 * q)) & 3;
    for (int i = 0; i < 4; ++i) r[4 * q + i] = from[4 * sel + i];
  }
  return (__m512)r;
}
inline __m512 unpack_ps(__m512 a, __m512 b, int hi) {
  const f32x16 x = (f32x16)a, y = (f32x16)b;
  f32x16 r;
  for (int l = 0; l < 4; ++l) {
    r[4 * l + 0] = x[4 * l + 2 * hi];
    r[4 * l + 1] = y[4 * l + 2 * hi];
    r[4 * l + 2] = x[4 * l + 2 * hi + 1];
    r[4 * l + 3] = y[4 * l + 2 * hi + 1];
  }
  return (__m512)r;
}
inline __m512 unpacklo_ps(__m512 a, __m512 b) { return unpack_ps(a, b, 0); }
inline __m512 unpackhi_ps(__m512 a, __m512 b) { return unpack_ps(a, b, 1); }
inline __m512d unpack_pd(__m512d a, __m512d b, int hi) {
  __m512d r;
  for (int l = 0; l < 4; ++l) r[2 * l] = a[2 * l + hi], r[2 * l + 1] = b[2 * l + hi];
  return r;
}
inline __m512d unpacklo_pd(__m512d a, __m512d b) { return unpack_pd(a, b, 0); }
inline __m512d unpackhi_pd(__m512d a, __m512d b) { return unpack_pd(a, b, 1); }
inline __m512i permutexvar_epi16(__m512i idx, __m512i a) {
  const u16x32 i16 = (u16x32)idx, x = (u16x32)a;
  u16x32 r;
  for (int i = 0; i < 32; ++i) r[i] = x[i16[i] & 31];
  return (__m512i)r;
}
inline __m512i permutex2var_epi16(__m512i a, __m512i idx, __m512i b) {
  const u16x32 i16 = (u16x32)idx, x = (u16x32)a, y = (u16x32)b;
  u16x32 r;
  for (int i = 0; i < 32; ++i) r[i] = (i16[i] & 32) ? y[i16[i] & 31] : x[i16[i] & 31];
  return (__m512i)r;
}

// ---- conversions -----------------------------------------------------------------------------
inline __m512i cvtepu16_epi32(__m256i a) {
  const u16x16 x = (u16x16)a;
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = x[i];
  return (__m512i)r;
}
inline __m256bh cvtneps_pbh(__m512 a) {
  const f32x16 x = (f32x16)a;
  u16x16 r;
  for (int i = 0; i < 16; ++i) r[i] = to_bf16(x[i]);
  return (__m256bh)r;
}
inline __m512bh cvtne2ps_pbh(__m512 a, __m512 b) {  // b's lanes first, then a's
  const f32x16 x = (f32x16)a, y = (f32x16)b;
  u16x32 r;
  for (int i = 0; i < 16; ++i) r[i] = to_bf16(y[i]), r[16 + i] = to_bf16(x[i]);
  return (__m512bh)r;
}
inline __m512 dpbf16_ps(__m512 src, __m512bh a, __m512bh b) {
  const u16x32 x = (u16x32)a, y = (u16x32)b;
  f32x16 r = (f32x16)src;
  for (int j = 0; j < 16; ++j) {
    r[j] = daz(std::fma(from_bf16(x[2 * j + 1]), from_bf16(y[2 * j + 1]), r[j]));
    r[j] = daz(std::fma(from_bf16(x[2 * j]), from_bf16(y[2 * j]), r[j]));
  }
  return (__m512)r;
}

// ---- AMX: eight tile registers per thread, configured by LDTILECFG's 64-byte layout ---------
struct Tiles {
  uint8_t rows[8] = {};
  uint16_t colsb[8] = {};
  alignas(64) unsigned char data[8][16][64] = {};
};
inline Tiles& tiles() {
  static thread_local Tiles t;
  return t;
}
inline void tile_loadconfig(const void* config) {
  const unsigned char* c = static_cast<const unsigned char*>(config);
  Tiles& t = tiles();
  for (int i = 0; i < 8; ++i) {
    std::memcpy(&t.colsb[i], c + 16 + 2 * i, 2);
    t.rows[i] = c[48 + i];
  }
  std::memset(t.data, 0, sizeof(t.data));
}
inline void tile_release() { tiles() = Tiles(); }
inline void tile_zero(int dst) { std::memset(tiles().data[dst], 0, sizeof(tiles().data[dst])); }
inline void tile_loadd(int dst, const void* base, int64_t stride) {
  Tiles& t = tiles();
  std::memset(t.data[dst], 0, sizeof(t.data[dst]));
  for (int r = 0; r < t.rows[dst]; ++r)
    std::memcpy(t.data[dst][r], static_cast<const char*>(base) + r * stride, t.colsb[dst]);
}
inline void tile_stored(int src, void* base, int64_t stride) {
  Tiles& t = tiles();
  for (int r = 0; r < t.rows[src]; ++r) std::memcpy(static_cast<char*>(base) + r * stride, t.data[src][r], t.colsb[src]);
}
// TDPBF16PS: dst[m][n] += a[m][2k] * b[k][2n] + a[m][2k+1] * b[k][2n+1], over k
inline void tile_dpbf16ps(int dst, int a, int b) {
  Tiles& t = tiles();
  const int M = t.rows[dst], N = t.colsb[dst] / 4, K = t.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    float c[16];
    uint16_t ar[32];
    std::memcpy(c, t.data[dst][m], 64);
    std::memcpy(ar, t.data[a][m], 64);
    for (int k = 0; k < K; ++k) {
      uint16_t br[32];
      std::memcpy(br, t.data[b][k], 64);
      const float a0 = from_bf16(ar[2 * k]), a1 = from_bf16(ar[2 * k + 1]);
      for (int n = 0; n < N; ++n) {
        c[n] = daz(std::fma(a0, from_bf16(br[2 * n]), c[n]));
        c[n] = daz(std::fma(a1, from_bf16(br[2 * n + 1]), c[n]));
      }
    }
    std::memcpy(t.data[dst][m], c, 64);
  }
}

// TDPBSUD: dst[m][n] += sum over k of the 4 products a[m][4k + i] (signed) x b[k][4n + i] (unsigned)
inline void tile_dpbsud(int dst, int a, int b) {
  Tiles& t = tiles();
  const int M = t.rows[dst], N = t.colsb[dst] / 4, K = t.colsb[a] / 4;
  for (int m = 0; m < M; ++m) {
    int32_t c[16];
    std::memcpy(c, t.data[dst][m], 64);
    for (int k = 0; k < K; ++k)
      for (int n = 0; n < N; ++n) {
        int32_t sum = 0;
        for (int i = 0; i < 4; ++i)
          sum += int32_t(static_cast<int8_t>(t.data[a][m][4 * k + i])) * int32_t(t.data[b][k][4 * n + i]);
        c[n] = static_cast<int32_t>(static_cast<uint32_t>(c[n]) + static_cast<uint32_t>(sum));
      }
    std::memcpy(t.data[dst][m], c, 64);
  }
}

// ---- integer: the 8-bit matmul (VNNI) ---------------------------------------------------------
typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef int8_t i8x64 __attribute__((vector_size(64)));
inline __m512i set1_epi8(char x) { u8x64 r; for (int i = 0; i < 64; ++i) r[i] = static_cast<uint8_t>(x); return (__m512i)r; }
inline __m512i and_si512(__m512i a, __m512i b) { return (__m512i)((u32x16)a & (u32x16)b); }
inline __m512i srli_epi16(__m512i a, unsigned imm) {
  return imm > 15 ? setzero_si512() : (__m512i)((u16x32)a >> static_cast<uint16_t>(imm));
}
inline __m512 cvtepi32_ps(__m512i a) {
  i32x16 x = (i32x16)a;
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = static_cast<float>(x[i]);
  return (__m512)r;
}
// VPDPBUSD: each 32-bit lane += the sum of its 4 (unsigned a byte x signed b byte) products, wrapping
inline __m512i dpbusd_epi32(__m512i src, __m512i a, __m512i b) {
  u8x64 ua = (u8x64)a;
  i8x64 sb = (i8x64)b;
  i32x16 r = (i32x16)src;
  for (int i = 0; i < 16; ++i) {
    int32_t sum = 0;
    for (int j = 0; j < 4; ++j) sum += int32_t(ua[4 * i + j]) * int32_t(sb[4 * i + j]);
    r[i] = static_cast<int32_t>(static_cast<uint32_t>(r[i]) + static_cast<uint32_t>(sum));
  }
  return (__m512i)r;
}

}  // namespace x86emu

// The intrinsics' names, now the functions above (some are macros in GCC's headers: undefined first).
#undef _mm512_set1_ps
#define _mm512_set1_ps x86emu::set1_ps
#undef _mm512_setzero_ps
#define _mm512_setzero_ps x86emu::setzero_ps
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 x86emu::set1_epi32
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 x86emu::setzero_si512
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 x86emu::setr_epi32
#undef _mm512_loadu_ps
#define _mm512_loadu_ps x86emu::loadu_ps
#undef _mm512_load_ps
#define _mm512_load_ps x86emu::loadu_ps
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 x86emu::loadu_si512
#undef _mm512_load_si512
#define _mm512_load_si512 x86emu::loadu_si512
#undef _mm512_storeu_ps
#define _mm512_storeu_ps x86emu::storeu_ps
#undef _mm512_store_ps
#define _mm512_store_ps x86emu::storeu_ps
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 x86emu::storeu_si512
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps x86emu::maskz_loadu_ps
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps x86emu::mask_storeu_ps
#undef _mm512_i32scatter_epi32
#define _mm512_i32scatter_epi32 x86emu::i32scatter_epi32
#undef _mm512_add_ps
#define _mm512_add_ps x86emu::add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps x86emu::sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps x86emu::mul_ps
#undef _mm512_max_ps
#define _mm512_max_ps x86emu::max_ps
#undef _mm512_min_ps
#define _mm512_min_ps x86emu::min_ps
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps x86emu::fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps x86emu::fnmadd_ps
#undef _mm512_rcp14_ps
#define _mm512_rcp14_ps x86emu::rcp14_ps
#undef _mm512_scalef_ps
#define _mm512_scalef_ps x86emu::scalef_ps
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps x86emu::roundscale_ps
#undef _mm512_add_epi32
#define _mm512_add_epi32 x86emu::add_epi32
#undef _mm512_mullo_epi32
#define _mm512_mullo_epi32 x86emu::mullo_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 x86emu::slli_epi32
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask x86emu::cmp_ps_mask
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps x86emu::mask_mov_ps
#undef _mm512_maskz_mov_ps
#define _mm512_maskz_mov_ps x86emu::maskz_mov_ps
#undef _mm512_mask_mov_epi32
#define _mm512_mask_mov_epi32 x86emu::mask_mov_epi32
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps x86emu::reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps x86emu::reduce_max_ps
#undef _mm512_mask_reduce_min_epi32
#define _mm512_mask_reduce_min_epi32 x86emu::mask_reduce_min_epi32
#undef _mm512_shuffle_f32x4
#define _mm512_shuffle_f32x4 x86emu::shuffle_f32x4
#undef _mm512_unpacklo_ps
#define _mm512_unpacklo_ps x86emu::unpacklo_ps
#undef _mm512_unpackhi_ps
#define _mm512_unpackhi_ps x86emu::unpackhi_ps
#undef _mm512_unpacklo_pd
#define _mm512_unpacklo_pd x86emu::unpacklo_pd
#undef _mm512_unpackhi_pd
#define _mm512_unpackhi_pd x86emu::unpackhi_pd
#undef _mm512_permutexvar_epi16
#define _mm512_permutexvar_epi16 x86emu::permutexvar_epi16
#undef _mm512_permutex2var_epi16
#define _mm512_permutex2var_epi16 x86emu::permutex2var_epi16
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps(a) ((__m512)(a))
#undef _mm512_castps_pd
#define _mm512_castps_pd(a) ((__m512d)(a))
#undef _mm512_castpd_ps
#define _mm512_castpd_ps(a) ((__m512)(a))
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 x86emu::cvtepu16_epi32
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh x86emu::cvtneps_pbh
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh x86emu::cvtne2ps_pbh
#undef _mm512_dpbf16_ps
#define _mm512_dpbf16_ps x86emu::dpbf16_ps
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 x86emu::set1_epi8
#undef _mm512_and_si512
#define _mm512_and_si512 x86emu::and_si512
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 x86emu::srli_epi16
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps x86emu::cvtepi32_ps
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 x86emu::dpbusd_epi32
#undef _tile_loadconfig
#define _tile_loadconfig x86emu::tile_loadconfig
#undef _tile_release
#define _tile_release x86emu::tile_release
#undef _tile_zero
#define _tile_zero x86emu::tile_zero
#undef _tile_loadd
#define _tile_loadd x86emu::tile_loadd
#undef _tile_stored
#define _tile_stored x86emu::tile_stored
#undef _tile_dpbsud
#define _tile_dpbsud x86emu::tile_dpbsud
#undef _tile_dpbf16ps
#define _tile_dpbf16ps x86emu::tile_dpbf16ps
