// The AMX level's row of the dispatch table (dispatch.h): AMX prefill tiles, the AMX matmul,
// the 8-bit matmul on AMX-INT8.
#pragma once
#include "../kernels.h"
#include "attention_amx.h"
#include "quant_gemm_amx.h"

namespace vidya {

inline void add_amx(Kernels& k) {
  k.attend_tile_bf16 = &pick_tile_amx;
  k.amx = true;
  k.q_tile = &q_tile_amx_for;  // (AMX-INT8: cpu_isa() checks it beside AMX-BF16)
  k.q_rows = kQMaxRows;
}

}  // namespace vidya
