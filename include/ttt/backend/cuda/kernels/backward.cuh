#pragma once
// Kernels<Cuda> for the backward of row ops (nvcc only): unary_backward (elementwise) and
// layer_norm_backward (one block per row for dx, then a column reduction for dweight / dbias).
// Same formulas as the CPU backend (ops::unary_backward, ops::layer_norm_backward).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/kernels/elementwise.cuh"
#include "ttt/backend/cuda/kernels/rows.cuh"
#include "ttt/backend/math.hpp"
#include "ttt/core/tensor.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- unary_backward: dx = dy * op'(x) ---------------------------------------------------

template <class T>
struct UnaryGradFn {
  T* o;
  const T* x;
  const T* dy;
  Unary op;
  float alpha;
  __device__ void operator()(const int64_t (&off)[3]) const {
    o[off[0]] = from_f32<T>(to_f32(dy[off[2]]) * math::apply_grad(op, to_f32(x[off[1]]), alpha));
  }
};

// ---- layer_norm_backward --------------------------------------------------------------

// Rows of x (any strides, rows of n), dy (same shape, its own strides) and dx (unit last
// stride). Per row the statistics are recomputed in two passes (as layer_norm_kernel);
// stats[r] = (μ, rstd) is kept for the column pass.
template <class T>
struct LnBackwardParams {
  RowLayout x;   // x rows -> dx rows (out_stride: dx's outer strides)
  RowLayout dy;  // dy rows (in_stride / in_inner: dy's strides)
  const T* px;
  const T* pdy;
  const T* weight;  // may be null (w = 1)
  T* dx;
  float2* stats;    // [rows] μ, rstd
  float* partial;   // [chunks, 2, n]: Σ dy x̂ and Σ dy over a chunk of rows
  float eps;
  int64_t chunk_rows;
  T* dweight;       // may be null
  T* dbias;         // may be null
  int chunks;
};

// dx = (u − mean u − x̂ mean(u x̂)) rstd, u = dy ⊙ w, one block per row.
template <class T>
__global__ void __launch_bounds__(kRowThreads) layer_norm_backward_rows_kernel(const LnBackwardParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t n = p.x.n;
  for (int64_t r = blockIdx.x; r < p.x.rows; r += gridDim.x) {
    int64_t xo, oo, dyo, unused;
    row_offsets(p.x, r, xo, oo);
    row_offsets(p.dy, r, dyo, unused);
    const T* x = p.px + xo;
    const T* dy = p.pdy + dyo;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) s += to_f32(x[j * p.x.in_inner]);
    const float mu = block_all_reduce<kRowThreads>(s, SumOp{}) / float(n);
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float d = to_f32(x[j * p.x.in_inner]) - mu;
      ss += d * d;
    }
    const float rstd = 1.f / sqrtf(block_all_reduce<kRowThreads>(ss, SumOp{}) / float(n) + p.eps);
    float su = 0.f, sux = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float xh = (to_f32(x[j * p.x.in_inner]) - mu) * rstd;
      const float u = to_f32(dy[j * p.dy.in_inner]) * (p.weight ? to_f32(p.weight[j]) : 1.f);
      su += u;
      sux += u * xh;
    }
    su = block_all_reduce<kRowThreads>(su, SumOp{}) / float(n);
    sux = block_all_reduce<kRowThreads>(sux, SumOp{}) / float(n);
    T* o = p.dx + oo;
    for (int64_t j = threadIdx.x; j < n; j += kRowThreads) {
      const float xh = (to_f32(x[j * p.x.in_inner]) - mu) * rstd;
      const float u = to_f32(dy[j * p.dy.in_inner]) * (p.weight ? to_f32(p.weight[j]) : 1.f);
      o[j] = from_f32<T>((u - su - xh * sux) * rstd);
    }
    if (threadIdx.x == 0) p.stats[r] = make_float2(mu, rstd);
  }
}

// partial[c][0][j] = Σ dy x̂, partial[c][1][j] = Σ dy over rows [c chunk_rows, (c+1) chunk_rows):
// grid (column blocks, chunks), one thread per column.
template <class T>
__global__ void __launch_bounds__(kRowThreads) layer_norm_backward_cols_kernel(const LnBackwardParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t n = p.x.n, j = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (j >= n) return;
  const int64_t r0 = int64_t(blockIdx.y) * p.chunk_rows, r1 = min(p.x.rows, r0 + p.chunk_rows);
  float sw = 0.f, sb = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    int64_t xo, oo, dyo, unused;
    row_offsets(p.x, r, xo, oo);
    row_offsets(p.dy, r, dyo, unused);
    const float2 st = p.stats[r];
    const float g = to_f32(p.pdy[dyo + j * p.dy.in_inner]);
    sw += g * ((to_f32(p.px[xo + j * p.x.in_inner]) - st.x) * st.y);
    sb += g;
  }
  p.partial[(int64_t(blockIdx.y) * 2 + 0) * n + j] = sw;
  p.partial[(int64_t(blockIdx.y) * 2 + 1) * n + j] = sb;
}

// dweight / dbias = Σ over chunks (double), one thread per column.
template <class T>
__global__ void __launch_bounds__(kRowThreads) layer_norm_backward_sum_kernel(const LnBackwardParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t n = p.x.n, j = int64_t(blockIdx.x) * kRowThreads + threadIdx.x;
  if (j >= n) return;
  double sw = 0, sb = 0;
  for (int c = 0; c < p.chunks; ++c) {
    sw += double(p.partial[(int64_t(c) * 2 + 0) * n + j]);
    sb += double(p.partial[(int64_t(c) * 2 + 1) * n + j]);
  }
  if (p.dweight) p.dweight[j] = from_f32<T>(float(sw));
  if (p.dbias) p.dbias[j] = from_f32<T>(float(sb));
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::unary_backward(const Tensor<T, Cuda>& dx, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy,
                                   Unary op, float alpha) {
  using namespace cuda::kernels;
  launch_elementwise<3>(dx.shape(), {dx.strides(), x.strides(), dy.strides()},
                        UnaryGradFn<T>{dx.data(), x.data(), dy.data(), op, alpha});
}

template <class T>
void Kernels<Cuda>::layer_norm_backward(const Tensor<T, Cuda>& dx, const Tensor<T, Cuda>& dweight,
                                        const Tensor<T, Cuda>& dbias, const Tensor<T, Cuda>& x,
                                        const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>& dy, float eps) {
  using namespace cuda::kernels;
  LnBackwardParams<T> p{};
  p.x = make_rows(x.shape(), x.strides(), dx.strides());
  p.dy = make_rows(dy.shape(), dy.strides(), dy.strides());
  if (p.x.rows == 0) return;
  p.px = x.data(), p.pdy = dy.data(), p.dx = dx.data();
  p.weight = weight.defined() ? weight.data() : nullptr;
  p.dweight = dweight.defined() ? dweight.data() : nullptr;
  p.dbias = dbias.defined() ? dbias.data() : nullptr;
  p.eps = eps;
  const int64_t rows = p.x.rows, width = p.x.n;
  const auto stats = Tensor<float, Cuda>::empty({rows * 2});
  p.stats = reinterpret_cast<float2*>(stats.data());
  launch(layer_norm_backward_rows_kernel<T>, grid_rows(p.x.rows), kRowThreads, 0, 1, p);
  if (!p.dweight && !p.dbias) return;
  // Chunks of rows so that the column pass fills the GPU (each chunk: one block row).
  const int64_t col_blocks = (p.x.n + kRowThreads - 1) / kRowThreads;
  const int64_t want = std::max<int64_t>(1, 4 * int64_t(cuda::Context::get().sm_count()) / col_blocks);
  p.chunk_rows = std::max<int64_t>(16, (p.x.rows + want - 1) / want);
  p.chunks = int((p.x.rows + p.chunk_rows - 1) / p.chunk_rows);
  const auto partial = Tensor<float, Cuda>::empty({int64_t(p.chunks) * 2 * width});
  p.partial = partial.data();
  launch(layer_norm_backward_cols_kernel<T>, dim3(unsigned(col_blocks), unsigned(p.chunks)), kRowThreads, 0, 1, p);
  launch(layer_norm_backward_sum_kernel<T>, unsigned(col_blocks), kRowThreads, 0, 1, p);
}

}  // namespace ttt
