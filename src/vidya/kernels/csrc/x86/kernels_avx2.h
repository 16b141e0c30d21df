// The AVX2 level's row of the dispatch table (dispatch.h): fp32 rows over 16-bit weights and cache;
// the 8-bit matmul on vpmaddubsw.
#pragma once
#include "../kernels.h"
#include "attention_avx2.h"
#include "elementwise_avx2.h"
#include "gemm_avx2.h"
#include "quant_gemm_avx2.h"

namespace vidya {

inline void add_avx2(Kernels& k) {
  k.attend_row_f32_bf16 = &attend_row_avx2;
  k.exp_sum = &exp_sum_avx2;
  k.silu_and_mul_f32 = &silu_and_mul_row_f32;
  k.argmax_f32 = &argmax_row_f32;
  k.w16_tile = &w16_tile_for;
  k.widen_strip = &widen_strip;
  k.q_tile = &q_tile_avx2_for;
  k.q_quantize_row = &quantize_row_avx2;
}

}  // namespace vidya
