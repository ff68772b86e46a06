#pragma once
// Kernels<Cpu>: the op set on the host. Eigen does the matrix products, OpenMP spreads
// the bandwidth-bound ones (GEMV, attention) over the cores; everything else is plain
// loops over strided rows. Arithmetic is float (double for statistics) whatever T is.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ttt/backend/cpu/conv.hpp"
#include "ttt/backend/cpu/strided.hpp"
#include "ttt/backend/math.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/core/rng.hpp"

namespace ttt {

namespace cpu {

template <class T>
inline float ld(const T* p) {
  return to_f32(*p);
}
template <class T>
inline void st(T* p, float v) {
  *p = from_f32<T>(v);
}

// Contiguous float copy of a strided tensor (what Eigen gets when T is not float).
template <class T>
std::vector<float> to_float_rows(const Tensor<T, Cpu>& t) {
  std::vector<float> out(static_cast<size_t>(t.numel()));
  size_t i = 0;
  const T* base = t.data();
  for_each_row<1>(t.shape(), {t.strides()}, [&](auto off, auto inner, int64_t n) {
    const T* p = base + off[0];
    for (int64_t j = 0; j < n; ++j) out[i++] = to_f32(p[j * inner[0]]);
  });
  return out;
}

// A row of codes of format F decoded to float without a table, so that the loop vectorises:
// int8 is a conversion; e4m3 builds the float's bits ((e + 120) << 23 | m << 20: the exponent
// rebiased from 7 to 127) for normal codes, m * 2^-9 for subnormal ones (e = 0) and NaN for
// 0x7F / 0xFF, chosen by bit masks, then puts the sign on. Equal to F::decode bit for bit for all 256
// codes (test_quant checks).
template <class F>
inline void decode_codes(const uint8_t* codes, int64_t n, float* out) {
  if constexpr (std::is_same_v<F, Int8>) {
    for (int64_t k = 0; k < n; ++k) out[k] = float(int8_t(codes[k]));
  } else {
    for (int64_t k = 0; k < n; ++k) {  // masks, not branches: the loop must stay branch-free
      const uint32_t u = codes[k], em = u & 0x7Fu;
      const uint32_t normal = (em + 960u) << 20;
      const uint32_t sub = detail::float_bits(float(int32_t(u & 7u)) * 0.001953125f);
      const uint32_t is_sub = 0u - uint32_t(em < 8u), is_nan = 0u - uint32_t(em == 0x7Fu);
      uint32_t bits = (sub & is_sub) | (normal & ~is_sub);
      bits = (0x7FC00000u & is_nan) | (bits & ~is_nan);
      out[k] = detail::bits_float(bits | ((u & 0x80u) << 24));
    }
  }
}

// One row of n values quantised in format F (core/quant.hpp): codes F::encode(x / scale) into
// `codes`, returns scale = max |x| / F::qmax (1 for an all-zero row). quantize_rows and the
// quantised kv_write both store rows this way, so the same values give the same bytes.
template <class F, class T>
inline float quantize_row(const T* x, int64_t n, uint8_t* codes) {
  float amax = 0.f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(to_f32(x[k])));
  const float s = amax > 0.f ? amax / F::qmax : 1.f;
  for (int64_t k = 0; k < n; ++k) codes[k] = F::encode(to_f32(x[k]) / s);
  return s;
}

// q . x over n elements in 8 interleaved fp32 partial sums (lane j sums elements j, j + 8, ...),
// added at the end: the loop vectorises and no single addition chain is n long.
template <class T>
inline float dot8(const float* q, const T* x, int64_t n) {
  float part[8] = {};
  int64_t d = 0;
  for (; d + 8 <= n; d += 8)
    for (int j = 0; j < 8; ++j) part[j] += q[d + j] * to_f32(x[d + j]);
  float dot = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
  for (; d < n; ++d) dot += q[d] * to_f32(x[d]);
  return dot;
}

using RowMajorMap = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                               Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;
using RowMajorMutMap = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>, 0,
                                  Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>>;
using DenseRowMap = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;
using DenseRowMutMap = Eigen::Map<Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>>;

inline int num_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace cpu

template <>
struct Kernels<Cpu> {
  template <class T>
  static void copy(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in) {
    T* o = out.data();
    const T* a = in.data();
    cpu::for_each_row<2>(out.shape(), {out.strides(), in.strides()}, [&](auto off, auto inner, int64_t n) {
      for (int64_t j = 0; j < n; ++j) o[off[0] + j * inner[0]] = a[off[1] + j * inner[1]];
    });
  }

  template <class To, class From>
  static void cast(const Tensor<To, Cpu>& out, const Tensor<From, Cpu>& in) {
    To* o = out.data();
    const From* a = in.data();
    cpu::for_each_row<2>(out.shape(), {out.strides(), in.strides()}, [&](auto off, auto inner, int64_t n) {
      for (int64_t j = 0; j < n; ++j) {
        const From v = a[off[1] + j * inner[1]];
        if constexpr (is_floating_v<To> && is_floating_v<From>) {
          if constexpr (std::is_same_v<To, double>) o[off[0] + j * inner[0]] = double(to_f32(v));
          else if constexpr (std::is_same_v<From, double>) o[off[0] + j * inner[0]] = from_f32<To>(float(v));
          else o[off[0] + j * inner[0]] = from_f32<To>(to_f32(v));
        } else if constexpr (is_floating_v<From>) {
          o[off[0] + j * inner[0]] = To(to_f32(v));
        } else if constexpr (is_floating_v<To>) {
          o[off[0] + j * inner[0]] = from_f32<To>(float(v));
        } else {
          o[off[0] + j * inner[0]] = To(v);
        }
      }
    });
  }

  template <class T>
  static void fill(const Tensor<T, Cpu>& out, double value) {
    T v;
    if constexpr (is_floating_v<T> && !std::is_same_v<T, double>) v = from_f32<T>(float(value));
    else v = T(value);
    T* o = out.data();
    cpu::for_each_row<1>(out.shape(), {out.strides()}, [&](auto off, auto inner, int64_t n) {
      for (int64_t j = 0; j < n; ++j) o[off[0] + j * inner[0]] = v;
    });
  }

  // ELU's loop is resolved outside the element loop so that it inlines and vectorises
  // (SEANet applies it to every activation); the other ops go through math::apply.
  template <class T>
  static void unary(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, Unary op, float alpha) {
    if (op == Unary::elu) return unary_with(out, in, [](float v) { return math::elu(v); });
    unary_with(out, in, [op, alpha](float v) { return math::apply(op, v, alpha); });
  }
  template <class T, class F>
  static void unary_with(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, F f) {
    T* o = out.data();
    const T* a = in.data();
    cpu::for_each_row<2>(out.shape(), {out.strides(), in.strides()}, [&](auto off, auto inner, int64_t n) {
      T* po = o + off[0];
      const T* pa = a + off[1];
      const auto lo = reinterpret_cast<uintptr_t>(po), li = reinterpret_cast<uintptr_t>(pa);
      const auto bytes = uintptr_t(n) * sizeof(T);
      if (inner[0] == 1 && inner[1] == 1 && (lo == li || lo + bytes <= li || li + bytes <= lo)) {
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) po[j] = from_f32<T>(f(to_f32(pa[j])));  // in place: same index
      } else {
        for (int64_t j = 0; j < n; ++j) po[j * inner[0]] = from_f32<T>(f(to_f32(pa[j * inner[1]])));
      }
    });
  }

  template <class T>
  static void binary(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& a, const Tensor<T, Cpu>& b, Binary op) {
    T* o = out.data();
    const T* pa = a.data();
    const T* pb = b.data();
    cpu::for_each_row<3>(out.shape(), {out.strides(), a.strides(), b.strides()},
                         [&](auto off, auto inner, int64_t n) {
                           for (int64_t j = 0; j < n; ++j)
                             o[off[0] + j * inner[0]] = from_f32<T>(math::apply(
                                 op, to_f32(pa[off[1] + j * inner[1]]), to_f32(pb[off[2] + j * inner[2]])));
                         });
  }

  template <class T>
  static void glu(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, Unary act) {
    const int64_t H = out.size(-1), rows = cpu::num_rows(out.shape());
    for (int64_t r = 0; r < rows; ++r) {
      T* o = out.data() + cpu::row_offset(out.shape(), out.strides(), r);
      const T* g = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      for (int64_t j = 0; j < H; ++j) o[j] = from_f32<T>(math::apply(act, to_f32(g[j]), 1.f) * to_f32(g[H + j]));
    }
  }

  // out, a, b are rank 4 (batch dims broadcast with stride 0); out's last stride is 1.
  template <class T>
  static void matmul(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& a, const Tensor<T, Cpu>& b, float alpha,
                     float beta) {
    const int64_t B0 = out.size(0), B1 = out.size(1), M = out.size(2), N = out.size(3), K = a.size(3);
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t i = 0; i < B0; ++i)
        for (int64_t j = 0; j < B1; ++j) {
          const float* pa = a.data() + i * a.stride(0) + j * a.stride(1);
          const float* pb = b.data() + i * b.stride(0) + j * b.stride(1);
          float* po = out.data() + i * out.stride(0) + j * out.stride(1);
          cpu::RowMajorMap A(pa, M, K, {a.stride(2), a.stride(3)});
          cpu::RowMajorMap Bm(pb, K, N, {b.stride(2), b.stride(3)});
          cpu::RowMajorMutMap O(po, M, N, {out.stride(2), 1});
          if (beta == 0.f) {
            O.noalias() = alpha * (A * Bm);
          } else {
            if (beta != 1.f) O *= beta;
            O.noalias() += alpha * (A * Bm);
          }
        }
    } else {
      // Narrow types: widen to float, multiply, round once.
      auto fa = cpu::to_float_rows(a), fb = cpu::to_float_rows(b);
      std::vector<float> fo(static_cast<size_t>(M * N));
      for (int64_t i = 0; i < B0; ++i)
        for (int64_t j = 0; j < B1; ++j) {
          cpu::DenseRowMap A(fa.data() + (i * B1 + j) * M * K, M, K);
          cpu::DenseRowMap Bm(fb.data() + (i * B1 + j) * K * N, K, N);
          cpu::DenseRowMutMap O(fo.data(), M, N);
          O.noalias() = alpha * (A * Bm);
          T* po = out.data() + i * out.stride(0) + j * out.stride(1);
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              T* d = po + m * out.stride(2) + n;
              float prev = beta == 0.f ? 0.f : beta * to_f32(*d);
              *d = from_f32<T>(prev + fo[size_t(m * N + n)]);
            }
        }
    }
  }

  // y [R, N] (+)= x [R, K] @ W^T, W [N, K]; all contiguous. Every output element is one
  // vectorised dot product whose summation order depends on K only, never on R: a row
  // gives the same bits whether it is computed alone (streaming) or with others (teacher
  // forcing), which is what makes streaming equal teacher forcing and a TTT layer at its
  // init equal the plain layer exactly. Split over output rows so batch-1 decoding (a
  // GEMV, bandwidth bound) uses every core.
  template <class T>
  static void linear(const Tensor<T, Cpu>& y, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w, float beta) {
    const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
    std::vector<float> xbuf;
    const float* xf;
    if constexpr (std::is_same_v<T, float>) {
      xf = x.data();
    } else {
      xbuf = cpu::to_float_rows(x);
      xf = xbuf.data();
    }
    using Vec = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, 1>>;
    const int64_t work = N * K * R;
    const int nt = work > (int64_t(1) << 15) ? cpu::num_threads() : 1;
    const int64_t blk = std::max<int64_t>(16, std::min<int64_t>((N + nt - 1) / nt, 256));
    const int64_t nblk = (N + blk - 1) / blk;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      std::vector<float> wrow;
      if constexpr (!std::is_same_v<T, float>) wrow.resize(size_t(K));
#pragma omp for schedule(static)
      for (int64_t ib = 0; ib < nblk; ++ib) {
        const int64_t n0 = ib * blk, n1 = std::min(N, n0 + blk);
        for (int64_t n = n0; n < n1; ++n) {
          const float* wp;
          if constexpr (std::is_same_v<T, float>) {
            wp = w.data() + n * K;
          } else {
            const T* src = w.data() + n * K;
            for (int64_t k = 0; k < K; ++k) wrow[size_t(k)] = to_f32(src[k]);
            wp = wrow.data();
          }
          const Vec wv(wp, K);
          for (int64_t r = 0; r < R; ++r) {
            float v = wv.dot(Vec(xf + r * K, K));
            T* py = y.data() + r * N + n;
            if (beta != 0.f) v += beta * to_f32(*py);
            *py = from_f32<T>(v);
          }
        }
      }
    }
  }

  template <class T>
  static void fused_linear(const Tensor<T, Cpu>& y, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                           const FusedLinear<T, Cpu>& f) {
    ops::fused_linear_unfused(y, x, w, f);
  }

  // Quantised weights (core/quant.hpp): rows decoded to float one at a time, as linear
  // converts bf16 rows, then the same dot products; the row scale multiplies each sum.
  template <class F, class T>
  static void quantize_rows(const QuantWeight<F, Cpu>& out, const Tensor<T, Cpu>& w) {
    const int64_t N = w.size(0), K = w.size(1);
    const T* wp = w.data();
    uint8_t* codes = out.data.data();
    float* scales = out.scale.data();
#pragma omp parallel for schedule(static) if (N * K > (int64_t(1) << 16))
    for (int64_t n = 0; n < N; ++n) {
      scales[n] = cpu::quantize_row<F>(wp + n * K, K, codes + n * K);
    }
  }
  template <class T, class F>
  static void dequantize(const Tensor<T, Cpu>& out, const QuantWeight<F, Cpu>& w) {
    const int64_t N = w.size(0), K = w.size(1);
    for (int64_t n = 0; n < N; ++n) {
      const float s = w.scale.data()[n];
      for (int64_t k = 0; k < K; ++k) out.data()[n * K + k] = from_f32<T>(s * F::decode(w.data.data()[n * K + k]));
    }
  }
  template <class T, class F>
  static void linear_q(const Tensor<T, Cpu>& y, const Tensor<T, Cpu>& x, const QuantWeight<F, Cpu>& w, float beta) {
    const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
    const std::vector<float> xbuf = cpu::to_float_rows(x);
    const uint8_t* codes = w.data.data();
    const float* scales = w.scale.data();
    const float* xs = xbuf.data();
    T* yp = y.data();
    using Vec = Eigen::Map<const Eigen::Matrix<float, Eigen::Dynamic, 1>>;
    const int nt = N * K * R > (int64_t(1) << 15) ? cpu::num_threads() : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      std::vector<float> wrow(static_cast<size_t>(K));
#pragma omp for schedule(static)
      for (int64_t n = 0; n < N; ++n) {
        cpu::decode_codes<F>(codes + n * K, K, wrow.data());
        const Vec wv(wrow.data(), K);
        const float s = scales[n];
        for (int64_t r = 0; r < R; ++r) {
          float v = s * wv.dot(Vec(xs + r * K, K));
          T* py = yp + r * N + n;
          if (beta != 0.f) v += beta * to_f32(*py);
          *py = from_f32<T>(v);
        }
      }
    }
  }
  template <class T, class F>
  static void fused_linear_q(const Tensor<T, Cpu>& y, const Tensor<T, Cpu>& x, const QuantWeight<F, Cpu>& w,
                             const FusedLinear<T, Cpu>& f) {
    ops::fused_linear_unfused(y, x, w, f);
  }

  template <class T>
  static void reduce(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, Reduce op) {
    const int64_t rows = cpu::num_rows(in.shape()), n = in.size(-1), s = in.stride(-1);
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      double acc = op == Reduce::max ? -std::numeric_limits<double>::infinity() : 0.0;
      for (int64_t j = 0; j < n; ++j) {
        double v = to_f32(p[j * s]);
        if (op == Reduce::max) acc = (v > acc || std::isnan(v)) ? v : acc;
        else acc += v;
      }
      if (op == Reduce::mean) acc /= double(n);
      // out has rank-1 shape; walk it as rows of length 1 by flat index.
      T* o = out.data() + (out.rank() ? cpu::row_offset(out.unsqueeze(-1).shape(), out.unsqueeze(-1).strides(), r) : 0);
      *o = from_f32<T>(float(acc));
    }
  }

  template <class T>
  static void argmax(const Tensor<int64_t, Cpu>& out, const Tensor<T, Cpu>& in) {
    const int64_t rows = cpu::num_rows(in.shape()), n = in.size(-1), s = in.stride(-1);
    auto o1 = out.unsqueeze(-1);
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      int64_t best = 0;
      float bv = -std::numeric_limits<float>::infinity();
      bool found = false;
      for (int64_t j = 0; j < n; ++j) {
        float v = to_f32(p[j * s]);
        if (std::isnan(v)) continue;
        if (!found || v > bv) {
          bv = v;
          best = j;
          found = true;
        }
      }
      out.data()[cpu::row_offset(o1.shape(), o1.strides(), r)] = best;
    }
  }

  template <class T>
  static void softmax(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in) {
    const int64_t rows = cpu::num_rows(in.shape()), n = in.size(-1), s = in.stride(-1);
    std::vector<float> buf(static_cast<size_t>(n));
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      T* o = out.data() + cpu::row_offset(out.shape(), out.strides(), r);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < n; ++j) m = std::max(m, buf[size_t(j)] = to_f32(p[j * s]));
      double z = 0;
      for (int64_t j = 0; j < n; ++j) z += (buf[size_t(j)] = std::exp(buf[size_t(j)] - m));
      const float inv = float(1.0 / z);
      for (int64_t j = 0; j < n; ++j) o[j] = from_f32<T>(buf[size_t(j)] * inv);
    }
  }

  template <class T>
  static void layer_norm(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, const Tensor<T, Cpu>& weight,
                         const Tensor<T, Cpu>& bias, float eps) {
    const int64_t rows = cpu::num_rows(in.shape()), n = in.size(-1), s = in.stride(-1);
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      T* o = out.data() + cpu::row_offset(out.shape(), out.strides(), r);
      double mu = 0;
      for (int64_t j = 0; j < n; ++j) mu += to_f32(p[j * s]);
      mu /= double(n);
      double var = 0;
      for (int64_t j = 0; j < n; ++j) {
        double d = to_f32(p[j * s]) - mu;
        var += d * d;
      }
      var /= double(n);
      const float rstd = float(1.0 / std::sqrt(var + double(eps)));
      const float muf = float(mu);
      for (int64_t j = 0; j < n; ++j) {
        float v = (to_f32(p[j * s]) - muf) * rstd;
        if (weight.defined()) v *= to_f32(weight.data()[j]);
        if (bias.defined()) v += to_f32(bias.data()[j]);
        o[j] = from_f32<T>(v);
      }
    }
  }

  template <class T>
  static void unary_backward(const Tensor<T, Cpu>& dx, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& dy, Unary op,
                             float alpha) {
    T* o = dx.data();
    const T* px = x.data();
    const T* pd = dy.data();
    cpu::for_each_row<3>(dx.shape(), {dx.strides(), x.strides(), dy.strides()}, [&](auto off, auto inner, int64_t n) {
      for (int64_t j = 0; j < n; ++j)
        o[off[0] + j * inner[0]] = from_f32<T>(to_f32(pd[off[2] + j * inner[2]]) *
                                               math::apply_grad(op, to_f32(px[off[1] + j * inner[1]]), alpha));
    });
  }

  // See ops::layer_norm_backward. dweight / dbias arrive zeroed.
  template <class T>
  static void layer_norm_backward(const Tensor<T, Cpu>& dx, const Tensor<T, Cpu>& dweight, const Tensor<T, Cpu>& dbias,
                                  const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& weight, const Tensor<T, Cpu>& dy,
                                  float eps) {
    const int64_t rows = cpu::num_rows(x.shape()), n = x.size(-1), sx = x.stride(-1), sd = dy.stride(-1);
    std::vector<double> xh(static_cast<size_t>(n)), u(static_cast<size_t>(n));
    std::vector<double> dw(dweight.defined() ? size_t(n) : 0), db(dbias.defined() ? size_t(n) : 0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* px = x.data() + cpu::row_offset(x.shape(), x.strides(), r);
      const T* pd = dy.data() + cpu::row_offset(dy.shape(), dy.strides(), r);
      T* o = dx.data() + cpu::row_offset(dx.shape(), dx.strides(), r);
      double mu = 0;
      for (int64_t j = 0; j < n; ++j) mu += to_f32(px[j * sx]);
      mu /= double(n);
      double var = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double d = to_f32(px[j * sx]) - mu;
        var += d * d;
      }
      const double rstd = 1.0 / std::sqrt(var / double(n) + double(eps));
      double su = 0, sux = 0;
      for (int64_t j = 0; j < n; ++j) {
        const double g = to_f32(pd[j * sd]);
        const double xj = (to_f32(px[j * sx]) - mu) * rstd;
        const double uj = weight.defined() ? g * to_f32(weight.data()[j]) : g;
        xh[size_t(j)] = xj;
        u[size_t(j)] = uj;
        su += uj;
        sux += uj * xj;
        if (!dw.empty()) dw[size_t(j)] += g * xj;
        if (!db.empty()) db[size_t(j)] += g;
      }
      su /= double(n);
      sux /= double(n);
      for (int64_t j = 0; j < n; ++j) o[j] = from_f32<T>(float((u[size_t(j)] - su - xh[size_t(j)] * sux) * rstd));
    }
    for (size_t j = 0; j < dw.size(); ++j) dweight.data()[j] = from_f32<T>(float(dw[j]));
    for (size_t j = 0; j < db.size(); ++j) dbias.data()[j] = from_f32<T>(float(db[j]));
  }

  template <class T>
  static void rms_norm(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& in, const Tensor<T, Cpu>& alpha, float eps) {
    const int64_t rows = cpu::num_rows(in.shape()), n = in.size(-1), s = in.stride(-1);
    for (int64_t r = 0; r < rows; ++r) {
      const T* p = in.data() + cpu::row_offset(in.shape(), in.strides(), r);
      T* o = out.data() + cpu::row_offset(out.shape(), out.strides(), r);
      double ss = 0;
      for (int64_t j = 0; j < n; ++j) {
        double v = to_f32(p[j * s]);
        ss += v * v;
      }
      const float rs = float(1.0 / std::sqrt(double(eps) + ss / double(n)));
      for (int64_t j = 0; j < n; ++j) o[j] = from_f32<T>(to_f32(p[j * s]) * (to_f32(alpha.data()[j]) * rs));
    }
  }

  template <class T>
  static void rope(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<int64_t, Cpu>& positions,
                   float max_period) {
    const int64_t Bn = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3);
    std::vector<float> freq(static_cast<size_t>(D / 2));
    for (int64_t i = 0; i < D / 2; ++i) freq[size_t(i)] = math::rope_freq(int(i), int(D), max_period);
    // cos/sin once per position, shared by the heads (the trig dominated this op).
    std::vector<float> cs(static_cast<size_t>(D / 2)), sn(static_cast<size_t>(D / 2));
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < Tn; ++t) {
        const float pos = float(positions(b, t));
        for (int64_t i = 0; i < D / 2; ++i) {
          const float ang = freq[size_t(i)] * pos;
          cs[size_t(i)] = std::cos(ang);
          sn[size_t(i)] = std::sin(ang);
        }
        for (int64_t h = 0; h < H; ++h) {
          const T* pi = x.data() + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
          T* po = out.data() + b * out.stride(0) + t * out.stride(1) + h * out.stride(2);
          for (int64_t i = 0; i < D / 2; ++i) {
            const float c = cs[size_t(i)], s = sn[size_t(i)];
            const float re = to_f32(pi[2 * i]), im = to_f32(pi[2 * i + 1]);
            po[2 * i] = from_f32<T>(re * c - im * s);
            po[2 * i + 1] = from_f32<T>(re * s + im * c);
          }
        }
      }
  }

  template <class T>
  static void add_sin_embedding(const Tensor<T, Cpu>& x, const Tensor<int64_t, Cpu>& positions, float max_period,
                                float scale) {
    const int64_t Bn = x.size(0), Tn = x.size(1), C = x.size(2), half = C / 2;
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < Tn; ++t) {
        T* p = x.data() + (b * Tn + t) * C;
        const float pos = float(positions(b, t));
        for (int64_t i = 0; i < half; ++i) {
          // torch: positions / (max_period ** (adim / (half_dim - 1))), all in fp32.
          const float phase = pos / std::pow(max_period, float(i) / float(half - 1));
          p[i] = from_f32<T>(to_f32(p[i]) + scale * std::cos(phase));
          p[half + i] = from_f32<T>(to_f32(p[half + i]) + scale * std::sin(phase));
        }
      }
  }

  template <class T>
  static void embedding(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& table, const Tensor<int64_t, Cpu>& ids) {
    const int64_t V = table.size(0), D = table.size(1), n = ids.numel();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids.data()[i];
      T* o = out.data() + i * D;
      if (id < 0 || id >= V) std::fill(o, o + D, from_f32<T>(0.f));
      else std::copy(table.data() + id * D, table.data() + (id + 1) * D, o);
    }
  }

  // Convolutions and the codebook search live in cpu/conv.hpp (im2col + GEMM tiles).
  template <class T>
  static void conv1d(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                     const Tensor<T, Cpu>& bias, int64_t stride, int64_t dilation, int64_t groups) {
    cpu::conv::conv1d(out, x, w, bias, stride, dilation, groups);
  }
  template <class T>
  static void conv_transpose1d(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                               const Tensor<T, Cpu>& bias, int64_t stride, int64_t groups) {
    cpu::conv::conv_transpose1d(out, x, w, bias, stride, groups);
  }
  template <class T>
  static void vq_nearest(const Tensor<int64_t, Cpu>& codes, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& codebook) {
    cpu::conv::vq_nearest(codes, x, codebook);
  }

  // Masked attention, one (item, head) per thread. `key_dot(b, hk, s, qf, scratch)` is q . k[s]
  // and `value_axpy(b, hk, s, w, acc, scratch)` adds w v[s] to acc (scratch: D floats of the
  // calling thread's own): the storage of the keys and values (T, or codes with a scale per
  // row) is all that differs between the two forms.
  template <class T, class KeyDot, class ValueAxpy>
  static void attention_rows(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& q, int64_t Hk, int64_t S,
                             const Tensor<int64_t, Cpu>& q_pos, const Tensor<int64_t, Cpu>& k_pos,
                             const AttentionParams& p, const KeyDot& key_dot, const ValueAxpy& value_axpy) {
    const int64_t Bn = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3);
    const int64_t rep = H / Hk;
    const int64_t work = Bn * H * Tn * S * D;
    const int nt = work > (int64_t(1) << 16) ? cpu::num_threads() : 1;
    constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
      std::vector<float> sc(static_cast<size_t>(S)), acc(static_cast<size_t>(D)), qf(static_cast<size_t>(D)),
          scratch(static_cast<size_t>(D));
#pragma omp for schedule(static) collapse(2)
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t hk = h / rep;
          for (int64_t t = 0; t < Tn; ++t) {
            const int64_t qp = q_pos(b, t);
            const T* qv = q.data() + b * q.stride(0) + t * q.stride(1) + h * q.stride(2);
            for (int64_t d = 0; d < D; ++d) qf[size_t(d)] = to_f32(qv[d]);
            float m = kNegInf;
            for (int64_t s = 0; s < S; ++s) {
              // kp <= qp before subtracting: positions from a loaded session are arbitrary.
              const int64_t kp = k_pos(b, s);
              const int64_t ctx = s < p.prefix ? p.prefix_context : p.context;
              if (kp < 0 || kp > qp || (ctx > 0 && qp - kp >= ctx)) {
                sc[size_t(s)] = kNegInf;
                continue;
              }
              sc[size_t(s)] = key_dot(b, hk, s, qf.data(), scratch.data()) * p.scale +
                              (s < p.prefix && p.prefix_bias ? p.prefix_bias[h] : 0.f);
              m = std::max(m, sc[size_t(s)]);
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            T* o = out.data() + b * out.stride(0) + t * out.stride(1) + h * out.stride(2);
            if (m == kNegInf) {
              for (int64_t d = 0; d < D; ++d) o[d] = from_f32<T>(0.f);
              continue;
            }
            float z = 0.f;
            for (int64_t s = 0; s < S; ++s) {
              if (sc[size_t(s)] == kNegInf) continue;
              const float w = std::exp(sc[size_t(s)] - m);
              z += w;
              value_axpy(b, hk, s, w, acc.data(), scratch.data());
            }
            const float inv = 1.f / z;
            for (int64_t d = 0; d < D; ++d) o[d] = from_f32<T>(acc[size_t(d)] * inv);
          }
        }
    }
  }

  template <class T>
  static void attention(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& q, const Tensor<T, Cpu>& k,
                        const Tensor<T, Cpu>& v, const Tensor<int64_t, Cpu>& q_pos, const Tensor<int64_t, Cpu>& k_pos,
                        const AttentionParams& p) {
    const int64_t D = q.size(3);
    auto key_dot = [&](int64_t b, int64_t hk, int64_t s, const float* qf, float*) {
      return cpu::dot8(qf, k.data() + b * k.stride(0) + hk * k.stride(1) + s * k.stride(2), D);
    };
    auto value_axpy = [&](int64_t b, int64_t hk, int64_t s, float w, float* acc, float*) {
      const T* vv = v.data() + b * v.stride(0) + hk * v.stride(1) + s * v.stride(2);
      for (int64_t d = 0; d < D; ++d) acc[d] += w * to_f32(vv[d]);
    };
    attention_rows(out, q, k.size(1), k.size(2), q_pos, k_pos, p, key_dot, value_axpy);
  }

  // Quantised keys and values (core/quant.hpp QuantKv): each row's codes decoded to float
  // (cpu::decode_codes), the row scale applied once per score (q . k = scale_k (q . decode(codes)))
  // and folded into each value's weight.
  template <class T, class F>
  static void attention_q(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& q, const QuantKv<F, Cpu>& k,
                          const QuantKv<F, Cpu>& v, const Tensor<int64_t, Cpu>& q_pos,
                          const Tensor<int64_t, Cpu>& k_pos, const AttentionParams& p) {
    const int64_t Hk = k.size(1), S = k.size(2), D = k.size(3);
    auto key_dot = [&](int64_t b, int64_t hk, int64_t s, const float* qf, float* kf) {
      const int64_t row = (b * Hk + hk) * S + s;
      cpu::decode_codes<F>(k.codes.data() + row * D, D, kf);
      return cpu::dot8(qf, kf, D) * k.scale.data()[row];
    };
    auto value_axpy = [&](int64_t b, int64_t hk, int64_t s, float w, float* acc, float* vf) {
      const int64_t row = (b * Hk + hk) * S + s;
      cpu::decode_codes<F>(v.codes.data() + row * D, D, vf);
      const float ws = w * v.scale.data()[row];
      for (int64_t d = 0; d < D; ++d) acc[d] += ws * vf[d];
    };
    attention_rows(out, q, Hk, S, q_pos, k_pos, p, key_dot, value_axpy);
  }

  template <class T>
  static void kv_write(const Tensor<T, Cpu>& ring_k, const Tensor<T, Cpu>& ring_v, const Tensor<int64_t, Cpu>& ring_pos,
                       const Tensor<T, Cpu>& k, const Tensor<T, Cpu>& v, const Tensor<int64_t, Cpu>& positions,
                       const Tensor<uint8_t, Cpu>& exec_mask) {
    const int64_t D = ring_k.size(3);
    kv_write_rows(ring_k.shape(), ring_pos, k, v, positions, exec_mask,
                  [&](int64_t dst, const T* sk, const T* sv) {
                    std::copy(sk, sk + D, ring_k.data() + dst * D);
                    std::copy(sv, sv + D, ring_v.data() + dst * D);
                  });
  }
  // Each written row quantised as quantize_rows does (the same bytes as on CUDA).
  template <class T, class F>
  static void kv_write_q(const QuantKv<F, Cpu>& ring_k, const QuantKv<F, Cpu>& ring_v,
                         const Tensor<int64_t, Cpu>& ring_pos, const Tensor<T, Cpu>& k, const Tensor<T, Cpu>& v,
                         const Tensor<int64_t, Cpu>& positions, const Tensor<uint8_t, Cpu>& exec_mask) {
    const int64_t D = ring_k.size(3);
    auto put = [&](const QuantKv<F, Cpu>& ring, int64_t dst, const T* src) {
      ring.scale.data()[dst] = cpu::quantize_row<F>(src, D, ring.codes.data() + dst * D);
    };
    kv_write_rows(ring_k.codes.shape(), ring_pos, k, v, positions, exec_mask,
                  [&](int64_t dst, const T* sk, const T* sv) {
                    put(ring_k, dst, sk);
                    put(ring_v, dst, sv);
                  });
  }
  // The ring bookkeeping of kv_write: for every executing (b, t) in order (a later token
  // overwrites an earlier one of the same slot), ring_pos and then put(row, k row, v row)
  // for each head, row = (b * H + h) * C + slot.
  template <class T, class Put>
  static void kv_write_rows(const Shape& ring, const Tensor<int64_t, Cpu>& ring_pos, const Tensor<T, Cpu>& k,
                            const Tensor<T, Cpu>& v, const Tensor<int64_t, Cpu>& positions,
                            const Tensor<uint8_t, Cpu>& exec_mask, const Put& put) {
    const int64_t Bn = ring.d[0], H = ring.d[1], C = ring.d[2], Tn = k.size(1);
    for (int64_t b = 0; b < Bn; ++b) {
      if (exec_mask.defined() && !exec_mask.data()[b]) continue;
      for (int64_t t = 0; t < Tn; ++t) {
        const int64_t pos = positions(b, t);
        const int64_t slot = ((pos % C) + C) % C;
        ring_pos.data()[b * C + slot] = pos;
        for (int64_t h = 0; h < H; ++h)
          put((b * H + h) * C + slot, k.data() + b * k.stride(0) + t * k.stride(1) + h * k.stride(2),
              v.data() + b * v.stride(0) + t * v.stride(1) + h * v.stride(2));
      }
    }
  }

  template <class T>
  static void random_normal(const Tensor<T, Cpu>& out, float std, uint64_t seed, uint64_t key) {
    T* o = out.data();
    const int64_t n = out.numel();
#pragma omp parallel for schedule(static) if (n > (int64_t(1) << 16))
    for (int64_t i = 0; i < n; ++i) o[i] = from_f32<T>(std * math::truncated_normal(seed, key, uint64_t(i)));
  }

  template <class T>
  static void sample(const Tensor<int64_t, Cpu>& out, const Tensor<T, Cpu>& logits, const SampleParams& p,
                     const Tensor<int64_t, Cpu>& counter) {
    const int64_t N = logits.size(0), V = logits.size(1);
    // Per-row parameters key the draw on (seed, counter) of the row and the token only;
    // the scalar ones on the shared counter and row * V + token (see SampleParams).
    const bool rows = p.row_counter != nullptr;
    std::vector<int64_t> idx(static_cast<size_t>(V));
    for (int64_t r = 0; r < N; ++r) {
      const T* l = logits.data() + r * logits.stride(0);
      auto lv = [&](int64_t i) {
        float x = to_f32(l[i]);
        return std::isnan(x) ? -std::numeric_limits<float>::infinity() : x;
      };
      const float temperature = rows ? p.row_temperature[r] : p.temperature;
      const int64_t top_k = rows ? p.row_top_k[r] : p.top_k;
      const uint64_t seed = rows ? uint64_t(p.row_seed[r]) : p.seed;
      const uint64_t ctr = uint64_t(rows ? p.row_counter[r] : counter.data()[0]) * 64u + p.salt;
      const uint64_t key0 = rows ? 0 : uint64_t(r * V);
      const int64_t k = (top_k <= 0 || top_k > V) ? V : top_k;
      if (!(temperature > 0.f) || k == 1) {
        int64_t best = 0;
        for (int64_t i = 1; i < V; ++i)
          if (lv(i) > lv(best)) best = i;
        out.data()[r] = best;
        continue;
      }
      // Top-k by (logit desc, index asc): a total order, so every backend picks the same set.
      std::iota(idx.begin(), idx.end(), int64_t(0));
      auto better = [&](int64_t a, int64_t b) { return lv(a) > lv(b) || (lv(a) == lv(b) && a < b); };
      if (k < V) std::nth_element(idx.begin(), idx.begin() + (k - 1), idx.end(), better);
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t j = 0; j < k; ++j) m = std::max(m, lv(idx[size_t(j)]));
      // log(p_i / E_i) up to a constant: (l_i - m) / temp - log(E_i).
      auto score_of = [&](int64_t i) {
        const float e = Philox::exponential(seed, ctr, key0 + uint64_t(i));
        return (lv(i) - m) / temperature - std::log(e);
      };
      // The race starts from the top token (first index of the maximum), not from
      // nth_element's arbitrary idx[0]: when m is infinite the top's score is NaN, no
      // score compares above it, and the start is the answer on every backend.
      int64_t best = V;
      for (int64_t j = 0; j < k; ++j)
        if (lv(idx[size_t(j)]) == m) best = std::min(best, idx[size_t(j)]);
      float best_score = score_of(best);
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = idx[size_t(j)];
        const float score = score_of(i);
        if (score > best_score || (score == best_score && i < best)) {
          best_score = score;
          best = i;
        }
      }
      out.data()[r] = best;
    }
  }
};

}  // namespace ttt
