// Prefill attention tiles on AMX (K tiles straight from the cache, P as A tiles, V pairs as B tiles).
#pragma once
#include "../kernels.h"
#include "amx.h"
#include "attention_avx512bf16.h"

namespace vidya {

// The same tile on AMX (BS % 16 == 0, so 16 consecutive keys are one tile of the cache with a
// fixed row stride): S^T[keys x rows] = K Q^T with Q^T as the B tile (the pairs layout above),
// the softmax as above on S^T's rows, then O = P V with P scattered into A tiles and V's key
// pairs as B tiles. Same arithmetic: fp32 sums of bf16 products, P rounded to bf16.
template <int NC>
VIDYA_AMX void attend_tile_amx(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t G,
                               const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table, int64_t c0,
                               int64_t kvh_index, int64_t BS, int64_t KVH, float scale, TileScratch& ws,
                               at::BFloat16* out, int64_t out_stride) {
  constexpr int D = NC * 16;
  const int64_t cmax = c0 + nrows - 1, token_stride = KVH * D;
  const int64_t ktiles = (cmax + 15) / 16, chunks = (cmax + 31) / 32, npairs = (cmax + 1) / 2;
  ws.scores.resize(static_cast<size_t>(ktiles) * 256);
  ws.vpairs.assign(static_cast<size_t>(chunks) * 16 * 2 * D, at::BFloat16(0.f));
  ws.pa.assign(static_cast<size_t>(chunks) * 256, 0u);
  collect_addresses(ws, kc, vc, table, cmax, kvh_index, BS, token_stride, D);
  pack_value_pairs(ws.values, cmax, D, ws.vpairs.data());  // the rest stays zero: whole 32-key chunks
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  const __m512i row16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* S = ws.scores.data();
  alignas(64) float obuf[16 * D];
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) uint32_t qt[D / 2][16];
    transpose_q_pairs(q, q_stride, nrows, g, D, &qt[0][0]);
    // S^T, 16 keys a tile: K rows straight from the cache block
    _tile_loadd(2, qt[0], 64);
    _tile_loadd(3, qt[16], 64);
    if constexpr (D == 128) { _tile_loadd(4, qt[32], 64); _tile_loadd(5, qt[48], 64); }
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int64_t t0 = kt * 16;
      const at::BFloat16* k = kc + (table[t0 / BS] * BS + t0 % BS) * token_stride + kvh_index * D;
      _tile_zero(0);
      _tile_loadd(1, k, token_stride * 2);
      _tile_dpbf16ps(0, 1, 2);
      _tile_loadd(1, k + 32, token_stride * 2);
      _tile_dpbf16ps(0, 1, 3);
      if constexpr (D == 128) {
        _tile_loadd(1, k + 64, token_stride * 2);
        _tile_dpbf16ps(0, 1, 4);
        _tile_loadd(1, k + 96, token_stride * 2);
        _tile_dpbf16ps(0, 1, 5);
      }
      _tile_stored(0, S + t0 * 16, 64);
    }
    // scale, causal mask, max per row (lane)
    __m512 mv = neg_inf;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < cmax; ++t) {
      const __m512 sv = _mm512_mask_mov_ps(neg_inf, visible_rows(t, c0), _mm512_mul_ps(_mm512_loadu_ps(S + t * 16), sc));
      _mm512_storeu_ps(S + t * 16, sv);
      mv = _mm512_max_ps(mv, sv);
    }
    // P in key pairs, scattered into the A tiles: pa[chunk][row][pair in chunk]
    __m512 sum = _mm512_setzero_ps();
    uint32_t* PA = ws.pa.data();
    for (int64_t pp = 0; pp < npairs; ++pp)
      _mm512_i32scatter_epi32(PA + (pp / 16) * 256 + (pp % 16), row16, exp_pair(S, 2 * pp, cmax, c0, mv, sum), 4);
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    // O = P V, 64 output dims (4 C tiles) at a time
    for (int d0 = 0; d0 < D; d0 += 64) {
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t j = 0; j < chunks; ++j) {
        _tile_loadd(0, PA + j * 256, 64);
        const at::BFloat16* vb = ws.vpairs.data() + j * 16 * 2 * D + 2 * d0;
        _tile_loadd(1, vb, 4 * D);
        _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(2, vb + 32, 4 * D);
        _tile_dpbf16ps(5, 0, 2);
        _tile_loadd(3, vb + 64, 4 * D);
        _tile_dpbf16ps(6, 0, 3);
        _tile_loadd(1, vb + 96, 4 * D);
        _tile_dpbf16ps(7, 0, 1);
      }
      _tile_stored(4, obuf + d0, D * 4);
      _tile_stored(5, obuf + d0 + 16, D * 4);
      _tile_stored(6, obuf + d0 + 32, D * 4);
      _tile_stored(7, obuf + d0 + 48, D * 4);
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const __m512 inv = _mm512_set1_ps(1.f / sums[i]);
      at::BFloat16* o = out + i * out_stride + g * D;
      for (int c = 0; c < NC; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(obuf + i * D + 16 * c), inv)));
    }
  }
  _tile_release();
}

// AMX tiles where 16 consecutive keys are one tile of the cache (BS % 16 == 0); else AVX-512 BF16's
inline AttendTileBF16 pick_tile_amx(int64_t D, int64_t BS) {
  if (BS % 16 != 0) return pick_tile_bf16(D, BS);
  switch (D) {
    case 64: return &attend_tile_amx<4>;
    case 128: return &attend_tile_amx<8>;
    default: return nullptr;
  }
}

}  // namespace vidya
