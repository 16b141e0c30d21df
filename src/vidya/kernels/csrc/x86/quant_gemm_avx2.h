// The 8-bit matmul's tile on AVX2 (../quant_gemm.h: the layout and the order of arithmetic).
// vpmaddubsw multiplies 32 unsigned codes by 32 signed activations and adds pairs into 16-bit
// lanes. Codes go in a nibble at a time (an 8-bit code as 16 * high + low), so no pair exceeds
// 2 * 15 * 127 and a 32-k sub-block's sums fit in 16 bits; vpmaddwd then folds each column's two
// lanes into its 32-bit sum. Each 32-byte load is 8 columns x 4 k (half a strip's row of lanes).
#pragma once
#include "../kernels.h"

namespace vidya {

#define VIDYA_AVX2_FMA __attribute__((target("avx2,fma")))

VIDYA_AVX2_FMA inline __m256i q_bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc8 = fma(float(dot), ws8 * xs, acc8): one sub-block of 8 columns of one row
VIDYA_AVX2_FMA inline void q_flush8(__m256i dot, const float* ws8, float xs, float* acc8) {
  const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(ws8), _mm256_set1_ps(xs));
  _mm256_storeu_ps(acc8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, _mm256_loadu_ps(acc8)));
}

// the group's zero term: acc -= (ws z) (xs sum q)
template <int R>
VIDYA_AVX2_FMA inline void q_zero_term(const QActs& a, const float* wz, int64_t g, int64_t ng, float* acc) {
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      float* acc8 = acc + r * 16 + h * 8;
      _mm256_storeu_ps(acc8, _mm256_fnmadd_ps(_mm256_loadu_ps(wz + g * 16 + h * 8), _mm256_set1_ps(a.xt[r * ng + g]),
                                              _mm256_loadu_ps(acc8)));
    }
}

// 4-bit: a half strip (8 columns) at a time, its float sums in registers across the groups
// (R = 4: 4 16-bit and 4 float accumulators, 2 code vectors, 2 broadcasts)
template <int R>
VIDYA_AVX2_FMA void q4_tile_avx2_rows(const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                                      int64_t K, int64_t group, float* acc) {
  const int64_t sub = std::min(group, kQSub), ng = K / group, nb = K / sub;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int h = 0; h < 2; ++h) {
    __m256 f[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
      const __m256 wsg = _mm256_loadu_ps(ws + g * 16 + h * 8);
      for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
        __m256i s0[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) s0[r] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k0 + sub; k += 8) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(strip + (k / 8) * 64 + h * 32));
          const __m256i c0 = _mm256_and_si256(v, low), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const int8_t* q = a.q + r * a.ldq + k;
            s0[r] = _mm256_add_epi16(s0[r], _mm256_add_epi16(_mm256_maddubs_epi16(c0, q_bcast4(q)),
                                                             _mm256_maddubs_epi16(c1, q_bcast4(q + 4))));
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r)
          f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s0[r], ones)),
                                 _mm256_mul_ps(wsg, _mm256_set1_ps(a.xs[r * nb + k0 / sub])), f[r]);
      }
      const __m256 wzg = _mm256_loadu_ps(wz + g * 16 + h * 8);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) f[r] = _mm256_fnmadd_ps(wzg, _mm256_set1_ps(a.xt[r * ng + g]), f[r]);
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + r * 16 + h * 8, f[r]);
  }
}

// 8-bit: a half strip (8 columns) at a time, each code as its two nibbles
template <int R>
VIDYA_AVX2_FMA void q8_tile_avx2_rows(const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                                      int64_t K, int64_t group, float* acc) {
  const int64_t sub = std::min(group, kQSub), ng = K / group, nb = K / sub;
  const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  for (int i = 0; i < R * 16; ++i) acc[i] = 0.f;
  for (int64_t g = 0; g < ng; ++g) {
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
      for (int h = 0; h < 2; ++h) {
        __m256i lo[R], hi[R];
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) lo[r] = hi[r] = _mm256_setzero_si256();
        for (int64_t k = k0; k < k0 + sub; k += 4) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(strip + (k / 4) * 64 + h * 32));
          const __m256i c0 = _mm256_and_si256(v, low), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
#pragma GCC unroll 4
          for (int r = 0; r < R; ++r) {
            const __m256i x = q_bcast4(a.q + r * a.ldq + k);
            lo[r] = _mm256_add_epi16(lo[r], _mm256_maddubs_epi16(c0, x));
            hi[r] = _mm256_add_epi16(hi[r], _mm256_maddubs_epi16(c1, x));
          }
        }
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
          const __m256i dot = _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(hi[r], ones), 4),
                                               _mm256_madd_epi16(lo[r], ones));
          q_flush8(dot, ws + g * 16 + h * 8, a.xs[r * nb + k0 / sub], acc + r * 16 + h * 8);
        }
      }
    }
    q_zero_term<R>(a, wz, g, ng, acc);
  }
}

// max |x[k0 .. k1)|, k1 - k0 a multiple of 8
VIDYA_AVX2_FMA inline float q_amax(const float* x, int64_t k0, int64_t k1) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t k = k0; k < k1; k += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// quant_gemm.h's quantize_row, 8 k at a time (the same divisions and roundings, so the same bytes)
VIDYA_AVX2_FMA inline void quantize_row_avx2(const float* x, int64_t K, int64_t sub, int64_t group, bool per_token,
                                             int8_t* q, float* xs, float* xt) {
  const float row_max = per_token ? q_amax(x, 0, K) : 0.f;
  const __m256 lo = _mm256_set1_ps(-128.f), hi = _mm256_set1_ps(127.f);
  for (int64_t g = 0; g < K / group; ++g) {
    float t = 0.f;
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
      const float scale = std::max(per_token ? row_max : q_amax(x, k0, k0 + sub), 1e-10f) / 127.f;
      const __m256 s = _mm256_set1_ps(scale);
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + sub; k += 8) {
        const __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256i i = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
        sum = _mm256_add_epi32(sum, i);
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(w, w));
      }
      __m128i h = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
      h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
      xs[k0 / sub] = scale;
      t += scale * float(_mm_cvtsi128_si32(h));
    }
    xt[g] = t;
  }
}

template <int Bits>
void q_tile_avx2(int64_t rows, const QActs& a, const uint8_t* strip, const float* ws, const float* wz, int64_t K,
                 int64_t group, float* acc) {
  constexpr auto pick = [](auto r) { return Bits == 8 ? &q8_tile_avx2_rows<decltype(r)::value>
                                                     : &q4_tile_avx2_rows<decltype(r)::value>; };
  switch (rows) {
    case 1: return pick(std::integral_constant<int, 1>{})(a, strip, ws, wz, K, group, acc);
    case 2: return pick(std::integral_constant<int, 2>{})(a, strip, ws, wz, K, group, acc);
    case 3: return pick(std::integral_constant<int, 3>{})(a, strip, ws, wz, K, group, acc);
    default: return pick(std::integral_constant<int, 4>{})(a, strip, ws, wz, K, group, acc);
  }
}

inline QTile q_tile_avx2_for(int64_t bits) { return bits == 8 ? &q_tile_avx2<8> : &q_tile_avx2<4>; }

}  // namespace vidya
