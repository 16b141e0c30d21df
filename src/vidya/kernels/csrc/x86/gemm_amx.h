// Small-batch bf16 matmul on AMX (decode steps), with SiLU*up and argmax epilogues.
#pragma once
#include "../dispatch.h"
#include "amx.h"
#include "avx512bf16.h"

namespace vidya {

// ---- small-batch bf16 linear on AMX: the decode steps' matmuls --------------------------------
// y[M, N] = x[M, K] W^T (+ bias) for M <= 64. W is packed once into AMX B tiles (VNNI pairs):
// [N / 16][K / 32][16 k-pairs][16 n][2], so each 16-column strip of W is one contiguous stream,
// read once per call. Each k-step loads one B tile and multiplies it with up to four 16-row A
// tiles of x (from L2). oneDNN's general kernel reaches ~60% of memory bandwidth at this shape;
// the weights are the whole cost of a decode step's matmuls.
constexpr int64_t kAmxMaxRows = 64;

at::Tensor amx_pack(const at::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kBFloat16 && w.size(0) % 16 == 0 && w.size(1) % 32 == 0,
              "amx_pack: need a bf16 [N, K] weight with N % 16 == 0 and K % 32 == 0");
  const int64_t N = w.size(0), K = w.size(1);
  at::Tensor wc = w.contiguous();
  at::Tensor out = at::empty({N / 16, K / 32, 16, 32}, w.options());
  const at::BFloat16* src = wc.data_ptr<at::BFloat16>();
  at::BFloat16* dst = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt)
      for (int64_t ks = 0; ks < K / 32; ++ks)
        for (int64_t r = 0; r < 16; ++r)  // k pair
          for (int64_t n = 0; n < 16; ++n)
            for (int64_t j = 0; j < 2; ++j)
              dst[(((nt * (K / 32) + ks) * 16 + r) * 16 + n) * 2 + j] = src[(nt * 16 + n) * K + ks * 32 + 2 * r + j];
  });
  return out;
}

// rows m0.. of a 16x16 fp32 tile (+ bias), rounded once to bf16, into y (row stride N)
VIDYA_AVX512BF16 void store_tile_rows(const float* c, int64_t m0, int64_t M, const float* bias, at::BFloat16* y,
                                      int64_t N) {
  const __m512 bv = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int64_t r = 0; r < 16 && m0 + r < M; ++r)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + r) * N),
                        (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(c + r * 16), bv)));
}

// C[m-tiles m0.., strips nt..] for MH m-tiles x SP strips (2 x 2 at most: 4 C tiles, 2 A, 2 B,
// every tile load feeding two multiplies). x stays in L2, each weight strip streams from memory.
// SiLU(gate) * up from a gate tile and an up tile, rounded as silu_and_mul rounds them
VIDYA_AVX512BF16 void store_silu_rows(const float* gate, const float* up, int64_t m0, int64_t M, at::BFloat16* y,
                                      int64_t N) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < 16 && m0 + r < M; ++r) {
    const __m512 x = round_bf16(_mm512_load_ps(gate + r * 16));
    const __m512 d = _mm512_add_ps(one, exp512_neg_capped(x));
    __m512 rc = _mm512_rcp14_ps(d);
    rc = _mm512_mul_ps(rc, _mm512_fnmadd_ps(d, rc, _mm512_set1_ps(2.f)));
    const __m512 h = _mm512_mul_ps(round_bf16(_mm512_mul_ps(x, rc)), round_bf16(_mm512_load_ps(up + r * 16)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + (m0 + r) * N), (__m256i)_mm512_cvtneps_pbh(h));
  }
}

// Running first maximum of each row over the bf16-rounded values of a tile's columns (lm_head +
// greedy argmax without writing the logits), kept per lane (column mod 16): best[r * 16 + lane],
// best_i likewise; reduced across lanes once at the end (argmax_lanes).
VIDYA_AVX512BF16 void argmax_tile_rows(const float* c, int64_t m0, int64_t M, int64_t col0, float* best,
                                       int32_t* best_i) {
  const __m512i cols = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(col0)),
                                        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  for (int64_t r = 0; r < 16 && m0 + r < M; ++r) {
    float* b = best + (m0 + r) * 16;
    int32_t* bi = best_i + (m0 + r) * 16;
    const __m512 v = round_bf16(_mm512_load_ps(c + r * 16));
    const __m512 bv = _mm512_loadu_ps(b);
    // strictly greater: columns come in increasing order, so each lane keeps its first maximum
    const __mmask16 gt = _mm512_cmp_ps_mask(v, bv, _CMP_GT_OQ);
    _mm512_storeu_ps(b, _mm512_mask_mov_ps(bv, gt, v));
    _mm512_storeu_si512(bi, _mm512_mask_mov_epi32(_mm512_loadu_si512(bi), gt, cols));
  }
}

// (value, column) of a row's first maximum from its 16 lanes
VIDYA_AVX512BF16 std::pair<float, int64_t> argmax_lanes(const float* best, const int32_t* best_i) {
  const __m512 bv = _mm512_loadu_ps(best);
  const float m = _mm512_reduce_max_ps(bv);
  if (!(m > -std::numeric_limits<float>::infinity())) return {m, 0};
  const __mmask16 eq = _mm512_cmp_ps_mask(bv, _mm512_set1_ps(m), _CMP_EQ_OQ);
  return {m, _mm512_mask_reduce_min_epi32(eq, _mm512_loadu_si512(best_i))};
}

// SILU: strip nt is a gate strip, strip nt1 its up strip; y gets SiLU(gate) * up in column strip nt.
// ARGMAX: no y; best / best_i (per row) track the first maximum (SP = 1).
template <int MH, int SP, bool SILU = false, bool ARGMAX = false>
VIDYA_AMX inline void amx_block(const at::BFloat16* x, int64_t K, int64_t m0, const at::BFloat16* wp, int64_t nt,
                                int64_t M, const float* bias, at::BFloat16* y, int64_t N, float* c,
                                int64_t nt1 = -1, float* c2 = nullptr, float* best = nullptr,
                                int32_t* best_i = nullptr) {
  const int64_t KS = K / 32, lda = K * 2;
  const at::BFloat16* b0 = wp + nt * KS * 512;
  const at::BFloat16* b1 = wp + (nt1 >= 0 ? nt1 : nt + 1) * KS * 512;
  const at::BFloat16* a0 = x + m0 * K;
  const at::BFloat16* a1 = a0 + 16 * K;
  _tile_zero(0);
  if constexpr (SP > 1) _tile_zero(1);
  if constexpr (MH > 1) _tile_zero(2);
  if constexpr (MH > 1 && SP > 1) _tile_zero(3);
  for (int64_t ks = 0; ks < KS; ++ks) {
    if (m0 == 0) {  // first pass over these strips: fetch the weight stream ahead
      const char* ahead = reinterpret_cast<const char*>(b0 + (ks + 16) * 512);
      for (int l = 0; l < 1024; l += 64) _mm_prefetch(ahead + l, _MM_HINT_T0);
      if constexpr (SP > 1) {
        const char* ahead1 = reinterpret_cast<const char*>(b1 + (ks + 16) * 512);
        for (int l = 0; l < 1024; l += 64) _mm_prefetch(ahead1 + l, _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a0 + ks * 32, lda);
    _tile_loadd(6, b0 + ks * 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (SP > 1) { _tile_loadd(7, b1 + ks * 512, 64); _tile_dpbf16ps(1, 4, 7); }
    if constexpr (MH > 1) { _tile_loadd(5, a1 + ks * 32, lda); _tile_dpbf16ps(2, 5, 6); }
    if constexpr (MH > 1 && SP > 1) _tile_dpbf16ps(3, 5, 7);
  }
  if constexpr (ARGMAX) {  // strips nt, nt + 1 in column order
    _tile_stored(0, c, 64); argmax_tile_rows(c, m0, M, nt * 16, best, best_i);
    if constexpr (SP > 1) { _tile_stored(1, c, 64); argmax_tile_rows(c, m0, M, nt * 16 + 16, best, best_i); }
    if constexpr (MH > 1) { _tile_stored(2, c, 64); argmax_tile_rows(c, m0 + 16, M, nt * 16, best, best_i); }
    if constexpr (MH > 1 && SP > 1) { _tile_stored(3, c, 64); argmax_tile_rows(c, m0 + 16, M, nt * 16 + 16, best, best_i); }
    return;
  }
  if constexpr (SILU) {
    static_assert(SP == 2, "a gate strip needs its up strip");
    _tile_stored(0, c, 64); _tile_stored(1, c2, 64); store_silu_rows(c, c2, m0, M, y + nt * 16, N);
    if constexpr (MH > 1) { _tile_stored(2, c, 64); _tile_stored(3, c2, 64); store_silu_rows(c, c2, m0 + 16, M, y + nt * 16, N); }
    return;
  }
  const float* bn0 = bias ? bias + nt * 16 : nullptr;
  const float* bn1 = bias ? bias + nt * 16 + 16 : nullptr;
  _tile_stored(0, c, 64); store_tile_rows(c, m0, M, bn0, y + nt * 16, N);
  if constexpr (SP > 1) { _tile_stored(1, c, 64); store_tile_rows(c, m0, M, bn1, y + nt * 16 + 16, N); }
  if constexpr (MH > 1) { _tile_stored(2, c, 64); store_tile_rows(c, m0 + 16, M, bn0, y + nt * 16, N); }
  if constexpr (MH > 1 && SP > 1) { _tile_stored(3, c, 64); store_tile_rows(c, m0 + 16, M, bn1, y + nt * 16 + 16, N); }
}

// strips [nt_begin, nt_end) of y: pairs of strips, for each pair every pair of m-tiles in turn
// (the pair's weights are still in L1/L2 for the second m-pair)
// silu_half > 0: W is [gate | up] with silu_half strips each; strips [nt_begin, nt_end) of the
// gate half are paired with their up strips and y (N = silu_half * 16 columns) gets SiLU(gate) * up.
VIDYA_AMX void amx_strips(const at::BFloat16* x, int64_t K, const at::BFloat16* wp, int64_t nt_begin, int64_t nt_end,
                          int64_t M, const float* bias, at::BFloat16* y, int64_t N, int64_t silu_half = 0,
                          float* best = nullptr, int32_t* best_i = nullptr) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  alignas(64) float c[16 * 16];
  alignas(64) float c2[16 * 16];
  const int64_t MT = (M + 15) / 16;
  if (best != nullptr) {  // argmax: strips in column order, every m-pair per panel
    const int64_t panel = std::max<int64_t>(2, (int64_t(96) * 1024 / (K * 32)) & ~int64_t(1));
    for (int64_t p0 = nt_begin; p0 < nt_end; p0 += panel) {
      const int64_t p1 = std::min(nt_end, p0 + panel);
      for (int64_t m0 = 0; m0 < MT * 16; m0 += 32) {
        const bool two = m0 + 16 < MT * 16;
        for (int64_t nt = p0; nt < p1; nt += 2) {
          const bool pair = nt + 1 < p1;
          if (pair && two) amx_block<2, 2, false, true>(x, K, m0, wp, nt, M, nullptr, nullptr, N, c, -1, nullptr, best, best_i);
          else if (pair) amx_block<1, 2, false, true>(x, K, m0, wp, nt, M, nullptr, nullptr, N, c, -1, nullptr, best, best_i);
          else if (two) amx_block<2, 1, false, true>(x, K, m0, wp, nt, M, nullptr, nullptr, N, c, -1, nullptr, best, best_i);
          else amx_block<1, 1, false, true>(x, K, m0, wp, nt, M, nullptr, nullptr, N, c, -1, nullptr, best, best_i);
        }
      }
    }
    _tile_release();
    return;
  }
  if (silu_half > 0) {
    const int64_t panel = std::max<int64_t>(1, int64_t(48) * 1024 / (K * 32));
    for (int64_t p0 = nt_begin; p0 < nt_end; p0 += panel) {
      const int64_t p1 = std::min(nt_end, p0 + panel);
      for (int64_t m0 = 0; m0 < MT * 16; m0 += 32) {
        const bool two = m0 + 16 < MT * 16;
        for (int64_t nt = p0; nt < p1; ++nt) {
          if (two) amx_block<2, 2, true>(x, K, m0, wp, nt, M, nullptr, y, N, c, nt + silu_half, c2);
          else amx_block<1, 2, true>(x, K, m0, wp, nt, M, nullptr, y, N, c, nt + silu_half, c2);
        }
      }
    }
    _tile_release();
    return;
  }
  // panels of strips small enough to stay in L2 while every m-pair passes over them; within a
  // pass the m-pair's rows of x stay in L1
  const int64_t panel = std::max<int64_t>(2, (int64_t(96) * 1024 / (K * 32)) & ~int64_t(1));
  for (int64_t p0 = nt_begin; p0 < nt_end; p0 += panel) {
    const int64_t p1 = std::min(nt_end, p0 + panel);
    for (int64_t m0 = 0; m0 < MT * 16; m0 += 32) {
      const bool two = m0 + 16 < MT * 16;
      for (int64_t nt = p0; nt < p1; nt += 2) {
        const bool pair = nt + 1 < p1;
        if (pair && two) amx_block<2, 2>(x, K, m0, wp, nt, M, bias, y, N, c);
        else if (pair) amx_block<1, 2>(x, K, m0, wp, nt, M, bias, y, N, c);
        else if (two) amx_block<2, 1>(x, K, m0, wp, nt, M, bias, y, N, c);
        else amx_block<1, 1>(x, K, m0, wp, nt, M, bias, y, N, c);
      }
    }
  }
  _tile_release();
}

at::Tensor amx_linear_impl(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           bool silu);

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias) {
  return amx_linear_impl(x, packed, bias, false);
}

// gate_up [2I, K] packed: SiLU(x Wg^T) * (x Wu^T), [M, I], the same values as silu_and_mul(amx_linear(..))
at::Tensor amx_linear_silu(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(packed.dim() == 4 && packed.size(0) % 2 == 0, "amx_linear_silu: need an even number of strips");
  return amx_linear_impl(x, packed, c10::nullopt, true);
}

// argmax over the columns of x W^T (rounded to bf16), per row, first maximum: the lm_head and
// greedy sampling in one pass, without writing [M, vocab] logits. Same ids as argmax_rows(amx_linear(..)).
at::Tensor amx_linear_argmax(const at::Tensor& x, const at::Tensor& packed) {
  TORCH_CHECK(kernels().amx, "amx_linear_argmax: this CPU (or kernel) offers no AMX");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
              packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && x.size(1) == packed.size(1) * 32 &&
              x.size(0) <= kAmxMaxRows, "amx_linear_argmax: need bf16 x [M <= 64, K] and a weight from amx_pack");
  const int64_t M = x.size(0), K = x.size(1), MT = (M + 15) / 16, strips = packed.size(0);
  at::Tensor out = at::empty({M}, x.options().dtype(at::kLong));
  if (M == 0) return out;
  at::Tensor xp = at::zeros({MT * 16, K}, x.options());
  xp.narrow(0, 0, M).copy_(x);
  const int nth = at::get_num_threads();
  // per thread, per row, per lane: running maximum and its column
  std::vector<float> best(static_cast<size_t>(nth) * M * 16, -std::numeric_limits<float>::infinity());
  std::vector<int32_t> best_i(static_cast<size_t>(nth) * M * 16, 0);
  const at::BFloat16* xd = xp.data_ptr<at::BFloat16>();
  const at::BFloat16* wd = packed.data_ptr<at::BFloat16>();
  int used = 1;
#pragma omp parallel num_threads(nth)
  {
    const int64_t n = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t begin = strips * tid / n, end = strips * (tid + 1) / n;
    if (tid == 0) used = static_cast<int>(n);
    amx_strips(xd, K, wd, begin, end, M, nullptr, nullptr, 0, 0, best.data() + tid * M * 16,
               best_i.data() + tid * M * 16);
  }
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) {  // threads cover increasing columns: the first strict maximum wins
    float b = -std::numeric_limits<float>::infinity();
    int64_t at_ = 0;
    for (int t = 0; t < used; ++t) {
      const auto [v, col] = argmax_lanes(best.data() + (t * M + r) * 16, best_i.data() + (t * M + r) * 16);
      if (v > b) b = v, at_ = col;
    }
    op[r] = at_;
  }
  return out;
}

at::Tensor amx_linear_impl(const at::Tensor& x, const at::Tensor& packed, const c10::optional<at::Tensor>& bias,
                           bool silu) {
  TORCH_CHECK(kernels().amx, "amx_linear: this CPU (or kernel) offers no AMX");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && packed.dim() == 4 &&
              packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() && x.size(1) == packed.size(1) * 32 &&
              x.size(0) <= kAmxMaxRows, "amx_linear: need bf16 x [M <= 64, K] and a weight from amx_pack");
  const int64_t M = x.size(0), K = x.size(1), MT = (M + 15) / 16;
  const int64_t N = packed.size(0) * 16 / (silu ? 2 : 1);  // output columns
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // x padded to whole 16-row tiles (the tiles read 16 rows)
  at::Tensor xp = x;
  if (M % 16 != 0 || !x.is_contiguous()) {
    xp = at::zeros({MT * 16, K}, x.options());
    xp.narrow(0, 0, M).copy_(x);
  }
  at::Tensor bf;
  const float* bp = nullptr;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->numel() == N, "amx_linear: bias size");
    bf = bias->to(at::kFloat).contiguous();
    bp = bf.data_ptr<float>();
  }
  const at::BFloat16* xd = xp.data_ptr<at::BFloat16>();
  const at::BFloat16* wd = packed.data_ptr<at::BFloat16>();
  at::BFloat16* yd = y.data_ptr<at::BFloat16>();
  const int64_t strips = N / 16;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t begin = strips * tid / nth, end = strips * (tid + 1) / nth;
    if (silu)  // strips of the gate half, each with its up strip
      amx_strips(xd, K, wd, begin, end, M, nullptr, yd, N, strips);
    else
      amx_strips(xd, K, wd, begin & ~int64_t(1), tid + 1 == nth ? strips : end & ~int64_t(1), M, bp, yd, N);
  }
  return y;
}

bool amx_available() { return kernels().amx; }

}  // namespace vidya
