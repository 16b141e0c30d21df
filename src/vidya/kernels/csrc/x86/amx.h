// AMX tile configuration and the OS permission check (Linux hands out tile state on request).
#pragma once
#include "../common.h"

namespace vidya {

#ifndef VIDYA_AMX  // (x86/emulated.h defines it empty)
#define VIDYA_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))
#endif

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

}  // namespace vidya
