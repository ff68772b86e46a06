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
  }
  return x;
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
