#pragma once
// The streaming GEMV (nvcc only): y (+)= x W^T for one or two rows of x -- a decoding stream's
// products -- with a dense weight (bf16, f16, f32) or a quantised one (int8 / fp8 codes and a
// scale per output row), and fused_linear's norm prologue and GLU epilogue.
//
// Why a second GEMV: the tiled one (linear.cuh, linear_quant.cuh) requests one 4 KiB tile of
// each row, meets the block at two barriers around staging that tile of x, then computes, so a
// warp has its loads in flight only between barriers and the whole block waits for its slowest
// load every tile. Nsight Compute on the H200 measured it at 17-34% of the DRAM peak (fp8,
// docs/perf.md). Here x (normalised, rounded to T exactly as the standalone norm stores it) is
// staged in shared memory once, for the whole K, behind the first loads; after that one barrier
// every warp streams its rows alone: kInFlight 16-byte loads per lane requested before any is
// consumed, no further barrier until the split-K combine. Little's law: a warp keeps 4 KiB in
// flight, ~24 warps per SM ~96 KiB, above the ~40 KiB per SM that HBM3e's latency x bandwidth
// asks for. Blocks are persistent (a first version with a block per 8 rows lost to the tiled
// kernel: its prologue outweighed its rows). On by default for the quantised products (mode 1:
// 14-17% off the fp8 / int8 frame on an H100, docs/perf.md); cuBLAS keeps the dense ones.
//
//   y[r, n] = scale(n) * sum_k decode(W[n, k]) * xn[r, k]      (fp32 sums)
//   glu:   y[r, n] = act(round_T(y_gate)) * round_T(y_value),  gate row n, value row n + N/2
//   beta:  y[r, n] = y[r, n] + beta * y_old[r, n]
// the same arithmetic as the tiled kernels, in another (fixed) summation order.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/quant_codes.cuh"
#include "ttt/backend/math.hpp"

namespace ttt::cuda::kernels {

using namespace device;

enum class GemvNorm : uint8_t { none, rms, layer };

// The GEMV's fused norm, shared by the bf16 and the quantised-weight kernels (any params struct
// with x, K, norm, norm_w, norm_b, eps). Statistics of one row by one warp, in fp32, mean first
// then squared deviations: mu (0 for RMSNorm) and scale = 1 / sqrt(var + eps), where var is the
// mean square for RMSNorm and the variance for LayerNorm. Lane 0 gets the result.
template <class T, class P>
__device__ __forceinline__ void gemv_norm_stats(const P& p, int row, int lane, float& mu_out, float& scale_out) {
  constexpr int kV = kVec<T>;
  const T* xr = p.x + row * p.K;
  const bool vx = aligned16(xr) && p.K % kV == 0;
  auto each = [&](auto&& f) {  // f(value) over the row, 16-byte loads when aligned
    if (vx) {
      for (int64_t c = lane; c < p.K / kV; c += 32) {
        float v[kV];
        load16(xr + c * kV, v);
#pragma unroll
        for (int j = 0; j < kV; ++j) f(v[j]);
      }
    } else {
      for (int64_t j = lane; j < p.K; j += 32) f(to_f32(xr[j]));
    }
  };
  float s = 0.f, ss = 0.f;
  if (p.norm == GemvNorm::layer) {
    each([&](float v) { s += v; });
    s = warp_sum(s);
  }
  const float mu = p.norm == GemvNorm::layer ? s / float(p.K) : 0.f;
  each([&](float v) { ss += (v - mu) * (v - mu); });
  ss = warp_sum(ss);
  mu_out = mu;
  scale_out = p.norm == GemvNorm::layer ? 1.f / sqrtf(ss / float(p.K) + p.eps) : 1.f / sqrtf(p.eps + ss / float(p.K));
}

// x[r, k] through the norm, rounded to T as the unfused norm kernel stores it.
template <class T, class P>
__device__ __forceinline__ T gemv_norm_value(const P& p, int r, int64_t k, float mu, float scale) {
  T v = p.x[r * p.K + k];
  if (p.norm == GemvNorm::rms) {
    v = from_f32<T>(to_f32(v) * (to_f32(p.norm_w[k]) * scale));
  } else if (p.norm == GemvNorm::layer) {
    float f = (to_f32(v) - mu) * scale;
    if (p.norm_w) f *= to_f32(p.norm_w[k]);
    if (p.norm_b) f += to_f32(p.norm_b[k]);
    v = from_f32<T>(f);
  }
  return v;
}

// The norm prologue of every GEMV kernel: row r's statistics by warp r (rows are at most 8,
// warps 8: no block-wide reduction in front of the weight stream) into shared memory, then a
// barrier. Nothing without a norm.
template <class T, class P, int kR>
__device__ __forceinline__ void gemv_norm_prologue(const P& p, int warp, int lane, float (&mu)[kR], float (&scale)[kR]) {
  if (p.norm == GemvNorm::none) return;
  if (warp < p.R) {
    float m, sc;
    gemv_norm_stats<T>(p, warp, lane, m, sc);
    if (lane == 0) mu[warp] = m, scale[warp] = sc;
  }
  __syncthreads();
}

// The end of every GEMV kernel's row group (this file's and the tiled ones in linear.cuh and
// linear_quant.cuh): each warp's lane sums reduced, then with a split (S > 1 warps per group)
// lane 0 of slice 0 adds the group's partials in a fixed order (deterministic). With S > 1
// every thread of the block must call it (two barriers: partial is reusable afterwards).
template <int kRows, int kR, int kWarps>
__device__ __forceinline__ void gemv_reduce(float (&acc)[kRows][kR], float (&partial)[kWarps][kRows][kR], int warp,
                                            int lane, int S, int group, int slice) {
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      acc[i][r] = warp_sum(acc[i][r]);
      if (S > 1 && lane == 0) partial[warp][i][r] = acc[i][r];
    }
  if (S > 1) {
    __syncthreads();
    if (slice == 0 && lane == 0)
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          float v = 0.f;
          for (int s2 = 0; s2 < S; ++s2) v += partial[group * S + s2][i][r];
          acc[i][r] = v;
        }
    __syncthreads();
  }
}

// The stores: y = v (+ beta * y), and the GLU's act(gate) * value with gate and value each
// rounded to T first, as linear + glu would store them.
template <class T>
__device__ __forceinline__ void gemv_store(T* y, float v, float beta) {
  *y = from_f32<T>(beta != 0.f ? v + beta * to_f32(*y) : v);
}
template <class T>
__device__ __forceinline__ void gemv_store_glu(T* y, Unary act, float gate, float value) {
  *y = from_f32<T>(math::apply(act, to_f32(from_f32<T>(gate)), 1.f) * to_f32(from_f32<T>(value)));
}

// ---- weight formats (policies): what a 16-byte chunk of a row holds ------------------------

// T weights: kVec<T> per chunk, no row scale.
template <class T>
struct DenseRows {
  static constexpr int kPer = kVec<T>;
  const T* w;  // [N, K]
  __device__ __forceinline__ const uint4* row(int64_t n, int64_t K) const {
    return reinterpret_cast<const uint4*>(w + n * K);
  }
  __device__ __forceinline__ void decode(const uint4& u, float (&f)[kPer]) const { unpack16<T>(u, f); }
  __device__ __forceinline__ float scale(int64_t) const { return 1.f; }
};

// 1-byte codes of format F (core/quant.hpp): 16 per chunk, an fp32 scale per row.
template <class F>
struct CodeRows {
  static constexpr int kPer = 16;
  const uint8_t* w;  // [N, K]
  const float* s;    // [N]
  __device__ __forceinline__ const uint4* row(int64_t n, int64_t K) const {
    return reinterpret_cast<const uint4*>(w + n * K);
  }
  __device__ __forceinline__ void decode(const uint4& u, float (&f)[kPer]) const { decode16<F>(u, f); }
  __device__ __forceinline__ float scale(int64_t n) const { return s[n]; }
};

template <class T, class W>
struct GemvStreamParams {
  W w;
  const T* x;  // [R, K]
  T* y;        // [R, N] ([R, N / 2] with glu)
  int64_t N, K;
  int R;
  float beta;
  GemvNorm norm = GemvNorm::none;  // the names gemv_norm_stats / gemv_norm_value read
  const T* norm_w = nullptr;
  const T* norm_b = nullptr;
  float eps = 0.f;
  bool glu = false;
  Unary act = Unary::identity;
  int split = 1;  // warps sharing a row group, each taking every split-th run of 32 chunks
};

constexpr int kGemvStreamThreads = 256, kGemvStreamWarps = kGemvStreamThreads / 32;
constexpr int kGemvStreamInFlight = 8;  // 16-byte loads per lane requested before the first is used
constexpr int64_t kGemvStreamSmemBytes = 48 << 10;  // x staged for all of K: R * K * sizeof(T) at most

// TTT_GEMV_STREAM (or Kernels<Cuda>::set_gemv_stream): 0 = off (the tiled kernels and cuBLAS
// take these products); 1 = wherever a GEMV runs (the quantised products of 1-2 rows; dense
// ones only where TTT_GEMV_MAX_ROWS routes them to a GEMV, cuBLAS otherwise); 2 = also the dense
// 1-2 row products cuBLAS takes by default. Default 1: measured on an H100 (2026-12-05, 7B,
// 100 frames, docs/perf.md "int8 / fp8 weights"), this persistent version takes the fp8 frame
// at batch 1 from 8.13 to 6.98 ms (int8 8.20 -> 7.04, fp8 batch 2 10.97 -> 9.10) against the
// tiled GEMV, but loses to cuBLAS on dense bf16 (8.70 -> 9.26 ms at batch 1), so not mode 2.
constexpr int kGemvStreamDefaultMode = 1;
// A mode clamped to 0..2; negative: TTT_GEMV_STREAM, else the default.
inline int gemv_stream_mode_or_env(int mode) {
  if (mode < 0) {
    const char* e = std::getenv("TTT_GEMV_STREAM");
    mode = e ? std::atoi(e) : kGemvStreamDefaultMode;
  }
  return std::max(0, std::min(2, mode));
}
inline int& gemv_stream_mode() {
  static int v = gemv_stream_mode_or_env(-1);
  return v;
}

// kRows weight rows per warp: 1, or 2 for a GLU (gate, value) pair. kR rows of x (1 or 2).
// Persistent: grid-stride over row groups, so that a block stages x (and the norm's statistics)
// once for many rows; a warp walks items q = (row group j, iteration t), and each of its kU
// load slots is refilled with item q + 1's chunk right after item q's chunk in it is consumed,
// so ~kU - 1 loads per lane stay in flight across iterations and across rows.
template <class T, class W, int kR, int kRows>
__global__ void __launch_bounds__(kGemvStreamThreads, 3) gemv_stream_kernel(const GemvStreamParams<T, W> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int kPer = W::kPer, kU = kGemvStreamInFlight / kRows, kXv = kVec<T>;
  extern __shared__ __align__(16) unsigned char gemv_stream_smem[];
  T* xs = reinterpret_cast<T*>(gemv_stream_smem);  // [kR, K]
  __shared__ float stat_mu[kR], stat_scale[kR];
  __shared__ float partial[kGemvStreamWarps][kRows][kR];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = p.split, G = kGemvStreamWarps / S, group = warp / S, slice = warp % S;
  const int64_t H = p.N / 2, outs = kRows == 2 ? H : p.N;
  // 32-bit chunk indices: a row of 2^31 chunks would be 32 GiB.
  const int chunks = int(p.K / kPer), step = 32 * S;  // a warp's chunks: slice*32 + lane + n*step
  const int c_start = slice * 32 + lane;
  // Iterations per row and rows per warp: the same for every warp of the block (barriers below).
  const int iters = ((chunks + 31) / 32 + S * kU - 1) / (S * kU);
  const int64_t rows_stride = int64_t(gridDim.x) * G;
  const int J = int((outs + rows_stride - 1) / rows_stride);
  auto out_of = [&](int j) { return (int64_t(j) * gridDim.x + blockIdx.x) * G + group; };

  // Item (j, t)'s kU chunks into the slots: `load_at` fixes the item's rows once, `fill` loads a slot.
  uint4 wv[kRows][kU];
  const uint4* nrow[kRows];
  int nc0 = 0;
  bool nok = false;
  auto load_at = [&](int j, int t) {
    const int64_t o = out_of(j);
    nok = j < J && o < outs;
#pragma unroll
    for (int i = 0; i < kRows; ++i) nrow[i] = p.w.row(nok ? (i == 0 ? o : o + H) : 0, p.K);
    nc0 = c_start + t * kU * step;
  };
  auto fill = [&](int u) {
    const int c = nc0 + u * step;
#pragma unroll
    for (int i = 0; i < kRows; ++i) wv[i][u] = nok && c < chunks ? __ldg(nrow[i] + c) : make_uint4(0, 0, 0, 0);
  };
  load_at(0, 0);
#pragma unroll
  for (int u = 0; u < kU; ++u) fill(u);  // in flight while x is staged

  gemv_norm_prologue<T>(p, warp, lane, stat_mu, stat_scale);
  for (int64_t i = threadIdx.x; i < kR * p.K; i += kGemvStreamThreads) {
    const int r = int(i / p.K);
    const int64_t k = i - r * p.K;
    xs[i] = gemv_norm_value<T>(p, r, k, stat_mu[r], stat_scale[r]);
  }
  __syncthreads();

  float acc[kRows][kR];
#pragma unroll
  for (int i = 0; i < kRows; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[i][r] = 0.f;
  for (int j = 0; j < J; ++j)
    for (int t = 0; t < iters; ++t) {
      const int c0 = c_start + t * kU * step;
      if (t + 1 < iters) load_at(j, t + 1);
      else load_at(j + 1, 0);
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int c = c0 + u * step;
        if (c < chunks) {  // zeros were loaded for a row past the end: harmless
          float wf[kRows][kPer];
#pragma unroll
          for (int i = 0; i < kRows; ++i) p.w.decode(wv[i][u], wf[i]);
#pragma unroll
          for (int r = 0; r < kR; ++r)
#pragma unroll
            for (int h = 0; h < kPer / kXv; ++h) {
              float xf[kXv];
              load16(xs + r * p.K + int64_t(c) * kPer + h * kXv, xf);
#pragma unroll
              for (int i = 0; i < kRows; ++i)
#pragma unroll
                for (int e = 0; e < kXv; ++e) acc[i][r] += wf[i][h * kXv + e] * xf[e];
            }
        }
        fill(u);  // the next item's chunk for this slot
      }
      if (t != iters - 1) continue;
      // Row group j is complete: reduce, combine the split, write.
      const int64_t o = out_of(j);
      gemv_reduce(acc, partial, warp, lane, S, group, slice);
      if (slice == 0 && lane == 0 && o < outs) {
        if constexpr (kRows == 2) {
          const float sg = p.w.scale(o), sv = p.w.scale(o + H);
#pragma unroll
          for (int r = 0; r < kR; ++r) gemv_store_glu(p.y + r * H + o, p.act, sg * acc[0][r], sv * acc[1][r]);
        } else {
          const float sc = p.w.scale(o);
#pragma unroll
          for (int r = 0; r < kR; ++r) gemv_store(p.y + r * p.N + o, sc * acc[0][r], p.beta);
        }
      }
#pragma unroll
      for (int i = 0; i < kRows; ++i)
#pragma unroll
        for (int r = 0; r < kR; ++r) acc[i][r] = 0.f;
    }
}

// Whether the streaming GEMV takes this product: 1-2 rows, rows of whole 16-byte chunks from a
// 16-byte aligned weight, x for all of K within the shared-memory budget.
template <class T, class W>
bool gemv_stream_fits(const W& w, int64_t R, int64_t K) {
  return gemv_stream_mode() > 0 && R >= 1 && R <= 2 && K % W::kPer == 0 && aligned16(w.w) &&
         R * K * int64_t(sizeof(T)) <= kGemvStreamSmemBytes;
}

// At most 3 blocks per SM (as many as are resident), each walking its row groups; the grid is
// cut to the fewest blocks that give every warp the same number of row groups. Small matrices
// (the depformer's) split a row over up to 8 warps while each warp still gets a run of 32 chunks.
template <class T, class W>
void launch_gemv_stream(GemvStreamParams<T, W> p) {
  const int64_t outs = p.glu ? p.N / 2 : p.N;
  const int64_t runs = (p.K / W::kPer + 31) / 32;
  const int64_t resident = 3 * int64_t(Context::get().sm_count());
  int S = 1;
  auto blocks_for = [&](int s) { return (outs + kGemvStreamWarps / s - 1) / (kGemvStreamWarps / s); };
  while (S < kGemvStreamWarps && blocks_for(S) < resident && runs >= 2 * S) S *= 2;
  p.split = S;
  const int64_t need = blocks_for(S);
  if (need == 0) return;
  const int64_t per_block = (need + resident - 1) / resident;  // row groups per warp
  const unsigned grid = unsigned((need + per_block - 1) / per_block);
  const size_t smem = size_t(p.R) * size_t(p.K) * sizeof(T);
  if (p.glu) {
    if (p.R == 1) launch(gemv_stream_kernel<T, W, 1, 2>, grid, kGemvStreamThreads, smem, 1, p);
    else launch(gemv_stream_kernel<T, W, 2, 2>, grid, kGemvStreamThreads, smem, 1, p);
  } else {
    if (p.R == 1) launch(gemv_stream_kernel<T, W, 1, 1>, grid, kGemvStreamThreads, smem, 1, p);
    else launch(gemv_stream_kernel<T, W, 2, 1>, grid, kGemvStreamThreads, smem, 1, p);
  }
}

}  // namespace ttt::cuda::kernels
