// The 8-bit matmul's tile on AMX-INT8 (../quant_gemm.h: the layout and the order of arithmetic):
// TDPBSUD multiplies a tile of int8 activations (up to 16 rows x one 32-k sub-block) by a tile of
// unsigned codes (the sub-block's 8 k-quads x 16 columns, which is the strip's own byte layout, so
// 8-bit codes load straight from the strip; 4-bit ones are split into their nibbles first), each
// sub-block's 32-bit sums then scaled into the float sums on AVX-512.
#pragma once
#include "../kernels.h"
#include "amx.h"

namespace vidya {

#ifndef VIDYA_AMX_INT8  // (x86/emulated.h defines it empty)
#define VIDYA_AMX_INT8 __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl")))
#endif

template <int Bits>
VIDYA_AMX_INT8 void q_tile_amx(int64_t rows, const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                               int64_t K, int64_t group, float* acc) {
  const int64_t sub = std::min(group, kQSub), ng = K / group, nb = K / sub;
  TileConfig cfg;
  cfg.rows[0] = static_cast<uint8_t>(rows), cfg.colsb[0] = 64;                  // C: rows x 16 int32
  cfg.rows[1] = static_cast<uint8_t>(rows), cfg.colsb[1] = static_cast<uint16_t>(sub);  // A: rows x sub int8
  cfg.rows[2] = static_cast<uint8_t>(sub / 4), cfg.colsb[2] = 64;               // B: sub / 4 quads x 16 x 4
  _tile_loadconfig(&cfg);
  alignas(64) int32_t c[16 * 16];
  alignas(64) uint8_t codes[(kQSub / 4) * 64];
  const __m512i low = _mm512_set1_epi8(0x0F);
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(acc + r * 16, _mm512_setzero_ps());
  for (int64_t g = 0; g < ng; ++g) {
    const __m512 wsg = _mm512_loadu_ps(ws + g * 16);
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
      const uint8_t* b = strip + (k0 / 4) * 64;
      if constexpr (Bits == 4) {  // quad 2j: the low nibbles of step j's 64 bytes; quad 2j + 1: the high ones
        for (int64_t j = 0; j < sub / 8; ++j) {
          const __m512i v = _mm512_loadu_si512(strip + (k0 / 8 + j) * 64);
          _mm512_storeu_si512(codes + (2 * j) * 64, _mm512_and_si512(v, low));
          _mm512_storeu_si512(codes + (2 * j + 1) * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
        }
        b = codes;
      }
      _tile_zero(0);
      _tile_loadd(1, a.q + k0, a.ldq);
      _tile_loadd(2, b, 64);
      _tile_dpbsud(0, 1, 2);
      _tile_stored(0, c, 64);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 s = _mm512_mul_ps(wsg, _mm512_set1_ps(a.xs[r * nb + k0 / sub]));
        const __m512 d = _mm512_cvtepi32_ps(_mm512_loadu_si512(c + r * 16));
        _mm512_storeu_ps(acc + r * 16, _mm512_fmadd_ps(d, s, _mm512_loadu_ps(acc + r * 16)));
      }
    }
    const __m512 wzg = _mm512_loadu_ps(wz + g * 16);
    for (int64_t r = 0; r < rows; ++r)
      _mm512_storeu_ps(acc + r * 16, _mm512_fnmadd_ps(wzg, _mm512_set1_ps(a.xt[r * ng + g]),
                                                      _mm512_loadu_ps(acc + r * 16)));
  }
  _tile_release();
}

inline QTile q_tile_amx_for(int64_t bits) { return bits == 8 ? &q_tile_amx<8> : &q_tile_amx<4>; }

}  // namespace vidya
