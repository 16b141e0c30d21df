// AVX2 pieces of the portable attention rows: the softmax's exponentials, 8 at a time (the
// scalar std::exp was most of a decode row's time on AVX2-only CPUs).
#pragma once
#include "avx2.h"

namespace vidya {

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

}  // namespace vidya
