// Paged attention on AVX-512 BF16 (VDPBF16PS): decode rows (one query row per work item) and
// prefill tiles of up to 16 rows in vector lanes.
#pragma once
#include "../kernels.h"
#include "avx512bf16.h"

namespace vidya {

// D a multiple of 64; G (query heads per kv head) a compile-time constant so the accumulators
// live in registers. Same contract as attend_one.
template <int G>
VIDYA_AVX512BF16 void attend_bf16_avx512(const at::BFloat16* __restrict q, const at::BFloat16* __restrict kc,
                                         const at::BFloat16* __restrict vc, const int64_t* __restrict table,
                                         int64_t ctx, int64_t off0, int64_t kvh_index, int64_t D, int64_t BS,
                                         int64_t KVH, float scale, float* __restrict scores,
                                         at::BFloat16* __restrict out) {
  const int64_t token_stride = KVH * D;
  // QK^T for 16 tokens at a time: 16 partial-sum vectors per head, then one transposing
  // reduction (hsum16) instead of 16 horizontal ones.
  const int64_t C = D / 32;
  // token -> address walks the block table with counters (an integer division per token costs
  // more than its dot products)
  const at::BFloat16* kp_all[16 + 16];
  int64_t blk = 0, off = off0;
  auto key_at = [&](void) {
    const at::BFloat16* p = kc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    if (++off == BS) off = 0, ++blk;
    return p;
  };
  for (int64_t j = 0; j < 16 && j < ctx; ++j) kp_all[j] = key_at();
  for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
    const int64_t n = ctx - t0 < 16 ? ctx - t0 : 16;
    // the next tile's addresses, prefetched while this tile computes
    for (int64_t j = 0; j < 16 && t0 + 16 + j < ctx; ++j) {
      const at::BFloat16* p = key_at();
      kp_all[16 + j] = p;
      for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
      // and its values into L2 for the P V pass: more requests in flight for this memory-bound loop
      const char* pv = reinterpret_cast<const char*>(vc + (p - kc));
      for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(pv + b, _MM_HINT_T1);
    }
    const at::BFloat16* kp[16];
    for (int64_t j = 0; j < 16; ++j) kp[j] = kp_all[j < n ? j : 0];
    for (int g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + g * D + c * 32);
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], qc, (__m512bh)_mm512_loadu_si512(kp[j] + c * 32));
      }
      const __m512 sv = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * ctx + t0, (__mmask16)((1u << n) - 1), sv);
    }
    for (int64_t j = 0; j < 16; ++j) kp_all[j] = kp_all[16 + j];
  }
  float inv_sum[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sg + t));
    float m = _mm512_reduce_max_ps(mv);
    for (; t < ctx; ++t) m = sg[t] > m ? sg[t] : m;
    mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= ctx; t += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mv));
      _mm512_storeu_ps(sg + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < ctx) {
      const __mmask16 mask = (__mmask16)((1u << (ctx - t)) - 1);
      __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + t), mv));
      _mm512_mask_storeu_ps(sg + t, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // P V, 64 output dims at a time: G x 4 accumulators in registers.
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0, off = off0, blk = 0; t < ctx; ++t, ++off) {
      if (off == BS) off = 0, ++blk;
      const at::BFloat16* v = vc + (table[blk] * BS + off) * token_stride + kvh_index * D + d0;
      if (off == 0 && blk + 1 < (off0 + ctx + BS - 1) / BS) {  // start of a block: fetch the next block's values
        const at::BFloat16* nv = vc + table[blk + 1] * BS * token_stride + kvh_index * D + d0;
        for (int64_t j = 0; j < BS; ++j)
          for (int64_t b = 0; b < 128; b += 64) _mm_prefetch(reinterpret_cast<const char*>(nv + j * token_stride) + b, _MM_HINT_T0);
      }
      __m512 vf[4];
      for (int c = 0; c < 4; ++c) vf[c] = bf16x16_to_f32(v + c * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * ctx + t]);
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(inv_sum[g]);
      for (int c = 0; c < 4; ++c) {
        __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], s));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + d0 + c * 16), (__m256i)packed);
      }
    }
  }
}

// the decode row for G query heads per kv head (the dispatch table's attend_row_bf16)
inline AttendRowBF16 pick_bf16_kernel(int64_t G) {
  switch (G) {
    case 1: return &attend_bf16_avx512<1>;
    case 2: return &attend_bf16_avx512<2>;
    case 3: return &attend_bf16_avx512<3>;
    case 4: return &attend_bf16_avx512<4>;
    case 5: return &attend_bf16_avx512<5>;
    case 6: return &attend_bf16_avx512<6>;
    case 7: return &attend_bf16_avx512<7>;
    case 8: return &attend_bf16_avx512<8>;
    default: return nullptr;
  }
}

// Prefill tiles: up to 16 consecutive query rows of one sequence (row i attends to c0 + i cached
// tokens) against one kv head, with the 16 rows in the 16 lanes of a vector. QK^T: Q transposed
// into dimension pairs once, each key's pair broadcast from the cache (VDPBF16PS, no horizontal
// sums). Scores in fp32, softmax per lane, P rounded to bf16 like the reference's probs.to(v.dtype).
// PV: V repacked once per tile into key pairs (VNNI order), P broadcast pairwise per row.

// The K and V addresses of a tile's first cmax keys (kv head kvh_index), from the block table.
inline void collect_addresses(TileScratch& ws, const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table,
                              int64_t cmax, int64_t kvh_index, int64_t BS, int64_t token_stride, int64_t D) {
  ws.keys.resize(cmax);
  ws.values.resize(cmax);
  for (int64_t t = 0, blk = 0, off = 0; t < cmax; ++t) {
    const int64_t base = (table[blk] * BS + off) * token_stride + kvh_index * D;
    ws.keys[t] = kc + base;
    ws.values[t] = vc + base;
    if (++off == BS) off = 0, ++blk;
  }
}

// V in key pairs (VNNI order): for pair pp, D x (V[2pp][d], V[2pp+1][d]); zero past cmax.
VIDYA_AVX512BF16 void pack_value_pairs(const std::vector<const at::BFloat16*>& values, int64_t cmax, int64_t D,
                                       at::BFloat16* dst) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int64_t pp = 0; pp < (cmax + 1) / 2; ++pp, dst += 2 * D) {
    const at::BFloat16* a = values[2 * pp];
    const at::BFloat16* b = 2 * pp + 1 < cmax ? values[2 * pp + 1] : nullptr;
    for (int64_t c = 0; c < D / 32; ++c) {
      const __m512i va = _mm512_loadu_si512(a + 32 * c);
      const __m512i vb = b ? _mm512_loadu_si512(b + 32 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 64 * c, _mm512_permutex2var_epi16(va, ilo, vb));
      _mm512_storeu_si512(dst + 64 * c + 32, _mm512_permutex2var_epi16(va, ihi, vb));
    }
  }
}

// Q of head g for the tile's rows, transposed into dimension pairs: qt[p * 16 + i] = (Q[i][2p], Q[i][2p+1])
inline void transpose_q_pairs(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t g, int64_t D,
                              uint32_t* qt) {
  for (int64_t p = 0; p < D / 2; ++p)
    for (int64_t i = 0; i < 16; ++i) {
      uint32_t v = 0;
      if (i < nrows) std::memcpy(&v, q + i * q_stride + g * D + 2 * p, 4);
      qt[p * 16 + i] = v;
    }
}

// lanes (rows) that may see key t: all when t < c0, else rows i > t - c0 (row i sees c0 + i keys)
inline __mmask16 visible_rows(int64_t t, int64_t c0) {
  return t < c0 ? (__mmask16)0xFFFF : (__mmask16)(0xFFFFu & ~((2u << (t - c0)) - 1u));
}

// (e0[i], e1[i]) as bf16 pairs, lane i = row i
VIDYA_AVX512BF16 inline __m512i pair_rows(__m512 e0, __m512 e1) {
  alignas(64) static const uint16_t pair_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(pair_idx), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
}

// exp(S[t] - max) and exp(S[t+1] - max) per row (zero where masked or past cmax), added to sum
// and returned as bf16 pairs: the P operand of P V
VIDYA_AVX512BF16 inline __m512i exp_pair(const float* S, int64_t t, int64_t cmax, int64_t c0, __m512 mv, __m512& sum) {
  const __m512 e0 = _mm512_maskz_mov_ps(visible_rows(t, c0), exp512(_mm512_sub_ps(_mm512_loadu_ps(S + t * 16), mv)));
  const __m512 e1 = t + 1 < cmax
      ? _mm512_maskz_mov_ps(visible_rows(t + 1, c0), exp512(_mm512_sub_ps(_mm512_loadu_ps(S + (t + 1) * 16), mv)))
      : _mm512_setzero_ps();
  sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
  return pair_rows(e0, e1);
}

template <int NC>  // NC = D / 16
VIDYA_AVX512BF16 void attend_tile_bf16(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t G,
                                       const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table,
                                       int64_t c0, int64_t kvh_index, int64_t BS, int64_t KVH, float scale,
                                       TileScratch& ws, at::BFloat16* out, int64_t out_stride) {
  constexpr int D = NC * 16, QG = 16 / NC;  // QG rows x NC vectors of accumulators in pass 3
  const int64_t cmax = c0 + nrows - 1, npairs = (cmax + 1) / 2, token_stride = KVH * D;
  ws.scores.resize(static_cast<size_t>(cmax) * 16);
  ws.pairs.resize(static_cast<size_t>(npairs) * 16);
  ws.vpairs.resize(static_cast<size_t>(npairs) * 2 * D);
  collect_addresses(ws, kc, vc, table, cmax, kvh_index, BS, token_stride, D);
  pack_value_pairs(ws.values, cmax, D, ws.vpairs.data());
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* S = ws.scores.data();
  uint32_t* P = ws.pairs.data();
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) uint32_t qt[D / 2][16];
    transpose_q_pairs(q, q_stride, nrows, g, D, &qt[0][0]);
    // pass 1: scores, 8 keys at a time, and the running max per row
    __m512 mv = neg_inf;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < cmax; t0 += 8) {
      const int64_t nk = cmax - t0 < 8 ? cmax - t0 : 8;
      const at::BFloat16* kp[8];
      for (int j = 0; j < 8; ++j) kp[j] = ws.keys[t0 + (j < nk ? j : 0)];
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
      for (int p = 0; p < D / 2; ++p) {
        const __m512bh qv = (__m512bh)_mm512_load_si512(qt[p]);
        for (int j = 0; j < 8; ++j) {
          int32_t kpair;
          std::memcpy(&kpair, kp[j] + 2 * p, 4);
          acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_set1_epi32(kpair));
        }
      }
      for (int j = 0; j < nk; ++j) {
        const __m512 s = _mm512_mask_mov_ps(neg_inf, visible_rows(t0 + j, c0), _mm512_mul_ps(acc[j], sc));
        _mm512_storeu_ps(S + (t0 + j) * 16, s);
        mv = _mm512_max_ps(mv, s);
      }
    }
    // pass 2: P = exp(S - max) in key pairs (bf16), row sums in fp32
    __m512 sum = _mm512_setzero_ps();
    for (int64_t pp = 0; pp < npairs; ++pp) _mm512_storeu_si512(P + pp * 16, exp_pair(S, 2 * pp, cmax, c0, mv, sum));
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    // pass 3: O = P V, QG rows at a time
    for (int64_t r0 = 0; r0 < nrows; r0 += QG) {
      __m512 acc[QG][NC];
      for (int i = 0; i < QG; ++i)
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
      for (int64_t pp = 0; pp < npairs; ++pp) {
        const at::BFloat16* vp = ws.vpairs.data() + pp * 2 * D;
        __m512bh v[NC];
        for (int c = 0; c < NC; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + 32 * c);
        for (int i = 0; i < QG; ++i) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(P[pp * 16 + r0 + i]));
          for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], v[c], pb);
        }
      }
      for (int i = 0; i < QG && r0 + i < nrows; ++i) {
        const __m512 inv = _mm512_set1_ps(1.f / sums[r0 + i]);
        at::BFloat16* o = out + (r0 + i) * out_stride + g * D;
        for (int c = 0; c < NC; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][c], inv)));
      }
    }
  }
}

// the prefill tile for head_dim D (the dispatch table's attend_tile_bf16)
inline AttendTileBF16 pick_tile_bf16(int64_t D, int64_t BS) {
  (void)BS;
  switch (D) {
    case 64: return &attend_tile_bf16<4>;
    case 128: return &attend_tile_bf16<8>;
    default: return nullptr;
  }
}

}  // namespace vidya
