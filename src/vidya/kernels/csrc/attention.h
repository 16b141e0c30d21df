// The paged-attention op: work items over rows and kv heads, each run by the best kernel the
// bound ISA level allows (AMX tiles, AVX-512 BF16 rows and tiles, or the generic rows).
// Paged attention, one kernel for decode and prefill rows alike:
//   q            [T, H, D]          one query row per scheduled token
//   k/v_cache    [NB, BS, KVH, D]   the layer's cache (the row's own K/V already written)
//   block_tables [S, W] int64       block ids of each sequence
//   row_seq      [T] int64          which sequence (row of block_tables) a query row belongs to
//   row_ctx      [T] int64          how many cached tokens the row attends to (its position + 1)
//   window       > 0: the row sees only its last `window` positions (a sliding-window layer);
//                such rows go one by one (the tiles assume every row starts at position 0)
// Work item = (row, kv head): the G = H / KVH query heads that share a kv head read each cached
// K/V vector once; a run of consecutive rows of one sequence (a prefill chunk) is cut into tiles
// of up to 16 rows that share every K/V load (bf16 on AVX-512 BF16). Arithmetic in fp32; inputs
// and output in the cache's dtype (bf16/fp16/fp32).
#pragma once
#include "attention_generic.h"

namespace vidya {

template <typename T, typename TC = T>
void paged_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& row_seq,
                          const at::Tensor& row_ctx, double scale, int64_t window, at::Tensor& out) {
  const int64_t T_ = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t BS = k_cache.size(1), KVH = k_cache.size(2);
  const int64_t G = H / KVH, W = block_tables.size(1);
  const T* qp = q.data_ptr<T>();
  const int64_t qrs = q.stride(0);  // q may be a view into the fused qkv rows
  const TC* kp = static_cast<const TC*>(k_cache.data_ptr());
  const TC* vp = static_cast<const TC*>(v_cache.data_ptr());
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seq = row_seq.data_ptr<int64_t>();
  const int64_t* ctx = row_ctx.data_ptr<int64_t>();
  int64_t max_ctx = 0;
  for (int64_t i = 0; i < T_; ++i) max_ctx = ctx[i] > max_ctx ? ctx[i] : max_ctx;
  T* op = out.data_ptr<T>();
  // the bound level's kernels for these dtypes and shapes (nullptr: the portable rows)
  const Kernels& kern = kernels();
  AttendRowBF16 fast = nullptr;
  AttendTileBF16 tile = nullptr;
  AttendRowF32BF16 mixed_rows = nullptr;
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<TC, T>) {
    if (kern.attend_row_bf16 && D % 64 == 0) fast = kern.attend_row_bf16(G);
    if (kern.attend_tile_bf16 && D % 64 == 0 && window == 0) tile = kern.attend_tile_bf16(D, BS);
  }
  if constexpr (std::is_same_v<T, float> && std::is_same_v<TC, at::BFloat16>)
    if (D % 8 == 0) mixed_rows = kern.attend_row_f32_bf16;
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
    if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<TC, T>) {
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
      // the keys the row sees: [start, ctx), from block start / BS, key start % BS of it
      const int64_t start = window > 0 && ctx[row] > window ? ctx[row] - window : 0;
      const int64_t* table = tables + seq[row] * W + start / BS;
      const int64_t n = ctx[row] - start, off0 = start % BS;
      if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<TC, T>) {
        if (fast) {
          fast(qp + row * qrs + h * G * D, kp, vp, table, n, off0, h, D, BS, KVH,
               static_cast<float>(scale), scores.data(), op + (row * H + h * G) * D);
          continue;
        }
      }
      if constexpr (std::is_same_v<T, float> && std::is_same_v<TC, at::BFloat16>) {
        if (mixed_rows) {
          mixed_rows(qp + row * qrs + h * G * D, kp, vp, table, n, off0, h, G, D, BS, KVH,
                          static_cast<float>(scale), scores.data(), op + (row * H + h * G) * D);
          continue;
        }
      }
      attend_one<T, TC>(qp + row * qrs + h * G * D, kp, vp, table, n, off0, h, G, D, BS,
                    KVH, static_cast<float>(scale), scores.data(), op + (row * H + h * G) * D, kern.exp_sum);
    }
  }
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& row_seq,
                           const at::Tensor& row_ctx, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "bad shapes");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2) && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "q needs contiguous rows of heads; the caches must be contiguous");
  const bool mixed = q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16;
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() || mixed || fp8,
              "q and cache dtypes differ (only fp32 q over a bf16 cache, or any q over a float8 cache)");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && row_seq.scalar_type() == at::kLong &&
              row_ctx.scalar_type() == at::kLong, "index tensors must be int64");
  TORCH_CHECK(block_tables.is_contiguous() && row_seq.is_contiguous() && row_ctx.is_contiguous(),
              "index tensors must be contiguous");
  TORCH_CHECK(window >= 0, "window must be >= 0 (0: none)");
  const int64_t H = q.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(H % KVH == 0 && H / KVH <= kMaxGroup && q.size(2) <= kMaxDim && q.size(2) == k_cache.size(3),
              "unsupported head layout");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  if (fp8) {  // an 8-bit cache: the portable rows, widening each K/V vector to fp32 (the caller folds
              // k_scale into `scale` and multiplies the output by v_scale)
    const bool e4m3 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
    auto run = [&](auto q_type) {
      using T = decltype(q_type);
      if (e4m3)
        paged_attention_impl<T, c10::Float8_e4m3fn>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out);
      else
        paged_attention_impl<T, c10::Float8_e5m2>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out);
    };
    switch (q.scalar_type()) {
      case at::kFloat: run(float{}); break;
      case at::kBFloat16: run(at::BFloat16{}); break;
      case at::kHalf: run(at::Half{}); break;
      default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
    }
    return out;
  }
  if (mixed) {
    paged_attention_impl<float, at::BFloat16>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out);
    return out;
  }
  switch (q.scalar_type()) {
    case at::kFloat: paged_attention_impl<float>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out); break;
    case at::kBFloat16: paged_attention_impl<at::BFloat16>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out); break;
    case at::kHalf: paged_attention_impl<at::Half>(q, k_cache, v_cache, block_tables, row_seq, row_ctx, scale, window, out); break;
    default: TORCH_CHECK(false, "unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace vidya
