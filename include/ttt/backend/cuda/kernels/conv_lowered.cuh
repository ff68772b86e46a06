#pragma once
// Convolutions lowered to cuBLAS (nvcc only): Mimi's FLOP-heavy layers in batched streaming,
// where a tensor-core GEMM beats conv.cuh's FMA implicit GEMM, which stays the path below
// kConvLoweredMinMacs multiply-adds (every layer of a batch-1 frame: latency, not FLOPs).
// The items' columns side by side, so that one GEMM covers the batch even when Tout is 2:
//   conv1d:           col[c·K + k, b·Tout + t] = x[b, c, t·stride + k·dil]           (im2col)
//                     y [Cout, B·Tout] = W [Cout, Cin·K] · col;  out[b, o, t] = y[o, b·Tout + t] + bias[o]
//   conv_transpose1d: col [Cout·K, B·Tin] = Wᵀ [Cout·K, Cin] · x as [Cin, B·Tin]
//                     out[b, o, j] = bias[o] + Σ_{t, k : t·stride + k = j} col[o·K + k, b·Tin + t]  (col2im)
// groups = 1 only. fp32 accumulation (run_gemm's compute type, reduced-precision reductions
// off), one rounding to T of each product sum; results differ from the FMA kernels only in the
// order of the additions. Scratch from Tensor::empty, launches on the thread's stream:
// capturable in a CUDA graph.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/kernels/linear.cuh"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// Multiply-adds (B·Tout·Cout·Cin·K) from which conv1d / conv_transpose1d with groups = 1 go
// through cuBLAS: the FLOP-heavy layers of batched streaming. Below it (every layer of a batch-1
// frame: at most ~31 M) the FMA kernels' lower latency wins. Kernels<Cuda>::set_conv_lowered_min_macs
// overrides it (0: every shape the path takes, for tests).
constexpr int64_t kConvLoweredMinMacs = int64_t(1) << 27;
inline int64_t& conv_lowered_min_macs() {
  static int64_t v = kConvLoweredMinMacs;
  return v;
}

constexpr int kLoweredThreads = 256;

// Shapes the lowering takes: every flat index of its tensors fits 32 bits (unsigned division is
// a few instructions; 64-bit division is what made these gathers slow). Others stay on the FMA
// kernels (conv.cuh asks first).
inline bool lowered_fits(int64_t col_elems, int64_t out_elems) {
  return col_elems < (int64_t(1) << 31) && out_elems < (int64_t(1) << 31);
}

// col [Cin·K, B·Tout] from x [B, Cin, Tin] (any strides): blocks grid-stride over the rows
// r = c·K + k (blockIdx.y) and the columns q = b·Tout + t.
template <class T>
__global__ void __launch_bounds__(kLoweredThreads)
    im2col_kernel(const T* __restrict__ x, int64_t xs0, int64_t xs1, int64_t xs2, T* __restrict__ col, unsigned rows,
                  unsigned K, unsigned cols, unsigned Tout, int stride, int dil) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t st = stride * xs2;
  for (unsigned r = blockIdx.y; r < rows; r += gridDim.y) {
    const unsigned c = r / K, k = r - c * K;
    const T* xr = x + c * xs1 + int64_t(k) * dil * xs2;
    T* cr = col + uint64_t(r) * cols;
    for (unsigned q = blockIdx.x * kLoweredThreads + threadIdx.x; q < cols; q += gridDim.x * kLoweredThreads) {
      const unsigned b = q / Tout, t = q - b * Tout;
      cr[q] = xr[b * xs0 + t * st];
    }
  }
}

// out [B, C, Tn] (contiguous) = y [C, B·Tn] moved to batch-major, plus bias[c].
template <class T>
__global__ void __launch_bounds__(kLoweredThreads)
    unfold_bias_kernel(const T* __restrict__ y, const T* __restrict__ bias, T* __restrict__ out, unsigned total,
                       unsigned C, unsigned B, unsigned Tn) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  for (unsigned i = blockIdx.x * kLoweredThreads + threadIdx.x; i < total; i += gridDim.x * kLoweredThreads) {
    const unsigned bc = i / Tn, t = i - bc * Tn, b = bc / C, c = bc - b * C;
    const T v = y[(c * B + b) * Tn + t];
    out[i] = bias ? from_f32<T>(to_f32(v) + to_f32(bias[c])) : v;
  }
}

// out[b, o, j] = bias[o] + Σ_t col[o·K + (j - t·stride), b·Tin + t] over the t whose window covers
// j, in increasing t (float sum, one rounding).
template <class T>
__global__ void __launch_bounds__(kLoweredThreads)
    col2im_kernel(const T* __restrict__ col, const T* __restrict__ bias, T* __restrict__ out, unsigned total,
                  unsigned Cout, int K, unsigned B, int Tin, unsigned Tout, int stride) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  for (unsigned i = blockIdx.x * kLoweredThreads + threadIdx.x; i < total; i += gridDim.x * kLoweredThreads) {
    const unsigned bo = i / Tout, b = bo / Cout, o = bo - b * Cout;
    const int j = int(i - bo * Tout);
    float s = bias ? to_f32(bias[o]) : 0.f;
    const int t_lo = j >= K ? (j - K) / stride + 1 : 0, t_hi = min(Tin - 1, j / stride);
    const unsigned ld = B * unsigned(Tin);
    const T* c = col + o * unsigned(K) * ld + b * unsigned(Tin);
    for (int t = t_lo; t <= t_hi; ++t) s += to_f32(c[unsigned(j - t * stride) * ld + unsigned(t)]);
    out[i] = from_f32<T>(s);
  }
}

template <class T>
void conv1d_lowered(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                    const Tensor<T, Cuda>& bias, int64_t stride, int64_t dil) {
  const int64_t B = x.size(0), Cin = x.size(1), Cout = out.size(1), Tout = out.size(2), K = w.size(2);
  const int64_t CK = Cin * K, N = B * Tout;
  auto col = Tensor<T, Cuda>::empty({CK, N});
  const dim3 grid(unsigned(std::min<int64_t>((N + kLoweredThreads - 1) / kLoweredThreads, 64)),
                  unsigned(std::min<int64_t>(CK, 65535)));
  launch(im2col_kernel<T>, grid, kLoweredThreads, 0, 1, x.data(), x.stride(0), x.stride(1), x.stride(2), col.data(),
         unsigned(CK), unsigned(K), unsigned(N), unsigned(Tout), int(stride), int(dil));
  // Row-major y [Cout, B·Tout] = W [Cout, CK] · col [CK, B·Tout]: one GEMM over every item.
  auto y = Tensor<T, Cuda>::empty({Cout, N});
  GemmCall<T> g{w.data(), as_transposed(Cout, CK, CK, 1), 0, col.data(), as_transposed(CK, N, N, 1), 0,
                y.data(), N, 0, Cout, N, CK, 1, 1.f, 0.f};
  run_gemm(g);
  launch(unfold_bias_kernel<T>, grid_for(out.numel(), kLoweredThreads), kLoweredThreads, 0, 1, y.data(),
         bias.defined() ? bias.data() : static_cast<const T*>(nullptr), out.data(), unsigned(out.numel()),
         unsigned(Cout), unsigned(B), unsigned(Tout));
}

template <class T>
void conv_transpose1d_lowered(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                              const Tensor<T, Cuda>& bias, int64_t stride) {
  const int64_t B = x.size(0), Cin = x.size(1), Tin = x.size(2), Cout = out.size(1), Tout = out.size(2),
                K = w.size(2);
  const int64_t N = B * Tin;
  // X [Cin, B·Tin]: the items side by side (one copy of the input, the smallest operand).
  auto xt = Tensor<T, Cuda>::empty({Cin, B, Tin});
  xt.copy_from(x.transpose(0, 1));
  // Row-major col [Cout·K, B·Tin] = Wᵀ (W [Cin, Cout·K] row-major) · X [Cin, B·Tin].
  auto col = Tensor<T, Cuda>::empty({Cout * K, N});
  GemmCall<T> g{w.data(), as_transposed(Cout * K, Cin, 1, Cout * K), 0, xt.data(), as_transposed(Cin, N, N, 1), 0,
                col.data(), N, 0, Cout * K, N, Cin, 1, 1.f, 0.f};
  run_gemm(g);
  launch(col2im_kernel<T>, grid_for(out.numel(), kLoweredThreads), kLoweredThreads, 0, 1, col.data(),
         bias.defined() ? bias.data() : static_cast<const T*>(nullptr), out.data(), unsigned(out.numel()),
         unsigned(Cout), int(K), unsigned(B), int(Tin), unsigned(Tout), int(stride));
}

}  // namespace cuda::kernels

void Kernels<Cuda>::set_conv_lowered_min_macs(int64_t macs) {
  cuda::kernels::conv_lowered_min_macs() = macs < 0 ? cuda::kernels::kConvLoweredMinMacs : macs;
}

}  // namespace ttt
