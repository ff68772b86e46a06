#pragma once
// Device pieces of the TTT inner-loop backward (nvcc only): the block-wide small products,
// the per-row LayerNorm pieces and the GELU derivatives, each the device twin of a function
// of layers/cpu/ttt_backward_kernels.hpp (cpu_grad), which states the math.
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/backend/cuda/device.cuh"

namespace ttt::layers::cuda_kernels::bwd {

using namespace ::ttt::cuda::device;

// The block size is a launch choice (TttBackwardCudaTuning::threads: 256, 512 or 1024; the
// kernel is instantiated per size for its register budget), so the device code strides by
// blockDim rather than by a constant.
__device__ __forceinline__ int nthreads() { return int(blockDim.x); }
__device__ __forceinline__ int nwarps() { return int(blockDim.x) >> 5; }

// C = A B over a block: acc(m, n) = Σ_k A(m, k) B(k, n) with A(m, k) = A[m lda + k] (or
// A[k lda + m] with TA), B(k, n) = B[k ldb + n] (or B[n ldb + k] with TB); epi(m, n, acc)
// once per element by the thread that owns it. Three schemes, chosen by shape and alignment:
//   tiles (no TB): a thread owns TM x 4 outputs, B's 4 columns in one 16-byte load, A's TM rows
//     in one 16-byte load with TA (else TM broadcast loads); consecutive threads take
//     consecutive column quads (coalesced, conflict-free);
//   dots (TB): a thread owns one output, a dot product of A's row m and B's row n along k in
//     16-byte chunks; lane l starts at chunk l mod (Kd / 4) and wraps, so the lanes of a warp
//     read different banks of the same row (and distinct rows of B without conflicts);
//   generic: 1 x 4 outputs, scalar loads (any shape or alignment).
template <bool TA, bool TB, class Epi>
__device__ __forceinline__ void mm_generic(int M, int N, int Kd, const float* __restrict__ A, int lda,
                                           const float* __restrict__ B, int ldb, Epi& epi) {
  const int N4 = (N + 3) >> 2, total = M * N4;
  for (int idx = threadIdx.x; idx < total; idx += nthreads()) {
    const int m = idx / N4, n0 = (idx - m * N4) * 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int k = 0; k < Kd; ++k) {
      const float a = TA ? A[k * lda + m] : A[m * lda + k];
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (n0 + j < N) acc[j] = fmaf(a, TB ? B[(n0 + j) * ldb + k] : B[k * ldb + n0 + j], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j)
      if (n0 + j < N) epi(m, n0 + j, acc[j]);
  }
}

template <int TM, bool TA, class Epi>
__device__ __forceinline__ void mm_tiles(int M, int N, int Kd, const float* __restrict__ A, int lda,
                                         const float* __restrict__ B, int ldb, Epi& epi) {
  const int NT = N >> 2, total = (M / TM) * NT;
  for (int idx = threadIdx.x; idx < total; idx += nthreads()) {
    const int mt = idx / NT, m0 = mt * TM, n0 = (idx - mt * NT) * 4;
    float acc[TM][4];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll 4
    for (int k = 0; k < Kd; ++k) {
      float a[TM];
      if constexpr (TA && TM == 4) {
        const float4 t = *reinterpret_cast<const float4*>(A + k * lda + m0);
        a[0] = t.x, a[1] = t.y, a[2] = t.z, a[3] = t.w;
      } else {
#pragma unroll
        for (int i = 0; i < TM; ++i) a[i] = TA ? A[k * lda + m0 + i] : A[(m0 + i) * lda + k];
      }
      const float4 b = *reinterpret_cast<const float4*>(B + k * ldb + n0);
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        acc[i][0] = fmaf(a[i], b.x, acc[i][0]);
        acc[i][1] = fmaf(a[i], b.y, acc[i][1]);
        acc[i][2] = fmaf(a[i], b.z, acc[i][2]);
        acc[i][3] = fmaf(a[i], b.w, acc[i][3]);
      }
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) epi(m0 + i, n0 + j, acc[i][j]);
  }
}

template <class Epi>
__device__ __forceinline__ void mm_dots(int M, int N, int Kd, const float* __restrict__ A, int lda,
                                        const float* __restrict__ B, int ldb, Epi& epi) {
  const int nch = Kd >> 2, total = M * N, start = (threadIdx.x & 31) % nch;
  for (int idx = threadIdx.x; idx < total; idx += nthreads()) {
    const int m = idx / N, n = idx - m * N;
    const float* a = A + m * lda;
    const float* b = B + n * ldb;
    float s0 = 0.f, s1 = 0.f;
    int c = start;
#pragma unroll 4
    for (int u = 0; u < nch; ++u) {
      const float4 x = *reinterpret_cast<const float4*>(a + 4 * c);
      const float4 y = *reinterpret_cast<const float4*>(b + 4 * c);
      s0 = fmaf(x.x, y.x, s0);
      s1 = fmaf(x.y, y.y, s1);
      s0 = fmaf(x.z, y.z, s0);
      s1 = fmaf(x.w, y.w, s1);
      c = c + 1 == nch ? 0 : c + 1;
    }
    epi(m, n, s0 + s1);
  }
}

__device__ __forceinline__ bool al16(const float* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

template <bool TA, bool TB, class Epi>
__device__ __forceinline__ void mm(int M, int N, int Kd, const float* __restrict__ A, int lda,
                                   const float* __restrict__ B, int ldb, Epi epi) {
  if constexpr (TB && !TA) {
    if (Kd > 0 && Kd % 4 == 0 && lda % 4 == 0 && ldb % 4 == 0 && al16(A) && al16(B)) {
      mm_dots(M, N, Kd, A, lda, B, ldb, epi);
      return;
    }
  } else if constexpr (!TB) {
    if (N % 4 == 0 && ldb % 4 == 0 && al16(B)) {
      const bool a4 = !TA || (lda % 4 == 0 && al16(A));
      if (M % 4 == 0 && a4 && (M / 4) * (N / 4) >= nthreads()) mm_tiles<4, TA>(M, N, Kd, A, lda, B, ldb, epi);
      else if (M % 2 == 0 && (M / 2) * (N / 4) >= nthreads() / 2) mm_tiles<2, TA>(M, N, Kd, A, lda, B, ldb, epi);
      else mm_tiles<1, TA>(M, N, Kd, A, lda, B, ldb, epi);
      return;
    }
  }
  mm_generic<TA, TB>(M, N, Kd, A, lda, B, ldb, epi);
}

// Σ over the rows of M [n, w] into out[c] (op(c, sum)), one thread per column.
template <class Op>
__device__ __forceinline__ void col_sums(int n, int w, const float* M, Op op) {
  for (int c = threadIdx.x; c < w; c += nthreads()) {
    float s = 0.f;
    for (int i = 0; i < n; ++i) s += M[i * w + c];
    op(c, s);
  }
}

// One warp: x̂ = LN-normalised z (w wide), returns rstd = 1 / sqrt(var_biased + eps) (two
// passes, as the host's ln_rows).
__device__ __forceinline__ float ln_row(const float* z, int w, float eps, float* xh) {
  const int lane = threadIdx.x & 31;
  const RowStats st = row_stats(z, w, eps);
  for (int j = lane; j < w; j += 32) xh[j] = (z[j] - st.mu) * st.rstd;
  return st.rstd;
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
