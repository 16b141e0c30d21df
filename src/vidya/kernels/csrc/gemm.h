// The GEMM for CPUs without bf16 math: fp32 rows times weights held in 16 bits, packed once
// into strips of 16 output columns (vidya/ops/cpu.py, `pack_w16`; the layout and the kernels:
// x86/gemm_avx2.h). Small (decode) batches run the level's register tiles strip by strip; big
// ones widen ~4 MB of strips at a time and let torch's fp32 GEMM multiply them.
#pragma once
#include "dispatch.h"

namespace vidya {

constexpr int64_t kW16SmallM = 96;

// y[M, N] = x[M, K] W^T (+ bias); x fp32 rows, W packed as above, bias fp32 [N] or none.
at::Tensor linear_w16(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                      int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.stride(1) == 1, "linear_w16: x must be fp32 [M, K] rows");
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
              packed.size(2) == 16 && packed.size(1) == x.size(1) && N > 0 && (N + 15) / 16 == packed.size(0),
              "linear_w16: weight must be bf16 packed as [ceil(N / 16), K, 16] (pack_w16)");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear_w16: bias must be fp32 [N]");
  const Kernels& k = kernels();
  TORCH_CHECK(k.w16_tile && k.widen_strip, "linear_w16: the bound ISA level has no 16-bit strip kernels "
              "(AVX2 and above do)");
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
          k.w16_tile(rows)(xp + m * ldx, ldx, wp + s * K * 16, K, bp ? bias16.data() + s * 16 : nullptr,
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
      for (int64_t s = a; s < b; ++s) k.widen_strip(wp + (s0 + s) * K * 16, K, bd + s * 16, width);
    });
    const at::Tensor wt = buf.narrow(1, 0, n);
    at::Tensor yc = y.narrow(1, n0, n);
    if (bias) at::addmm_out(yc, bias->narrow(0, n0, n), x, wt);
    else at::mm_out(yc, x, wt);
  }
  return y;
}

}  // namespace vidya
