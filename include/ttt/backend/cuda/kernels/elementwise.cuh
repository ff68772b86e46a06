#pragma once
// Kernels<Cuda>, one thread per element (nvcc only): copy, cast, fill, unary and binary over
// strided operands; rope and the sinusoidal embedding; the embedding lookup.
#include <cuda_runtime.h>

#include <array>
#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/math.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- strided elementwise (copy, cast, fill, unary, binary) --------------------------

// Shapes and strides of N operands with size-1 dimensions dropped and dimensions merged
// where every operand is contiguous across them (most calls end up rank 1: no division).
template <int N>
struct Strided {
  int rank;
  int64_t size[kMaxRank];
  int64_t stride[N][kMaxRank];
};

template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<Shape, N>& strides) {
  Strided<N> s{};
  for (int i = 0; i < shape.rank; ++i) {
    if (shape.d[i] == 1) continue;
    const int j = s.rank - 1;
    bool merge = j >= 0;
    for (int k = 0; k < N && merge; ++k) merge = s.stride[k][j] == strides[k].d[i] * shape.d[i];
    if (merge) {
      s.size[j] *= shape.d[i];
      for (int k = 0; k < N; ++k) s.stride[k][j] = strides[k].d[i];
    } else {
      s.size[s.rank] = shape.d[i];
      for (int k = 0; k < N; ++k) s.stride[k][s.rank] = strides[k].d[i];
      ++s.rank;
    }
  }
  if (s.rank == 0) {
    s.rank = 1;
    s.size[0] = 1;
  }
  return s;
}

template <int N>
__device__ inline void strided_offsets(const Strided<N>& s, int64_t i, int64_t (&off)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
#pragma unroll
  for (int d = kMaxRank - 1; d >= 0; --d) {
    if (d >= s.rank) continue;
    const int64_t c = d == 0 ? i : i % s.size[d];
    if (d) i /= s.size[d];
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += c * s.stride[k][d];
  }
}

template <int N, class F>
struct ElementwiseParams {
  Strided<N> layout;
  int64_t n;
  F f;  // f(off): the element operation, given each operand's offset
};

template <int N, class F>
__global__ void __launch_bounds__(256) elementwise_kernel(const ElementwiseParams<N, F> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[N];
    strided_offsets(p.layout, i, off);
    p.f(off);
  }
}

template <int N, class F>
void launch_elementwise(const Shape& shape, const std::array<Shape, N>& strides, const F& f) {
  const ElementwiseParams<N, F> p{make_strided<N>(shape, strides), shape.numel(), f};
  if (p.n == 0) return;
  constexpr int kThreads = 256;
  launch(elementwise_kernel<N, F>, grid_for(p.n, kThreads), kThreads, 0, 1, p);
}

template <class To, class From>
struct CastFn {
  To* o;
  const From* a;
  __device__ void operator()(const int64_t (&off)[2]) const { o[off[0]] = convert<To>(a[off[1]]); }
};
template <class T>
struct FillFn {
  T* o;
  T v;
  __device__ void operator()(const int64_t (&off)[1]) const { o[off[0]] = v; }
};
template <class T>
struct UnaryFn {
  T* o;
  const T* a;
  Unary op;
  float alpha;
  __device__ void operator()(const int64_t (&off)[2]) const {
    o[off[0]] = from_f32<T>(math::apply(op, to_f32(a[off[1]]), alpha));
  }
};
template <class T>
struct BinaryFn {
  T* o;
  const T* a;
  const T* b;
  Binary op;
  __device__ void operator()(const int64_t (&off)[3]) const {
    o[off[0]] = from_f32<T>(math::apply(op, to_f32(a[off[1]]), to_f32(b[off[2]])));
  }
};

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::copy(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in) {
  using namespace cuda::kernels;
  launch_elementwise<2>(out.shape(), {out.strides(), in.strides()}, CastFn<T, T>{out.data(), in.data()});
}

template <class To, class From>
void Kernels<Cuda>::cast(const Tensor<To, Cuda>& out, const Tensor<From, Cuda>& in) {
  using namespace cuda::kernels;
  launch_elementwise<2>(out.shape(), {out.strides(), in.strides()}, CastFn<To, From>{out.data(), in.data()});
}

template <class T>
void Kernels<Cuda>::fill(const Tensor<T, Cuda>& out, double value) {
  using namespace cuda::kernels;
  T v;
  if constexpr (is_floating_v<T> && !std::is_same_v<T, double>) v = from_f32<T>(float(value));
  else v = T(value);
  launch_elementwise<1>(out.shape(), {out.strides()}, FillFn<T>{out.data(), v});
}

template <class T>
void Kernels<Cuda>::unary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary op, float alpha) {
  using namespace cuda::kernels;
  launch_elementwise<2>(out.shape(), {out.strides(), in.strides()}, UnaryFn<T>{out.data(), in.data(), op, alpha});
}

template <class T>
void Kernels<Cuda>::binary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b,
                           Binary op) {
  using namespace cuda::kernels;
  launch_elementwise<3>(out.shape(), {out.strides(), a.strides(), b.strides()},
                        BinaryFn<T>{out.data(), a.data(), b.data(), op});
}

namespace cuda::kernels {

// ---- positions: rope, sinusoidal embedding --------------------------------------------

template <class T>
struct RopeParams {
  const T* x;
  T* out;
  const int64_t* pos;
  int64_t xs[3], os[3], ps[2];  // strides of dims b, t, h (x, out) and b, t (positions)
  int64_t B, T_, H, D;
  float max_period;
};

template <class T>
__global__ void __launch_bounds__(256) rope_kernel(const RopeParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t half = p.D / 2, n = p.B * p.T_ * p.H * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    int64_t rest = idx / half;
    const int64_t h = rest % p.H;
    rest /= p.H;
    const int64_t t = rest % p.T_, b = rest / p.T_;
    const float ang = rope_freq_rn(int(i), int(p.D), p.max_period) * float(p.pos[b * p.ps[0] + t * p.ps[1]]);
    float sn, c;
    sincosf(ang, &sn, &c);
    const T* pi = p.x + b * p.xs[0] + t * p.xs[1] + h * p.xs[2];
    T* po = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
    const float re = to_f32(pi[2 * i]), im = to_f32(pi[2 * i + 1]);
    po[2 * i] = from_f32<T>(re * c - im * sn);
    po[2 * i + 1] = from_f32<T>(re * sn + im * c);
  }
}

template <class T>
struct SinEmbeddingParams {
  T* x;  // [B, T, C] contiguous
  const int64_t* pos;
  int64_t ps[2];
  int64_t B, T_, C;
  float max_period, scale;
};

template <class T>
__global__ void __launch_bounds__(256) sin_embedding_kernel(const SinEmbeddingParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t half = p.C / 2, n = p.B * p.T_ * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, bt = idx / half, b = bt / p.T_, t = bt % p.T_;
    const float pos = float(p.pos[b * p.ps[0] + t * p.ps[1]]);
    // The host's powf, rounded once from double (CUDA's powf is off by up to 4 ulp and the
    // phase scales the error by the position).
    const float denom = float(pow(double(p.max_period), double(float(i) / float(half - 1))));
    const float phase = pos / denom;
    float sn, c;
    sincosf(phase, &sn, &c);
    T* row = p.x + bt * p.C;
    row[i] = from_f32<T>(to_f32(row[i]) + p.scale * c);
    row[half + i] = from_f32<T>(to_f32(row[half + i]) + p.scale * sn);
  }
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::rope(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions,
                         float max_period) {
  using namespace cuda::kernels;
  RopeParams<T> p{x.data(), out.data(), positions.data(),
                  {x.stride(0), x.stride(1), x.stride(2)},
                  {out.stride(0), out.stride(1), out.stride(2)},
                  {positions.stride(0), positions.stride(1)},
                  x.size(0), x.size(1), x.size(2), x.size(3), max_period};
  const int64_t n = p.B * p.T_ * p.H * (p.D / 2);
  if (n == 0) return;
  launch(rope_kernel<T>, grid_for(n, 256), 256, 0, 1, p);
}

template <class T>
void Kernels<Cuda>::add_sin_embedding(const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions,
                                      float max_period, float scale) {
  using namespace cuda::kernels;
  SinEmbeddingParams<T> p{x.data(), positions.data(), {positions.stride(0), positions.stride(1)},
                          x.size(0), x.size(1), x.size(2), max_period, scale};
  const int64_t n = p.B * p.T_ * (p.C / 2);
  launch(sin_embedding_kernel<T>, grid_for(n, 256), 256, 0, 1, p);
}

namespace cuda::kernels {

// ---- embedding ------------------------------------------------------------------------

template <class T>
struct EmbeddingParams {
  T* out;
  const T* table;
  const int64_t* ids;
  int64_t n, V, D;
};

template <class T>
__global__ void __launch_bounds__(256) embedding_kernel(const EmbeddingParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t total = p.n * p.D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / p.D, d = idx % p.D, id = p.ids[i];
    p.out[idx] = (id < 0 || id >= p.V) ? from_f32<T>(0.f) : p.table[id * p.D + d];
  }
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::embedding(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& table,
                              const Tensor<int64_t, Cuda>& ids) {
  using namespace cuda::kernels;
  const EmbeddingParams<T> p{out.data(), table.data(), ids.data(), ids.numel(), table.size(0), table.size(1)};
  launch(embedding_kernel<T>, grid_for(p.n * p.D, 256), 256, 0, 1, p);
}

}  // namespace ttt
