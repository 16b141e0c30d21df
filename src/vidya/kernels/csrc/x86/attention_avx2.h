// Paged attention on AVX2: the softmax's exponentials 8 at a time (for the portable rows too),
// and whole rows for fp32 queries over a bf16 cache (what CPUs without bf16 math serve).
#pragma once
#include "avx2.h"

namespace vidya {

// the largest of s[0..n), n >= 1
__attribute__((target("avx2,fma"))) inline float max_avx2(const float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  float m = lanes[0];
  for (int i = 1; i < 8; ++i) m = lanes[i] > m ? lanes[i] : m;
  for (; t < n; ++t) m = s[t] > m ? s[t] : m;
  return m;
}

// s[t] = exp(s[t] - m) for t < n; returns their sum
__attribute__((target("avx2,fma"))) inline float exp_sum_avx2(float* s, int64_t n, float m) {
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  float sum = 0.f;
  for (float v : lanes) sum += v;
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    sum += s[t];
  }
  return sum;
}

// r[j] = the sum of a[j]'s 8 lanes, for 8 vectors (pairwise adds, then the two 128-bit halves)
__attribute__((target("avx2,fma"))) inline __m256 hsum8(const __m256* a) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

__attribute__((target("avx2,fma"))) inline __m256 widen8(const at::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

// P V for query heads [g0, g0 + GC) and dims [d0, d0 + 8 * NC): GC x NC accumulators in registers
// over every key, each value vector widened once for the GC heads.
template <int GC, int NC>
__attribute__((target("avx2,fma"))) void pv_chunk_avx2(const at::BFloat16* vc, const int64_t* table, int64_t ctx,
                                                       int64_t off0, int64_t kvh_index, int64_t D, int64_t BS, int64_t KVH,
                                                       const float* p, const float* inv_sum, int64_t g0, int64_t d0,
                                                       float* out) {
  const int64_t token_stride = KVH * D;
  __m256 acc[GC][NC];
  for (int g = 0; g < GC; ++g)
    for (int c = 0; c < NC; ++c) acc[g][c] = _mm256_setzero_ps();
  for (int64_t t = 0, off = off0, blk = 0; t < ctx; ++t, ++off) {
    if (off == BS) off = 0, ++blk;
    const at::BFloat16* v = vc + (table[blk] * BS + off) * token_stride + kvh_index * D + d0;
    __m256 vv[NC];
    for (int c = 0; c < NC; ++c) vv[c] = widen8(v + 8 * c);
    for (int g = 0; g < GC; ++g) {
      const __m256 pg = _mm256_broadcast_ss(p + (g0 + g) * ctx + t);
      for (int c = 0; c < NC; ++c) acc[g][c] = _mm256_fmadd_ps(pg, vv[c], acc[g][c]);
    }
  }
  for (int g = 0; g < GC; ++g) {
    const __m256 s = _mm256_set1_ps(inv_sum[g0 + g]);
    for (int c = 0; c < NC; ++c) _mm256_storeu_ps(out + (g0 + g) * D + d0 + 8 * c, _mm256_mul_ps(acc[g][c], s));
  }
}

template <int GC>
inline void pv_chunk_avx2_nc(int nc, const at::BFloat16* vc, const int64_t* table, int64_t ctx, int64_t off0,
                             int64_t kvh_index,
                             int64_t D, int64_t BS, int64_t KVH, const float* p, const float* inv_sum, int64_t g0,
                             int64_t d0, float* out) {
  switch (nc) {
    case 1: return pv_chunk_avx2<GC, 1>(vc, table, ctx, off0, kvh_index, D, BS, KVH, p, inv_sum, g0, d0, out);
    case 2: return pv_chunk_avx2<GC, 2>(vc, table, ctx, off0, kvh_index, D, BS, KVH, p, inv_sum, g0, d0, out);
    case 3: return pv_chunk_avx2<GC, 3>(vc, table, ctx, off0, kvh_index, D, BS, KVH, p, inv_sum, g0, d0, out);
    default: return pv_chunk_avx2<GC, 4>(vc, table, ctx, off0, kvh_index, D, BS, KVH, p, inv_sum, g0, d0, out);
  }
}

// One (row, kv head) work item, fp32 q over a bf16 cache (CPUs without bf16 math), D % 8 == 0:
// the same contract as attend_one. Scores 8 keys at a time (the block's keys widened once into
// L1, then 8 accumulators per head and one transposing sum, not a horizontal sum per key), the
// softmax's exponentials 8 at a time, then P V with the accumulators in registers.
__attribute__((target("avx2,fma"))) inline void attend_row_avx2(const float* __restrict q,
                                                                const at::BFloat16* __restrict kc,
                                                                const at::BFloat16* __restrict vc,
                                                                const int64_t* __restrict table, int64_t ctx,
                                                                int64_t off0, int64_t kvh_index, int64_t G, int64_t D, int64_t BS,
                                                                int64_t KVH, float scale, float* __restrict scores,
                                                                float* __restrict out) {
  alignas(32) float qf[kMaxGroup * kMaxDim];
  alignas(32) float kf[8 * kMaxDim];
  for (int64_t i = 0; i < G * D; ++i) qf[i] = q[i] * scale;
  const int64_t token_stride = KVH * D, C = D / 8;
  // a second walker kAhead keys ahead prefetches each key (to L1) and its value (to L2): one
  // key at a time, a row's reads are too few in flight to keep up with memory otherwise
  constexpr int64_t kAhead = 16;
  int64_t pt = 0, poff = off0, pblk = 0;
  auto prefetch_next = [&](int64_t upto) {
    for (; pt < upto && pt < ctx; ++pt) {
      const int64_t at = (table[pblk] * BS + poff) * token_stride + kvh_index * D;
      for (int64_t b = 0; b < D * 2; b += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kc + at) + b, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vc + at) + b, _MM_HINT_T1);
      }
      if (++poff == BS) poff = 0, ++pblk;
    }
  };
  for (int64_t t0 = 0, off = off0, blk = 0; t0 < ctx; t0 += 8) {
    const int64_t n = ctx - t0 < 8 ? ctx - t0 : 8;
    prefetch_next(t0 + 8 + kAhead);
    for (int64_t j = 0; j < 8; ++j) {
      if (j < n) {
        const at::BFloat16* k = kc + (table[blk] * BS + off) * token_stride + kvh_index * D;
        for (int64_t c = 0; c < C; ++c) _mm256_store_ps(kf + j * D + 8 * c, widen8(k + 8 * c));
        if (++off == BS) off = 0, ++blk;
      } else {
        std::memset(kf + j * D, 0, sizeof(float) * D);
      }
    }
    for (int64_t g = 0; g < G; ++g) {
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m256 qv = _mm256_load_ps(qf + g * D + 8 * c);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_load_ps(kf + j * D + 8 * c), acc[j]);
      }
      alignas(32) float s[8];
      _mm256_store_ps(s, hsum8(acc));
      std::memcpy(scores + g * ctx + t0, s, sizeof(float) * n);
    }
  }
  float inv_sum[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    inv_sum[g] = 1.f / exp_sum_avx2(sg, ctx, max_avx2(sg, ctx));
  }
  for (int64_t g0 = 0; g0 < G; g0 += 3)
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      const int nc = static_cast<int>(std::min<int64_t>(4, (D - d0) / 8));
      switch (std::min<int64_t>(3, G - g0)) {
        case 1: pv_chunk_avx2_nc<1>(nc, vc, table, ctx, off0, kvh_index, D, BS, KVH, scores, inv_sum, g0, d0, out); break;
        case 2: pv_chunk_avx2_nc<2>(nc, vc, table, ctx, off0, kvh_index, D, BS, KVH, scores, inv_sum, g0, d0, out); break;
        default: pv_chunk_avx2_nc<3>(nc, vc, table, ctx, off0, kvh_index, D, BS, KVH, scores, inv_sum, g0, d0, out); break;
      }
    }
}

}  // namespace vidya
