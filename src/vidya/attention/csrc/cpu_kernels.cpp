// CPU kernels for vidya: paged attention over a block table, and the fused elementwise ops of a
// Llama layer. Registered as torch ops under `vidya::`; the pure-torch code in
// vidya/attention/paged.py and vidya/models/llama.py is the reference they are tested against.
//
// Paged attention, one kernel for decode and prefill rows alike:
//   q            [T, H, D]          one query row per scheduled token
//   k/v_cache    [NB, BS, KVH, D]   the layer's cache (the row's own K/V already written)
//   block_tables [S, W] int64       block ids of each sequence
//   row_seq      [T] int64          which sequence (row of block_tables) a query row belongs to
//   row_ctx      [T] int64          how many cached tokens the row attends to (its position + 1)
// Work item = (row, kv head): the G = H / KVH query heads that share a kv head read each cached
// K/V vector once; a run of consecutive rows of one sequence (a prefill chunk) is cut into tiles
// of up to 16 rows that share every K/V load (bf16 on AVX-512 BF16). Arithmetic in fp32; inputs
// and output in the cache's dtype (bf16/fp16/fp32).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>
#include <algorithm>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <>
inline float to_f<at::BFloat16>(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}


template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

// Round through T (what storing an intermediate in T does), so fused ops match unfused torch.
template <typename T>
inline float round_as(float x) { return to_f<T>(from_f<T>(x)); }

constexpr int kMaxGroup = 32;
constexpr int kMaxDim = 256;
// consecutive rows of one sequence below this count run row by row, not as a tile
constexpr int64_t kMinTileRows = 4;

template <typename T>
__attribute__((target_clones("avx512f", "avx2", "default")))
void attend_one(const T* __restrict q, const T* __restrict kc, const T* __restrict vc,
                const int64_t* __restrict table, int64_t ctx, int64_t kvh_index, int64_t G,
                int64_t D, int64_t BS, int64_t KVH, float scale, float* __restrict scores,
                T* __restrict out) {
  float qf[kMaxGroup * kMaxDim];
  float acc[kMaxGroup * kMaxDim];
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_f(q[g * D + d]) * scale;
  const int64_t token_stride = KVH * D;
  // scores[g * ctx + t] = q_g . k_t
  for (int64_t t = 0, off = 0, blk = 0; t < ctx; ++t, ++off) {
    if (off == BS) off = 0, ++blk;
    const T* k = kc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    float kf[kMaxDim];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) kf[d] = to_f(k[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = qf + g * D;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t d = 0; d < D; ++d) s += qg[d] * kf[d];
      scores[g * ctx + t] = s;
    }
  }
  float inv_sum[kMaxGroup];
  for (int64_t g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < ctx; ++t) m = sg[t] > m ? sg[t] : m;
    float sum = 0.f;
    for (int64_t t = 0; t < ctx; ++t) {
      sg[t] = std::exp(sg[t] - m);
      sum += sg[t];
    }
    inv_sum[g] = 1.f / sum;
  }
  std::memset(acc, 0, sizeof(float) * G * D);
  for (int64_t t = 0, off = 0, blk = 0; t < ctx; ++t, ++off) {
    if (off == BS) off = 0, ++blk;
    const T* v = vc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    float vf[kMaxDim];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) vf[d] = to_f(v[d]);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * ctx + t];
      float* ag = acc + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ag[d] += p * vf[d];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[g * D + d] = static_cast<T>(acc[g * D + d] * inv_sum[g]);
}


// ---- bf16 on AVX-512 BF16 (VDPBF16PS): the hot path on CPUs that have it ----------------------
#define VIDYA_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

VIDYA_AVX512BF16 inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n * e^r, n = round(x / ln 2), |r| <= ln2 / 2; degree-6 polynomial for e^r.
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

VIDYA_AVX512BF16 inline __m512 bf16x16_to_f32(const at::BFloat16* p) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}


// r[i] = sum of the 16 lanes of v[i], for 16 vectors: pairwise unpacks, then 128-bit lane shuffles.
VIDYA_AVX512BF16 inline __m512 hsum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i)
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {
    const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
    u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// D a multiple of 64; G (query heads per kv head) a compile-time constant so the accumulators
// live in registers. Same contract as attend_one.
template <int G>
VIDYA_AVX512BF16 void attend_bf16_avx512(const at::BFloat16* __restrict q, const at::BFloat16* __restrict kc,
                                         const at::BFloat16* __restrict vc, const int64_t* __restrict table,
                                         int64_t ctx, int64_t kvh_index, int64_t D, int64_t BS, int64_t KVH,
                                         float scale, float* __restrict scores, at::BFloat16* __restrict out) {
  const int64_t token_stride = KVH * D;
  // QK^T for 16 tokens at a time: 16 partial-sum vectors per head, then one transposing
  // reduction (hsum16) instead of 16 horizontal ones.
  const int64_t C = D / 32;
  // token -> address walks the block table with counters (an integer division per token costs
  // more than its dot products)
  const at::BFloat16* kp_all[16 + 16];
  int64_t blk = 0, off = 0;
  auto key_at = [&](void) {
    const at::BFloat16* p = kc + (table[blk] * BS + off) * token_stride + kvh_index * D;
    if (++off == BS) off = 0, ++blk;
    return p;
  };
  for (int64_t j = 0; j < 16 && j < ctx; ++j) kp_all[j] = key_at();
  for (int64_t t0 = 0; t0 < ctx; t0 += 16) {
    const int64_t n = ctx - t0 < 16 ? ctx - t0 : 16;
    // the next tile's addresses, prefetched while this tile computes
    for (int64_t j = 0; j < 16 && t0 + 16 + j < ctx; ++j) {
      const at::BFloat16* p = key_at();
      kp_all[16 + j] = p;
      for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(reinterpret_cast<const char*>(p) + b, _MM_HINT_T0);
      // and its values into L2 for the P V pass: more requests in flight for this memory-bound loop
      const char* pv = reinterpret_cast<const char*>(vc + (p - kc));
      for (int64_t b = 0; b < D * 2; b += 64) _mm_prefetch(pv + b, _MM_HINT_T1);
    }
    const at::BFloat16* kp[16];
    for (int64_t j = 0; j < 16; ++j) kp[j] = kp_all[j < n ? j : 0];
    for (int g = 0; g < G; ++g) {
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) acc[j] = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m512bh qc = (__m512bh)_mm512_loadu_si512(q + g * D + c * 32);
        for (int j = 0; j < 16; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], qc, (__m512bh)_mm512_loadu_si512(kp[j] + c * 32));
      }
      const __m512 sv = _mm512_mul_ps(hsum16(acc), _mm512_set1_ps(scale));
      _mm512_mask_storeu_ps(scores + g * ctx + t0, (__mmask16)((1u << n) - 1), sv);
    }
    for (int64_t j = 0; j < 16; ++j) kp_all[j] = kp_all[16 + j];
  }
  float inv_sum[G];
  for (int g = 0; g < G; ++g) {
    float* sg = scores + g * ctx;
    __m512 mv = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 16 <= ctx; t += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(sg + t));
    float m = _mm512_reduce_max_ps(mv);
    for (; t < ctx; ++t) m = sg[t] > m ? sg[t] : m;
    mv = _mm512_set1_ps(m);
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= ctx; t += 16) {
      __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sg + t), mv));
      _mm512_storeu_ps(sg + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (t < ctx) {
      const __mmask16 mask = (__mmask16)((1u << (ctx - t)) - 1);
      __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + t), mv));
      _mm512_mask_storeu_ps(sg + t, mask, e);
      sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(mask, e));
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // P V, 64 output dims at a time: G x 4 accumulators in registers.
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m512 acc[G][4];
    for (int g = 0; g < G; ++g)
      for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0, off = 0, blk = 0; t < ctx; ++t, ++off) {
      if (off == BS) off = 0, ++blk;
      const at::BFloat16* v = vc + (table[blk] * BS + off) * token_stride + kvh_index * D + d0;
      if (off == 0 && blk + 1 < (ctx + BS - 1) / BS) {  // start of a block: fetch the next block's values
        const at::BFloat16* nv = vc + table[blk + 1] * BS * token_stride + kvh_index * D + d0;
        for (int64_t j = 0; j < BS; ++j)
          for (int64_t b = 0; b < 128; b += 64) _mm_prefetch(reinterpret_cast<const char*>(nv + j * token_stride) + b, _MM_HINT_T0);
      }
      __m512 vf[4];
      for (int c = 0; c < 4; ++c) vf[c] = bf16x16_to_f32(v + c * 16);
      for (int g = 0; g < G; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * ctx + t]);
        for (int c = 0; c < 4; ++c) acc[g][c] = _mm512_fmadd_ps(p, vf[c], acc[g][c]);
      }
    }
    for (int g = 0; g < G; ++g) {
      const __m512 s = _mm512_set1_ps(inv_sum[g]);
      for (int c = 0; c < 4; ++c) {
        __m256bh packed = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][c], s));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * D + d0 + c * 16), (__m256i)packed);
      }
    }
  }
}

using AttendBF16 = void (*)(const at::BFloat16*, const at::BFloat16*, const at::BFloat16*, const int64_t*,
                            int64_t, int64_t, int64_t, int64_t, int64_t, float, float*, at::BFloat16*);

AttendBF16 pick_bf16_kernel(int64_t G) {
  switch (G) {
    case 1: return &attend_bf16_avx512<1>;
    case 2: return &attend_bf16_avx512<2>;
    case 3: return &attend_bf16_avx512<3>;
    case 4: return &attend_bf16_avx512<4>;
    case 5: return &attend_bf16_avx512<5>;
    case 6: return &attend_bf16_avx512<6>;
    case 7: return &attend_bf16_avx512<7>;
    case 8: return &attend_bf16_avx512<8>;
    default: return nullptr;
  }
}


#define VIDYA_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_ready() {
  static const bool ok = [] {
    if (!(__builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("amx-bf16") &&
          __builtin_cpu_supports("amx-tile")))
      return false;
    // Linux hands out the tile data state only on request (ARCH_REQ_XCOMP_PERM, XTILEDATA)
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  }();
  return ok;
}

// Prefill tiles: up to 16 consecutive query rows of one sequence (row i attends to c0 + i cached
// tokens) against one kv head, with the 16 rows in the 16 lanes of a vector. QK^T: Q transposed
// into dimension pairs once, each key's pair broadcast from the cache (VDPBF16PS, no horizontal
// sums). Scores in fp32, softmax per lane, P rounded to bf16 like the reference's probs.to(v.dtype).
// PV: V repacked once per tile into key pairs (VNNI order), P broadcast pairwise per row.
struct TileScratch {
  std::vector<float> scores;                 // [cmax][16]
  std::vector<uint32_t> pairs;               // [(cmax + 1) / 2][16]: (P[t], P[t+1]) per row
  std::vector<at::BFloat16> vpairs;          // [(cmax + 1) / 2][D][2]
  std::vector<const at::BFloat16*> keys;     // [cmax] key addresses
  std::vector<const at::BFloat16*> values;   // [cmax] value addresses
  std::vector<uint32_t> pa;                  // AMX: P as A tiles, [chunks of 32 keys][16 rows][16 pairs]
};

// The K and V addresses of a tile's first cmax keys (kv head kvh_index), from the block table.
inline void collect_addresses(TileScratch& ws, const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table,
                              int64_t cmax, int64_t kvh_index, int64_t BS, int64_t token_stride, int64_t D) {
  ws.keys.resize(cmax);
  ws.values.resize(cmax);
  for (int64_t t = 0, blk = 0, off = 0; t < cmax; ++t) {
    const int64_t base = (table[blk] * BS + off) * token_stride + kvh_index * D;
    ws.keys[t] = kc + base;
    ws.values[t] = vc + base;
    if (++off == BS) off = 0, ++blk;
  }
}

// V in key pairs (VNNI order): for pair pp, D x (V[2pp][d], V[2pp+1][d]); zero past cmax.
VIDYA_AVX512BF16 void pack_value_pairs(const std::vector<const at::BFloat16*>& values, int64_t cmax, int64_t D,
                                       at::BFloat16* dst) {
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t hi_idx[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                  24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_load_si512(hi_idx);
  for (int64_t pp = 0; pp < (cmax + 1) / 2; ++pp, dst += 2 * D) {
    const at::BFloat16* a = values[2 * pp];
    const at::BFloat16* b = 2 * pp + 1 < cmax ? values[2 * pp + 1] : nullptr;
    for (int64_t c = 0; c < D / 32; ++c) {
      const __m512i va = _mm512_loadu_si512(a + 32 * c);
      const __m512i vb = b ? _mm512_loadu_si512(b + 32 * c) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 64 * c, _mm512_permutex2var_epi16(va, ilo, vb));
      _mm512_storeu_si512(dst + 64 * c + 32, _mm512_permutex2var_epi16(va, ihi, vb));
    }
  }
}

// Q of head g for the tile's rows, transposed into dimension pairs: qt[p * 16 + i] = (Q[i][2p], Q[i][2p+1])
inline void transpose_q_pairs(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t g, int64_t D,
                              uint32_t* qt) {
  for (int64_t p = 0; p < D / 2; ++p)
    for (int64_t i = 0; i < 16; ++i) {
      uint32_t v = 0;
      if (i < nrows) std::memcpy(&v, q + i * q_stride + g * D + 2 * p, 4);
      qt[p * 16 + i] = v;
    }
}

// lanes (rows) that may see key t: all when t < c0, else rows i > t - c0 (row i sees c0 + i keys)
inline __mmask16 visible_rows(int64_t t, int64_t c0) {
  return t < c0 ? (__mmask16)0xFFFF : (__mmask16)(0xFFFFu & ~((2u << (t - c0)) - 1u));
}

// (e0[i], e1[i]) as bf16 pairs, lane i = row i
VIDYA_AVX512BF16 inline __m512i pair_rows(__m512 e0, __m512 e1) {
  alignas(64) static const uint16_t pair_idx[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  return _mm512_permutexvar_epi16(_mm512_load_si512(pair_idx), (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
}

// exp(S[t] - max) and exp(S[t+1] - max) per row (zero where masked or past cmax), added to sum
// and returned as bf16 pairs: the P operand of P V
VIDYA_AVX512BF16 inline __m512i exp_pair(const float* S, int64_t t, int64_t cmax, int64_t c0, __m512 mv, __m512& sum) {
  const __m512 e0 = _mm512_maskz_mov_ps(visible_rows(t, c0), exp512(_mm512_sub_ps(_mm512_loadu_ps(S + t * 16), mv)));
  const __m512 e1 = t + 1 < cmax
      ? _mm512_maskz_mov_ps(visible_rows(t + 1, c0), exp512(_mm512_sub_ps(_mm512_loadu_ps(S + (t + 1) * 16), mv)))
      : _mm512_setzero_ps();
  sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
  return pair_rows(e0, e1);
}

template <int NC>  // NC = D / 16
VIDYA_AVX512BF16 void attend_tile_bf16(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t G,
                                       const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table,
                                       int64_t c0, int64_t kvh_index, int64_t BS, int64_t KVH, float scale,
                                       TileScratch& ws, at::BFloat16* out, int64_t out_stride) {
  constexpr int D = NC * 16, QG = 16 / NC;  // QG rows x NC vectors of accumulators in pass 3
  const int64_t cmax = c0 + nrows - 1, npairs = (cmax + 1) / 2, token_stride = KVH * D;
  ws.scores.resize(static_cast<size_t>(cmax) * 16);
  ws.pairs.resize(static_cast<size_t>(npairs) * 16);
  ws.vpairs.resize(static_cast<size_t>(npairs) * 2 * D);
  collect_addresses(ws, kc, vc, table, cmax, kvh_index, BS, token_stride, D);
  pack_value_pairs(ws.values, cmax, D, ws.vpairs.data());
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* S = ws.scores.data();
  uint32_t* P = ws.pairs.data();
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) uint32_t qt[D / 2][16];
    transpose_q_pairs(q, q_stride, nrows, g, D, &qt[0][0]);
    // pass 1: scores, 8 keys at a time, and the running max per row
    __m512 mv = neg_inf;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t0 = 0; t0 < cmax; t0 += 8) {
      const int64_t nk = cmax - t0 < 8 ? cmax - t0 : 8;
      const at::BFloat16* kp[8];
      for (int j = 0; j < 8; ++j) kp[j] = ws.keys[t0 + (j < nk ? j : 0)];
      __m512 acc[8];
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
      for (int p = 0; p < D / 2; ++p) {
        const __m512bh qv = (__m512bh)_mm512_load_si512(qt[p]);
        for (int j = 0; j < 8; ++j) {
          int32_t kpair;
          std::memcpy(&kpair, kp[j] + 2 * p, 4);
          acc[j] = _mm512_dpbf16_ps(acc[j], qv, (__m512bh)_mm512_set1_epi32(kpair));
        }
      }
      for (int j = 0; j < nk; ++j) {
        const __m512 s = _mm512_mask_mov_ps(neg_inf, visible_rows(t0 + j, c0), _mm512_mul_ps(acc[j], sc));
        _mm512_storeu_ps(S + (t0 + j) * 16, s);
        mv = _mm512_max_ps(mv, s);
      }
    }
    // pass 2: P = exp(S - max) in key pairs (bf16), row sums in fp32
    __m512 sum = _mm512_setzero_ps();
    for (int64_t pp = 0; pp < npairs; ++pp) _mm512_storeu_si512(P + pp * 16, exp_pair(S, 2 * pp, cmax, c0, mv, sum));
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    // pass 3: O = P V, QG rows at a time
    for (int64_t r0 = 0; r0 < nrows; r0 += QG) {
      __m512 acc[QG][NC];
      for (int i = 0; i < QG; ++i)
        for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_setzero_ps();
      for (int64_t pp = 0; pp < npairs; ++pp) {
        const at::BFloat16* vp = ws.vpairs.data() + pp * 2 * D;
        __m512bh v[NC];
        for (int c = 0; c < NC; ++c) v[c] = (__m512bh)_mm512_loadu_si512(vp + 32 * c);
        for (int i = 0; i < QG; ++i) {
          const __m512bh pb = (__m512bh)_mm512_set1_epi32(static_cast<int32_t>(P[pp * 16 + r0 + i]));
          for (int c = 0; c < NC; ++c) acc[i][c] = _mm512_dpbf16_ps(acc[i][c], v[c], pb);
        }
      }
      for (int i = 0; i < QG && r0 + i < nrows; ++i) {
        const __m512 inv = _mm512_set1_ps(1.f / sums[r0 + i]);
        at::BFloat16* o = out + (r0 + i) * out_stride + g * D;
        for (int c = 0; c < NC; ++c)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                              (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][c], inv)));
      }
    }
  }
}

// The same tile on AMX (BS % 16 == 0, so 16 consecutive keys are one tile of the cache with a
// fixed row stride): S^T[keys x rows] = K Q^T with Q^T as the B tile (the pairs layout above),
// the softmax as above on S^T's rows, then O = P V with P scattered into A tiles and V's key
// pairs as B tiles. Same arithmetic: fp32 sums of bf16 products, P rounded to bf16.
template <int NC>
VIDYA_AMX void attend_tile_amx(const at::BFloat16* q, int64_t q_stride, int64_t nrows, int64_t G,
                               const at::BFloat16* kc, const at::BFloat16* vc, const int64_t* table, int64_t c0,
                               int64_t kvh_index, int64_t BS, int64_t KVH, float scale, TileScratch& ws,
                               at::BFloat16* out, int64_t out_stride) {
  constexpr int D = NC * 16;
  const int64_t cmax = c0 + nrows - 1, token_stride = KVH * D;
  const int64_t ktiles = (cmax + 15) / 16, chunks = (cmax + 31) / 32, npairs = (cmax + 1) / 2;
  ws.scores.resize(static_cast<size_t>(ktiles) * 256);
  ws.vpairs.assign(static_cast<size_t>(chunks) * 16 * 2 * D, at::BFloat16(0.f));
  ws.pa.assign(static_cast<size_t>(chunks) * 256, 0u);
  collect_addresses(ws, kc, vc, table, cmax, kvh_index, BS, token_stride, D);
  pack_value_pairs(ws.values, cmax, D, ws.vpairs.data());  // the rest stays zero: whole 32-key chunks
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) cfg.rows[i] = 16, cfg.colsb[i] = 64;
  _tile_loadconfig(&cfg);
  const __m512i row16 = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(16));
  const __m512 neg_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float* S = ws.scores.data();
  alignas(64) float obuf[16 * D];
  for (int64_t g = 0; g < G; ++g) {
    alignas(64) uint32_t qt[D / 2][16];
    transpose_q_pairs(q, q_stride, nrows, g, D, &qt[0][0]);
    // S^T, 16 keys a tile: K rows straight from the cache block
    _tile_loadd(2, qt[0], 64);
    _tile_loadd(3, qt[16], 64);
    if constexpr (D == 128) { _tile_loadd(4, qt[32], 64); _tile_loadd(5, qt[48], 64); }
    for (int64_t kt = 0; kt < ktiles; ++kt) {
      const int64_t t0 = kt * 16;
      const at::BFloat16* k = kc + (table[t0 / BS] * BS + t0 % BS) * token_stride + kvh_index * D;
      _tile_zero(0);
      _tile_loadd(1, k, token_stride * 2);
      _tile_dpbf16ps(0, 1, 2);
      _tile_loadd(1, k + 32, token_stride * 2);
      _tile_dpbf16ps(0, 1, 3);
      if constexpr (D == 128) {
        _tile_loadd(1, k + 64, token_stride * 2);
        _tile_dpbf16ps(0, 1, 4);
        _tile_loadd(1, k + 96, token_stride * 2);
        _tile_dpbf16ps(0, 1, 5);
      }
      _tile_stored(0, S + t0 * 16, 64);
    }
    // scale, causal mask, max per row (lane)
    __m512 mv = neg_inf;
    const __m512 sc = _mm512_set1_ps(scale);
    for (int64_t t = 0; t < cmax; ++t) {
      const __m512 sv = _mm512_mask_mov_ps(neg_inf, visible_rows(t, c0), _mm512_mul_ps(_mm512_loadu_ps(S + t * 16), sc));
      _mm512_storeu_ps(S + t * 16, sv);
      mv = _mm512_max_ps(mv, sv);
    }
    // P in key pairs, scattered into the A tiles: pa[chunk][row][pair in chunk]
    __m512 sum = _mm512_setzero_ps();
    uint32_t* PA = ws.pa.data();
    for (int64_t pp = 0; pp < npairs; ++pp)
      _mm512_i32scatter_epi32(PA + (pp / 16) * 256 + (pp % 16), row16, exp_pair(S, 2 * pp, cmax, c0, mv, sum), 4);
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum);
    // O = P V, 64 output dims (4 C tiles) at a time
    for (int d0 = 0; d0 < D; d0 += 64) {
      _tile_zero(4);
      _tile_zero(5);
      _tile_zero(6);
      _tile_zero(7);
      for (int64_t j = 0; j < chunks; ++j) {
        _tile_loadd(0, PA + j * 256, 64);
        const at::BFloat16* vb = ws.vpairs.data() + j * 16 * 2 * D + 2 * d0;
        _tile_loadd(1, vb, 4 * D);
        _tile_dpbf16ps(4, 0, 1);
        _tile_loadd(2, vb + 32, 4 * D);
        _tile_dpbf16ps(5, 0, 2);
        _tile_loadd(3, vb + 64, 4 * D);
        _tile_dpbf16ps(6, 0, 3);
        _tile_loadd(1, vb + 96, 4 * D);
        _tile_dpbf16ps(7, 0, 1);
      }
      _tile_stored(4, obuf + d0, D * 4);
      _tile_stored(5, obuf + d0 + 16, D * 4);
      _tile_stored(6, obuf + d0 + 32, D * 4);
      _tile_stored(7, obuf + d0 + 48, D * 4);
    }
    for (int64_t i = 0; i < nrows; ++i) {
      const __m512 inv = _mm512_set1_ps(1.f / sums[i]);
      at::BFloat16* o = out + i * out_stride + g * D;
      for (int c = 0; c < NC; ++c)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 16 * c),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_load_ps(obuf + i * D + 16 * c), inv)));
    }
  }
  _tile_release();
}

using AttendTileBF16 = void (*)(const at::BFloat16*, int64_t, int64_t, int64_t, const at::BFloat16*,
                                const at::BFloat16*, const int64_t*, int64_t, int64_t, int64_t, int64_t, float,
                                TileScratch&, at::BFloat16*, int64_t);

AttendTileBF16 pick_tile_kernel(int64_t D, int64_t BS) {
  const char* off = std::getenv("VIDYA_AMX");  // "0": AVX-512 only (for comparisons)
  const bool amx = amx_ready() && BS % 16 == 0 && !(off && std::strcmp(off, "0") == 0);
  switch (D) {
    case 64: return amx ? &attend_tile_amx<4> : &attend_tile_bf16<4>;
    case 128: return amx ? &attend_tile_amx<8> : &attend_tile_bf16<8>;
    default: return nullptr;
  }
}


// AVX-512 BF16 versions of the three ops for bf16 rows (the serving dtype on such CPUs).
VIDYA_AVX512BF16 inline __m512 round_bf16(__m512 x) {
  __m256bh b = _mm512_cvtneps_pbh(x);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)b), 16));
}

VIDYA_AVX512BF16 inline void store_bf16(at::BFloat16* p, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(x));
}

VIDYA_AVX512BF16 void add_rms_norm_row_bf16(at::BFloat16* xr, at::BFloat16* rr, const at::BFloat16* w, int64_t n,
                                            float eps, bool add, float* h) {
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    __m512 v = bf16x16_to_f32(xr + i);
    if (add) {
      v = round_bf16(_mm512_add_ps(bf16x16_to_f32(rr + i), v));
      store_bf16(rr + i, v);
    }
    _mm512_storeu_ps(h + i, v);
    ss = _mm512_fmadd_ps(v, v, ss);
  }
  const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(n) + eps));
  for (int64_t i = 0; i < n; i += 16)
    store_bf16(xr + i, _mm512_mul_ps(bf16x16_to_f32(w + i), round_bf16(_mm512_mul_ps(_mm512_loadu_ps(h + i), inv))));
}

VIDYA_AVX512BF16 void silu_and_mul_row_bf16(const at::BFloat16* g, const at::BFloat16* u, at::BFloat16* o, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t i = 0; i < n; i += 16) {
    const __m512 x = bf16x16_to_f32(g + i);
    // x / (1 + e^-x) with a reciprocal estimate and one Newton step (division is the slowest op here)
    const __m512 d = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
    __m512 r = _mm512_rcp14_ps(d);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.f)));
    const __m512 silu = _mm512_mul_ps(x, r);
    store_bf16(o + i, _mm512_mul_ps(round_bf16(silu), bf16x16_to_f32(u + i)));
  }
}

VIDYA_AVX512BF16 void rotary_row_bf16(at::BFloat16* x, const at::BFloat16* c, const at::BFloat16* s, int64_t heads,
                                      int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h, x += D) {
    for (int64_t i = 0; i < half; i += 16) {
      const __m512 a = bf16x16_to_f32(x + i), b = bf16x16_to_f32(x + i + half);
      const __m512 c_lo = bf16x16_to_f32(c + i), c_hi = bf16x16_to_f32(c + i + half);
      const __m512 s_lo = bf16x16_to_f32(s + i), s_hi = bf16x16_to_f32(s + i + half);
      const __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(a, c_lo)),
                                      round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), b), s_lo)));
      const __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(b, c_hi)), round_bf16(_mm512_mul_ps(a, s_hi)));
      store_bf16(x + i, lo);
      store_bf16(x + i + half, hi);
    }
  }
}

bool has_avx512bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512bw");
  return yes;
}

template <typename T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& row_seq,
                          const at::Tensor& row_ctx, double scale, at::Tensor& out) {
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, W = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const int64_t qrs = q.stride(0);  // q may be a view into the fused qkv rows
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq = row_seq.data_ptr<int64_t>();
  const int64_t* ctx = row_ctx.data_ptr<int64_t>();
  int64_t max_ctx = 0;
  for (int64_t i = 0; i < T_; ++i) max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
  T* op = out.data_ptr<T>();
  AttendBF16 fast = nullptr;
  AttendTileBF16 tile = nullptr;
  if constexpr (std::is_same_v<T, at::BFloat16>)
    if (has_avx512bf16() && D % 64 == 0) fast = pick_bf16_kernel(G), tile = pick_tile_kernel(D, BS);
  // Work items: tiles of up to 16 consecutive rows of one sequence (prefill chunks), biggest
  // first, handed out dynamically (they cost far more than rows); then single rows in batch
  // order, a few at a time, so one thread reads all kv heads of a row's blocks in turn.
  struct Tile { int64_t row, nrows, h, cost; };
  std::vector<Tile> tiles;
  std::vector<int64_t> rows;  // row * KVH + h
  rows.reserve(static_cast<size_t>(T_ * KVH));
  for (int64_t r = 0; r < T_;) {
    int64_t n = 1;
    if (tile)
      while (r + n < T_ && n < 16 && seq[r + n] == seq[r] && ctx[r + n] == ctx[r] + n) ++n;
    if (n < kMinTileRows) n = 1;
    for (int64_t h = 0; h < KVH; ++h) {
      if (n > 1) tiles.push_back({r, n, h, ctx[r] + n});
      else rows.push_back(r * KVH + h);
    }
    r += n;
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const Tile& a, const Tile& b) { return a.cost > b.cost; });
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()), n_rows = static_cast<int64_t>(rows.size());
#pragma omp parallel num_threads(at::get_num_threads())
  {
    std::vector<float> scores(static_cast<size_t>(G * max_ctx));
    if constexpr (std::is_same_v<T, at::BFloat16>) {
      TileScratch ws;
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t k = 0; k < n_tiles; ++k) {
        const Tile& it = tiles[k];
        tile(qp + it.row * qrs + it.h * G * D, qrs, it.nrows, G, kp, vp, tables + seq[it.row] * W, ctx[it.row],
             it.h, BS, KVH, static_cast<float>(scale), ws, op + (it.row * H + it.h * G) * D, H * D);
      }
    }
#pragma omp for schedule(dynamic, 4 * KVH)
    for (int64_t k = 0; k < n_rows; ++k) {
      const int64_t row = rows[k] / KVH, h = rows[k] % KVH;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (fast) {
          fast(qp + row * qrs + h * G * D, kp, vp, tables + seq[row] * W, ctx[row], h, D, BS, KVH,
               static_cast<float>(scale), scores.data(), op + (row * H + h * G) * D);
          continue;
        }
      }
      attend_one<T>(qp + row * qrs + h * G * D, kp, vp, tables + seq[row] * W, ctx[row], h, G, D, BS,
                    KVH, static_cast<float>(scale), scores.data(), op + (row * H + h * G) * D);
    }
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& row_seq,
                           const at::Tensor& row_ctx, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q needs contiguous rows of heads; the caches must be contiguous");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type(), "q and cache dtypes differ");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && row_seq.scalar_type() == at::kLong &&
              row_ctx.scalar_type() == at::kLong, "index tensors must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && row_seq.is_contiguous() && row_ctx.is_contiguous(),
              "index tensors must be contiguous");
  const int64_t H = q.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && H / KVH <= kMaxGroup && q.size(2) <= kMaxDim && q.size(2) == k_cache.size(3),
              "unsupported head layout");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  switch (q.scalar_type()) {
    case at::kFloat: paged_attention_impl<float>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, out); break;
    case at::kBFloat16: paged_attention_impl<at::BFloat16>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, out); break;
    case at::kHalf: paged_attention_impl<at::Half>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}


// ---- fused elementwise ops of a Llama layer; each matches the unfused torch ops it replaces,
// rounding every intermediate to T where torch would store it in T. ----------------------------

// residual = residual + x (rounded to T); x = RMSNorm(residual) * weight. In place.
template <typename T>
void add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps, bool add) {
  const int64_t rows = x.size(0), n = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const int64_t xs = x.stride(0), rs = residual.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * xs;
      T* rr = rp + r * rs;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (has_avx512bf16() && n % 16 == 0) {
          add_rms_norm_row_bf16(xr, rr, wp, n, static_cast<float>(eps), add, h.data());
          continue;
        }
      }
      float ss = 0.f;
      for (int64_t i = 0; i < n; ++i) {
        float v = add ? round_as<T>(to_f(rr[i]) + to_f(xr[i])) : to_f(xr[i]);
        if (add) rr[i] = from_f<T>(v);
        h[i] = v;
        ss += v * v;
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + static_cast<float>(eps));
      for (int64_t i = 0; i < n; ++i) xr[i] = from_f<T>(to_f(wp[i]) * round_as<T>(h[i] * inv));
    }
  });
}

// out = silu(gate) * up for gate_up = [gate | up] along the last dim.
template <typename T>
void silu_and_mul_impl(const at::Tensor& gate_up, at::Tensor& out) {
  const int64_t rows = gate_up.size(0), n = out.size(1);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t gs = gate_up.stride(0);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * gs;
      const T* u = g + n;
      T* o = op + r * n;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (has_avx512bf16() && n % 16 == 0) {
          silu_and_mul_row_bf16(g, u, o, n);
          continue;
        }
      }
      for (int64_t i = 0; i < n; ++i) {
        const float x = to_f(g[i]);
        o[i] = from_f<T>(round_as<T>(x / (1.f + std::exp(-x))) * to_f(u[i]));
      }
    }
  });
}

// Rotate-half RoPE in place on the q and k heads of a fused qkv row: x*cos + rotate_half(x)*sin.
template <typename T>
void rotary_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t D,
                 at::Tensor* k_cache = nullptr, at::Tensor* v_cache = nullptr, const int64_t* slots = nullptr,
                 int64_t kv_heads = 0) {
  const int64_t rows = qkv.size(0), half = D / 2;
  // with caches: row r's k heads (the last kv_heads of the rotated ones) and the v heads after
  // them are copied to cache slot slots[r]
  T* kcp = k_cache ? k_cache->data_ptr<T>() : nullptr;
  T* vcp = v_cache ? v_cache->data_ptr<T>() : nullptr;
  const int64_t kv_width = kv_heads * D;
  T* p = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t qs = qkv.stride(0);
  auto write_kv = [&](int64_t r) {
    if (!kcp) return;
    const T* k = p + r * qs + (heads - kv_heads) * D;
    std::memcpy(kcp + slots[r] * kv_width, k, sizeof(T) * kv_width);
    std::memcpy(vcp + slots[r] * kv_width, k + kv_width, sizeof(T) * kv_width);
  };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * D;
      const T* s = sp + r * D;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (has_avx512bf16() && D % 32 == 0) {
          rotary_row_bf16(p + r * qs, c, s, heads, D);
          write_kv(r);
          continue;
        }
      }
      for (int64_t h = 0; h < heads; ++h) {
        T* x = p + r * qs + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_f(x[i]), b = to_f(x[i + half]);
          // rotate_half(x) = [-x2, x1]; torch stores x*cos and rotate_half(x)*sin in T, then adds
          const float lo = round_as<T>(a * to_f(c[i])) + round_as<T>(-b * to_f(s[i]));
          const float hi = round_as<T>(b * to_f(c[i + half])) + round_as<T>(a * to_f(s[i + half]));
          x[i] = from_f<T>(lo);
          x[i + half] = from_f<T>(hi);
        }
      }
      write_kv(r);
    }
  });
}

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
    const __m512 d = _mm512_add_ps(one, exp512(_mm512_sub_ps(_mm512_setzero_ps(), x)));
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
  TORCH_CHECK(amx_ready(), "amx_linear_argmax: this CPU (or kernel) offers no AMX");
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
  TORCH_CHECK(amx_ready(), "amx_linear: this CPU (or kernel) offers no AMX");
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

bool amx_available() { return amx_ready(); }

#define VIDYA_DISPATCH(dtype, NAME, ...)                                              \
  switch (dtype) {                                                                  \
    case at::kFloat: { using scalar = float; __VA_ARGS__; break; }                  \
    case at::kBFloat16: { using scalar = at::BFloat16; __VA_ARGS__; break; }        \
    case at::kHalf: { using scalar = at::Half; __VA_ARGS__; break; }                \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", dtype);               \
  }

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.stride(1) == 1, name, " must be 2-D with contiguous rows");
}

void add_rms_norm_(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  check_rows(residual, "residual");
  TORCH_CHECK(x.sizes() == residual.sizes() && weight.is_contiguous() && weight.numel() == x.size(1) &&
              x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(), "bad add_rms_norm_ input");
  VIDYA_DISPATCH(x.scalar_type(), "add_rms_norm_", add_rms_norm_impl<scalar>(x, residual, weight, eps, true));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1) && x.scalar_type() == weight.scalar_type(), "bad rms_norm input");
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  VIDYA_DISPATCH(x.scalar_type(), "rms_norm", add_rms_norm_impl<scalar>(out, out, weight, eps, false));
  return out;
}

at::Tensor silu_and_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "gate_up");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "gate_up must have an even width");
  at::Tensor out = at::empty({gate_up.size(0), gate_up.size(1) / 2}, gate_up.options());
  VIDYA_DISPATCH(gate_up.scalar_type(), "silu_and_mul", silu_and_mul_impl<scalar>(gate_up, out));
  return out;
}

// RoPE in place on the q and k heads of each fused qkv row, then that row's k and v heads written to its
// cache slot: k_cache/v_cache [NB, BS, KVH, D], slot_mapping [T] int64 (block * BS + offset).
void rotary_cache_(at::Tensor qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t kv_heads,
                   int64_t head_dim, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping) {
  check_rows(qkv, "qkv");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == qkv.size(0) &&
              cos.size(-1) == head_dim && qkv.size(1) >= (heads + 2 * kv_heads) * head_dim && head_dim % 2 == 0 &&
              kv_heads > 0 && kv_heads <= heads &&
              cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "bad rotary_cache_ input");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kv_heads && k_cache.size(3) == head_dim &&
              k_cache.scalar_type() == qkv.scalar_type() && v_cache.scalar_type() == qkv.scalar_type(),
              "bad rotary_cache_ caches");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == qkv.size(0), "slot_mapping must be int64 with one slot per row");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t r = 0; r < slot_mapping.numel(); ++r)
    TORCH_CHECK(slots[r] >= 0 && slots[r] < n_slots, "slot ", slots[r], " outside the cache");
  VIDYA_DISPATCH(qkv.scalar_type(), "rotary_cache_",
                 rotary_impl<scalar>(qkv, cos, sin, heads + kv_heads, head_dim, &k_cache, &v_cache, slots, kv_heads));
}

// Index of the first maximum of each row (torch.max(dim=-1).indices), bf16 rows on AVX-512.
VIDYA_AVX512BF16 int64_t argmax_row_bf16(const at::BFloat16* x, int64_t n) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16, idx = _mm512_add_epi32(idx, step)) {
    const __m512 v = bf16x16_to_f32(x + i);
    const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);  // strictly greater: first per lane
    best = _mm512_mask_mov_ps(best, gt, v);
    best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
  }
  float m = _mm512_reduce_max_ps(best);
  int64_t at = 0;  // a row of -inf: its first element
  if (m > -std::numeric_limits<float>::infinity()) {
    const __mmask16 eq = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
    at = _mm512_mask_reduce_min_epi32(eq, best_i);
  }
  for (; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > m) m = v, at = i;
  }
  return at;
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  check_rows(logits, "logits");
  if (!(logits.scalar_type() == at::kBFloat16 && has_avx512bf16() && logits.size(1) < (int64_t(1) << 31)) ||
      logits.size(1) == 0)
    return std::get<1>(logits.max(-1));
  // (NaN entries are skipped; torch would return a NaN's index: a broken model either way)
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  const at::BFloat16* xp = logits.data_ptr<at::BFloat16>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) op[r] = argmax_row_bf16(xp + r * ld, n);
  });
  return out;
}

// Every decoder layer of a small batch (M <= 64 rows: decode steps) in one call, the same ops
// the Python layer runs (RMSNorm + residual, qkv on AMX, RoPE + cache write, paged attention,
// o_proj, RMSNorm + residual, gate_up, SiLU * up, down): on a 135M model the ~10 Python-level
// dispatches per layer cost as much as a layer's elementwise work. Returns (x, residual) after
// the last layer; the final norm stays with the caller.
std::tuple<at::Tensor, at::Tensor> decode_layers(
    at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList ln1, at::TensorList qkv,
    at::TensorList qkv_bias, at::TensorList o, at::TensorList ln2, at::TensorList gate_up, at::TensorList down,
    at::TensorList k_caches, at::TensorList v_caches, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
    const at::Tensor& row_seq, const at::Tensor& row_ctx, int64_t heads, int64_t kv_heads, int64_t head_dim,
    double eps, double scale) {
  const size_t L = ln1.size();
  TORCH_CHECK(L > 0 && qkv.size() == L && o.size() == L && ln2.size() == L && gate_up.size() == L &&
              down.size() == L && k_caches.size() == L && v_caches.size() == L &&
              (qkv_bias.empty() || qkv_bias.size() == L), "decode_layers: one of each per layer");
  const int64_t M = x.size(0);
  at::Tensor residual = x;
  x = rms_norm(x, ln1[0], eps);
  for (size_t l = 0; l < L; ++l) {
    if (l > 0) add_rms_norm_(x, residual, ln1[l], eps);
    c10::optional<at::Tensor> bias;
    if (!qkv_bias.empty()) bias = qkv_bias[l];
    at::Tensor fused_qkv = amx_linear(x, qkv[l], bias);
    rotary_cache_(fused_qkv, cos, sin, heads, kv_heads, head_dim, k_caches[l], v_caches[l], slot_mapping);
    at::Tensor q = fused_qkv.narrow(1, 0, heads * head_dim).view({M, heads, head_dim});
    at::Tensor attn = paged_attention(q, k_caches[l], v_caches[l], block_tables, row_seq, row_ctx, scale);
    x = amx_linear(attn.view({M, heads * head_dim}), o[l], c10::nullopt);
    add_rms_norm_(x, residual, ln2[l], eps);
    x = amx_linear(amx_linear_silu(x, gate_up[l]), down[l], c10::nullopt);
  }
  return {x, residual};
}

}  // namespace

TORCH_LIBRARY(vidya, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor row_seq, "
        "Tensor row_ctx, float scale) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_cache_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int kv_heads, int head_dim, "
        "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping) -> ()");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("amx_available() -> bool");
  m.def("amx_pack(Tensor weight) -> Tensor");
  m.def("amx_linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
  m.def("amx_linear_silu(Tensor x, Tensor packed) -> Tensor");
  m.def("amx_linear_argmax(Tensor x, Tensor packed) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor[] ln1, Tensor[] qkv, Tensor[] qkv_bias, Tensor[] o, "
        "Tensor[] ln2, Tensor[] gate_up, Tensor[] down, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, "
        "Tensor slot_mapping, Tensor block_tables, Tensor row_seq, Tensor row_ctx, int heads, int kv_heads, "
        "int head_dim, float eps, float scale) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(vidya, CompositeExplicitAutograd, m) {
  m.impl("amx_available", &amx_available);
}

TORCH_LIBRARY_IMPL(vidya, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_cache_", &rotary_cache_);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("amx_pack", &amx_pack);
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_linear_silu", &amx_linear_silu);
  m.impl("amx_linear_argmax", &amx_linear_argmax);
  m.impl("decode_layers", &decode_layers);
}
