// The AMX level's row of the dispatch table (dispatch.h): AMX prefill tiles and the AMX matmul.
#pragma once
#include "../kernels.h"
#include "attention_amx.h"

namespace vidya {

inline void add_amx(Kernels& k) {
  k.attend_tile_bf16 = &pick_tile_amx;
  k.amx = true;
}

}  // namespace vidya
