// Paged attention for one (row, kv head) work item in portable C++ (any dtype, fp32 arithmetic):
// the path every CPU runs (on x86 compiled for AVX-512, AVX2 and the baseline by target_clones).
#pragma once
#include "dispatch.h"

namespace vidya {

// q and out in T, the cache in TC (fp32 rows over a bf16 cache on CPUs without bf16 math). The
// row attends to `ctx` keys from key `off0` of table[0]'s block on (the row kernels' contract:
// off0 > 0 where a sliding window starts mid-block; the caller moves `table` to its first block).
// `exp_sum`: the bound level's softmax exponentials (the dispatch table's), or nullptr.
template <typename T, typename TC = T>
#if VIDYA_X86
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void attend_one(const T* __restrict q, const TC* __restrict kc, const TC* __restrict vc,
                const int64_t* __restrict table, int64_t ctx, int64_t off0, int64_t kvh_index, int64_t G,
                int64_t D, int64_t BS, int64_t KVH, float scale, float* __restrict scores,
                T* __restrict out, float (*exp_sum)(float*, int64_t, float)) {
  float qf[kMaxGroup * kMaxDim];
  float acc[kMaxGroup * kMaxDim];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(q[g * D + d]) * scale;
  const int64_t token_stride = KVH * D;
  // scores[g * ctx + t] = q_g . k_t
  for (int64_t t = 0, off = off0, blk = 0; t < ctx; ++t, ++off) {
    if (off == BS) off = 0, ++blk;
    const TC* k = kc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    float kf[kMaxDim];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kf[d] = to_f(k[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
      scores[g * ctx + t] = s;
    }
  }
  float inv_sum[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) m = sg[t] > m ? sg[t] : m;
    float sum = 0.f;
    if (exp_sum) {
      sum = exp_sum(sg, ctx, m);
    } else {
      for (int64_t t = 0; t < ctx; ++t) {
        sg[t] = std::exp(sg[t] - m);
        sum += sg[t];
      }
    }
    inv_sum[g] = 1.f / sum;
  }
  std::memset(acc, 0, sizeof(float) * G * D);
  for (int64_t t = 0, off = off0, blk = 0; t < ctx; ++t, ++off) {
    if (off == BS) off = 0, ++blk;
    const TC* v = vc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    float vf[kMaxDim];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) vf[d] = to_f(v[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * ctx + t];
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] * inv_sum[g]);
}

}  // namespace vidya
