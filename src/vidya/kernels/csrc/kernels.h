// The dispatch table's shape: for one ISA level, the kernel each op runs for each case, or
// nullptr where the level has none (the op then runs its portable C++). Which level's table the
// ops read is bound once (bind_isa, from vidya/platform.py); dispatch.h builds the tables from
// each ISA's files. The ops check only the shape contract written beside each entry.
#pragma once
#include "common.h"

namespace vidya {

// A prefill tile's working memory (x86/attention_avx512bf16.h, x86/attention_amx.h), one per thread.
struct TileScratch {
  std::vector<float> scores;                 // [cmax][16]
  std::vector<uint32_t> pairs;               // [(cmax + 1) / 2][16]: (P[t], P[t+1]) per row
  std::vector<at::BFloat16> vpairs;          // [(cmax + 1) / 2][D][2]
  std::vector<const at::BFloat16*> keys;     // [cmax] key addresses
  std::vector<const at::BFloat16*> values;   // [cmax] value addresses
  std::vector<uint32_t> pa;                  // AMX: P as A tiles, [chunks of 32 keys][16 rows][16 pairs]
};

// One (row, kv head) of paged attention: attend_one's contract (attention_generic.h), G fixed by the pick.
using AttendRowBF16 = void (*)(const at::BFloat16* q, const at::BFloat16* kc, const at::BFloat16* vc,
                               const int64_t* table, int64_t ctx, int64_t off0, int64_t kvh_index, int64_t D,
                               int64_t BS, int64_t KVH, float scale, float* scores, at::BFloat16* out);
using AttendRowF32BF16 = void (*)(const float* q, const at::BFloat16* kc, const at::BFloat16* vc,
                                  const int64_t* table, int64_t ctx, int64_t off0, int64_t kvh_index, int64_t G,
                                  int64_t D, int64_t BS, int64_t KVH, float scale, float* scores, float* out);
// Up to 16 consecutive query rows of one sequence from position 0 (row i sees c0 + i keys).
using AttendTileBF16 = void (*)(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t G,
                                const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table, int64_t c0,
                                int64_t kvh_index, int64_t BS, int64_t KVH, float scale, TileScratch& ws,
                                at::BFloat16* out, int64_t out_stride);
// R rows (1..6) of x times one 16-column strip of packed 16-bit weights (x86/gemm_avx2.h's layout).
using W16Tile = void (*)(const float* x, int64_t ldx, const at::BFloat16* strip, int64_t K, const float* bias16,
                         float* y, int64_t ldy, int64_t n_valid);

// Rows of x quantized for the 8-bit matmul (quant_gemm.h): q int8 [rows][ldq]; xs (the scales)
// [rows][K / sub]; xt (the zero term's sum of scale * q) [rows][K / group].
struct QActs {
  const int8_t* q;
  int64_t ldq;
  const float* xs;
  const float* xt;
};
constexpr int64_t kQRows = 4;      // rows a tile takes at most (the AMX one: kQMaxRows)
constexpr int64_t kQMaxRows = 16;
constexpr int64_t kQSub = 32;  // k per integer sub-block (quant_gemm.h)
// Up to q_rows (kQRows, or kQMaxRows on AMX) rows of quantized x times one 16-column strip of 4/8-bit codes (quant_gemm.h's layout
// and order of arithmetic); acc [rows][16].
using QTile = void (*)(int64_t rows, const QActs& a, const uint8_t* strip, const float* ws, const float* wz,
                       int64_t K, int64_t group, float* acc);

struct Kernels {
  // ---- paged attention (attention.h)
  AttendRowBF16 (*attend_row_bf16)(int64_t G) = nullptr;            // D % 64 == 0; nullptr for a G it lacks
  AttendTileBF16 (*attend_tile_bf16)(int64_t D, int64_t BS) = nullptr;  // nullptr for a D (or BS) it lacks
  AttendRowF32BF16 attend_row_f32_bf16 = nullptr;                   // D % 8 == 0
  float (*exp_sum)(float* s, int64_t n, float m) = nullptr;         // s = e^(s - m) in place; their sum
  // ---- elementwise (elementwise.h); the bf16 rows need n % 16 == 0 (RoPE: head_dim % 32 == 0)
  void (*add_rms_norm_bf16)(at::BFloat16* x, at::BFloat16* residual, const at::BFloat16* w, int64_t n, float eps,
                            bool add, float* scratch) = nullptr;
  void (*silu_and_mul_bf16)(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o, int64_t n) = nullptr;
  void (*silu_and_mul_f32)(const float* g, const float* u, float* o, int64_t n) = nullptr;
  void (*rotary_bf16)(at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t heads,
                      int64_t D) = nullptr;
  int64_t (*argmax_bf16)(const at::BFloat16* x, int64_t n) = nullptr;  // 1 <= n < 2^31
  int64_t (*argmax_f32)(const float* x, int64_t n) = nullptr;          // 1 <= n < 2^31
  // ---- GEMM (gemm.h: fp32 rows times 16-bit weight strips; x86/gemm_amx.h: AMX)
  W16Tile (*w16_tile)(int64_t rows) = nullptr;                       // rows 1..6
  void (*widen_strip)(const at::BFloat16* strip, int64_t K, float* buf, int64_t ld) = nullptr;
  // one fp32 row of x quantized (quant_gemm.h's quantize_row's contract); sub % 8 == 0
  void (*q_quantize_row)(const float* x, int64_t K, int64_t sub, int64_t group, bool per_token, int8_t* q,
                         float* xs, float* xt) = nullptr;
  QTile (*q_tile)(int64_t bits) = nullptr;                           // bits 4 or 8; group % 8 == 0
  int64_t q_rows = kQRows;                                           // rows its tiles take (<= kQMaxRows)
  bool amx = false;                                                  // the AMX matmul and tiles
};

}  // namespace vidya
