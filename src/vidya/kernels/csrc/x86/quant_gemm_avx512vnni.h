// The 8-bit matmul's tile with AVX-512 VNNI (../quant_gemm.h: the layout and the order of
// arithmetic): vpdpbusd multiplies 4 unsigned codes by 4 signed activations and adds them into
// each 32-bit lane (no 16-bit step, no saturation), a 64-byte load being a strip's 16 columns x
// 4 k; 4-bit codes are split into their two nibbles first.
#pragma once
#include "../kernels.h"

namespace vidya {

#ifndef VIDYA_AVX512VNNI  // (x86/emulated.h defines it empty)
#define VIDYA_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#endif

VIDYA_AVX512VNNI inline __m512i q_bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

template <int Bits, int R>
VIDYA_AVX512VNNI void q_tile_vnni_rows(const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                                       int64_t K, int64_t group, float* acc) {
  const int64_t sub = std::min(group, kQSub), ng = K / group, nb = K / sub;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 f[R];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) f[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 wsg = _mm512_loadu_ps(ws + g * 16);
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
      __m512i d[R];
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) d[r] = _mm512_setzero_si512();
      if constexpr (Bits == 4) {
        for (int64_t k = k0; k < k0 + sub; k += 8) {
          const __m512i v = _mm512_loadu_si512(strip + (k / 8) * 64);
          const __m512i c0 = _mm512_and_si512(v, low), c1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const int8_t* q = a.q + r * a.ldq + k;
            d[r] = _mm512_dpbusd_epi32(d[r], c0, q_bcast4_512(q));
            d[r] = _mm512_dpbusd_epi32(d[r], c1, q_bcast4_512(q + 4));
          }
        }
      } else {
        for (int64_t k = k0; k < k0 + sub; k += 4) {
          const __m512i v = _mm512_loadu_si512(strip + (k / 4) * 64);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) d[r] = _mm512_dpbusd_epi32(d[r], v, q_bcast4_512(a.q + r * a.ldq + k));
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r)
        f[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[r]), _mm512_mul_ps(wsg, _mm512_set1_ps(a.xs[r * nb + k0 / sub])), f[r]);
    }
    const __m512 wzg = _mm512_loadu_ps(wz + g * 16);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) f[r] = _mm512_fnmadd_ps(wzg, _mm512_set1_ps(a.xt[r * ng + g]), f[r]);
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * 16, f[r]);
}

template <int Bits>
void q_tile_vnni(int64_t rows, const QActs& a, const uint8_t* strip, const float* ws, const float* wz, int64_t K,
                 int64_t group, float* acc) {
  switch (rows) {
    case 1: return q_tile_vnni_rows<Bits, 1>(a, strip, ws, wz, K, group, acc);
    case 2: return q_tile_vnni_rows<Bits, 2>(a, strip, ws, wz, K, group, acc);
    case 3: return q_tile_vnni_rows<Bits, 3>(a, strip, ws, wz, K, group, acc);
    default: return q_tile_vnni_rows<Bits, 4>(a, strip, ws, wz, K, group, acc);
  }
}

inline QTile q_tile_vnni_for(int64_t bits) { return bits == 8 ? &q_tile_vnni<8> : &q_tile_vnni<4>; }

}  // namespace vidya
