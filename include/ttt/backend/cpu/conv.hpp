#pragma once
// Kernels<Cpu>'s convolutions and nearest-codebook search (Mimi's SEANet and RVQ). The
// contracts are in backend/ops.hpp; Kernels<Cpu> forwards here. Float arithmetic for every T.
//
// conv1d, per group g, over the column space q = (batch item, output step):
//   - GEMM (the general case): tiles of (group, output-channel block, column chunk); a tile
//     gathers its input windows into a float im2col block [Cin/g*K, chunk] sized for L2 and
//     makes one Eigen GEMM W[block] x cols. Batch items share chunks, so a batch of short
//     sequences is one wide GEMM rather than many skinny ones. Float input with K = 1,
//     stride 1 and a unit time stride needs no im2col (the input rows are the operand).
//   - dot (B*Tout <= kDotMaxCols: the one- and two-step layers at the bottom of SEANet,
//     bandwidth bound): each weight row is read once and dotted with every column.
//   - direct (one input channel, or at most kDirectMaxOut output channels, per group:
//     depthwise, 1 -> 64, 64 -> 1): a loop over the taps on L1-sized time chunks.
// conv_transpose1d: tiles of (group, output-channel block). GEMM: Y = W[:, block]^T x by
// Eigen over column chunks (whole batch items while they fit, else pieces of one item), then
// overlap-add (col2im) into the tile's own output rows, so no two threads write one element.
// Short inputs (B*Tin <= kAxpyMaxCols) take rank-1 updates over the weight rows (each read
// once); one input channel per group is a direct loop.
// Scheduling is static everywhere: a thread gets the same time chunks call after call and
// layer after layer, so activations stay in its L2 (dynamic scheduling measured 2x slower on
// SEANet's K = 1 layers).
// Scratch is thread-local and keeps its capacity: steady-state calls allocate only inside
// Eigen's GEMM. Narrow T: the bandwidth-bound paths convert weights on the fly, the GEMM
// paths convert them once per call.
#include <Eigen/Core>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "ttt/core/tensor.hpp"

namespace ttt::cpu::conv {

// Below this many output columns (B * Tout) conv1d takes the dot-product path.
inline constexpr int64_t kDotMaxCols = 4;
// Up to this many output channels per group conv1d loops directly (no GEMM).
inline constexpr int64_t kDirectMaxOut = 4;
// Below this many input columns (B * Tin) conv_transpose1d takes rank-1 updates.
inline constexpr int64_t kAxpyMaxCols = 4;
// Products smaller than this run on one thread.
inline constexpr double kMinParallelWork = double(1 << 17);
// Floats in one im2col / Y block (256 KB: half of a core's L2).
inline constexpr int64_t kBlockFloats = int64_t(1) << 16;

inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}
inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread scratch that keeps its capacity between calls. Slots a caller fills before a
// parallel region (kWeights, kShared) are never used inside one: its thread 0 is the caller.
enum Slot { kWeights, kShared, kCols, kOut, kRow, kSlots };
template <class U>
U* scratch(int slot, int64_t n) {
  thread_local std::vector<U> buf[kSlots];
  auto& b = buf[slot];
  if (b.size() < size_t(n)) b.resize(size_t(n));
  return b.data();
}

using Mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using CMap = Eigen::Map<const Mat, 0, Eigen::OuterStride<>>;
using MMap = Eigen::Map<Mat, 0, Eigen::OuterStride<>>;
using CVec = Eigen::Map<const Eigen::VectorXf>;
using MVec = Eigen::Map<Eigen::VectorXf>;

// The weights as contiguous floats: the tensor itself for float, one conversion otherwise.
template <class T>
const float* float_weights(const Tensor<T, Cpu>& w, int nt) {
  if constexpr (std::is_same_v<T, float>) {
    return w.data();
  } else {
    const int64_t n = w.numel();
    float* f = scratch<float>(kWeights, n);
    const T* p = w.data();
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && n > (int64_t(1) << 18))
    for (int64_t i = 0; i < n; ++i) f[i] = to_f32(p[i]);
    return f;
  }
}

// Row i of a strided input as floats: the row itself when it is float with unit stride,
// else converted into `buf`.
template <class T>
const float* float_row(const T* p, int64_t n, int64_t step, float* buf) {
  if constexpr (std::is_same_v<T, float>)
    if (step == 1) return p;
  for (int64_t j = 0; j < n; ++j) buf[j] = to_f32(p[j * step]);
  return buf;
}

// Splits a count of `items` tiles further (first along `a`, then along `b`, keeping pieces of
// at least min_a / min_b) until static scheduling gives every thread an equal share.
inline void balance(int nt, int64_t items, int64_t A, int64_t min_a, int64_t& na, int64_t B, int64_t min_b,
                    int64_t& nb) {
  if (nt <= 1) return;
  auto tiles = [&] { return items * na * nb; };
  if (tiles() >= 4 * int64_t(nt)) return;  // enough tiles: static scheduling is within 25%
  for (int it = 0; it < 256 && (tiles() < nt || tiles() % nt != 0); ++it) {
    if (A / (na + 1) >= min_a) ++na;
    else if (B / (nb + 1) >= min_b) ++nb;
    else break;
  }
}

// ---- conv1d ----------------------------------------------------------------------------

// One output row at a time, in time chunks that stay in L1: out[o, t] += w[o, c, k] * x[c, t*stride + k*dil]
// for every (c, k). For groups of one input channel (depthwise, 1 -> C) and for very few
// output channels per group (SEANet's last layer, 64 -> 1), where a GEMM has nothing to block.
template <class T>
void conv1d_direct(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w, const T* bias,
                   int64_t stride, int64_t dil, int64_t groups, int nt) {
  const int64_t Bn = x.size(0), Cin = x.size(1), Cout = out.size(1), Tout = out.size(2), K = w.size(2);
  const int64_t Cg = Cin / groups, M = Cout / groups, xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  int64_t nq = ceil_div(Tout, 1024), one = 1;
  balance(nt, Bn * Cout, Tout, 128, nq, 1, 1, one);
  const int64_t tiles = Bn * Cout * nq;
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int64_t span = (ceil_div(Tout, nq) - 1) * stride + (K - 1) * dil + 1;  // input window of a chunk
    float* xbuf = scratch<float>(kRow, span);
    float* abuf = std::is_same_v<T, float> ? nullptr : scratch<float>(kOut, ceil_div(Tout, nq));
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      const int64_t r = tile / nq, iq = tile % nq, b = r / Cout, o = r % Cout, g = o / M;
      const int64_t t0 = Tout * iq / nq, n = Tout * (iq + 1) / nq - t0, win = (n - 1) * stride + (K - 1) * dil + 1;
      float* a;
      if constexpr (std::is_same_v<T, float>) a = out.data() + r * Tout + t0;
      else a = abuf;
      const float b0 = bias ? to_f32(bias[o]) : 0.f;
      for (int64_t t = 0; t < n; ++t) a[t] = b0;
      for (int64_t c = 0; c < Cg; ++c) {
        const float* xf = float_row(x.data() + b * xs0 + (g * Cg + c) * xs1 + t0 * stride * xs2, win, xs2, xbuf);
        const T* wr = w.data() + (o * Cg + c) * K;
        for (int64_t k = 0; k < K; ++k) {
          const float wk = to_f32(wr[k]);
          const float* xk = xf + k * dil;
          if (stride == 1)
            for (int64_t t = 0; t < n; ++t) a[t] += wk * xk[t];
          else
            for (int64_t t = 0; t < n; ++t) a[t] += wk * xk[t * stride];
        }
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t t = 0; t < n; ++t) out.data()[r * Tout + t0 + t] = from_f32<T>(a[t]);
    }
  }
}

// Column q = b * Tout + t of group g's im2col matrix, rows (c, k): x[b, g*Cg + c, t*stride + k*dil].
// Calls f(b, t, q, len) for the runs of [q0, q1) inside one batch item.
template <class F>
void for_each_run(int64_t q0, int64_t q1, int64_t Tout, F&& f) {
  for (int64_t q = q0; q < q1;) {
    const int64_t b = q / Tout, t = q % Tout, len = std::min(q1 - q, Tout - t);
    f(b, t, q, len);
    q += len;
  }
}

template <class T>
void conv1d_dot(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w, const T* bias,
                int64_t stride, int64_t dil, int64_t groups, int nt) {
  const int64_t Bn = x.size(0), Cin = x.size(1), Cout = out.size(1), Tout = out.size(2), K = w.size(2);
  const int64_t Cg = Cin / groups, M = Cout / groups, Kd = Cg * K, Q = Bn * Tout;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  // Transposed im2col of every group, [groups][Q][Kd]: a handful of columns.
  float* ct = scratch<float>(kShared, groups * Q * Kd);
  for (int64_t g = 0; g < groups; ++g)
    for (int64_t q = 0; q < Q; ++q) {
      const int64_t b = q / Tout, t = q % Tout;
      float* dst = ct + (g * Q + q) * Kd;
      for (int64_t c = 0; c < Cg; ++c) {
        const T* src = x.data() + b * xs0 + (g * Cg + c) * xs1 + t * stride * xs2;
        for (int64_t k = 0; k < K; ++k) dst[c * K + k] = to_f32(src[k * dil * xs2]);
      }
    }
  // Weight rows over the threads, each read once (converted on the fly for narrow T).
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* wrow = std::is_same_v<T, float> ? nullptr : scratch<float>(kRow, Kd);
#pragma omp for schedule(static)
    for (int64_t o = 0; o < Cout; ++o) {
      const int64_t g = o / M;
      const float* wr = float_row(w.data() + o * Kd, Kd, 1, wrow);
      alignas(64) float res[16];  // Q <= kDotMaxCols <= 16
      MVec(res, Q).noalias() = Eigen::Map<const Mat>(ct + g * Q * Kd, Q, Kd) * CVec(wr, Kd);
      const float b0 = bias ? to_f32(bias[o]) : 0.f;
      for (int64_t q = 0; q < Q; ++q) {
        const int64_t b = q / Tout, t = q % Tout;
        out.data()[(b * Cout + o) * Tout + t] = from_f32<T>(res[q] + b0);
      }
    }
  }
}

template <class T>
void conv1d_gemm(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const float* wf, const T* bias, int64_t K,
                 int64_t stride, int64_t dil, int64_t groups, int nt) {
  const int64_t Bn = x.size(0), Cin = x.size(1), Cout = out.size(1), Tout = out.size(2);
  const int64_t Cg = Cin / groups, M = Cout / groups, Kd = Cg * K, Q = Bn * Tout;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  // Float K = 1 stride 1 with a unit time stride: the input rows are the GEMM operand.
  const bool direct_in = std::is_same_v<T, float> && K == 1 && stride == 1 && xs2 == 1;
  int64_t nq = ceil_div(Q, direct_in ? 512 : std::max<int64_t>(64, kBlockFloats / Kd)), nm = 1;
  balance(nt, groups, Q, 32, nq, M, 16, nm);
  const int64_t tiles = groups * nm * nq;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t iq = tile % nq, im = (tile / nq) % nm, g = tile / (nq * nm);
    const int64_t q0 = Q * iq / nq, q1 = Q * (iq + 1) / nq, n = q1 - q0;
    const int64_t m0 = M * im / nm, m1 = M * (im + 1) / nm, mc = m1 - m0;
    const bool one_item = q0 / Tout == (q1 - 1) / Tout;
    const float* cols = nullptr;
    int64_t ldc = xs1;
    if constexpr (std::is_same_v<T, float>)
      if (direct_in && one_item) cols = x.data() + (q0 / Tout) * xs0 + g * Cg * xs1 + q0 % Tout;
    if (!cols) {
      float* cb = scratch<float>(kCols, Kd * n);
      for_each_run(q0, q1, Tout, [&](int64_t b, int64_t t, int64_t q, int64_t len) {
        const T* xb = x.data() + b * xs0 + g * Cg * xs1 + t * stride * xs2;
        const int64_t step = stride * xs2;
        for (int64_t c = 0; c < Cg; ++c)
          for (int64_t k = 0; k < K; ++k) {
            const T* src = xb + c * xs1 + k * dil * xs2;
            float* dst = cb + (c * K + k) * n + (q - q0);
            if (step == 1)
              for (int64_t j = 0; j < len; ++j) dst[j] = to_f32(src[j]);
            else
              for (int64_t j = 0; j < len; ++j) dst[j] = to_f32(src[j * step]);
          }
      });
      cols = cb;
      ldc = n;
    }
    const CMap W(wf + (g * M + m0) * Kd, mc, Kd, Eigen::OuterStride<>(Kd));
    const CMap C(cols, Kd, n, Eigen::OuterStride<>(ldc));
    float* direct_out = nullptr;
    if constexpr (std::is_same_v<T, float>)
      if (one_item) direct_out = out.data() + ((q0 / Tout) * Cout + g * M + m0) * Tout + q0 % Tout;
    if (direct_out) {
      MMap O(direct_out, mc, n, Eigen::OuterStride<>(Tout));
      O.noalias() = W * C;
      if (bias)
        for (int64_t m = 0; m < mc; ++m) O.row(m).array() += to_f32(bias[g * M + m0 + m]);
    } else {
      float* ob = scratch<float>(kOut, mc * n);
      MMap O(ob, mc, n, Eigen::OuterStride<>(n));
      O.noalias() = W * C;
      for (int64_t m = 0; m < mc; ++m) {
        const int64_t o = g * M + m0 + m;
        const float b0 = bias ? to_f32(bias[o]) : 0.f;
        for_each_run(q0, q1, Tout, [&](int64_t b, int64_t t, int64_t q, int64_t len) {
          T* dst = out.data() + (b * Cout + o) * Tout + t;
          const float* src = ob + m * n + (q - q0);
          for (int64_t j = 0; j < len; ++j) dst[j] = from_f32<T>(src[j] + b0);
        });
      }
    }
  }
}

template <class T>
void conv1d(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w, const Tensor<T, Cpu>& bias,
            int64_t stride, int64_t dil, int64_t groups) {
  const int64_t Bn = x.size(0), Cin = x.size(1), Cout = out.size(1), Tout = out.size(2), K = w.size(2);
  const int64_t Cg = Cin / groups;
  const double work = double(Bn) * double(Cout) * double(Cg * K) * double(Tout);
  const int nt = work >= kMinParallelWork ? max_threads() : 1;
  const T* b = bias.defined() ? bias.data() : nullptr;
  if (Cg == 1 || Cout / groups <= kDirectMaxOut) return conv1d_direct(out, x, w, b, stride, dil, groups, nt);
  if (Bn * Tout <= kDotMaxCols) return conv1d_dot(out, x, w, b, stride, dil, groups, nt);
  conv1d_gemm(out, x, float_weights(w, nt), b, K, stride, dil, groups, nt);
}

// ---- conv_transpose1d ------------------------------------------------------------------

template <class T>
void conv_transpose1d_direct(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                             const T* bias, int64_t stride, int64_t groups, int nt) {
  const int64_t Bn = x.size(0), Tin = x.size(2), Og = w.size(1), K = w.size(2), Cout = out.size(1),
                Tout = out.size(2);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float* xbuf = scratch<float>(kRow, Tin);
    float* abuf = std::is_same_v<T, float> ? nullptr : scratch<float>(kOut, Tout);
    int64_t cached = -1;
    const float* xf = nullptr;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < Bn * Cout; ++r) {
      const int64_t b = r / Cout, o = r % Cout, g = o / Og;  // input channel g (one per group)
      if (b * groups + g != cached) {
        xf = float_row(x.data() + b * xs0 + g * xs1, Tin, xs2, xbuf);
        cached = b * groups + g;
      }
      float* a;
      if constexpr (std::is_same_v<T, float>) a = out.data() + r * Tout;
      else a = abuf;
      const float b0 = bias ? to_f32(bias[o]) : 0.f;
      for (int64_t j = 0; j < Tout; ++j) a[j] = b0;
      for (int64_t k = 0; k < K; ++k) {
        const float wk = to_f32(w.data()[(g * Og + o % Og) * K + k]);
        float* ak = a + k;
        for (int64_t t = 0; t < Tin; ++t) ak[t * stride] += wk * xf[t];
      }
      if constexpr (!std::is_same_v<T, float>)
        for (int64_t j = 0; j < Tout; ++j) out.data()[r * Tout + j] = from_f32<T>(a[j]);
    }
  }
}

// Overlap-add: a [mc, Tout] += the windows of input steps t0 .. t0+n-1, column j of the
// column-major Y (leading dimension ldy) holding step t0 + j's K outputs of each channel.
inline void col2im(float* a, int64_t Tout, const float* y, int64_t ldy, int64_t mc, int64_t K, int64_t n,
                   int64_t t0, int64_t stride) {
  for (int64_t j = 0; j < n; ++j) {
    const float* yc = y + j * ldy;
    float* dst = a + (t0 + j) * stride;
    for (int64_t o = 0; o < mc; ++o)
      for (int64_t k = 0; k < K; ++k) dst[o * Tout + k] += yc[o * K + k];
  }
}

template <class T>
void conv_transpose1d_gemm(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                           const T* bias, int64_t stride, int64_t groups, int nt) {
  const int64_t K = w.size(2);
  const int64_t Bn = x.size(0), Cin = x.size(1), Tin = x.size(2), Cout = out.size(1), Tout = out.size(2);
  const int64_t Cg = Cin / groups, Og = Cout / groups, ldw = Og * K;
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const bool axpy = Bn * Tin <= kAxpyMaxCols;
  // GEMM: the weights as floats, converted once for narrow T. Rank-1 updates read them once
  // and convert row segments on the fly.
  const float* wf = axpy ? nullptr : float_weights(w, nt);
  // Output-channel blocks. GEMM: a weight block [Cg, mc*K] of at most ~512 KB stays in cache
  // across batch items. Rank-1 updates read W once whatever the blocks: as few as the threads
  // need, so each streams long row segments.
  int64_t nm = axpy ? 1 : std::min(Og, std::max<int64_t>(1, ceil_div(Cg * ldw, 2 * kBlockFloats))), one = 1;
  balance(nt, groups, Og, 4, nm, 1, 1, one);
  const int64_t tiles = groups * nm;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t g = tile / nm, im = tile % nm;
    const int64_t o0 = Og * im / nm, o1 = Og * (im + 1) / nm, mc = o1 - o0, rows = mc * K;
    const float* wg = axpy ? nullptr : wf + g * Cg * ldw + o0 * K;  // [Cg, rows], row stride ldw
    float* acc = nullptr;  // non-float T: float rows accumulated, rounded once
    if (axpy) {
      if constexpr (!std::is_same_v<T, float>) acc = scratch<float>(kOut, mc * Tout);
      // Y^T [Bn*Tin, rows] = x^T W, in column blocks that keep the Bn*Tin rows of Y in L1
      // while the weight rows stream by once.
      const int64_t nq = Bn * Tin, jc = std::max<int64_t>(256, 4096 / nq);
      float* xq = scratch<float>(kRow, nq * Cg + jc);  // x^T of this group [nq, Cg], a weight segment
      float* wseg = xq + nq * Cg;
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t t = 0; t < Tin; ++t)
          for (int64_t c = 0; c < Cg; ++c)
            xq[(b * Tin + t) * Cg + c] = to_f32(x.data()[b * xs0 + (g * Cg + c) * xs1 + t * xs2]);
      float* y = scratch<float>(kCols, nq * rows);
      std::fill(y, y + nq * rows, 0.f);
      for (int64_t j0 = 0; j0 < rows; j0 += jc) {
        const int64_t n = std::min(jc, rows - j0);
        for (int64_t c = 0; c < Cg; ++c) {
          const float* wr = float_row(w.data() + (g * Cg + c) * ldw + o0 * K + j0, n, 1, wseg);
          for (int64_t q = 0; q < nq; ++q) {
            const float xv = xq[q * Cg + c];
            float* yr = y + q * rows + j0;
            for (int64_t j = 0; j < n; ++j) yr[j] += xv * wr[j];
          }
        }
      }
      for (int64_t b = 0; b < Bn; ++b) {
        float* a;
        if constexpr (std::is_same_v<T, float>) a = out.data() + (b * Cout + g * Og + o0) * Tout;
        else a = acc;
        for (int64_t o = 0; o < mc; ++o)
          std::fill(a + o * Tout, a + (o + 1) * Tout, bias ? to_f32(bias[g * Og + o0 + o]) : 0.f);
        // col2im with Y^T: element (o, k) of step t is y[(b*Tin + t)*rows + o*K + k].
        for (int64_t t = 0; t < Tin; ++t) {
          const float* yr = y + (b * Tin + t) * rows;
          for (int64_t o = 0; o < mc; ++o)
            for (int64_t k = 0; k < K; ++k) a[o * Tout + t * stride + k] += yr[o * K + k];
        }
        if constexpr (!std::is_same_v<T, float>)
          for (int64_t i = 0; i < mc * Tout; ++i)
            out.data()[(b * Cout + g * Og + o0) * Tout + i] = from_f32<T>(acc[i]);
      }
      continue;
    }
    // GEMM over column chunks of at most nc input steps: whole items while they fit (a batch
    // of short inputs makes one wide product), else one item's steps in pieces.
    const CMap Wt(wg, Cg, rows, Eigen::OuterStride<>(ldw));
    const int64_t nc = std::max<int64_t>(32, kBlockFloats / rows);
    const int64_t per_chunk = Tin >= nc ? 1 : nc / Tin, tc = std::min(nc, Tin);
    float* y = scratch<float>(kCols, rows * per_chunk * tc);
    if constexpr (!std::is_same_v<T, float>) acc = scratch<float>(kOut, per_chunk * mc * Tout);
    for (int64_t b0 = 0; b0 < Bn; b0 += per_chunk) {
      const int64_t nb = std::min(per_chunk, Bn - b0);
      for (int64_t t0 = 0; t0 < Tin; t0 += tc) {
        const int64_t n = std::min(tc, Tin - t0), cols = nb * n;
        // X [Cg, cols], column i*n + j = step t0 + j of item b0 + i.
        const float* xc = nullptr;
        int64_t ldx = xs1;
        if constexpr (std::is_same_v<T, float>)
          if (xs2 == 1 && nb == 1) xc = x.data() + b0 * xs0 + g * Cg * xs1 + t0;
        if (!xc) {
          float* xb = scratch<float>(kRow, Cg * cols);
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t i = 0; i < nb; ++i) {
              const T* src = x.data() + (b0 + i) * xs0 + (g * Cg + c) * xs1 + t0 * xs2;
              for (int64_t j = 0; j < n; ++j) xb[c * cols + i * n + j] = to_f32(src[j * xs2]);
            }
          xc = xb;
          ldx = cols;
        }
        // Y column-major [rows, cols]: a column holds one step's windows for every channel.
        Eigen::Map<Eigen::MatrixXf> Y(y, rows, cols);
        Y.noalias() = Wt.transpose() * CMap(xc, Cg, cols, Eigen::OuterStride<>(ldx));
        for (int64_t i = 0; i < nb; ++i) {
          const int64_t b = b0 + i;
          float* a;
          if constexpr (std::is_same_v<T, float>) a = out.data() + (b * Cout + g * Og + o0) * Tout;
          else a = acc + i * mc * Tout;
          if (t0 == 0)
            for (int64_t o = 0; o < mc; ++o)
              std::fill(a + o * Tout, a + (o + 1) * Tout, bias ? to_f32(bias[g * Og + o0 + o]) : 0.f);
          col2im(a, Tout, y + i * n * rows, rows, mc, K, n, t0, stride);
          if constexpr (!std::is_same_v<T, float>)
            if (t0 + n == Tin)
              for (int64_t e = 0; e < mc * Tout; ++e)
                out.data()[(b * Cout + g * Og + o0) * Tout + e] = from_f32<T>(a[e]);
        }
      }
    }
  }
}

template <class T>
void conv_transpose1d(const Tensor<T, Cpu>& out, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& w,
                      const Tensor<T, Cpu>& bias, int64_t stride, int64_t groups) {
  const int64_t Bn = x.size(0), Cin = x.size(1), Tin = x.size(2), Og = w.size(1), K = w.size(2);
  const int64_t Cg = Cin / groups;
  const double work = double(Bn) * double(Cin) * double(Og * K) * double(Tin);
  const int nt = work >= kMinParallelWork ? max_threads() : 1;
  const T* b = bias.defined() ? bias.data() : nullptr;
  if (Cg == 1) return conv_transpose1d_direct(out, x, w, b, stride, groups, nt);
  conv_transpose1d_gemm(out, x, w, b, stride, groups, nt);
}

// ---- vq_nearest ------------------------------------------------------------------------

// The contract's distance (ops.hpp): 32 partial sums (lane l takes j % 32 == l, increasing
// j, fma), combined by a halving tree. Vectorises as two 16-float (or four 8-float) lanes.
inline float sq_dist(const float* __restrict a, const float* __restrict c, int64_t d) {
  float s[32] = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32)
    for (int l = 0; l < 32; ++l) {
      const float e = a[j + l] - c[j + l];
      s[l] = std::fma(e, e, s[l]);
    }
  for (int l = 0; j + l < d; ++l) {
    const float e = a[j + l] - c[j + l];
    s[l] = std::fma(e, e, s[l]);
  }
  for (int off = 16; off > 0; off >>= 1)
    for (int l = 0; l < off; ++l) s[l] += s[l + off];
  return s[0];
}

// sq_dist of one row against U codebook rows (ldc apart), the same operations per distance:
// U independent accumulator chains hide the fma latency and share the row's loads.
template <int U>
inline void sq_dist_n(const float* __restrict a, const float* __restrict c, int64_t ldc, int64_t d, float* out) {
  float s[U][32] = {};
  int64_t j = 0;
  for (; j + 32 <= d; j += 32)
    for (int u = 0; u < U; ++u)
      for (int l = 0; l < 32; ++l) {
        const float e = a[j + l] - c[u * ldc + j + l];
        s[u][l] = std::fma(e, e, s[u][l]);
      }
  for (int u = 0; u < U; ++u)
    for (int l = 0; j + l < d; ++l) {
      const float e = a[j + l] - c[u * ldc + j + l];
      s[u][l] = std::fma(e, e, s[u][l]);
    }
  for (int off = 16; off > 0; off >>= 1)
    for (int u = 0; u < U; ++u)
      for (int l = 0; l < off; ++l) s[u][l] += s[u][l + off];
  for (int u = 0; u < U; ++u) out[u] = s[u][0];
}

// Keeps (dist, v) if it beats the current best under the contract's rule: NaN never wins,
// ties keep the earlier (smaller) index. best_v < 0: nothing yet.
inline void keep_better(float dist, int64_t v, float& best_d, int64_t& best_v) {
  if (best_v < 0 ? !std::isnan(dist) : dist < best_d) {
    best_d = dist;
    best_v = v;
  }
}

template <class T>
void vq_nearest(const Tensor<int64_t, Cpu>& codes, const Tensor<T, Cpu>& x, const Tensor<T, Cpu>& cb) {
  const int64_t N = x.size(0), d = x.size(1), V = cb.size(0);
  const double work = double(N) * double(V) * double(d);
  const int nt = int(std::min<int64_t>(V, work >= kMinParallelWork ? max_threads() : 1));
  const float* xf;
  int64_t ldx;
  if constexpr (std::is_same_v<T, float>) {
    xf = x.data();
    ldx = x.stride(0);
  } else {
    float* buf = scratch<float>(kShared, N * d);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t j = 0; j < d; ++j) buf[r * d + j] = to_f32(x.data()[r * x.stride(0) + j]);
    xf = buf;
    ldx = d;
  }
  // Each thread searches a contiguous range of the codebook for every row; the ranges are
  // merged in index order, so ties still go to the smallest index.
  float* best_d = scratch<float>(kWeights, int64_t(nt) * N);
  int64_t* best_v = scratch<int64_t>(kWeights, int64_t(nt) * N);
  std::fill(best_v, best_v + int64_t(nt) * N, int64_t(-1));
  const int64_t row_block = 64;  // rows kept in cache while a codebook range streams by
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    const int tid = thread_id(), nth = team_size();
    const int64_t v0 = V * tid / nth, v1 = V * (tid + 1) / nth;
    constexpr int U = 4;  // codebook rows per pass
    float* crow = std::is_same_v<T, float> ? nullptr : scratch<float>(kRow, U * d);
    float* bd = best_d + int64_t(tid) * N;
    int64_t* bv = best_v + int64_t(tid) * N;
    for (int64_t r0 = 0; r0 < N; r0 += row_block) {
      const int64_t r1 = std::min(N, r0 + row_block);
      for (int64_t v = v0; v < v1;) {
        const int64_t u = v + U <= v1 ? U : 1;
        const float* c;
        if constexpr (std::is_same_v<T, float>) {
          c = cb.data() + v * d;
        } else {
          for (int64_t j = 0; j < u * d; ++j) crow[j] = to_f32(cb.data()[v * d + j]);
          c = crow;
        }
        for (int64_t r = r0; r < r1; ++r) {
          if (u == U) {
            float dist[U];
            sq_dist_n<U>(xf + r * ldx, c, d, d, dist);
            for (int i = 0; i < U; ++i) keep_better(dist[i], v + i, bd[r], bv[r]);  // index order
          } else {
            keep_better(sq_dist(xf + r * ldx, c, d), v, bd[r], bv[r]);
          }
        }
        v += u;
      }
    }
  }
  for (int64_t r = 0; r < N; ++r) {
    float bd = 0.f;
    int64_t bv = -1;
    for (int t = 0; t < nt; ++t)
      if (best_v[int64_t(t) * N + r] >= 0) keep_better(best_d[int64_t(t) * N + r], best_v[int64_t(t) * N + r], bd, bv);
    codes.data()[r * codes.stride(0)] = bv < 0 ? 0 : bv;
  }
}

}  // namespace ttt::cpu::conv
