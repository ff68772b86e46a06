#pragma once
// Device utilities shared by every CUDA kernel of the library (nvcc only): the launch helper
// and grid sizing on the calling thread's stream, 16-byte vector loads, conversions, warp and
// block reductions, the RoPE frequency.
//
// Internal namespaces of the CUDA code (none of them is API):
//   ttt::cuda                          runtime plumbing usable from any compiler (context.hpp)
//   ttt::cuda::device                  this file: utilities for the backend and the layers
//   ttt::cuda::kernels                 the backend's op kernels, their params and launchers
//                                      (backend/cuda/kernels/*.cuh); Kernels<Cuda> is in ttt
//   ttt::layers::cuda_kernels          the TTT layer kernels (layers/cuda/*.cuh): params,
//                                      shared-memory layouts, device helpers, the prologue /
//                                      post_norm / conv kernels and the kernel choice;
//     ::fp32, ::mma, ::decode          the three inner-loop kernel families (FMA tiles, tensor
//                                      cores, one-token); TttKernels<Cuda> is in ttt::layers
// Both kernel namespaces see this one through a using-directive. (Not ttt::layers::cuda:
// inside ttt::layers that name would hide ttt::cuda, and `using namespace ttt; using
// namespace ttt::layers;` code would find `cuda::` ambiguous.)
#include <cub/block/block_reduce.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/core/dtype.hpp"

namespace ttt::cuda::device {

// ---- launches ---------------------------------------------------------------------------

inline cudaStream_t stream() { return Context::get().stream(); }

// Blocks for a grid-stride loop over n items: enough to fill the GPU (at most blocks_per_sm
// per SM), no more.
inline unsigned grid_for(int64_t n, int threads, int blocks_per_sm = 32) {
  const int64_t want = (n + threads - 1) / threads;
  const int64_t cap = int64_t(Context::get().sm_count()) * blocks_per_sm;
  return unsigned(std::max<int64_t>(1, std::min(want, cap)));
}

// ---- Programmatic Dependent Launch (sm_90+) ----------------------------------------------
// A decode frame is ~640 small dependent kernels; between two of them the GPU drains one grid,
// makes its writes visible and only then launches the next, a few microseconds each. With
// PDL (Context::pdl(): Hopper, TTT_PDL) each launch carries
// cudaLaunchAttributeProgrammaticStreamSerialization, so the next grid is launched once every
// CTA of this one has started, and its CTAs wait on the GPU instead of on the launch path.
// It is correct because every kernel of the library begins with pdl_begin(): griddepcontrol.wait
// returns only when the preceding grid has completed and its memory is visible, before the
// kernel reads or writes anything (so read-after-write and write-after-read both hold, and
// transitively: a grid completes only after its own wait). launch_dependents then lets the next
// grid launch. Kernels launched without the attribute (cuBLAS, CUB) order as usual; on them,
// and without PDL, both instructions are no-ops.
__device__ __forceinline__ void pdl_begin() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A launch of grid x block threads with smem bytes of dynamic shared memory, in clusters of
// `cluster` CTAs along x (1: no cluster attribute), programmatic serialisation when `pdl`;
// `attr` holds the attributes.
inline cudaLaunchConfig_t launch_config(dim3 grid, unsigned block, size_t smem, int cluster, bool pdl,
                                        cudaLaunchAttribute (&attr)[2]) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(block, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 0;
  if (cluster > 1) {
    cudaLaunchAttribute& a = attr[cfg.numAttrs++];
    a.id = cudaLaunchAttributeClusterDimension;
    a.val.clusterDim.x = unsigned(cluster);
    a.val.clusterDim.y = 1;
    a.val.clusterDim.z = 1;
  }
  if (pdl) {
    cudaLaunchAttribute& a = attr[cfg.numAttrs++];
    a.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    a.val.programmaticStreamSerializationAllowed = 1;
  }
  return cfg;
}

// kernel<<<grid, block, smem, stream>>>(args...) in clusters of `cluster` CTAs along x (1:
// none), with PDL where the context has it; launch errors thrown. The kernel must begin with
// pdl_begin(). `stream`: the context's (launch below) or a side stream the caller orders
// against it with events.
template <class... Params, class... Args>
void launch_on(cudaStream_t stream, void (*kernel)(Params...), dim3 grid, unsigned block, size_t smem, int cluster,
               const Args&... args) {
  cudaLaunchAttribute attr[2];
  cudaLaunchConfig_t cfg = launch_config(grid, block, smem, cluster, Context::get().pdl(), attr);
  cfg.stream = stream;
  TTT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, args...));
  TTT_CUDA_CHECK(cudaGetLastError());
}

// launch_on(Context::get().stream(), ...).
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, unsigned block, size_t smem, int cluster, const Args&... args) {
  launch_on(Context::get().stream(), kernel, grid, block, smem, cluster, args...);
}

// ---- small helpers ------------------------------------------------------------------------

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
__host__ __device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <class To, class From>
__device__ inline To convert(From v) {
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (is_floating_v<To> && is_floating_v<From>) return from_f32<To>(to_f32(v));
  else if constexpr (is_floating_v<From>) return To(to_f32(v));
  else if constexpr (is_floating_v<To>) return from_f32<To>(float(v));
  else return To(v);
}

// 16 bytes of T widened to floats (the caller guarantees 16-byte alignment).
template <class T>
inline constexpr int kVec = 16 / int(sizeof(T));

template <class T>
__device__ inline void unpack16(const uint4& u, float (&out)[kVec<T>]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (sizeof(T) == 4) {
      out[j] = __uint_as_float(w[j]);
    } else {
      T lo, hi;
      lo.bits = uint16_t(w[j]);
      hi.bits = uint16_t(w[j] >> 16);
      out[2 * j] = to_f32(lo);
      out[2 * j + 1] = to_f32(hi);
    }
  }
}
template <class T>
__device__ inline void load16(const T* p, float (&out)[kVec<T>]) {
  unpack16<T>(*reinterpret_cast<const uint4*>(p), out);
}

// math::rope_freq with the exponential taken in double and rounded once: CUDA's expf is
// off by up to 2 ulp, and the angle multiplies that error by the position (thousands).
// Rounded this way the frequency matches the host's (nearly correctly rounded) expf.
__device__ inline float rope_freq_rn(int i, int D, float max_period) {
  const float c = float(-log(double(max_period)) * 2.0 / double(D));
  return float(exp(double(float(i) * c)));
}

// ---- reductions ---------------------------------------------------------------------------

// Butterfly sum over a full warp (every lane gets the same value).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Mean and 1/sqrt(biased var + eps) of a row of n floats, by one warp (two passes, as the host
// does: mean first, then the squared deviations).
struct RowStats {
  float mu, rstd;
};
__device__ __forceinline__ RowStats row_stats(const float* z, int n, float eps) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int j = lane; j < n; j += 32) s += z[j];
  const float mu = warp_sum(s) / float(n);
  float v = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float d = z[j] - mu;
    v += d * d;
  }
  const float var = warp_sum(v) / float(n);
  return {mu, 1.f / sqrtf(var + eps)};
}

// Block-wide reduction whose result every thread receives. Callable repeatedly in one
// kernel: the trailing barrier frees the shared storage for the next call.
template <int kThreads, class V, class Op>
__device__ inline V block_all_reduce(V v, Op op) {
  using BlockReduce = cub::BlockReduce<V, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ V result;
  V r = BlockReduce(tmp).Reduce(v, op);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  r = result;
  __syncthreads();
  return r;
}

// Threads of the one-block-per-row kernels (the backend's row ops and the TTT post_norm,
// which reduces in layer_norm_kernel's order: same block size, same result).
constexpr int kRowThreads = 256;

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
// fmaxf ignores NaN, as std::max(m, x) does in the CPU softmax and attention.
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
// Reduce::max on the CPU keeps the first NaN it meets: NaN wins.
struct NanMaxOp {
  __device__ float operator()(float a, float b) const { return isnan(a) ? a : isnan(b) ? b : fmaxf(a, b); }
};

// A candidate of an argmax: larger value wins, ties go to the smaller index. `valid`
// false is the identity (NaN never wins).
struct ArgBest {
  float v;
  int64_t i;
  bool valid;
};
struct ArgBestOp {
  __device__ ArgBest operator()(const ArgBest& a, const ArgBest& b) const {
    if (!a.valid) return b;
    if (!b.valid) return a;
    return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;
  }
};
__device__ inline void offer(ArgBest& best, float v, int64_t i) {
  if (isnan(v)) return;
  if (!best.valid || v > best.v || (v == best.v && i < best.i)) best = {v, i, true};
}

}  // namespace ttt::cuda::device
