#pragma once
// Kernels<Cuda> convolutions (nvcc only): conv1d and
// conv_transpose1d (Mimi's SEANet; vq_nearest is in vq.cuh). The contracts are in backend/ops.hpp;
// backend/cpu/conv.hpp is the CPU's definition. Float arithmetic for every T, one rounding to
// T at the end; all launches on the thread's stream, no host synchronisation, scratch from
// Tensor::empty (the caching allocator / the active arena): capturable in a CUDA graph.
//
// conv1d, over the columns q = (batch item b, output step t) of each group g:
//   - direct (at most kConvDirectMaxOut output channels per group: depthwise, 64 -> 1; or one
//     input channel per group with few columns: 1 -> 64 at batch 1): a thread per 4 output
//     steps, the reduction over the input channels split across up to 32 threads when there
//     are few outputs.
//   - dot (B*Tout <= kConvDotMaxCols: the one- to sixteen-step layers at the bottom of SEANet,
//     weight-bandwidth bound): a block per 2 output channels streams their weight rows once
//     (vector loads, the reduction spread over all 256 threads) and dots them with every column.
//   - lowered (groups 1, at least kConvLoweredMinMacs multiply-adds: batched streaming): im2col +
//     cuBLAS on tensor cores (conv_lowered.cuh).
//   - GEMM (the rest): C[o, q] = W[o, (c, k)] * X[(c, k), q] as an implicit GEMM (the im2col
//     operand gathered from x's strides while staging tiles in shared memory), FMA register
//     tiles (128x128, 64x128, 32x128, 64x64), double-buffered. A cost model (waves x (FMA
//     time + unhidden load latency per stage + a block's fixed cost), plus the split
//     reduction's cost; fitted on the H200) picks the tile and a split of the reduction over
//     blocks: each split stores partial sums, the last block of a tile to arrive (a counter
//     per tile, zeroed by a memset node) adds them in split order and writes the output, so
//     the result does not depend on which block finishes last.
// conv_transpose1d (lowered like conv1d from kConvLoweredMinMacs multiply-adds, groups 1):
//   - direct (one input channel per group: Mimi's depthwise upsampler): a thread per output
//     gathering its ceil(K/stride) taps.
//   - dot (B*Tin <= kConvTDotMaxCols: the decoder's first layers at batch 1): a block per few
//     output channels streams the weight segments w[c, o-block, :] once over the input
//     channels, sums the windows in shared memory and overlap-adds them there (col2im).
//   - GEMM: output step j = n*stride + p (phase p) is a conv1d-like product,
//       out[b, o, n*stride + p] = sum_{c, m} w[c, o, p + m*stride] * x[b, c, n - m],
//     m < ceil(K/stride) (taps past K and steps outside the input are zero): the same GEMM
//     kernel with one grid slice per (group, phase), the weights gathered in place.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/kernels/conv_lowered.cuh"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- shared parameters --------------------------------------------------------------

constexpr int kConvThreads = 256;
// Output channels per group up to which conv1d loops directly (as the CPU's kDirectMaxOut).
constexpr int kConvDirectMaxOut = 4;
// Columns (B * Tout) up to which conv1d takes the dot kernel.
constexpr int kConvDotMaxCols = 16;
// Input columns (B * Tin) up to which conv_transpose1d takes the dot kernel, and the
// longest output-channel segment (channels x K) one of its blocks reduces.
constexpr int kConvTDotMaxCols = 8;
constexpr int kConvTDotMaxSeg = 1024;

template <class T>
struct ConvParams {
  const T* x;
  const T* w;
  const T* bias;  // null: none
  T* out;
  float* ws;      // split-K partial sums [splits][groups * phases][M][N]
  int* counters;  // split-K: arrivals per output tile (zeroed before the launch)
  int64_t xs0, xs1, xs2;
  int B, Cin, Tin, Cout, Tout, K, stride, dil, groups;
  int Cg;  // input channels per group
  int M;   // output channels per group
  // The GEMM view (conv_transpose1d: per phase).
  int transposed;  // 0: conv1d, 1: conv_transpose1d
  int taps;        // reduction taps per input channel: K, or ceil(K / stride)
  int Kr;          // reduction length Cg * taps
  int Np;          // columns per batch item: Tout, or ceil(Tout / stride)
  int N;           // columns B * Np (dot kernels: B * Tout or B * Tin)
  int P;           // phases: 1, or stride
  int splits, tiles_per_split;
  int R;     // conv_transpose1d dot: output channels per block; conv1d direct: channel slices
  bool vec;  // dot kernels: weight rows / segments aligned for 4-element vector loads
};

// 4 consecutive elements as floats: one 16-byte (float) or 8-byte (16-bit T) load when `vec`
// (the caller guarantees the alignment), else up to `avail` scalar loads, zeros past it.
template <class T>
__device__ __forceinline__ void load4(const T* p, bool vec, int avail, float (&v)[4]) {
  if (vec && avail >= 4) {
    if constexpr (sizeof(T) == 4) {
      const float4 f = __ldg(reinterpret_cast<const float4*>(p));
      v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
    } else {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
      const uint32_t h[2] = {u.x, u.y};
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        T lo, hi;
        lo.bits = uint16_t(h[j]);
        hi.bits = uint16_t(h[j] >> 16);
        v[2 * j] = to_f32(lo);
        v[2 * j + 1] = to_f32(hi);
      }
    }
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < avail ? to_f32(p[j]) : 0.f;
  }
}

template <class T>
__device__ __forceinline__ float ldf(const T* p) {
  if constexpr (std::is_same_v<T, float>) return __ldg(p);
  else return to_f32(*p);
}

// ---- conv1d: direct -----------------------------------------------------------------

// Thread: 4 consecutive output steps of one (b, o) row (each weight loaded once for the four,
// four independent accumulation chains). Block: 256 / S such chunks x S slices of the input
// channels (S = p.R), combined in shared memory in slice order.
constexpr int kDirectSteps = 4;

template <class T>
__global__ void __launch_bounds__(kConvThreads) conv1d_direct_kernel(const ConvParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int U = kDirectSteps;
  __shared__ float red[U][kConvThreads];
  const int S = p.R, per = kConvThreads / S;
  const int lo = threadIdx.x % per, sl = threadIdx.x / per;
  const int tq_n = (p.Tout + U - 1) / U;
  const int total = p.B * p.Cout * tq_n;  // < 2^30 (conv_params)
  const int64_t kstep = int64_t(p.dil) * p.xs2, tstep = int64_t(p.stride) * p.xs2;
  for (int base = blockIdx.x * per; base < total; base += gridDim.x * per) {
    const int i = base + lo;
    float acc[U] = {};
    int r = 0, t0 = 0;
    if (i < total) {
      r = i / tq_n, t0 = (i - r * tq_n) * U;
      const int b = r / p.Cout, o = r - b * p.Cout, g = o / p.M;
      // Steps past the row's end repeat its last step (computed, never stored).
      int64_t toff[U];
#pragma unroll
      for (int u = 0; u < U; ++u) toff[u] = min(t0 + u, p.Tout - 1) * tstep;
      const T* xb = p.x + b * p.xs0 + int64_t(g) * p.Cg * p.xs1;
      const T* wo = p.w + int64_t(o) * p.Cg * p.K;
      for (int c = sl; c < p.Cg; c += S) {
        const T* xc = xb + c * p.xs1;
        const T* wc = wo + c * p.K;
#pragma unroll 4
        for (int k = 0; k < p.K; ++k) {
          const float wk = ldf(wc + k);
          const T* xk = xc + k * kstep;
#pragma unroll
          for (int u = 0; u < U; ++u) acc[u] = fmaf(wk, ldf(xk + toff[u]), acc[u]);
        }
      }
    }
    if (S > 1) {
#pragma unroll
      for (int u = 0; u < U; ++u) red[u][threadIdx.x] = acc[u];
      __syncthreads();
      if (sl == 0)
        for (int s2 = 1; s2 < S; ++s2)
#pragma unroll
          for (int u = 0; u < U; ++u) acc[u] += red[u][s2 * per + lo];
      __syncthreads();
    }
    if (sl == 0 && i < total) {
      const int o = r % p.Cout;
      const float b0 = p.bias ? to_f32(p.bias[o]) : 0.f;
      T* y = p.out + int64_t(r) * p.Tout + t0;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (t0 + u < p.Tout) y[u] = from_f32<T>(acc[u] + b0);
    }
  }
}

// ---- conv1d: dot (few columns) ---------------------------------------------------------

// Block (blockIdx.x, g): output channels g*M + m0, m0 + 1 (kR = 2; a lone last channel is
// computed twice, stored once). Thread: reduction chunks of 4 (c, k) elements, every 256th,
// the two weight rows' chunks (vector loads) dotted with the kQ columns' inputs (read through
// L1: a few KB shared by every block of the group). Columns past N repeat the last one.
template <class T, int kQ>
__global__ void __launch_bounds__(kConvThreads) conv1d_dot_kernel(const ConvParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int kR = 2;
  __shared__ float red[kConvThreads / 32][kR * kQ];
  const int g = blockIdx.y, m0 = blockIdx.x * kR;
  const int rows = min(kR, p.M - m0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* xg = p.x + int64_t(g) * p.Cg * p.xs1;
  int64_t qoff[kQ];
#pragma unroll
  for (int q = 0; q < kQ; ++q) {
    const int qq = min(q, p.N - 1);
    const int b = qq / p.Tout, t = qq - b * p.Tout;
    qoff[q] = b * p.xs0 + int64_t(t) * p.stride * p.xs2;
  }
  const T* w0 = p.w + (int64_t(g) * p.M + m0) * p.Kr;
  const T* w1 = w0 + (rows > 1 ? p.Kr : 0);
  float acc[kR][kQ];
#pragma unroll
  for (int i = 0; i < kR; ++i)
#pragma unroll
    for (int q = 0; q < kQ; ++q) acc[i][q] = 0.f;
  const int64_t kstep = int64_t(p.dil) * p.xs2;
  const int chunks = (p.Kr + 3) / 4;
#pragma unroll 2
  for (int ch = tid; ch < chunks; ch += kConvThreads) {
    const int r0 = ch * 4;
    float wv[kR][4];
    load4(w0 + r0, p.vec, p.Kr - r0, wv[0]);
    load4(w1 + r0, p.vec, p.Kr - r0, wv[1]);
    int c = r0 / p.K, k = r0 - c * p.K;
    const T* xc = xg + int64_t(c) * p.xs1;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
      if (r0 + v < p.Kr) {
        const T* xk = xc + k * kstep;
#pragma unroll
        for (int q = 0; q < kQ; ++q) {
          const float xv = ldf(xk + qoff[q]);
          acc[0][q] = fmaf(wv[0][v], xv, acc[0][q]);
          acc[1][q] = fmaf(wv[1][v], xv, acc[1][q]);
        }
      }
      if (++k == p.K) k = 0, xc += p.xs1;
    }
  }
#pragma unroll
  for (int i = 0; i < kR; ++i)
#pragma unroll
    for (int q = 0; q < kQ; ++q) {
      const float s = warp_sum(acc[i][q]);
      if (lane == 0) red[warp][i * kQ + q] = s;
    }
  __syncthreads();
  if (tid < rows * kQ) {
    const int i = tid / kQ, q = tid - i * kQ;
    if (q < p.N) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kConvThreads / 32; ++w) s += red[w][tid];
      const int o = g * p.M + m0 + i, b = q / p.Tout, t = q - b * p.Tout;
      if (p.bias) s += to_f32(p.bias[o]);
      p.out[(int64_t(b) * p.Cout + o) * p.Tout + t] = from_f32<T>(s);
    }
  }
}

// ---- implicit GEMM (conv1d, and conv_transpose1d per phase) ------------------------------

// Tile BM x BN over (output channel, column), BK reduction elements per stage; 256 threads,
// each a TM x TN register tile whose rows (columns) are float4 groups spread BM*4/TM
// (BN*4/TN) apart: conflict-free 16-byte shared loads.
template <class T, int BM, int BN, int BK, int TM, int TN>
__global__ void __launch_bounds__(kConvThreads, TM* TN >= 64 || BM * BK >= 16 * kConvThreads ? 1 : 2)
    conv_gemm_kernel(const ConvParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  static_assert((BM / TM) * (BN / TN) == kConvThreads, "256 threads per tile");
  static_assert(BM * BK % kConvThreads == 0 && BK * BN % kConvThreads == 0, "whole loads per thread");
  constexpr int kA = BM * BK / kConvThreads, kB = BK * BN / kConvThreads;
  constexpr int kAStep = kConvThreads / BK, kBStep = kConvThreads / BN;
  __shared__ __align__(16) float As[2][BK][BM + 4];
  __shared__ __align__(16) float Bs[2][BK][BN + 4];

  const int tid = threadIdx.x;
  const int GP = p.groups * p.P;
  const int gp = blockIdx.z % GP, split = blockIdx.z / GP;
  const int g = gp / p.P, ph = gp - g * p.P;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int ntiles = (p.Kr + BK - 1) / BK;
  const int kt0 = split * p.tiles_per_split, kt1 = min(ntiles, kt0 + p.tiles_per_split);

  // This thread's loads: A (weights) at reduction offset ar of rows am + i*kAStep; B (inputs)
  // at column bn, reduction offsets br + i*kBStep. (c, k) pairs advance by BK per stage.
  const int ar = tid % BK, am = tid / BK;
  const int bn = tid % BN, br = tid / BN;
  const int n = n0 + bn;
  const bool n_ok = n < p.N;
  int nb = 0, nu = 0;
  if (n_ok) nb = n / p.Np, nu = n - nb * p.Np;
  const int64_t xg = nb * p.xs0 + int64_t(g) * p.Cg * p.xs1;
  const int64_t xoff_n = p.transposed ? xg : xg + int64_t(nu) * p.stride * p.xs2;
  const int64_t kstep = int64_t(p.dil) * p.xs2;
  const int dq = BK / p.taps, dr = BK - dq * p.taps;
  int bc[kB], bk[kB];
#pragma unroll
  for (int i = 0; i < kB; ++i) {
    const int r = kt0 * BK + br + i * kBStep;
    bc[i] = r / p.taps;
    bk[i] = r - bc[i] * p.taps;
  }
  int ac = 0, ak = 0;  // conv_transpose1d: the weight loads' (c, tap)
  if (p.transposed) {
    const int r = kt0 * BK + ar;
    ac = r / p.taps;
    ak = r - ac * p.taps;
  }
  float ra[kA], rb[kB];

  auto load = [&](int kt) {
    const int r = kt * BK + ar;
#pragma unroll
    for (int i = 0; i < kA; ++i) {
      const int m = m0 + am + i * kAStep;
      float v = 0.f;
      if (!p.transposed) {
        if (m < p.M && r < p.Kr) v = ldf(p.w + (int64_t(g) * p.M + m) * p.Kr + r);
      } else {
        const int k = ph + ak * p.stride;
        if (m < p.M && ac < p.Cg && k < p.K) v = ldf(p.w + ((int64_t(g) * p.Cg + ac) * p.M + m) * p.K + k);
      }
      ra[i] = v;
    }
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      float v = 0.f;
      if (n_ok && bc[i] < p.Cg) {
        if (!p.transposed) {
          v = ldf(p.x + xoff_n + int64_t(bc[i]) * p.xs1 + bk[i] * kstep);
        } else {
          const int t = nu - bk[i];
          if (t >= 0 && t < p.Tin) v = ldf(p.x + xoff_n + int64_t(bc[i]) * p.xs1 + int64_t(t) * p.xs2);
        }
      }
      rb[i] = v;
    }
    // Advance the (c, k) pairs to the next stage.
#pragma unroll
    for (int i = 0; i < kB; ++i) {
      bk[i] += dr, bc[i] += dq;
      if (bk[i] >= p.taps) bk[i] -= p.taps, ++bc[i];
    }
    ak += dr, ac += dq;
    if (ak >= p.taps) ak -= p.taps, ++ac;
  };
  auto store = [&](int buf) {
#pragma unroll
    for (int i = 0; i < kA; ++i) As[buf][ar][am + i * kAStep] = ra[i];
#pragma unroll
    for (int i = 0; i < kB; ++i) Bs[buf][br + i * kBStep][bn] = rb[i];
  };

  const int tx = tid % (BN / TN), ty = tid / (BN / TN);
  float acc[TM][TN];
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;

  if (kt0 < kt1) {
    load(kt0);
    store(0);
    __syncthreads();
    for (int kt = kt0; kt < kt1; ++kt) {
      const int cur = (kt - kt0) & 1;
      const bool more = kt + 1 < kt1;
      if (more) load(kt + 1);  // in flight while this stage computes
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float a[TM], b[TN];
#pragma unroll
        for (int u = 0; u < TM / 4; ++u) {
          const float4 v = *reinterpret_cast<const float4*>(&As[cur][kk][u * (BM * 4 / TM) + ty * 4]);
          a[4 * u] = v.x, a[4 * u + 1] = v.y, a[4 * u + 2] = v.z, a[4 * u + 3] = v.w;
        }
#pragma unroll
        for (int u = 0; u < TN / 4; ++u) {
          const float4 v = *reinterpret_cast<const float4*>(&Bs[cur][kk][u * (BN * 4 / TN) + tx * 4]);
          b[4 * u] = v.x, b[4 * u + 1] = v.y, b[4 * u + 2] = v.z, b[4 * u + 3] = v.w;
        }
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      if (more) store(cur ^ 1);
      __syncthreads();
    }
  }

  if (p.splits > 1) {
    // Split reduction: every split stores its partial sums; the last to arrive at this tile
    // (a counter per tile) adds them in split order -- the same sum whichever block is last.
    const int64_t plane = int64_t(GP) * p.M * p.N;
    const int64_t base = int64_t(gp) * p.M * p.N;
#pragma unroll
    for (int i = 0; i < TM; ++i) {
      const int m = m0 + (i / 4) * (BM * 4 / TM) + ty * 4 + (i % 4);
      if (m >= p.M) continue;
      float* wr = p.ws + split * plane + base + int64_t(m) * p.N;
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int nn = n0 + (j / 4) * (BN * 4 / TN) + tx * 4 + (j % 4);
        if (nn < p.N) __stcg(wr + nn, acc[i][j]);
      }
    }
    __threadfence();
    __syncthreads();
    __shared__ int last;
    if (tid == 0) {
      const int tile = (gp * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
      last = atomicAdd(p.counters + tile, 1) == p.splits - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.f;
    for (int sp = 0; sp < p.splits; ++sp) {  // each split's loads all in flight at once
      const float* rd = p.ws + sp * plane + base;
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = min(m0 + (i / 4) * (BM * 4 / TM) + ty * 4 + (i % 4), p.M - 1);
#pragma unroll
        for (int j = 0; j < TN; ++j) {
          const int nn = min(n0 + (j / 4) * (BN * 4 / TN) + tx * 4 + (j % 4), p.N - 1);
          acc[i][j] += __ldcg(rd + int64_t(m) * p.N + nn);
        }
      }
    }
  }
  // Output offsets: a column part per column (-1: none) and a row part per row.
  int col[TN];
#pragma unroll
  for (int j = 0; j < TN; ++j) {
    const int nn = n0 + (j / 4) * (BN * 4 / TN) + tx * 4 + (j % 4);
    const int b = nn / p.Np, u = nn - b * p.Np;
    const int jj = p.transposed ? u * p.stride + ph : u;
    col[j] = nn < p.N && jj < p.Tout ? b * p.Cout * p.Tout + jj : -1;
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int m = m0 + (i / 4) * (BM * 4 / TM) + ty * 4 + (i % 4);
    if (m >= p.M) continue;
    const int o = g * p.M + m;
    const float b0 = p.bias ? to_f32(p.bias[o]) : 0.f;
    T* orow = p.out + o * p.Tout;
#pragma unroll
    for (int j = 0; j < TN; ++j)
      if (col[j] >= 0) orow[col[j]] = from_f32<T>(acc[i][j] + b0);
  }
}

// ---- conv_transpose1d: direct and dot ----------------------------------------------------

// One input channel per group (g = o / M): out[b, o, j] = bias + sum_t x[b, g, t] w[g, o % M, j - t*s].
template <class T>
__global__ void __launch_bounds__(kConvThreads) conv_transpose1d_direct_kernel(const ConvParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int total = p.B * p.Cout * p.Tout;  // < 2^30 (conv_params)
  for (int i = blockIdx.x * kConvThreads + threadIdx.x; i < total; i += gridDim.x * kConvThreads) {
    const int r = i / p.Tout, j = i - r * p.Tout;
    const int b = r / p.Cout, o = r - b * p.Cout, g = o / p.M;
    const T* xc = p.x + b * p.xs0 + int64_t(g) * p.xs1;
    const T* wr = p.w + int64_t(o) * p.K;  // w[g, o % M, :] is row o of [Cin * M, K]
    const int t_lo = j >= p.K ? (j - p.K) / p.stride + 1 : 0, t_hi = min(p.Tin - 1, j / p.stride);
    float acc = 0.f;
    for (int t = t_lo; t <= t_hi; ++t) acc = fmaf(ldf(xc + int64_t(t) * p.xs2), ldf(wr + j - t * p.stride), acc);
    p.out[i] = from_f32<T>(acc + (p.bias ? to_f32(p.bias[o]) : 0.f));
  }
}

// Block: group g, output channels o0 .. o0+R-1 of it; the segment w[c, o0 .. o0+R-1, :] of
// L = R*K elements is split into 4-element chunks (nch of them) x slices of the input channels.
// Y[(o, k), (b, t)] = sum_c w[c, o, k] x[b, c, t] is reduced over the slices in shared memory,
// then overlap-added: out[b, o, j] = bias + sum_t Y[(o, j - t*s), (b, t)].
template <class T, int kQ>
__global__ void __launch_bounds__(kConvThreads) conv_transpose1d_dot_kernel(const ConvParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  __shared__ float red[kConvThreads * 4 * kQ];  // [slice][nch*4][kQ], at most 32 KB
  const int tid = threadIdx.x;
  const int nblk = (p.M + p.R - 1) / p.R;
  const int g = blockIdx.x / nblk, o0 = (blockIdx.x - g * nblk) * p.R;
  const int ob = min(p.R, p.M - o0), L = ob * p.K;
  const int nch = (p.R * p.K + 3) / 4, Lp = nch * 4, nsl = kConvThreads / nch;
  const int ch = tid % nch, sl = tid / nch;
  int64_t qoff[kQ];
#pragma unroll
  for (int q = 0; q < kQ; ++q) {  // columns past N repeat the last one
    const int qq = min(q, p.N - 1);
    const int b = qq / p.Tin, t = qq - b * p.Tin;
    qoff[q] = b * p.xs0 + int64_t(t) * p.xs2;
  }
  float acc[4][kQ];
#pragma unroll
  for (int v = 0; v < 4; ++v)
#pragma unroll
    for (int q = 0; q < kQ; ++q) acc[v][q] = 0.f;
  if (sl < nsl && ch * 4 < L) {
    const int64_t wstep = int64_t(nsl) * p.M * p.K;
    const T* wc = p.w + ((int64_t(g) * p.Cg + sl) * p.M + o0) * p.K + ch * 4;
    const T* xc = p.x + (int64_t(g) * p.Cg + sl) * p.xs1;
    const int64_t xstep = int64_t(nsl) * p.xs1;
#pragma unroll 8
    for (int c = sl; c < p.Cg; c += nsl, wc += wstep, xc += xstep) {
      float wv[4];
      load4(wc, p.vec, L - ch * 4, wv);
#pragma unroll
      for (int q = 0; q < kQ; ++q) {
        const float xv = ldf(xc + qoff[q]);
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[v][q] = fmaf(wv[v], xv, acc[v][q]);
      }
    }
  }
  if (sl < nsl)
#pragma unroll
    for (int v = 0; v < 4; ++v)
#pragma unroll
      for (int q = 0; q < kQ; ++q) red[(sl * Lp + ch * 4 + v) * kQ + q] = acc[v][q];
  __syncthreads();
  for (int idx = tid; idx < L * kQ; idx += kConvThreads) {
    float s = red[idx];
    for (int s2 = 1; s2 < nsl; ++s2) s += red[s2 * Lp * kQ + idx];
    red[idx] = s;
  }
  __syncthreads();
  const int total = ob * p.B * p.Tout;
  for (int idx = tid; idx < total; idx += kConvThreads) {
    const int j = idx % p.Tout, r = idx / p.Tout, b = r % p.B, o = r / p.B;
    const int t_lo = j >= p.K ? (j - p.K) / p.stride + 1 : 0, t_hi = min(p.Tin - 1, j / p.stride);
    float s = 0.f;
    for (int t = t_lo; t <= t_hi; ++t) s += red[(o * p.K + j - t * p.stride) * kQ + b * p.Tin + t];
    const int oc = g * p.M + o0 + o;
    if (p.bias) s += to_f32(p.bias[oc]);
    p.out[(int64_t(b) * p.Cout + oc) * p.Tout + j] = from_f32<T>(s);
  }
}

// ---- launch plans ----------------------------------------------------------------------

inline int checked_dim(int64_t v, const char* what) {
  TTT_CHECK(v >= 0 && v <= INT_MAX / 2, "conv (CUDA): ", what, " = ", v, " is too large");
  return int(v);
}

template <class T>
ConvParams<T> conv_params(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                          const Tensor<T, Cuda>& bias, int64_t stride, int64_t dil, int64_t groups) {
  ConvParams<T> p{};
  p.x = x.data(), p.w = w.data(), p.bias = bias.defined() ? bias.data() : nullptr, p.out = out.data();
  p.xs0 = x.stride(0), p.xs1 = x.stride(1), p.xs2 = x.stride(2);
  p.B = checked_dim(x.size(0), "batch"), p.Cin = checked_dim(x.size(1), "input channels");
  p.Tin = checked_dim(x.size(2), "input length");
  p.Cout = checked_dim(out.size(1), "output channels"), p.Tout = checked_dim(out.size(2), "output length");
  p.K = checked_dim(w.size(2), "kernel size"), p.stride = checked_dim(stride, "stride");
  p.dil = checked_dim(dil, "dilation"), p.groups = checked_dim(groups, "groups");
  p.Cg = p.Cin / p.groups, p.M = p.Cout / p.groups;
  checked_dim(out.numel(), "output size");
  checked_dim(w.numel(), "weight size");
  return p;
}

// The GEMM's tile shapes, and a cost model to choose one with its split of the reduction:
// waves of 2 blocks per SM, each block's FMAs at the tile's relative efficiency, plus a
// launch and the workspace traffic when split.
struct GemmTile {
  int bm, bn, bk;
  int per_sm;  // resident blocks per SM (registers)
  double eff;  // FMA efficiency relative to the 128 x 128 tile
};
constexpr GemmTile kGemmTiles[] = {
    {128, 128, 8, 1, 1.0}, {64, 128, 8, 2, 0.9}, {32, 128, 16, 2, 0.7}, {64, 64, 32, 2, 0.9}};
// The model's cycles: load latency a stage does not hide, a block's fixed cost, a split
// reduction's fixed cost and its cost per split (the last block's pass over the partial sums).
// Fitted on the H200 to a sweep of every tile and split over Mimi's layers at batch 1 and 64
// (bench_mimi_ops_cuda tile=N splits=N): within 2% of the best forced choice in total.
constexpr double kStageLatency = 150, kBlockLatency = 4000, kSplitLatency = 2000, kSplitPass = 600;

// Kernels<Cuda>::set_conv_gemm's override: tile (-1: automatic) and splits (0: chosen).
inline int& conv_forced_tile() {
  static int v = -1;
  return v;
}
inline int& conv_forced_splits() {
  static int v = 0;
  return v;
}

template <class T>
void launch_conv_gemm(ConvParams<T>& p) {
  const int sm = Context::get().sm_count();
  const int64_t GP = int64_t(p.groups) * p.P;
  int best = 0, best_splits = 1;
  double best_cost = HUGE_VAL;
  for (int c = 0; c < int(std::size(kGemmTiles)); ++c) {
    if (conv_forced_tile() >= 0 && c != conv_forced_tile()) continue;
    const GemmTile& t = kGemmTiles[c];
    const int64_t blocks = ((p.M + t.bm - 1) / t.bm) * int64_t((p.N + t.bn - 1) / t.bn) * GP;
    const int64_t ntiles = (p.Kr + t.bk - 1) / t.bk;
    for (int s = 1; s <= 16; s *= 2) {
      if (s > 1 && (ntiles < 2 * s || blocks * s > 2 * int64_t(t.per_sm) * sm)) break;
      const int64_t stages = (ntiles + s - 1) / s;
      const int64_t slots = int64_t(t.per_sm) * sm, waves = (blocks * s + slots - 1) / slots;
      const double fma = double(t.bm) * t.bn * t.bk * stages * t.per_sm / 128.0 / t.eff;
      double cost = double(waves) * (fma + stages * kStageLatency + kBlockLatency);
      if (s > 1) cost += kSplitLatency + s * kSplitPass;
      if (cost < best_cost) best = c, best_splits = s, best_cost = cost;
    }
  }
  const GemmTile& t = kGemmTiles[best];
  const int64_t ntiles = (p.Kr + t.bk - 1) / t.bk;
  if (conv_forced_splits() > 0)
    best_splits = int(std::min<int64_t>(conv_forced_splits(), std::max<int64_t>(1, ntiles)));
  p.splits = best_splits;
  p.tiles_per_split = int((ntiles + best_splits - 1) / best_splits);
  p.splits = int((ntiles + p.tiles_per_split - 1) / p.tiles_per_split);  // no empty split
  const dim3 grid(unsigned((p.N + t.bn - 1) / t.bn), unsigned((p.M + t.bm - 1) / t.bm), unsigned(GP * p.splits));
  Tensor<float, Cuda> ws;
  if (p.splits > 1) {
    // Partial sums, then one arrival counter per output tile, zeroed on the stream.
    const int64_t n = GP * p.splits * p.M * p.N, tiles = int64_t(grid.x) * grid.y * GP;
    ws = Tensor<float, Cuda>::empty({n + tiles});
    p.ws = ws.data();
    p.counters = reinterpret_cast<int*>(ws.data() + n);
    TTT_CUDA_CHECK(cudaMemsetAsync(p.counters, 0, size_t(tiles) * sizeof(int), stream()));
  }
  TTT_CHECK(grid.y <= 65535 && grid.z <= 65535, "conv (CUDA): grid too large (", p.M, " channels per group, ", GP,
            " groups x phases)");
  switch (best) {
    case 0: launch(conv_gemm_kernel<T, 128, 128, 8, 8, 8>, grid, kConvThreads, 0, 1, p); break;
    case 1: launch(conv_gemm_kernel<T, 64, 128, 8, 4, 8>, grid, kConvThreads, 0, 1, p); break;
    case 2: launch(conv_gemm_kernel<T, 32, 128, 16, 4, 4>, grid, kConvThreads, 0, 1, p); break;
    default: launch(conv_gemm_kernel<T, 64, 64, 32, 4, 4>, grid, kConvThreads, 0, 1, p); break;
  }
}

// Channel slices (at most 32) for a direct kernel: enough threads for ~2 waves of 256-thread blocks.
inline int direct_slices(int64_t outputs, int64_t channels) {
  const int64_t want = 2 * int64_t(Context::get().sm_count()) * kConvThreads;
  int s = 1;
  while (s < 32 && outputs * s < want && channels >= 2 * s) s *= 2;
  return s;
}

inline bool aligned_to(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

}  // namespace cuda::kernels

void Kernels<Cuda>::set_conv_gemm(int tile, int splits) {
  using namespace cuda::kernels;
  conv_forced_tile() = tile >= 0 && tile < int(std::size(kGemmTiles)) ? tile : -1;
  conv_forced_splits() = std::max(0, splits);
}

template <class T>
void Kernels<Cuda>::conv1d(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                           const Tensor<T, Cuda>& bias, int64_t stride, int64_t dilation, int64_t groups) {
  using namespace cuda::kernels;
  ConvParams<T> p = conv_params(out, x, w, bias, stride, dilation, groups);
  p.transposed = 0, p.taps = p.K, p.Kr = checked_dim(int64_t(p.Cg) * p.K, "reduction length");
  p.Np = p.Tout, p.N = checked_dim(int64_t(p.B) * p.Tout, "columns"), p.P = 1;
  if (conv_forced_tile() >= 0) return launch_conv_gemm(p);
  // Many columns, one group: im2col + a tensor-core GEMM (conv_lowered.cuh).
  const double macs = double(p.B) * p.Tout * p.Cout * p.Cin * p.K;
  if (p.groups == 1 && macs >= double(conv_lowered_min_macs()) && int64_t(p.Cin) * p.K >= 8 && p.Cout >= 8 &&
      lowered_fits(int64_t(p.Cin) * p.K * p.B * p.Tout, int64_t(p.Cout) * p.B * p.Tout))
    return conv1d_lowered(out, x, w, bias, stride, dilation);
  // Direct: few output channels per group (depthwise, 64 -> 1), or one input channel per group
  // with few columns (1 -> 64 at batch 1; the GEMM with its one reduction stage wins above).
  if (p.M <= kConvDirectMaxOut || (p.Cg == 1 && int64_t(p.N) * p.M <= int64_t(1) << 17)) {
    const int64_t chunks = int64_t(p.B) * p.Cout * ((p.Tout + kDirectSteps - 1) / kDirectSteps);
    p.R = direct_slices(chunks, p.Cg);
    const int per = kConvThreads / p.R;
    launch(conv1d_direct_kernel<T>, unsigned(std::min<int64_t>((chunks + per - 1) / per, int64_t(1) << 20)),
           kConvThreads, 0, 1, p);
    return;
  }
  if (p.N <= kConvDotMaxCols && p.groups <= 65535) {
    p.vec = p.Kr % 4 == 0 && aligned_to(p.w, 4 * sizeof(T));
    const dim3 grid(unsigned((p.M + 1) / 2), unsigned(p.groups));
    if (p.N <= 2) launch(conv1d_dot_kernel<T, 2>, grid, kConvThreads, 0, 1, p);
    else if (p.N <= 4) launch(conv1d_dot_kernel<T, 4>, grid, kConvThreads, 0, 1, p);
    else launch(conv1d_dot_kernel<T, kConvDotMaxCols>, grid, kConvThreads, 0, 1, p);
    return;
  }
  launch_conv_gemm(p);
}

template <class T>
void Kernels<Cuda>::conv_transpose1d(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                                     const Tensor<T, Cuda>& bias, int64_t stride, int64_t groups) {
  using namespace cuda::kernels;
  ConvParams<T> p = conv_params(out, x, w, bias, stride, 1, groups);
  const int64_t outputs = out.numel();
  const bool forced = conv_forced_tile() >= 0;
  if (p.Cg == 1 && !forced) {
    launch(conv_transpose1d_direct_kernel<T>, grid_for(outputs, kConvThreads), kConvThreads, 0, 1, p);
    return;
  }
  const double macs = double(p.B) * p.Tin * p.Cin * p.Cout * p.K;
  if (p.groups == 1 && !forced && macs >= double(conv_lowered_min_macs()) && p.Cin >= 8 && p.Cout >= 8 &&
      lowered_fits(int64_t(p.Cout) * p.K * p.B * p.Tin, int64_t(p.Cout) * p.B * p.Tout))
    return conv_transpose1d_lowered(out, x, w, bias, stride);
  const int sm = cuda::Context::get().sm_count();
  if (int64_t(p.B) * p.Tin <= kConvTDotMaxCols && p.K <= kConvTDotMaxSeg && !forced) {
    p.N = p.B * p.Tin;
    // Output channels per block: enough blocks for ~2 per SM, a segment of at most 1024.
    const int64_t cap = std::min<int64_t>(p.M, kConvTDotMaxSeg / p.K);
    p.R = int(std::max<int64_t>(1, std::min<int64_t>(cap, int64_t(p.groups) * p.M / (2 * sm))));
    p.vec = int64_t(p.M) * p.K % 4 == 0 && int64_t(p.R) * p.K % 4 == 0 && aligned_to(p.w, 4 * sizeof(T));
    const int64_t blocks = int64_t(p.groups) * ((p.M + p.R - 1) / p.R);
    TTT_CHECK(blocks <= INT_MAX, "conv_transpose1d (CUDA): too many blocks");
    if (p.N <= 2) launch(conv_transpose1d_dot_kernel<T, 2>, unsigned(blocks), kConvThreads, 0, 1, p);
    else launch(conv_transpose1d_dot_kernel<T, kConvTDotMaxCols>, unsigned(blocks), kConvThreads, 0, 1, p);
    return;
  }
  p.transposed = 1, p.taps = (p.K + p.stride - 1) / p.stride;
  p.Kr = checked_dim(int64_t(p.Cg) * p.taps, "reduction length");
  p.Np = (p.Tout + p.stride - 1) / p.stride, p.N = checked_dim(int64_t(p.B) * p.Np, "columns");
  p.P = p.stride;
  // (Repacking the weights per phase into conv1d's contiguous layout first measured slower on
  // the H200 at batch 1 and 64: the gathered weight loads are not what limits these GEMMs.)
  launch_conv_gemm(p);
}

}  // namespace ttt
