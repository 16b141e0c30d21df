// The AVX-512 BF16 level's row of the dispatch table (dispatch.h): bf16 rows and prefill tiles;
// the 8-bit matmul on VNNI.
#pragma once
#include "../kernels.h"
#include "attention_avx512bf16.h"
#include "elementwise_avx512bf16.h"
#include "quant_gemm_avx512vnni.h"

namespace vidya {

inline void add_avx512bf16(Kernels& k) {
  k.attend_row_bf16 = &pick_bf16_kernel;
  k.attend_tile_bf16 = &pick_tile_bf16;
  k.add_rms_norm_bf16 = &add_rms_norm_row_bf16;
  k.silu_and_mul_bf16 = &silu_and_mul_row_bf16;
  k.rotary_bf16 = &rotary_row_bf16;
  k.argmax_bf16 = &argmax_row_bf16;
  k.q_tile = &q_tile_vnni_for;  // (every CPU with AVX-512 BF16 has VNNI; cpu_isa() checks)
}

}  // namespace vidya
