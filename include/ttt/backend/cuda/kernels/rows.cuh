#pragma once
// Kernels<Cuda>, one block per row of the last dimension (nvcc only): reduce, argmax,
// softmax, layer_norm, rms_norm, glu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/math.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- row ops (reduce, argmax, softmax, norms, glu) --------------------------------------

inline unsigned grid_rows(int64_t rows) { return unsigned(std::max<int64_t>(1, std::min<int64_t>(rows, 1 << 20))); }

// Rows of the last dimension: up to three outer dimensions (padded with 1 in front) and
// the element offsets of a row in the input and in the output.
struct RowLayout {
  int64_t rows, n;
  int64_t outer[3];
  int64_t in_stride[3], out_stride[3];
  int64_t in_inner;  // input stride along the row (the output's is 1)
};

// out_strides holds at least the outer dimensions' strides of the output.
inline RowLayout make_rows(const Shape& shape, const Shape& in_strides, const Shape& out_strides) {
  RowLayout L{};
  const int outer = shape.rank - 1;
  L.n = shape.d[outer];
  L.in_inner = in_strides.d[outer];
  L.rows = 1;
  for (int j = 0; j < 3; ++j) L.outer[j] = 1;
  for (int i = 0; i < outer; ++i) {
    const int j = 3 - outer + i;
    L.outer[j] = shape.d[i];
    L.in_stride[j] = in_strides.d[i];
    L.out_stride[j] = out_strides.d[i];
    L.rows *= shape.d[i];
  }
  return L;
}

__device__ inline void row_offsets(const RowLayout& L, int64_t r, int64_t& in_off, int64_t& out_off) {
  in_off = out_off = 0;
#pragma unroll
  for (int j = 2; j >= 0; --j) {
    const int64_t c = r % L.outer[j];
    r /= L.outer[j];
    in_off += c * L.in_stride[j];
    out_off += c * L.out_stride[j];
  }
}
template <class T>
struct RowParams {
  RowLayout L;
  const T* in;
  T* out;
  int64_t* index_out;  // argmax
  const T* weight;     // layer_norm (may be null), rms_norm alpha
  const T* bias;       // layer_norm (may be null)
  float eps;
  Reduce reduce;
  Unary act;  // glu
};

template <class T>
__global__ void __launch_bounds__(kRowThreads) reduce_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    float v;
    if (p.reduce == Reduce::max) {
      float acc = -INFINITY;
      for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) acc = NanMaxOp{}(acc, to_f32(x[j * L.in_inner]));
      v = block_all_reduce<kRowThreads>(acc, NanMaxOp{});
    } else {
      float acc = 0.f;
      for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) acc += to_f32(x[j * L.in_inner]);
      v = block_all_reduce<kRowThreads>(acc, SumOp{});
      if (p.reduce == Reduce::mean) v /= float(L.n);
    }
    if (threadIdx.x == 0) p.out[oo] = from_f32<T>(v);
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) argmax_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    ArgBest best{0.f, 0, false};
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) offer(best, to_f32(x[j * L.in_inner]), j);
    best = block_all_reduce<kRowThreads>(best, ArgBestOp{});
    // A row of NaNs gives index 0, as on the CPU.
    if (threadIdx.x == 0) p.index_out[oo] = best.valid ? best.i : 0;
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) softmax_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) m = fmaxf(m, to_f32(x[j * L.in_inner]));
    m = block_all_reduce<kRowThreads>(m, MaxOp{});
    float z = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) z += expf(to_f32(x[j * L.in_inner]) - m);
    z = block_all_reduce<kRowThreads>(z, SumOp{});
    const float inv = 1.f / z;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) o[j] = from_f32<T>(expf(to_f32(x[j * L.in_inner]) - m) * inv);
  }
}

// Two passes (mean, then squared deviations) like the CPU: no cancellation in E[x^2]-mu^2.
template <class T>
__global__ void __launch_bounds__(kRowThreads) layer_norm_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) s += to_f32(x[j * L.in_inner]);
    const float mu = block_all_reduce<kRowThreads>(s, SumOp{}) / float(L.n);
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      const float d = to_f32(x[j * L.in_inner]) - mu;
      ss += d * d;
    }
    const float var = block_all_reduce<kRowThreads>(ss, SumOp{}) / float(L.n);
    const float rstd = 1.f / sqrtf(var + p.eps);
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      float v = (to_f32(x[j * L.in_inner]) - mu) * rstd;
      if (p.weight) v *= to_f32(p.weight[j]);
      if (p.bias) v += to_f32(p.bias[j]);
      o[j] = from_f32<T>(v);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      const float v = to_f32(x[j * L.in_inner]);
      ss += v * v;
    }
    ss = block_all_reduce<kRowThreads>(ss, SumOp{});
    const float rs = 1.f / sqrtf(p.eps + ss / float(L.n));
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads)
      o[j] = from_f32<T>(to_f32(x[j * L.in_inner]) * (to_f32(p.weight[j]) * rs));
  }
}

// The same norm for rows short enough to sit in registers (unit stride, 16-byte aligned rows
// of n <= kRmsVecs * kVec<T> * kRowThreads: Moshi's 4096 / 1024 in bf16 or f32): the row and alpha are loaded
// once, together, before the block's one reduction, so a row costs one round trip to memory
// instead of the general kernel's two (x for the sum of squares, then x and alpha again). At
// batch 1 the decode frame runs 161 of these one-block norms back to back (bf16: the norm
// before every cuBLAS product), each bound by that latency, not by bandwidth. The sum of squares
// is taken in another order than rms_norm_kernel's (per thread over its 16-byte pieces).
constexpr int kRmsVecs = 4;

template <class T>
__global__ void __launch_bounds__(kRowThreads) rms_norm_row_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int V = kVec<T>;
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float xv[kRmsVecs][V], wv[kRmsVecs][V];
    float ss = 0.f;
#pragma unroll
    for (int q = 0; q < kRmsVecs; ++q) {
      const int64_t j = (int64_t(q) * kRowThreads + threadIdx.x) * V;
      if (j < L.n) {
        load16<T>(x + j, xv[q]);
        load16<T>(p.weight + j, wv[q]);
      }
    }
#pragma unroll
    for (int q = 0; q < kRmsVecs; ++q) {
      if ((int64_t(q) * kRowThreads + threadIdx.x) * V < L.n) {
#pragma unroll
        for (int e = 0; e < V; ++e) ss += xv[q][e] * xv[q][e];
      }
    }
    ss = block_all_reduce<kRowThreads>(ss, SumOp{});
    const float rs = 1.f / sqrtf(p.eps + ss / float(L.n));
#pragma unroll
    for (int q = 0; q < kRmsVecs; ++q) {
      const int64_t j = (int64_t(q) * kRowThreads + threadIdx.x) * V;
      if (j < L.n) {
        if constexpr (sizeof(T) == 4) {
          float4 v;
          v.x = xv[q][0] * (wv[q][0] * rs), v.y = xv[q][1] * (wv[q][1] * rs);
          v.z = xv[q][2] * (wv[q][2] * rs), v.w = xv[q][3] * (wv[q][3] * rs);
          *reinterpret_cast<float4*>(o + j) = v;
        } else {
          uint32_t w[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const T lo = from_f32<T>(xv[q][2 * e] * (wv[q][2 * e] * rs));
            const T hi = from_f32<T>(xv[q][2 * e + 1] * (wv[q][2 * e + 1] * rs));
            w[e] = uint32_t(lo.bits) | (uint32_t(hi.bits) << 16);
          }
          *reinterpret_cast<uint4*>(o + j) = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
    }
  }
}

// L describes the output rows (width H); the input row (width 2H, unit stride) shares
// the output's outer coordinates through in_stride. blockIdx.y spreads a row's columns.
template <class T>
__global__ void __launch_bounds__(kRowThreads) glu_kernel(const RowParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* g = p.in + io;
    T* o = p.out + oo;
    for (int64_t j = int64_t(blockIdx.y) * kRowThreads + threadIdx.x; j < L.n; j += int64_t(gridDim.y) * kRowThreads)
      o[j] = from_f32<T>(math::apply(p.act, to_f32(g[j]), 1.f) * to_f32(g[L.n + j]));
  }
}

// The params of a row op over in's rows (make_rows) into out (argmax: the indices).
template <class T, class O>
RowParams<T> row_params(const Tensor<O, Cuda>& out, const Tensor<T, Cuda>& in) {
  RowParams<T> p{};
  p.L = make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  if constexpr (std::is_same_v<O, T>) p.out = out.data();
  else p.index_out = out.data();
  return p;
}

template <class T, class Kernel>
void launch_rows(Kernel kernel, const RowParams<T>& p) {
  if (p.L.rows == 0) return;
  launch(kernel, grid_rows(p.L.rows), kRowThreads, 0, 1, p);
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::glu(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary act) {
  using namespace cuda::kernels;
  RowParams<T> p{};
  p.L = make_rows(out.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  p.act = act;
  if (p.L.rows == 0) return;
  const unsigned gy = unsigned(std::min<int64_t>((p.L.n + kRowThreads - 1) / kRowThreads, 1024));
  launch(glu_kernel<T>, dim3(grid_rows(p.L.rows), gy), kRowThreads, 0, 1, p);
}

template <class T>
void Kernels<Cuda>::reduce(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Reduce op) {
  using namespace cuda::kernels;
  RowParams<T> p = row_params(out, in);
  p.reduce = op;
  launch_rows(reduce_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::argmax(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& in) {
  using namespace cuda::kernels;
  launch_rows(argmax_kernel<T>, row_params(out, in));
}

template <class T>
void Kernels<Cuda>::softmax(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in) {
  using namespace cuda::kernels;
  launch_rows(softmax_kernel<T>, row_params(out, in));
}

template <class T>
void Kernels<Cuda>::layer_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& weight,
                               const Tensor<T, Cuda>& bias, float eps) {
  using namespace cuda::kernels;
  RowParams<T> p = row_params(out, in);
  p.weight = weight.defined() ? weight.data() : nullptr;
  p.bias = bias.defined() ? bias.data() : nullptr;
  p.eps = eps;
  launch_rows(layer_norm_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::rms_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& alpha,
                             float eps) {
  using namespace cuda::kernels;
  RowParams<T> p = row_params(out, in);
  p.weight = alpha.data();
  p.eps = eps;
  // The register kernel wherever every row and alpha are 16-byte aligned, contiguous pieces.
  const int64_t V = kVec<T>;
  bool rows_aligned = p.L.in_inner == 1 && p.L.n % V == 0 && p.L.n <= kRmsVecs * V * kRowThreads &&
                      aligned16(p.in) && aligned16(p.out) && aligned16(p.weight);
  for (int j = 0; j < 3; ++j)
    rows_aligned = rows_aligned && (p.L.outer[j] == 1 || (p.L.in_stride[j] % V == 0 && p.L.out_stride[j] % V == 0));
  if (rows_aligned) launch_rows(rms_norm_row_kernel<T>, p);
  else launch_rows(rms_norm_kernel<T>, p);
}

}  // namespace ttt
