#pragma once
// Element types. bf16 and f16 are plain 16-bit storage types with conversions that work
// on host and device, so one Tensor<bf16, B> type serves both backends and files.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <type_traits>

#include "ttt/config.hpp"
#include "ttt/core/error.hpp"

namespace ttt {

namespace detail {
TTT_HD inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
TTT_HD inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace detail

// bfloat16: the upper half of an IEEE float, rounded to nearest even.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  TTT_HD explicit bf16(float f) : bits(from_float(f)) {}
  TTT_HD explicit operator float() const { return detail::bits_float(uint32_t(bits) << 16); }
  TTT_HD static uint16_t from_float(float f) {
    uint32_t u = detail::float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return uint16_t(u >> 16);
  }
  static bf16 from_bits(uint16_t b) {
    bf16 r;
    r.bits = b;
    return r;
  }
};

// IEEE binary16. Conversions use float arithmetic for the rounding (exact under IEEE
// semantics; never build with -ffast-math).
struct f16 {
  uint16_t bits = 0;
  f16() = default;
  TTT_HD explicit f16(float f) : bits(from_float(f)) {}
  TTT_HD explicit operator float() const { return to_float(bits); }
  TTT_HD static uint16_t from_float(float f) {
    const float scale_to_inf = 0x1.0p+112f;
    const float scale_to_zero = 0x1.0p-110f;
    float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = detail::float_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xff000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = detail::bits_float((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = detail::float_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007c00u;
    const uint32_t mantissa_bits = bits & 0x00000fffu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return uint16_t((sign >> 16) | (shl1_w > 0xff000000u ? 0x7e00u : nonsign));
  }
  TTT_HD static float to_float(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const uint32_t exp_offset = 0xe0u << 23;
    const float exp_scale = 0x1.0p-112f;
    const float normalized = detail::bits_float((two_w >> 4) + exp_offset) * exp_scale;
    const uint32_t magic_mask = 126u << 23;
    const float denormalized = detail::bits_float((two_w >> 17) | magic_mask) - 0.5f;
    const uint32_t cutoff = 1u << 27;
    const uint32_t result =
        sign | (two_w < cutoff ? detail::float_bits(denormalized) : detail::float_bits(normalized));
    return detail::bits_float(result);
  }
  static f16 from_bits(uint16_t b) {
    f16 r;
    r.bits = b;
    return r;
  }
};

// Uniform conversions used by every op: arithmetic happens in float (or double for
// float64 references), storage in T.
template <class T>
TTT_HD inline float to_f32(T v) {
  return static_cast<float>(v);
}
template <class T>
TTT_HD inline T from_f32(float v) {
  return static_cast<T>(v);
}
template <>
TTT_HD inline bf16 from_f32<bf16>(float v) {
  return bf16(v);
}
template <>
TTT_HD inline f16 from_f32<f16>(float v) {
  return f16(v);
}

enum class DType : uint8_t { f32, f64, bf16, f16, i32, i64, u8, boolean };

template <class T>
struct dtype_of;
template <> struct dtype_of<float> { static constexpr DType value = DType::f32; };
template <> struct dtype_of<double> { static constexpr DType value = DType::f64; };
template <> struct dtype_of<bf16> { static constexpr DType value = DType::bf16; };
template <> struct dtype_of<f16> { static constexpr DType value = DType::f16; };
template <> struct dtype_of<int32_t> { static constexpr DType value = DType::i32; };
template <> struct dtype_of<int64_t> { static constexpr DType value = DType::i64; };
template <> struct dtype_of<uint8_t> { static constexpr DType value = DType::u8; };
template <class T>
inline constexpr DType dtype_v = dtype_of<T>::value;

template <class T>
inline constexpr bool is_floating_v =
    std::is_same_v<T, float> || std::is_same_v<T, double> || std::is_same_v<T, bf16> ||
    std::is_same_v<T, f16>;

inline constexpr size_t dtype_size(DType d) {
  switch (d) {
    case DType::f64: case DType::i64: return 8;
    case DType::f32: case DType::i32: return 4;
    case DType::bf16: case DType::f16: return 2;
    case DType::u8: case DType::boolean: return 1;
  }
  return 0;
}

// Names as safetensors spells them.
inline constexpr std::string_view dtype_name(DType d) {
  switch (d) {
    case DType::f32: return "F32";
    case DType::f64: return "F64";
    case DType::bf16: return "BF16";
    case DType::f16: return "F16";
    case DType::i32: return "I32";
    case DType::i64: return "I64";
    case DType::u8: return "U8";
    case DType::boolean: return "BOOL";
  }
  return "?";
}

// Returns false for names the library does not handle (I8, F8_E4M3, ...).
inline bool parse_dtype(std::string_view s, DType& out) {
  for (DType d : {DType::f32, DType::f64, DType::bf16, DType::f16, DType::i32, DType::i64,
                  DType::u8, DType::boolean}) {
    if (dtype_name(d) == s) {
      out = d;
      return true;
    }
  }
  return false;
}

}  // namespace ttt
