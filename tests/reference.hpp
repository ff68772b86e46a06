#pragma once
// Independent float64 references for the op tests: naive loops over row-major vectors,
// written from the definitions, sharing no code with the backends.
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "ttt/core/tensor.hpp"

namespace ref {

using ttt::Cpu;
using ttt::Shape;
using ttt::Tensor;

template <class T>
Tensor<T, Cpu> random(const Shape& s, std::mt19937& g, float lo = -1.f, float hi = 1.f) {
  auto t = Tensor<T, Cpu>::empty(s);
  std::uniform_real_distribution<float> d(lo, hi);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = ttt::from_f32<T>(d(g));
  return t;
}

// Row-major doubles of any host tensor (strided views included).
template <class T>
std::vector<double> values(const Tensor<T, Cpu>& t) {
  auto v = t.to_vector();
  std::vector<double> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    if constexpr (ttt::is_floating_v<T> && !std::is_same_v<T, double>) out[i] = ttt::to_f32(v[i]);
    else out[i] = double(v[i]);
  }
  return out;
}

inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  if (a.size() != b.size()) return std::numeric_limits<double>::infinity();
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return std::numeric_limits<double>::infinity();
    if (!std::isnan(a[i])) m = std::max(m, std::abs(a[i] - b[i]));
  }
  return m;
}
inline double max_abs(const std::vector<double>& a) {
  double m = 0;
  for (double v : a) m = std::max(m, std::abs(v));
  return m;
}

// C[M,N] = A[M,K] B[K,N]
inline std::vector<double> matmul(const std::vector<double>& a, const std::vector<double>& b, int64_t M, int64_t K,
                                  int64_t N) {
  std::vector<double> c(size_t(M * N), 0.0);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = 0;
      for (int64_t k = 0; k < K; ++k) s += a[size_t(m * K + k)] * b[size_t(k * N + n)];
      c[size_t(m * N + n)] = s;
    }
  return c;
}

inline double silu(double x) { return x / (1 + std::exp(-x)); }
inline double gelu(double x) { return 0.5 * x * (1 + std::erf(x / std::sqrt(2.0))); }
inline double gelu_tanh(double x) {
  return 0.5 * x * (1 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}
inline double sigmoid(double x) { return 1 / (1 + std::exp(-x)); }

inline std::vector<double> softmax_rows(const std::vector<double>& x, int64_t n) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / size_t(n); ++r) {
    double m = -1e300, z = 0;
    for (int64_t j = 0; j < n; ++j) m = std::max(m, x[r * n + j]);
    for (int64_t j = 0; j < n; ++j) z += std::exp(x[r * n + j] - m);
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = std::exp(x[r * n + j] - m) / z;
  }
  return y;
}

inline std::vector<double> layer_norm_rows(const std::vector<double>& x, int64_t n, const std::vector<double>& w,
                                           const std::vector<double>& b, double eps) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / size_t(n); ++r) {
    double mu = 0, var = 0;
    for (int64_t j = 0; j < n; ++j) mu += x[r * n + j];
    mu /= double(n);
    for (int64_t j = 0; j < n; ++j) var += (x[r * n + j] - mu) * (x[r * n + j] - mu);
    var /= double(n);
    for (int64_t j = 0; j < n; ++j) {
      double v = (x[r * n + j] - mu) / std::sqrt(var + eps);
      if (!w.empty()) v *= w[size_t(j)];
      if (!b.empty()) v += b[size_t(j)];
      y[r * n + j] = v;
    }
  }
  return y;
}

inline std::vector<double> rms_norm_rows(const std::vector<double>& x, int64_t n, const std::vector<double>& alpha,
                                         double eps) {
  std::vector<double> y(x.size());
  for (size_t r = 0; r < x.size() / size_t(n); ++r) {
    double ss = 0;
    for (int64_t j = 0; j < n; ++j) ss += x[r * n + j] * x[r * n + j];
    const double s = 1 / std::sqrt(eps + ss / double(n));
    for (int64_t j = 0; j < n; ++j) y[r * n + j] = x[r * n + j] * alpha[size_t(j)] * s;
  }
  return y;
}

// x [B, T, H, D] row-major, positions [B, T].
inline std::vector<double> rope(const std::vector<double>& x, const std::vector<int64_t>& pos, int64_t B, int64_t T,
                                int64_t H, int64_t D, double max_period) {
  std::vector<double> y(x.size());
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D / 2; ++i) {
          const double ang = double(pos[size_t(b * T + t)]) * std::pow(max_period, -2.0 * double(i) / double(D));
          const size_t o = size_t(((b * T + t) * H + h) * D + 2 * i);
          y[o] = x[o] * std::cos(ang) - x[o + 1] * std::sin(ang);
          y[o + 1] = x[o] * std::sin(ang) + x[o + 1] * std::cos(ang);
        }
  return y;
}

// q [B,T,H,D], k/v [B,Hk,S,D], positions [B,T] / [B,S].
inline std::vector<double> attention(const std::vector<double>& q, const std::vector<double>& k,
                                     const std::vector<double>& v, const std::vector<int64_t>& qp,
                                     const std::vector<int64_t>& kp, int64_t B, int64_t T, int64_t H, int64_t Hk,
                                     int64_t S, int64_t D, int64_t context, double scale) {
  std::vector<double> o(size_t(B * T * H * D), 0.0);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h) {
        const int64_t hk = h / (H / Hk);
        std::vector<double> w(size_t(S), 0.0);
        double m = -1e300;
        bool any = false;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t d = qp[size_t(b * T + t)] - kp[size_t(b * S + s)];
          if (kp[size_t(b * S + s)] < 0 || d < 0 || (context > 0 && d >= context)) continue;
          double dot = 0;
          for (int64_t e = 0; e < D; ++e)
            dot += q[size_t(((b * T + t) * H + h) * D + e)] * k[size_t(((b * Hk + hk) * S + s) * D + e)];
          w[size_t(s)] = dot * scale;
          m = std::max(m, w[size_t(s)]);
          any = true;
        }
        if (!any) continue;
        double z = 0;
        for (int64_t s = 0; s < S; ++s) {
          const int64_t d = qp[size_t(b * T + t)] - kp[size_t(b * S + s)];
          if (kp[size_t(b * S + s)] < 0 || d < 0 || (context > 0 && d >= context)) {
            w[size_t(s)] = 0;
            continue;
          }
          w[size_t(s)] = std::exp(w[size_t(s)] - m);
          z += w[size_t(s)];
        }
        for (int64_t s = 0; s < S; ++s)
          for (int64_t e = 0; e < D; ++e)
            o[size_t(((b * T + t) * H + h) * D + e)] += w[size_t(s)] / z * v[size_t(((b * Hk + hk) * S + s) * D + e)];
      }
  return o;
}

// Convolutions, straight from PyTorch's definitions. y is the result, mag the sum of
// |product| terms of each output (the scale a float accumulation error is relative to).
struct Conv {
  std::vector<double> y, mag;
};

// F.conv1d without padding: x [B, Cin, Tin], w [Cout, Cin/groups, K], bias [Cout] or empty.
inline Conv conv1d(const std::vector<double>& x, const std::vector<double>& w, const std::vector<double>& bias,
                   int64_t B, int64_t Cin, int64_t Tin, int64_t Cout, int64_t K, int64_t stride, int64_t dilation,
                   int64_t groups) {
  const int64_t Cg = Cin / groups, M = Cout / groups, Tout = (Tin - dilation * (K - 1) - 1) / stride + 1;
  Conv r{std::vector<double>(size_t(B * Cout * Tout)), std::vector<double>(size_t(B * Cout * Tout))};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < Cout; ++o)
      for (int64_t t = 0; t < Tout; ++t) {
        double s = bias.empty() ? 0.0 : bias[size_t(o)], m = std::abs(s);
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t k = 0; k < K; ++k) {
            const double p = w[size_t((o * Cg + c) * K + k)] *
                             x[size_t((b * Cin + (o / M) * Cg + c) * Tin + t * stride + k * dilation)];
            s += p;
            m += std::abs(p);
          }
        r.y[size_t((b * Cout + o) * Tout + t)] = s;
        r.mag[size_t((b * Cout + o) * Tout + t)] = m;
      }
  return r;
}

// F.conv_transpose1d without padding: x [B, Cin, Tin], w [Cin, Cout/groups, K]; every input
// step scatters its kernel-long window.
inline Conv conv_transpose1d(const std::vector<double>& x, const std::vector<double>& w,
                             const std::vector<double>& bias, int64_t B, int64_t Cin, int64_t Tin, int64_t Cout,
                             int64_t K, int64_t stride, int64_t groups) {
  const int64_t Cg = Cin / groups, Og = Cout / groups, Tout = (Tin - 1) * stride + K;
  Conv r{std::vector<double>(size_t(B * Cout * Tout)), std::vector<double>(size_t(B * Cout * Tout))};
  for (int64_t b = 0; b < B; ++b)
    for (int64_t o = 0; o < Cout; ++o)
      for (int64_t j = 0; j < Tout; ++j) {
        r.y[size_t((b * Cout + o) * Tout + j)] = bias.empty() ? 0.0 : bias[size_t(o)];
        r.mag[size_t((b * Cout + o) * Tout + j)] = std::abs(r.y[size_t((b * Cout + o) * Tout + j)]);
      }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t ci = 0; ci < Cin; ++ci) {
      const int64_t g = ci / Cg;
      for (int64_t ol = 0; ol < Og; ++ol)
        for (int64_t t = 0; t < Tin; ++t)
          for (int64_t k = 0; k < K; ++k) {
            const double p = x[size_t((b * Cin + ci) * Tin + t)] * w[size_t((ci * Og + ol) * K + k)];
            const size_t o = size_t((b * Cout + g * Og + ol) * Tout + t * stride + k);
            r.y[o] += p;
            r.mag[o] += std::abs(p);
          }
    }
  return r;
}

inline double elu(double x) { return x > 0 ? x : std::expm1(x); }

}  // namespace ref
