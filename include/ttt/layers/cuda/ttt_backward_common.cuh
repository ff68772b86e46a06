#pragma once
// Device pieces of the TTT inner-loop backward (nvcc only): the block-wide small products,
// the per-row LayerNorm pieces and the GELU derivatives, each the device twin of a function
// of layers/cpu/ttt_backward_kernels.hpp (cpu_grad), which states the math.
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/backend/cuda/device.cuh"

namespace ttt::layers::cuda_kernels::bwd {

using namespace ::ttt::cuda::device;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// C = A B over a block: acc(m, n) = Σ_k A(m, k) B(k, n) with A(m, k) = A[m lda + k] (or
// A[k lda + m] with TA), B(k, n) = B[k ldb + n] (or B[n ldb + k] with TB); epi(m, n, acc)
// once per element by the thread that owns it. A thread owns 4 consecutive columns of one
// row (consecutive threads: consecutive column quads, so plain B loads coalesce).
template <bool TA, bool TB, class Epi>
__device__ __forceinline__ void mm(int M, int N, int Kd, const float* __restrict__ A, int lda,
                                   const float* __restrict__ B, int ldb, Epi epi) {
  const int N4 = (N + 3) >> 2, total = M * N4;
  for (int idx = threadIdx.x; idx < total; idx += kThreads) {
    const int m = idx / N4, n0 = (idx - m * N4) * 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    if (n0 + 4 <= N) {
#pragma unroll 4
      for (int k = 0; k < Kd; ++k) {
        const float a = TA ? A[k * lda + m] : A[m * lda + k];
        if constexpr (TB) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[j] = fmaf(a, B[(n0 + j) * ldb + k], acc[j]);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[j] = fmaf(a, B[k * ldb + n0 + j], acc[j]);
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) epi(m, n0 + j, acc[j]);
    } else {
      for (int k = 0; k < Kd; ++k) {
        const float a = TA ? A[k * lda + m] : A[m * lda + k];
        for (int j = 0; n0 + j < N; ++j) acc[j] = fmaf(a, TB ? B[(n0 + j) * ldb + k] : B[k * ldb + n0 + j], acc[j]);
      }
      for (int j = 0; n0 + j < N; ++j) epi(m, n0 + j, acc[j]);
    }
  }
}

// Σ over the rows of M [n, w] into out[c] (op(c, sum)), one thread per column.
template <class Op>
__device__ __forceinline__ void col_sums(int n, int w, const float* M, Op op) {
  for (int c = threadIdx.x; c < w; c += kThreads) {
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += M[i * w + c];
    op(c, s);
  }
}

// One warp: x̂ = LN-normalised z (w wide), returns rstd = 1 / sqrt(var_biased + eps) (two
// passes, as the host's ln_rows).
__device__ __forceinline__ float ln_row(const float* z, int w, float eps, float* xh) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int j = lane; j < w; j += 32) s += z[j];
  const float mu = warp_sum(s) / float(w);
  float v = 0.f;
  for (int j = lane; j < w; j += 32) {
    const float d = z[j] - mu;
    v += d * d;
  }
  const float r = 1.f / sqrtf(warp_sum(v) / float(w) + eps);
  for (int j = lane; j < w; j += 32) xh[j] = (z[j] - mu) * r;
  return r;
}

// One warp: g = rstd (u − mean u − x̂ mean(u x̂)) for a row (the host's ln_project). g may
// alias u (each lane reads and writes the same columns).
__device__ __forceinline__ void ln_project_row(float* g, const float* u, const float* xh, float rstd, int w) {
  const int lane = threadIdx.x & 31;
  float su = 0.f, sux = 0.f;
  for (int j = lane; j < w; j += 32) {
    su += u[j];
    sux += u[j] * xh[j];
  }
  const float mu = warp_sum(su) / float(w), mux = warp_sum(sux) / float(w);
  for (int j = lane; j < w; j += 32) g[j] = rstd * (u[j] - mu - xh[j] * mux);
}

// gelu_tanh, its exact derivative, the reference's gelu_bwd (truncated constants) and that
// formula's exact derivative (cpu_grad::gelu, gelu_grad, gelu_bwd_trunc, gelu_bwd_trunc_grad).
__device__ __forceinline__ float gelu_f(float x) {
  return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_grad(float x) {
  const float k = 0.79788456080286536f;
  const float t = tanhf(k * (x + 0.044715f * x * x * x));
  return 0.5f * (1.f + t) + 0.5f * x * (1.f - t * t) * k * (1.f + 3.f * 0.044715f * x * x);
}
__device__ __forceinline__ float gelu_bwd_trunc(float x) {
  const float t = tanhf(0.79788456f * x * (1.f + 0.044715f * x * x));
  return 0.5f * x * ((1.f - t * t) * (0.79788456f + 0.1070322243f * x * x)) + 0.5f * (1.f + t);
}
__device__ __forceinline__ float gelu_bwd_trunc_grad(float x) {
  const float c1 = 0.79788456f, a = 0.044715f, c3 = 0.1070322243f;
  const float t = tanhf(c1 * x * (1.f + a * x * x));
  const float s = 1.f - t * t;
  const float dt = s * (c1 + 3.f * c1 * a * x * x);
  const float w = c1 + c3 * x * x;
  return 0.5f * s * w - x * t * dt * w + c3 * x * x * s + 0.5f * dt;
}

}  // namespace ttt::layers::cuda_kernels::bwd
