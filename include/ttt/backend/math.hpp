#pragma once
// Scalar formulas shared by every backend, so that CPU and CUDA compute the same function.
#include <cmath>

#include "ttt/backend/ops.hpp"
#include "ttt/config.hpp"
#include "ttt/core/rng.hpp"

namespace ttt::math {

TTT_HD inline float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }
TTT_HD inline float silu(float x) { return x / (1.f + expf(-x)); }
TTT_HD inline float gelu(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
TTT_HD inline float gelu_tanh(float x) {
  const float k = 0.79788456080286536f;  // sqrt(2 / pi)
  return 0.5f * x * (1.f + tanhf(k * (x + 0.044715f * x * x * x)));
}
// expm1(x) for x <= 0 (ELU's negative side) within 1 ulp (tests sweep it against double
// expm1), without branches or library calls so the CPU vectorises it (libm's expm1f costs
// ~7 ns an element). x = n ln2 + r, |r| <= ln2/2 (Cody-Waite: n * ln2_hi is exact);
// expm1(x) = 2^n expm1(r) + (2^n - 1), where 2^n expm1(r) is exact and 2^n - 1 exact for
// n >= -24; expm1(r) is its Taylor series to r^8 (truncation < 1e-9 relative). Below -88,
// expm1 is -1 in float; NaN and -0 pass through. Whether a compiler fuses the products into fmas
// changes nothing but last bits (<= 1 ulp either way).
TTT_HD inline float expm1_nonpositive(float x) {
  const float xc = x > -88.f ? x : -88.f;  // NaN -> -88 too: keeps the int conversion defined
  const float n = nearbyintf(xc * 1.44269504088896341f);
  const float r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 2.4801587301587302e-05f;  // 1/8!
  p = p * r + 1.9841269841269841e-04f;
  p = p * r + 1.3888888888888889e-03f;
  p = p * r + 8.3333333333333333e-03f;
  p = p * r + 4.1666666666666667e-02f;
  p = p * r + 1.6666666666666667e-01f;
  p = p * r + 0.5f;
  const float em = r + r * r * p;  // expm1(r)
  const float s = ::ttt::detail::bits_float(uint32_t(int(n) + 127) << 23);  // 2^n (n = -127: 0)
  const float y = s * em + (s - 1.f);
  return x == x && x != 0.f ? y : x;  // NaN stays NaN, -0 stays -0
}
// torch.nn.ELU(alpha=1): x > 0 ? x : expm1(x) (expm1 keeps small negative inputs exact,
// where exp(x) - 1 would cancel).
TTT_HD inline float elu(float x) { return x > 0.f ? x : expm1_nonpositive(x); }

TTT_HD inline float apply(Unary op, float x, float alpha) {
  switch (op) {
    case Unary::scale: return alpha * x;
    case Unary::silu: return silu(x);
    case Unary::gelu: return gelu(x);
    case Unary::gelu_tanh: return gelu_tanh(x);
    case Unary::tanh: return tanhf(x);
    case Unary::sigmoid: return sigmoid(x);
    case Unary::exp: return expf(x);
    case Unary::relu: return x > 0.f ? x : 0.f;
    case Unary::identity: return x;
    case Unary::elu: return elu(x);
  }
  return x;
}

// d/dx apply(op, x, alpha), the exact derivative of each formula above (what autograd
// computes; ops::unary_backward). elu: expm1(x) + 1 on the negative side.
TTT_HD inline float apply_grad(Unary op, float x, float alpha) {
  switch (op) {
    case Unary::scale: return alpha;
    case Unary::silu: {
      const float s = sigmoid(x);
      return s * (1.f + x * (1.f - s));
    }
    case Unary::gelu:
      return 0.5f * (1.f + erff(x * 0.70710678118654752f)) + x * 0.39894228040143268f * expf(-0.5f * x * x);
    case Unary::gelu_tanh: {
      const float k = 0.79788456080286536f;  // sqrt(2 / pi)
      const float t = tanhf(k * (x + 0.044715f * x * x * x));
      return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
    }
    case Unary::tanh: {
      const float t = tanhf(x);
      return 1.f - t * t;
    }
    case Unary::sigmoid: {
      const float s = sigmoid(x);
      return s * (1.f - s);
    }
    case Unary::exp: return expf(x);
    case Unary::relu: return x > 0.f ? 1.f : 0.f;
    case Unary::identity: return 1.f;
    case Unary::elu: return x > 0.f ? 1.f : expm1_nonpositive(x) + 1.f;
  }
  return 1.f;
}

TTT_HD inline float apply(Binary op, float a, float b) {
  switch (op) {
    case Binary::add: return a + b;
    case Binary::sub: return a - b;
    case Binary::mul: return a * b;
    case Binary::div: return a / b;
  }
  return a;
}

// RoPE frequency of pair i for head dimension D, as moshi computes it in fp32.
TTT_HD inline float rope_freq(int i, int D, float max_period) {
  // moshi: ds * (-math.log(max_period) * 2 / D) -- the constant in double, rounded once.
  const float c = float(-log(double(max_period)) * 2.0 / double(D));
  return expf(float(i) * c);
}

// Element i of ops::random_normal: Box-Muller on Philox words, redrawn (next attempt
// counter) while |z| > 3.
TTT_HD inline float truncated_normal(uint64_t seed, uint64_t key, uint64_t i) {
  for (uint32_t attempt = 0;; ++attempt) {
    uint32_t c[4] = {uint32_t(i), uint32_t(i >> 32), uint32_t(key) ^ attempt * 0x9E3779B9u, uint32_t(key >> 32)};
    Philox::generate(c, uint32_t(seed), uint32_t(seed >> 32));
    const float u1 = (float(c[0] >> 8) + 0.5f) * (1.0f / 16777216.0f);
    const float u2 = float(c[1] >> 8) * (1.0f / 16777216.0f);
    const float z = sqrtf(-2.f * logf(u1)) * cosf(6.2831853071795865f * u2);
    if (fabsf(z) <= 3.f || attempt >= 64) return fabsf(z) <= 3.f ? z : 0.f;
  }
}

}  // namespace ttt::math
