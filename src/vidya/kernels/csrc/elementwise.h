// The fused elementwise ops of a decoder layer (add + RMSNorm, SiLU * up, RoPE + KV-cache write)
// and the argmax of logits rows; each matches the unfused torch ops it replaces.
#pragma once
#include "dispatch.h"

namespace vidya {

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
  const auto row_bf16 = kernels().add_rms_norm_bf16;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> h(static_cast<size_t>(n));
    for (int64_t r = begin; r < end; ++r) {
      T* xr = xp + r * xs;
      T* rr = rp + r * rs;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (row_bf16 && n % 16 == 0) {
          row_bf16(xr, rr, wp, n, static_cast<float>(eps), add, h.data());
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
  const Kernels& k = kernels();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gp + r * gs;
      const T* u = g + n;
      T* o = op + r * n;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (k.silu_and_mul_bf16 && n % 16 == 0) {
          k.silu_and_mul_bf16(g, u, o, n);
          continue;
        }
      }
      if constexpr (std::is_same_v<T, float>) {
        if (k.silu_and_mul_f32) {
          k.silu_and_mul_f32(g, u, o, n);
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
template <typename T, typename TC = T>
void rotary_impl(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t D,
                 at::Tensor* k_cache = nullptr, at::Tensor* v_cache = nullptr, const int64_t* slots = nullptr,
                 int64_t kv_heads = 0, float k_scale = 1.f, float v_scale = 1.f) {
  const int64_t rows = qkv.size(0), half = D / 2;
  // with caches: row r's k heads (the last kv_heads of the rotated ones) and the v heads after
  // them are copied to cache slot slots[r]
  TC* kcp = k_cache ? static_cast<TC*>(k_cache->data_ptr()) : nullptr;
  TC* vcp = v_cache ? static_cast<TC*>(v_cache->data_ptr()) : nullptr;
  const int64_t kv_width = kv_heads * D;
  T* p = qkv.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  const int64_t qs = qkv.stride(0);
  const auto row_bf16 = kernels().rotary_bf16;
  auto write_kv = [&](int64_t r) {
    if (!kcp) return;
    const T* k = p + r * qs + (heads - kv_heads) * D;
    if constexpr (std::is_same_v<T, TC>) {
      std::memcpy(kcp + slots[r] * kv_width, k, sizeof(T) * kv_width);
      std::memcpy(vcp + slots[r] * kv_width, k + kv_width, sizeof(T) * kv_width);
    } else if constexpr (is_fp8_v<TC>) {  // an 8-bit cache: divided by its scales, saturated
      for (int64_t i = 0; i < kv_width; ++i) kcp[slots[r] * kv_width + i] = to_fp8<TC>(to_f(k[i]), k_scale);
      for (int64_t i = 0; i < kv_width; ++i) vcp[slots[r] * kv_width + i] = to_fp8<TC>(to_f(k[kv_width + i]), v_scale);
    } else {  // round to the cache's dtype, as tensor.to(cache dtype) does
      for (int64_t i = 0; i < kv_width; ++i) kcp[slots[r] * kv_width + i] = from_f<TC>(to_f(k[i]));
      for (int64_t i = 0; i < kv_width; ++i) vcp[slots[r] * kv_width + i] = from_f<TC>(to_f(k[kv_width + i]));
    }
  };
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* c = cp + r * D;
      const T* s = sp + r * D;
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (row_bf16 && D % 32 == 0) {
          row_bf16(p + r * qs, c, s, heads, D);
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
                   int64_t head_dim, at::Tensor k_cache, at::Tensor v_cache, const at::Tensor& slot_mapping,
                   double k_scale, double v_scale) {
  check_rows(qkv, "qkv");
  const bool fp8 = k_cache.scalar_type() == at::kFloat8_e4m3fn || k_cache.scalar_type() == at::kFloat8_e5m2;
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(0) == qkv.size(0) &&
              cos.size(-1) == head_dim && qkv.size(1) >= (heads + 2 * kv_heads) * head_dim && head_dim % 2 == 0 &&
              kv_heads > 0 && kv_heads <= heads &&
              cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(), "bad rotary_cache_ input");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
              k_cache.sizes() == v_cache.sizes() && k_cache.size(2) == kv_heads && k_cache.size(3) == head_dim &&
              k_cache.scalar_type() == v_cache.scalar_type() &&
              (k_cache.scalar_type() == qkv.scalar_type() || fp8 ||
               (qkv.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kBFloat16)),
              "bad rotary_cache_ caches (their dtype must be the rows', bf16 under fp32 rows, or float8)");
  TORCH_CHECK(k_scale > 0 && v_scale > 0, "KV-cache scales must be > 0");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
              slot_mapping.numel() == qkv.size(0), "slot_mapping must be int64 with one slot per row");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const int64_t n_slots = k_cache.size(0) * k_cache.size(1);
  for (int64_t r = 0; r < slot_mapping.numel(); ++r)
    TORCH_CHECK(slots[r] >= 0 && slots[r] < n_slots, "slot ", slots[r], " outside the cache");
  if (fp8) {
    const float ks = static_cast<float>(k_scale), vs = static_cast<float>(v_scale);
    const bool e4m3 = k_cache.scalar_type() == at::kFloat8_e4m3fn;
    VIDYA_DISPATCH(qkv.scalar_type(), "rotary_cache_", {
      if (e4m3)
        rotary_impl<scalar, c10::Float8_e4m3fn>(qkv, cos, sin, heads + kv_heads, head_dim, &k_cache, &v_cache, slots,
                                                kv_heads, ks, vs);
      else
        rotary_impl<scalar, c10::Float8_e5m2>(qkv, cos, sin, heads + kv_heads, head_dim, &k_cache, &v_cache, slots,
                                              kv_heads, ks, vs);
    });
    return;
  }
  if (qkv.scalar_type() != k_cache.scalar_type()) {
    rotary_impl<float, at::BFloat16>(qkv, cos, sin, heads + kv_heads, head_dim, &k_cache, &v_cache, slots, kv_heads);
    return;
  }
  VIDYA_DISPATCH(qkv.scalar_type(), "rotary_cache_",
                 rotary_impl<scalar>(qkv, cos, sin, heads + kv_heads, head_dim, &k_cache, &v_cache, slots, kv_heads));
}

at::Tensor argmax_rows(const at::Tensor& logits) {
  check_rows(logits, "logits");
  const int64_t rows = logits.size(0), n = logits.size(1), ld = logits.stride(0);
  const Kernels& k = kernels();
  const auto bf16 = logits.scalar_type() == at::kBFloat16 ? k.argmax_bf16 : nullptr;
  const auto f32 = logits.scalar_type() == at::kFloat ? k.argmax_f32 : nullptr;
  if (!(bf16 || f32) || n == 0 || n >= (int64_t(1) << 31))
    return std::get<1>(logits.max(-1));
  // (NaN entries are skipped; torch would return a NaN's index: a broken model either way)
  at::Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  if (bf16) {
    const at::BFloat16* xp = logits.data_ptr<at::BFloat16>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) op[r] = bf16(xp + r * ld, n);
    });
  } else {
    const float* xp = logits.data_ptr<float>();
    at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) op[r] = f32(xp + r * ld, n);
    });
  }
  return out;
}

}  // namespace vidya
