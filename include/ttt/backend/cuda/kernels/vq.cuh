#pragma once
// Kernels<Cuda>::vq_nearest (nvcc only): the nearest codebook entry per row (Mimi's RVQ). The
// contract is in backend/ops.hpp, the CPU's definition in backend/cpu/conv.hpp. All launches on
// the thread's stream, scratch from Tensor::empty: capturable in a CUDA graph.
// The search: a warp per codebook entry and 8 rows: lane l sums j = l, l+32, ... in increasing
// j with fmaf (the contract's 32 partial sums), then the contract's halving tree as a
// transposing butterfly (offsets 16, 8, 4 move rows between lanes, 2 and 1 finish): the
// additions of the CPU's tree, so the same bits. The (distance, index) minimum is order-free
// (ties to the lower index, NaN never offered), so blocks and a final pass may combine in any
// order and still pick the CPU's code.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

inline int vq_checked_dim(int64_t v, const char* what) {
  TTT_CHECK(v >= 0 && v <= INT_MAX / 2, "vq_nearest (CUDA): ", what, " = ", v, " is too large");
  return int(v);
}

// ---- vq_nearest -------------------------------------------------------------------------

constexpr int kVqThreads = 256, kVqWarps = kVqThreads / 32, kVqRows = 8;

template <class T>
struct VqParams {
  const T* x;
  const T* cb;
  int64_t* codes;
  unsigned long long* best;  // [vblocks][N]: the block's minimum key, ~0 for none
  int64_t xs0, codes_stride;
  int N, d, V;
  int per_warp;  // codebook entries per warp
  int vblocks;
};

// (distance, index) as one ordered key: distances are >= +0 (sums of squares), whose bit
// patterns order as the values do, and infinity below every NaN pattern (NaN is never keyed).
__device__ __forceinline__ unsigned long long vq_key(float dist, int v) {
  return (static_cast<unsigned long long>(__float_as_uint(dist)) << 32) | static_cast<unsigned int>(v);
}

// kI > 0: lane l holds its x elements j = l + 32 i (i < kI, d <= 32 kI) for 8 rows in
// registers; kI == 0: any d, x read through L1.
template <class T, int kI>
__global__ void __launch_bounds__(kVqThreads) vq_search_kernel(const VqParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  __shared__ unsigned long long red[kVqWarps][kVqRows];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.y * kVqRows, rows = min(kVqRows, p.N - n0);
  constexpr int kRegs = kI > 0 ? kI : 1;
  float xr[kVqRows][kRegs];
  if constexpr (kI > 0) {
#pragma unroll
    for (int r = 0; r < kVqRows; ++r)
#pragma unroll
      for (int i = 0; i < kI; ++i) {
        const int j = lane + 32 * i;
        xr[r][i] = r < rows && j < p.d ? to_f32(p.x[(n0 + r) * p.xs0 + j]) : 0.f;
      }
  }
  // Lane l ends up with the distance of row (l >> 2) & 7 (bit-reversed halving, below).
  const int my_row = ((lane >> 4) & 1) * 4 + ((lane >> 3) & 1) * 2 + ((lane >> 2) & 1);
  unsigned long long best = ~0ull;
  const int v0 = (blockIdx.x * kVqWarps + warp) * p.per_warp, v1 = min(p.V, v0 + p.per_warp);
  for (int v = v0; v < v1; ++v) {
    const T* c = p.cb + int64_t(v) * p.d;
    float s[kVqRows];
#pragma unroll
    for (int r = 0; r < kVqRows; ++r) s[r] = 0.f;
    if constexpr (kI > 0) {
#pragma unroll
      for (int i = 0; i < kI; ++i) {
        const int j = lane + 32 * i;
        if (j < p.d) {
          const float cv = ldf(c + j);
#pragma unroll
          for (int r = 0; r < kVqRows; ++r) {
            const float e = xr[r][i] - cv;
            s[r] = fmaf(e, e, s[r]);
          }
        }
      }
    } else {
      for (int j = lane; j < p.d; j += 32) {
        const float cv = ldf(c + j);
#pragma unroll
        for (int r = 0; r < kVqRows; ++r) {
          if (r < rows) {
            const float e = to_f32(p.x[(n0 + r) * p.xs0 + j]) - cv;
            s[r] = fmaf(e, e, s[r]);
          }
        }
      }
    }
    // The contract's tree s_l += s_{l+16}, += s_{l+8}, ... for 8 rows at once: at offset 16
    // lanes with bit 4 set keep rows 4..7 (and send 0..3), the others the reverse; likewise
    // at 8 (bit 3) and 4 (bit 2), leaving one row per lane; offsets 2 and 1 finish it. Every
    // addition adds the same two partial sums as the CPU's tree (in either order: same bits).
    const bool h4 = lane & 16, h3 = lane & 8, h2 = lane & 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float send = h4 ? s[i] : s[i + 4], keep = h4 ? s[i + 4] : s[i];
      s[i] = keep + __shfl_xor_sync(0xffffffffu, send, 16);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float send = h3 ? s[i] : s[i + 2], keep = h3 ? s[i + 2] : s[i];
      s[i] = keep + __shfl_xor_sync(0xffffffffu, send, 8);
    }
    {
      const float send = h2 ? s[0] : s[1], keep = h2 ? s[1] : s[0];
      s[0] = keep + __shfl_xor_sync(0xffffffffu, send, 4);
    }
    s[0] += __shfl_xor_sync(0xffffffffu, s[0], 2);
    s[0] += __shfl_xor_sync(0xffffffffu, s[0], 1);
    if (!isnan(s[0])) best = min(best, vq_key(s[0], v));
  }
  if ((lane & 3) == 0) red[warp][my_row] = best;
  __syncthreads();
  if (threadIdx.x < rows) {
    unsigned long long b = red[0][threadIdx.x];
#pragma unroll
    for (int w = 1; w < kVqWarps; ++w) b = min(b, red[w][threadIdx.x]);
    p.best[int64_t(blockIdx.x) * p.N + n0 + threadIdx.x] = b;
  }
}

// A warp per row: the minimum over the entry blocks' keys.
template <class T>
__global__ void __launch_bounds__(kVqThreads) vq_finish_kernel(const VqParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int lane = threadIdx.x & 31;
  for (int n = (blockIdx.x * kVqThreads + threadIdx.x) / 32; n < p.N; n += gridDim.x * (kVqThreads / 32)) {
    unsigned long long b = ~0ull;
    for (int vb = lane; vb < p.vblocks; vb += 32) b = min(b, p.best[int64_t(vb) * p.N + n]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) b = min(b, __shfl_xor_sync(0xffffffffu, b, o));
    if (lane == 0) p.codes[int64_t(n) * p.codes_stride] = b == ~0ull ? 0 : int64_t(b & 0xffffffffull);  // all NaN: 0
  }
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::vq_nearest(const Tensor<int64_t, Cuda>& codes, const Tensor<T, Cuda>& x,
                               const Tensor<T, Cuda>& codebook) {
  using namespace cuda::kernels;
  VqParams<T> p{};
  p.x = x.data(), p.cb = codebook.data(), p.codes = codes.data();
  p.xs0 = x.stride(0), p.codes_stride = codes.stride(0);
  p.N = vq_checked_dim(x.size(0), "rows"), p.d = vq_checked_dim(x.size(1), "dimension");
  p.V = vq_checked_dim(codebook.size(0), "codebook size");
  const int sm = cuda::Context::get().sm_count();
  const int ytiles = (p.N + kVqRows - 1) / kVqRows;
  TTT_CHECK(ytiles <= 65535, "vq_nearest (CUDA): ", p.N, " rows are too many");
  // Entries per warp: ~4 blocks per SM over the (entry block, row tile) grid.
  const int64_t warps_wanted = int64_t(4) * sm * kVqWarps / ytiles;
  p.per_warp = int(std::max<int64_t>(1, (p.V + warps_wanted - 1) / std::max<int64_t>(1, warps_wanted)));
  p.vblocks = (p.V + kVqWarps * p.per_warp - 1) / (kVqWarps * p.per_warp);
  const int64_t nbest = int64_t(p.vblocks) * p.N;
  auto best = Tensor<int64_t, Cuda>::empty({nbest});
  p.best = reinterpret_cast<unsigned long long*>(best.data());
  const dim3 grid(unsigned(p.vblocks), unsigned(ytiles));
  if (p.d <= 256) launch(vq_search_kernel<T, 8>, grid, kVqThreads, 0, 1, p);
  else launch(vq_search_kernel<T, 0>, grid, kVqThreads, 0, 1, p);
  launch(vq_finish_kernel<T>, grid_for(int64_t(p.N) * 32, kVqThreads, 4), kVqThreads, 0, 1, p);
}

}  // namespace ttt
