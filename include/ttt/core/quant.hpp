#pragma once
// Weight-only quantisation formats and the quantised weight of a linear layer.
//
// A quantised weight W [N, K] is one byte per element plus one fp32 scale per output row
// (per-output-channel, symmetric):
//   W[n, k] ~= scale[n] * decode(q[n, k]),   scale[n] = max_k |W[n, k]| / F::qmax
//   q[n, k] = encode(W[n, k] / scale[n])     (scale 1 for an all-zero row)
// The same formats store an attention layer's KV cache (--kv-dtype): one scale per key or
// value row of head_dim elements instead of per weight row (QuantKv below).
// Two formats, each a policy with the same interface:
//   Int8     two's-complement int8, qmax 127, encode = round half to even, clamp to +-127
//   Fp8E4M3  OCP FP8 E4M3FN (bias 7, no infinities, 0x7F/0xFF NaN), qmax 448, encode =
//            round to nearest even, saturating at +-448; subnormals m * 2^-9
// Both encode and decode are the same TTT_HD functions on every backend, so the CPU and
// CUDA backends quantise a weight to the same bytes. Activations stay in the engine's T
// (bf16/f32); products accumulate in fp32 and the row scale is applied once per output.
#include <cmath>
#include <cstdint>
#include <string>
#include <string_view>

#include "ttt/core/dtype.hpp"
#include "ttt/core/error.hpp"
#include "ttt/core/tensor.hpp"

namespace ttt {

struct Int8 {
  static constexpr const char* name = "int8";
  static constexpr float qmax = 127.f;
  TTT_HD static uint8_t encode(float v) {
    float r = rintf(v);  // round half to even (the default rounding mode)
    r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
    return uint8_t(int8_t(r));
  }
  TTT_HD static float decode(uint8_t c) { return float(int8_t(c)); }
};

struct Fp8E4M3 {
  static constexpr const char* name = "fp8_e4m3";
  static constexpr float qmax = 448.f;
  TTT_HD static uint8_t encode(float v) {
    const uint8_t sign = uint8_t((detail::float_bits(v) >> 24) & 0x80u);
    const float a = fabsf(v);
    if (a != a) return uint8_t(sign | 0x7Fu);        // NaN stays NaN
    if (!(a < 448.f)) return uint8_t(sign | 0x7Eu);  // saturate (no infinities in E4M3FN)
    // Below the smallest normal (2^-6) the grid is m * 2^-9, m = 0..8 (8 is 2^-6 itself,
    // whose code 0x08 is m); a * 512 is exact, rintf rounds half to even.
    if (a < 0.015625f) return uint8_t(sign | uint8_t(rintf(a * 512.f)));
    // Normal: keep 3 mantissa bits, rounding the 20 dropped bits half to even (a carry
    // moves into the exponent as it should); a < 448 never rounds past 448 (0x7E).
    uint32_t u = detail::float_bits(a);
    u += 0x7FFFFu + ((u >> 20) & 1u);
    const uint32_t e = (u >> 23) - 127u + 7u, m = (u >> 20) & 7u;
    return uint8_t(sign | uint8_t((e << 3) | m));
  }
  TTT_HD static float decode(uint8_t c) {
    const uint32_t e = (c >> 3) & 15u, m = c & 7u;
    float a;
    if (e == 15u && m == 7u) a = detail::bits_float(0x7FC00000u);
    else if (e == 0u) a = float(m) * 0.001953125f;  // m * 2^-9
    else a = detail::bits_float(((e - 7u + 127u) << 23) | (m << 20));
    return (c & 0x80u) ? -a : a;
  }
};

// How the big linear weights of a model are stored: as T (dense) or quantised. Chosen at
// load (`--dtype fp8|int8`, or by a checkpoint that is already quantised).
enum class WeightFormat : uint8_t { dense, int8, fp8_e4m3 };

inline std::string_view weight_format_name(WeightFormat f) {
  switch (f) {
    case WeightFormat::dense: return "dense";
    case WeightFormat::int8: return Int8::name;
    case WeightFormat::fp8_e4m3: return Fp8E4M3::name;
  }
  return "?";
}
inline bool parse_weight_format(std::string_view s, WeightFormat& out) {
  for (WeightFormat f : {WeightFormat::dense, WeightFormat::int8, WeightFormat::fp8_e4m3})
    if (weight_format_name(f) == s) {
      out = f;
      return true;
    }
  return false;
}
template <class F>
constexpr WeightFormat weight_format_of() {
  if constexpr (std::is_same_v<F, Int8>) return WeightFormat::int8;
  else return WeightFormat::fp8_e4m3;
}

// A weight W [N, K] stored in format F on backend B.
template <class F, class B>
struct QuantWeight {
  using Format = F;
  Tensor<uint8_t, B> data;  // [N, K] codes
  Tensor<float, B> scale;   // [N] per output row

  bool defined() const { return data.defined(); }
  int64_t size(int i) const { return data.size(i); }
  Shape shape() const { return data.shape(); }
  int64_t numel() const { return data.numel(); }
  int64_t bytes() const { return data.numel() + 4 * scale.numel(); }
  // Rows [n0, n1): a view (per-row scales make any row range a weight of its own).
  QuantWeight rows(int64_t n0, int64_t n1) const { return {data.slice(0, n0, n1), scale.slice(0, n0, n1)}; }
  template <class B2>
  QuantWeight<F, B2> to() const {
    return {data.template to<B2>(), scale.template to<B2>()};
  }
};

// Keys or values of attention stored in format F (the KV cache with --kv-dtype fp8|int8):
// one code per element and one fp32 scale per row of D, i.e. per (item, head, slot):
//   x[b, h, s, d] ~= scale[b, h, s] * decode(codes[b, h, s, d]),
//   scale = max_d |x[b, h, s, d]| / F::qmax (1 for an all-zero row)
// which is quantize_rows on the [B * H * S, D] rows, so both backends write the same bytes.
// For D = 128 a row costs 128 + 4 bytes against 256 in bf16.
template <class F, class B>
struct QuantKv {
  using Format = F;
  Tensor<uint8_t, B> codes;  // [B, H, S, D]
  Tensor<float, B> scale;    // [B, H, S]

  bool defined() const { return codes.defined(); }
  int64_t size(int i) const { return codes.size(i); }
  Shape shape() const { return codes.shape(); }
  // All rows decode to zeros (codes 0, scales 0).
  static QuantKv zeros(int64_t batch, int64_t heads, int64_t slots, int64_t dim) {
    return {Tensor<uint8_t, B>::zeros({batch, heads, slots, dim}), Tensor<float, B>::zeros({batch, heads, slots})};
  }
  // The same buffers as the rows of one quantised matrix [B * H * S, D] (for dequantize).
  QuantWeight<F, B> as_rows() const {
    const int64_t n = codes.size(0) * codes.size(1) * codes.size(2);
    return {codes.reshape({n, codes.size(3)}), scale.reshape({n})};
  }
  QuantKv clone() const { return {codes.clone(), scale.clone()}; }
};

}  // namespace ttt
