// Every decoder layer of a small (decode) batch in one call, on the AMX matmul.
#pragma once
#include "../attention.h"
#include "../elementwise.h"
#include "gemm_amx.h"

namespace vidya {

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
    rotary_cache_(fused_qkv, cos, sin, heads, kv_heads, head_dim, k_caches[l], v_caches[l], slot_mapping, 1.0, 1.0);
    at::Tensor q = fused_qkv.narrow(1, 0, heads * head_dim).view({M, heads, head_dim});
    at::Tensor attn = paged_attention(q, k_caches[l], v_caches[l], block_tables, row_seq, row_ctx, scale, 0);
    x = amx_linear(attn.view({M, heads * head_dim}), o[l], c10::nullopt);
    add_rms_norm_(x, residual, ln2[l], eps);
    x = amx_linear(amx_linear_silu(x, gate_up[l]), down[l], c10::nullopt);
  }
  return {x, residual};
}

}  // namespace vidya
