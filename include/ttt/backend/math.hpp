#pragma once
// Scalar formulas shared by every backend, so that CPU and CUDA compute the same function.
#include <cmath>

#include "ttt/backend/ops.hpp"
#include "ttt/config.hpp"

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

}  // namespace ttt::math
