// The op registry: every vidya:: op and the function that implements it. Which ISA's kernels an
// op runs inside is the dispatch table's (dispatch.h), whose row is bound once (bind_isa, from
// vidya/platform.py), not decided per call.
#include "common.h"
#include "attention.h"
#include "elementwise.h"
#include "gemm.h"
#include "quant_gemm.h"
#if VIDYA_X86
#include "x86/gemm_amx.h"
#include "x86/decode_layers_amx.h"
#endif

using namespace vidya;

TORCH_LIBRARY(vidya, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor row_seq, "
        "Tensor row_ctx, float scale, int window=0) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_and_mul(Tensor gate_up) -> Tensor");
  m.def("rotary_cache_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int kv_heads, int head_dim, "
        "Tensor(b!) k_cache, Tensor(c!) v_cache, Tensor slot_mapping, float k_scale=1.0, float v_scale=1.0) -> ()");
  m.def("argmax_rows(Tensor logits) -> Tensor");
  m.def("cpu_isa() -> int");
  m.def("bind_isa(int level) -> int");
  m.def("linear_w16(Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor packed, Tensor scales, Tensor scaled_zeros, Tensor? bias, int n, int bits, "
        "int group, bool act_per_token) -> Tensor");
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

// The level the kernels may use: at most what the CPU offers. Returns the level now bound.
int64_t bind_isa(int64_t level) {
  TORCH_CHECK(level >= kGeneric && level <= kAmx, "bind_isa: unknown level ", level);
  bound_isa().store(std::min(level, cpu_isa()));
  return bound_isa().load();
}

int64_t cpu_isa_op() { return cpu_isa(); }

#if !VIDYA_X86
bool amx_available() { return false; }
#endif

TORCH_LIBRARY_IMPL(vidya, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu_isa_op);
  m.impl("bind_isa", &bind_isa);
  m.impl("amx_available", &amx_available);
}

TORCH_LIBRARY_IMPL(vidya, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("add_rms_norm_", &add_rms_norm_);
  m.impl("rms_norm", &rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_cache_", &rotary_cache_);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("linear_w16", &linear_w16);
  m.impl("linear_q8", &linear_q8);
#if VIDYA_X86
  m.impl("amx_pack", &amx_pack);
  m.impl("amx_linear", &amx_linear);
  m.impl("amx_linear_silu", &amx_linear_silu);
  m.impl("amx_linear_argmax", &amx_linear_argmax);
  m.impl("decode_layers", &decode_layers);
#endif
}

