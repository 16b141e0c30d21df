// fp32 x bf16-weight matmul for CPUs without bf16 math (AVX2, AVX-512 without BF16): the weights
// stay in 16 bits in memory (half of fp32's RAM and traffic) and are widened to fp32 in
// registers (bf16 -> fp32 is a 16-bit shift).
//
// Weights are packed once (vidya/ops/cpu.py, `pack_w16`) into strips of 16 output columns, k-major:
//
//   packed [S = ceil(N / 16)][K][16] bf16; in each 16, position 2j holds column j + 8 and 2j + 1
//   column j, so one 32-byte load read as 8 int32 lanes gives columns 0-7 by masking off the low
//   halves and columns 8-15 by shifting them up: two ALU ops for 16 widened weights.
//
// Decode-sized batches (M <= kW16SmallM, gemm.h) run a 6 x 16 register-tiled kernel per strip (12 fp32
// accumulators, x broadcast a row at a time; a strip, 16 x K bf16, stays in L1 while every
// 6-row tile of x passes over it). Bigger batches widen a chunk of strips into a [K, n] fp32
// buffer (it is W^T, row-major) and let torch's fp32 GEMM multiply it: widening costs K x n
// per chunk against 2 M K n flops.
#pragma once
#include "../kernels.h"

namespace vidya {

// 16 widened weights of strip row k: (columns 0-7, columns 8-15)
__attribute__((target("avx2,fma"))) inline void widen16(const at::BFloat16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  hi = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// y[m0 .. m0 + R, cols of strip s] for R <= 6 rows of x (row stride ldx); n_valid <= 16 columns
// stored. The 12 accumulators are named variables: GCC spills an array of them every iteration.
template <int R>
__attribute__((target("avx2,fma"))) void w16_tile(const float* x, int64_t ldx, const at::BFloat16* strip,
                                                  int64_t K, const float* bias, float* y, int64_t ldy,
                                                  int64_t n_valid) {
  __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00;
  __m256 a30 = a00, a31 = a00, a40 = a00, a41 = a00, a50 = a00, a51 = a00;
  const float* x0 = x;
  const float* x1 = x + ldx;
  const float* x2 = x + 2 * ldx;
  const float* x3 = x + 3 * ldx;
  const float* x4 = x + 4 * ldx;
  const float* x5 = x + 5 * ldx;
  for (int64_t k = 0; k < K; ++k) {
    __m256 lo, hi;
    widen16(strip + k * 16, lo, hi);
    __m256 xv = _mm256_broadcast_ss(x0 + k);
    a00 = _mm256_fmadd_ps(xv, lo, a00);
    a01 = _mm256_fmadd_ps(xv, hi, a01);
    if constexpr (R > 1) {
      xv = _mm256_broadcast_ss(x1 + k);
      a10 = _mm256_fmadd_ps(xv, lo, a10);
      a11 = _mm256_fmadd_ps(xv, hi, a11);
    }
    if constexpr (R > 2) {
      xv = _mm256_broadcast_ss(x2 + k);
      a20 = _mm256_fmadd_ps(xv, lo, a20);
      a21 = _mm256_fmadd_ps(xv, hi, a21);
    }
    if constexpr (R > 3) {
      xv = _mm256_broadcast_ss(x3 + k);
      a30 = _mm256_fmadd_ps(xv, lo, a30);
      a31 = _mm256_fmadd_ps(xv, hi, a31);
    }
    if constexpr (R > 4) {
      xv = _mm256_broadcast_ss(x4 + k);
      a40 = _mm256_fmadd_ps(xv, lo, a40);
      a41 = _mm256_fmadd_ps(xv, hi, a41);
    }
    if constexpr (R > 5) {
      xv = _mm256_broadcast_ss(x5 + k);
      a50 = _mm256_fmadd_ps(xv, lo, a50);
      a51 = _mm256_fmadd_ps(xv, hi, a51);
    }
  }
  const __m256 acc[6][2] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}, {a40, a41}, {a50, a51}};
  alignas(32) float tmp[16];
  for (int r = 0; r < R; ++r) {
    __m256 c0 = acc[r][0], c1 = acc[r][1];
    if (bias) {
      c0 = _mm256_add_ps(c0, _mm256_loadu_ps(bias));
      c1 = _mm256_add_ps(c1, _mm256_loadu_ps(bias + 8));
    }
    if (n_valid == 16) {
      _mm256_storeu_ps(y + r * ldy, c0);
      _mm256_storeu_ps(y + r * ldy + 8, c1);
    } else {
      _mm256_store_ps(tmp, c0);
      _mm256_store_ps(tmp + 8, c1);
      std::memcpy(y + r * ldy, tmp, sizeof(float) * n_valid);
    }
  }
}

inline W16Tile w16_tile_for(int64_t rows) {
  static constexpr W16Tile tiles[7] = {nullptr, &w16_tile<1>, &w16_tile<2>, &w16_tile<3>,
                                       &w16_tile<4>, &w16_tile<5>, &w16_tile<6>};
  return tiles[rows];
}

// strip s widened into buf (row-major [K, ld]) at columns s * 16 .. s * 16 + 16
__attribute__((target("avx2,fma"))) inline void widen_strip(const at::BFloat16* strip, int64_t K, float* buf,
                                                            int64_t ld) {
  for (int64_t k = 0; k < K; ++k) {
    __m256 lo, hi;
    widen16(strip + k * 16, lo, hi);
    _mm256_storeu_ps(buf + k * ld, lo);
    _mm256_storeu_ps(buf + k * ld + 8, hi);
  }
}

}  // namespace vidya
