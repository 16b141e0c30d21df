// The 8-bit integer matmul: y = x W^T (+ bias) with W held as 4- or 8-bit codes (vidya's quantized
// layout, vidya/models/quant.py) and x quantized to int8 at run time, so the products are integer
// dot products (AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd), as llama.cpp runs its quantized formats.
//
//   W[n, k] = (c[n, k] - z[n, g]) * ws[n, g]     g = k / group; codes c unsigned (0..15 or 0..255)
//   x[m, k] ~ q[m, k] * xs[m, b]                  b = k / sub, sub = min(group, kQSub): q int8,
//                                                 xs = max |x| / 127 over the block (act_per_token:
//                                                 over the whole token, the W8A8 checkpoints' way)
//   y[m, n] = sum_g [ sum_b ws xs_b (sum_k c q) ]  -  (ws z) (sum_b xs_b sum_k q)
//
// The order of the float arithmetic is fixed, so that every ISA level gives the same bits as the
// portable tile below: within a group, the integer dot product of each sub-block is scaled and
// added (fma(dot, ws * xs_b, acc)), then the group's zero term (fma(-ws z, xt_g, acc), xt_g the
// sum over its blocks of xs_b * sum q, added in order); then the bias. (32 k also bounds AVX2's
// 16-bit partial sums: 8 products of a code <= 15 and |q| <= 127, two a lane, stay below 2^15.)
//
// Weights are packed once (vidya/ops/cpu.py, `pack_q8`) into strips of 16 output columns:
//   8-bit  [S][K / 4][16][4]  bytes: four consecutive k of one column per 32-bit lane (VNNI's order)
//   4-bit  [S][K / 8][16][4]  the low nibbles hold k 8j .. 8j + 3, the high ones k 8j + 4 .. 8j + 7
//   ws, wz [S][G][16] float   the scale and scale * zero of each group (0 for padding columns)
#pragma once
#include "dispatch.h"

namespace vidya {

// The code of column c at k in a strip (the layout above).
template <int Bits>
inline int32_t q_code(const uint8_t* strip, int64_t k, int c) {
  if constexpr (Bits == 8) return strip[(k / 4) * 64 + c * 4 + (k % 4)];
  const uint8_t b = strip[(k / 8) * 64 + c * 4 + (k % 4)];
  return (k % 8) < 4 ? (b & 15) : (b >> 4);
}

// The portable tile: `rows` rows of quantized x against one strip; acc [rows][16].
template <int Bits>
void q_tile_portable(int64_t rows, const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                     int64_t K, int64_t group, float* acc) {
  const int64_t sub = std::min(group, kQSub), ng = K / group, nb = K / sub;
  for (int64_t r = 0; r < rows; ++r) {
    const int8_t* q = a.q + r * a.ldq;
    for (int c = 0; c < 16; ++c) {
      float f = 0.f;
      for (int64_t g = 0; g < ng; ++g) {
        for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
          int32_t dot = 0;
          for (int64_t k = k0; k < k0 + sub; ++k) dot += q_code<Bits>(strip, k, c) * int32_t(q[k]);
          f = std::fma(float(dot), ws[g * 16 + c] * a.xs[r * nb + k0 / sub], f);
        }
        f = std::fma(-wz[g * 16 + c], a.xt[r * ng + g], f);
      }
      acc[r * 16 + c] = f;
    }
  }
}

// One row of x to int8, a block of `sub` k at a time: scale = max |x| / 127 over the block (or the
// whole row: per_token; at least 1e-10 / 127), q = round-half-even(x / scale), as
// vidya/models/quant.py's quantize_activations; xs [K / sub] the blocks' scales, xt [K / group]
// each group's sum over its blocks of scale * (sum of the block's q), in block order.
inline void quantize_row(const float* x, int64_t K, int64_t sub, int64_t group, bool per_token, int8_t* q,
                         float* xs, float* xt) {
  float row_max = 0.f;
  if (per_token)
    for (int64_t k = 0; k < K; ++k) row_max = std::max(row_max, std::fabs(x[k]));
  for (int64_t g = 0; g < K / group; ++g) {
    float t = 0.f;
    for (int64_t k0 = g * group; k0 < (g + 1) * group; k0 += sub) {
      float amax = row_max;
      if (!per_token)
        for (int64_t k = k0; k < k0 + sub; ++k) amax = std::max(amax, std::fabs(x[k]));
      const float scale = std::max(amax, 1e-10f) / 127.f;
      int32_t sum = 0;
      for (int64_t k = k0; k < k0 + sub; ++k) {
        const int32_t v = static_cast<int32_t>(std::min(127.f, std::max(-128.f, std::nearbyint(x[k] / scale))));
        q[k] = static_cast<int8_t>(v);
        sum += v;
      }
      xs[k0 / sub] = scale;
      t += scale * float(sum);
    }
    xt[g] = t;
  }
}

// Every row of x [M, K] (fp32 or bf16, row stride ldx) quantized: q [M][K], xs [M][K / sub], xt [M][K / group].
template <typename T>
void quantize_rows(const T* x, int64_t ldx, int64_t M, int64_t K, int64_t sub, int64_t group, bool per_token,
                   int8_t* q, float* xs, float* xt) {
  const int64_t ng = K / group, nb = K / sub;
  const auto row = kernels().q_quantize_row ? kernels().q_quantize_row : &quantize_row;
  at::parallel_for(0, M, 8, [&](int64_t m0, int64_t m1) {
    std::vector<float> wide(std::is_same_v<T, float> ? 0 : K);
    for (int64_t m = m0; m < m1; ++m) {
      const float* xr;
      if constexpr (std::is_same_v<T, float>) {
        xr = x + m * ldx;
      } else {
        for (int64_t k = 0; k < K; ++k) wide[k] = to_f(x[m * ldx + k]);
        xr = wide.data();
      }
      row(xr, K, sub, group, per_token, q + m * K, xs + m * nb, xt + m * ng);
    }
  });
}

// y [M, N] = x [M, K] W^T (+ bias): x fp32 or bf16 rows (y in x's dtype), W packed as above.
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& ws, const at::Tensor& wz,
                     const c10::optional<at::Tensor>& bias, int64_t N, int64_t bits, int64_t group,
                     bool act_per_token) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16) &&
              x.stride(1) == 1, "linear_q8: x must be fp32 or bf16 [M, K] rows");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(bits == 4 || bits == 8, "linear_q8: bits must be 4 or 8");
  TORCH_CHECK(group > 0 && K % group == 0 && group % 8 == 0, "linear_q8: the group (", group,
              ") must divide K (", K, ") and be a multiple of 8");
  const int64_t S = (N + 15) / 16, ng = K / group, sub = std::min(group, kQSub), nb = K / sub;
  TORCH_CHECK(N > 0 && packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.dim() == 2 &&
              packed.size(0) == S && packed.size(1) == K * bits * 2,
              "linear_q8: weight must be uint8 packed as [ceil(N / 16), K * bits * 2] (pack_q8)");
  for (const at::Tensor* t : {&ws, &wz})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 3 && t->size(0) == S &&
                t->size(1) == ng && t->size(2) == 16, "linear_q8: scales must be fp32 [ceil(N / 16), K / group, 16]");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == N),
              "linear_q8: bias must be fp32 [N]");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  std::vector<int8_t> q(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M * nb)), xt(static_cast<size_t>(M * ng));
  if (x.scalar_type() == at::kFloat)
    quantize_rows(x.data_ptr<float>(), x.stride(0), M, K, sub, group, act_per_token, q.data(), xs.data(), xt.data());
  else
    quantize_rows(x.data_ptr<at::BFloat16>(), x.stride(0), M, K, sub, group, act_per_token, q.data(), xs.data(), xt.data());
  const Kernels& k = kernels();
  const QTile tile = k.q_tile ? k.q_tile(bits) : nullptr;
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  const float* wsp = ws.data_ptr<float>();
  const float* wzp = wz.data_ptr<float>();
  const float* bp = bias ? bias->data_ptr<float>() : nullptr;
  float* y32 = x.scalar_type() == at::kFloat ? y.data_ptr<float>() : nullptr;
  at::BFloat16* y16 = y32 ? nullptr : y.data_ptr<at::BFloat16>();
  at::parallel_for(0, S, 1, [&](int64_t s0, int64_t s1) {
    alignas(64) float acc[kQMaxRows * 16];
    const int64_t step = tile ? k.q_rows : kQRows;
    for (int64_t s = s0; s < s1; ++s) {
      const uint8_t* strip = wp + s * K * bits * 2;
      const float* sws = wsp + s * ng * 16;
      const float* swz = wzp + s * ng * 16;
      const int64_t n0 = s * 16, nv = std::min<int64_t>(16, N - n0);
      for (int64_t m = 0; m < M; m += step) {
        const int64_t rows = std::min(step, M - m);
        const QActs a{q.data() + m * K, K, xs.data() + m * nb, xt.data() + m * ng};
        if (tile) tile(rows, a, strip, sws, swz, K, group, acc);
        else if (bits == 8) q_tile_portable<8>(rows, a, strip, sws, swz, K, group, acc);
        else q_tile_portable<4>(rows, a, strip, sws, swz, K, group, acc);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < nv; ++c) {
            const float v = bp ? acc[r * 16 + c] + bp[n0 + c] : acc[r * 16 + c];
            if (y32) y32[(m + r) * N + n0 + c] = v;
            else y16[(m + r) * N + n0 + c] = at::BFloat16(v);
          }
      }
    }
  });
  return y;
}

}  // namespace vidya
