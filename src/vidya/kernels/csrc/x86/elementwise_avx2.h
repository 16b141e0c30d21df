// AVX2 rows of the elementwise ops for fp32 activations (the serving dtype on CPUs without bf16
// math): SiLU * up, whose exponentials were the op's whole time with std::exp.
#pragma once
#include "avx2.h"

namespace vidya {

// o = silu(g) * u = g / (1 + e^-g) * u; e^-g capped at e^88 (finite) where g < -88, so the result
// is ~0 there as it is exactly.
__attribute__((target("avx2,fma"))) inline void silu_and_mul_row_f32(const float* g, const float* u, float* o,
                                                                     int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), cap = _mm256_set1_ps(88.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e = exp256(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), cap));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(x, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + i)));
  }
  for (; i < n; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
}

// The index of the first maximum of x[0..n), NaNs skipped (n >= 1, n < 2^31): a running maximum
// and its index per lane (strictly greater, so each lane keeps its first), then the smallest
// index among the lanes that hold the maximum, then the tail.
__attribute__((target("avx2,fma"))) inline int64_t argmax_row_f32(const float* x, int64_t n) {
  __m256 best = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256i best_i = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), idx = best_i;
  const __m256i step = _mm256_set1_epi32(8);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8, idx = _mm256_add_epi32(idx, step)) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256 gt = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
    best = _mm256_blendv_ps(best, v, gt);
    best_i = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_i), _mm256_castsi256_ps(idx), gt));
  }
  alignas(32) float bv[8];
  alignas(32) int32_t bi[8];
  _mm256_store_ps(bv, best);
  _mm256_store_si256(reinterpret_cast<__m256i*>(bi), best_i);
  float m = bv[0];
  int64_t arg = bi[0];
  for (int l = 1; l < 8; ++l)
    if (bv[l] > m || (bv[l] == m && bi[l] < arg)) m = bv[l], arg = bi[l];
  if (i == 0) m = -std::numeric_limits<float>::infinity(), arg = 0;  // no full vector: the lanes saw nothing
  for (; i < n; ++i)
    if (x[i] > m) m = x[i], arg = i;
  return arg;
}

}  // namespace vidya
