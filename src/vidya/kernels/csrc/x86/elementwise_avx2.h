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

}  // namespace vidya
