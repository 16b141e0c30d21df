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
// Decode-sized batches (M <= kW16SmallM) run a 6 x 16 register-tiled kernel per strip (12 fp32
// accumulators, x broadcast a row at a time; a strip, 16 x K bf16, stays in L1 while every
// 6-row tile of x passes over it). Bigger batches widen a chunk of strips into a [K, n] fp32
// buffer (it is W^T, row-major) and let torch's fp32 GEMM multiply it: widening costs K x n
// per chunk against 2 M K n flops.
#pragma once
#include "../common.h"
#include <ATen/ThreadLocalState.h>

namespace vidya {

constexpr int64_t kW16SmallM = 96;

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

using W16Tile = void (*)(const float*, int64_t, const at::BFloat16*, int64_t, const float*, float*, int64_t, int64_t);
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

// y[M, N] = x[M, K] W^T (+ bias); x fp32 rows, W packed as above, bias fp32 [N] or none.
at::Tensor linear_w16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                      int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "linear_w16: x must be fp32 [M, K] rows");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(1) == x.size(1) && N > 0 && (N + 15) / 16 == packed.size(0),
              "linear_w16: weight must be bf16 packed as [ceil(N / 16), K, 16] (pack_w16)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear_w16: bias must be fp32 [N]");
  TORCH_CHECK(isa_at_least(kAvx2), "linear_w16 needs AVX2");
  const int64_t M = x.size(0), K = x.size(1), S = packed.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const at::BFloat16* wp = packed.data_ptr<at::BFloat16>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  const float* xp = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  float* yp = y.data_ptr<float>();
  if (M <= kW16SmallM) {
    // bias padded to whole strips (the kernel reads 16 at a time)
    std::vector<float> bias16;
    if (bp) {
      bias16.assign(static_cast<size_t>(S * 16), 0.f);
      std::memcpy(bias16.data(), bp, sizeof(float) * N);
    }
    at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t n_valid = std::min<int64_t>(16, N - s * 16);
        for (int64_t m = 0; m < M; m += 6) {
          const int64_t rows = std::min<int64_t>(6, M - m);
          w16_tile_for(rows)(xp + m * ldx, ldx, wp + s * K * 16, K, bp ? bias16.data() + s * 16 : nullptr,
                             yp + m * N + s * 16, N, n_valid);
        }
      }
    });
    return y;
  }
  // prefill-sized: widen ~4 MB of strips at a time, then one fp32 GEMM over all threads
  const int64_t chunk = std::max<int64_t>(1, (int64_t(1) << 20) / (16 * K));  // strips per chunk
  const int64_t width = std::min(chunk, S) * 16;
  at::Tensor buf = at::empty({K, width}, x.options());
  float* bd = buf.data_ptr<float>();
  for (int64_t s0 = 0; s0 < S; s0 += chunk) {
    const int64_t ns = std::min(chunk, S - s0), n0 = s0 * 16, n = std::min(ns * 16, N - n0);
    at::parallel_for(0, ns, 1, [&](int64_t a, int64_t b) {
      for (int64_t s = a; s < b; ++s) widen_strip(wp + (s0 + s) * K * 16, K, bd + s * 16, width);
    });
    const at::Tensor wt = buf.narrow(1, 0, n);
    at::Tensor yc = y.narrow(1, n0, n);
    if (bias) at::addmm_out(yc, bias->narrow(0, n0, n), x, wt);
    else at::mm_out(yc, x, wt);
  }
  return y;
}

}  // namespace vidya
