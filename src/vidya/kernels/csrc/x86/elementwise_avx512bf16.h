// AVX-512 BF16 rows of the elementwise ops (norm, SiLU*up, RoPE) and the argmax of a bf16 row.
#pragma once
#include "avx512bf16.h"

namespace vidya {

// AVX-512 BF16 versions of the three ops for bf16 rows (the serving dtype on such CPUs).
VIDYA_AVX512BF16 inline __m512 round_bf16(__m512 x) {
  __m256bh b = _mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16));
}

VIDYA_AVX512BF16 inline void store_bf16(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

VIDYA_AVX512BF16 void add_rms_norm_row_bf16(at::BFloat16* xr, at::BFloat16* rr, const at::BFloat16* w, int64_t n,
                                            float eps, bool add, float* h) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = bf16x16_to_f32(xr + i);
    if (add) {
      v = round_bf16(_mm512_add_ps(bf16x16_to_f32(rr + i), v));
      store_bf16(rr + i, v);
    }
    _mm512_storeu_ps(h + i, v);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += 16)
    store_bf16(xr + i, _mm512_mul_ps(bf16x16_to_f32(w + i), round_bf16(_mm512_mul_ps(_mm512_loadu_ps(h + i), inv))));
}

VIDYA_AVX512BF16 void silu_and_mul_row_bf16(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = bf16x16_to_f32(g + i);
    // x / (1 + e^-x) with a reciprocal estimate and one Newton step (division is the slowest op here)
    const __m512 d = _mm512_add_ps(one, exp512_neg_capped(x));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
    const __m512 silu = _mm512_mul_ps(x, r);
    store_bf16(o + i, _mm512_mul_ps(round_bf16(silu), bf16x16_to_f32(u + i)));
  }
}

VIDYA_AVX512BF16 void rotary_row_bf16(at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t heads,
                                      int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, x += D) {
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 a = bf16x16_to_f32(x + i), b = bf16x16_to_f32(x + i + half);
      const __m512 c_lo = bf16x16_to_f32(c + i), c_hi = bf16x16_to_f32(c + i + half);
      const __m512 s_lo = bf16x16_to_f32(s + i), s_hi = bf16x16_to_f32(s + i + half);
      const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, c_lo)),
                                      round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), s_lo)));
      const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, c_hi)), round_bf16(_mm512_mul_ps(a, s_hi)));
      store_bf16(x + i, lo);
      store_bf16(x + i + half, hi);
    }
  }
}

// Index of the first maximum of each row (torch.max(dim=-1).indices), bf16 rows on AVX-512.
VIDYA_AVX512BF16 int64_t argmax_row_bf16(const at::BFloat16* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = bf16x16_to_f32(x + i);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly greater: first per lane
    best = _mm512_mask_mov_ps(best, gt, v);
    best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
  }
  float m = _mm512_reduce_max_ps(best);
  int64_t at = 0;  // a row of -inf: its first element
  if (m > -std::numeric_limits<float>::infinity()) {
    const __mmask16 eq = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    at = _mm512_mask_reduce_min_epi32(eq, best_i);
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > m) m = v, at = i;
  }
  return at;
}

}  // namespace vidya
