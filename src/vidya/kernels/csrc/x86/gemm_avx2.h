// fp32 x bf16-weight matmul for CPUs without bf16 math (AVX2, AVX-512 without BF16): the weights
// stay in 16 bits in memory (half of fp32's RAM and traffic) and are widened to fp32 a panel at a
// time (bf16 -> fp32 is a 16-bit shift), straight into an L2-sized buffer that torch's fp32 GEMM
// (MKL / oneDNN) then multiplies at its full speed:
//
//   W bf16 [N, K] | panel 0 | panel 1 | ... |    each thread: widen panel p -> buf (fp32, L2)
//                                               y[:, panel p] = x @ buf^T (+ bias)
//
// Widening costs K x N shifts per call against 2 M K N flops of GEMM: noise for prefill batches,
// and at decode sizes (M <= 64) it replaces reading twice the bytes from memory.
#pragma once
#include "../common.h"
#include <ATen/ThreadLocalState.h>

namespace vidya {

__attribute__((target("avx2,fma"))) inline void widen_bf16(const at::BFloat16* src, float* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
  }
  for (; i < n; ++i) dst[i] = to_f(src[i]);
}

// A few rows (M <= 8, a lone decode): dot products straight from the bf16 rows, no buffer.
__attribute__((target("avx2,fma"))) inline void dot_rows_w16(const float* x, int64_t M, int64_t K,
                                                             const at::BFloat16* w, int64_t n0, int64_t n1,
                                                             const float* bias, float* y, int64_t N) {
  for (int64_t n = n0; n < n1; ++n) {
    const at::BFloat16* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= K; k += 16) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + k));
        const __m256 lo = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(h)), 16));
        const __m256 hi = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(h, 1)), 16));
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k), lo, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xr + k + 8), hi, a1);
      }
      __m256 a = _mm256_add_ps(a0, a1);
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
      r = _mm_hadd_ps(r, r);
      r = _mm_hadd_ps(r, r);
      float sum = _mm_cvtss_f32(r);
      for (; k < K; ++k) sum += xr[k] * to_f(wr[k]);
      y[m * N + n] = sum + (bias ? bias[n] : 0.f);
    }
  }
}

// y[M, N] = x[M, K] W^T (+ bias); x fp32, W bf16 [N, K] contiguous, bias fp32 or none.
at::Tensor linear_w16(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "linear_w16: x must be fp32 [M, K] rows");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.is_contiguous() && w.size(1) == x.size(1),
              "linear_w16: weight must be contiguous bf16 [N, K]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->numel() == w.size(0)), "linear_w16: bias must be fp32 [N]");
  TORCH_CHECK(isa_at_least(kAvx2), "linear_w16 needs AVX2");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int nth = at::get_num_threads();
  const at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  const at::Tensor xc = x.is_contiguous() ? x : x.contiguous();
  if (M <= 8) {
    const float* bp = bias ? bias->data_ptr<float>() : nullptr;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      dot_rows_w16(xc.data_ptr<float>(), M, K, wp, n0, n1, bp, y.data_ptr<float>(), N);
    });
    return y;
  }
  if (M >= 128) {
    // prefill-sized: widen a few MB of rows at a time and let the GEMM use every thread on them
    const int64_t chunk = std::max<int64_t>(256, ((int64_t(4) << 20) / (4 * K)) / 16 * 16);
    at::Tensor buf = at::empty({std::min(chunk, N), K}, x.options());
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t n = std::min(chunk, N - n0);
      float* bd = buf.data_ptr<float>();
      at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) { widen_bf16(wp + (n0 + r0) * K, bd + r0 * K, (r1 - r0) * K); });
      const at::Tensor panel = buf.narrow(0, 0, n);
      at::Tensor yp = y.narrow(1, n0, n);
      if (bias) at::addmm_out(yp, bias->narrow(0, n0, n), xc, panel.t());
      else at::mm_out(yp, xc, panel.t());
    }
    return y;
  }
  // panels of 16-row multiples whose fp32 copy fits ~96 KiB, and at least 4 per thread
  int64_t nb = std::max<int64_t>(16, (24 * 1024 / K) / 16 * 16);
  while (nb > 16 && (N + nb - 1) / nb < 4 * nth) nb -= 16;
  const int64_t panels = (N + nb - 1) / nb;
  const at::ThreadLocalState tls;  // inference mode, grad mode: the caller's, on every thread
#pragma omp parallel num_threads(nth)
  {
    at::ThreadLocalStateGuard tls_guard(tls);
    std::vector<float> buf(static_cast<size_t>(nb * K));
#pragma omp for schedule(dynamic, 1)
    for (int64_t p = 0; p < panels; ++p) {
      const int64_t n0 = p * nb, n = std::min(nb, N - n0);
      widen_bf16(wp + n0 * K, buf.data(), n * K);
      const at::Tensor panel = at::from_blob(buf.data(), {n, K}, x.options());
      at::Tensor yp = y.narrow(1, n0, n);  // inside a parallel region: the GEMM runs on this thread
      if (bias) at::addmm_out(yp, bias->narrow(0, n0, n), xc, panel.t());
      else at::mm_out(yp, xc, panel.t());
    }
  }
  return y;
}

}  // namespace vidya
