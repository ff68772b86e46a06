#pragma once
// Kernels<Cuda> on counter-based random numbers (nvcc only): sample (greedy, temperature and
// top-k through the exponential race, core/rng.hpp's Philox) and random_normal (seeded
// weights made on the device: element i from math::truncated_normal, the CPU's numbers).
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/math.hpp"
#include "ttt/core/rng.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- sampling ---------------------------------------------------------------------------

// One block per row:
//  1. top = first index of the maximum (NaN read as -inf); greedy stops here.
//  2. for top-k < V, the k-th largest key by radix select (4 passes of 8 bits over an
//     order-preserving uint32 of the logit), then, among logits equal to that key, the
//     index cutoff by a block scan in index order: the set ordered by (logit desc, index
//     asc) exactly as the CPU's nth_element defines it.
//  3. the exponential race over the set: argmax of (l - m) / temperature - log(E_i), ties
//     to the smaller index, NaN never winning; when the top's own score is NaN (m
//     infinite) the CPU keeps the top, and so does this.
constexpr int kSampleThreads = 512;

template <class T>
struct SampleKernelParams {
  const T* logits;
  int64_t ld, V, k;
  int64_t* out;
  const int64_t* counter;
  float temperature;
  uint64_t seed;
  uint32_t salt;
  // Per-row parameters (all null: the scalars above): see SampleParams.
  const float* row_temperature;
  const int64_t *row_top_k, *row_seed, *row_counter;
};

__device__ inline uint32_t order_key(float x) {
  if (x == 0.f) x = 0.f;  // -0 ties with +0 on the CPU
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <class T>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(const SampleKernelParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t r = blockIdx.x, V = p.V;
  const T* l = p.logits + r * p.ld;
  // The row's parameters (uniform over the block, so the branches below stay uniform).
  const bool rows = p.row_counter != nullptr;
  const float temperature = rows ? p.row_temperature[r] : p.temperature;
  const int64_t top_k = rows ? p.row_top_k[r] : p.k;
  const int64_t k = (top_k <= 0 || top_k > V) ? V : top_k;
  const uint64_t seed = rows ? uint64_t(p.row_seed[r]) : p.seed;
  const uint64_t ctr = uint64_t(rows ? p.row_counter[r] : p.counter[0]) * 64u + p.salt;
  const uint64_t key0 = rows ? 0 : uint64_t(r * V);
  auto lv = [&](int64_t i) {
    const float x = to_f32(l[i]);
    return isnan(x) ? -INFINITY : x;
  };

  // 1. top (every value is a candidate: -inf ties resolve to the smaller index).
  ArgBest top{0.f, 0, false};
  for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) offer(top, lv(i), i);
  top = block_all_reduce<kSampleThreads>(top, ArgBestOp{});
  if (!(temperature > 0.f) || k == 1) {
    if (threadIdx.x == 0) p.out[r] = top.i;
    return;
  }
  const float m = top.v;

  // 2. the top-k set: key > tau, or key == tau and index <= cut.
  uint32_t tau = 0;
  int64_t cut = V;
  if (k < V) {
    __shared__ unsigned hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int64_t s_need;
    uint32_t prefix = 0, mask = 0;
    int64_t need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int j = threadIdx.x; j < 256; j += kSampleThreads) hist[j] = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) {
        const uint32_t key = order_key(lv(i));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t above = 0;
        for (int bin = 255; bin >= 0; --bin) {
          if (above + hist[bin] >= need) {
            s_prefix = prefix | (uint32_t(bin) << shift);
            s_need = need - above;
            break;
          }
          above += hist[bin];
        }
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      mask |= 0xffu << shift;
      __syncthreads();  // hist and s_* are rewritten next pass
    }
    tau = prefix;
    // The need-th index (in index order) among the keys equal to tau.
    using BlockScan = cub::BlockScan<int, kSampleThreads>;
    __shared__ typename BlockScan::TempStorage scan_tmp;
    __shared__ int64_t s_cut;
    int64_t seen = 0;
    for (int64_t base = 0; base < V; base += kSampleThreads) {
      const int64_t i = base + threadIdx.x;
      const int hit = (i < V && order_key(lv(i)) == tau) ? 1 : 0;
      int before, total;
      BlockScan(scan_tmp).ExclusiveSum(hit, before, total);
      if (hit && seen + before == need - 1) s_cut = i;
      seen += total;
      __syncthreads();
      if (seen >= need) break;
    }
    cut = s_cut;
  }

  // 3. the race.
  auto score = [&](int64_t i) {
    const float e = Philox::exponential(seed, ctr, key0 + uint64_t(i));
    return (lv(i) - m) / temperature - logf(e);
  };
  ArgBest best{0.f, 0, false};
  for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) {
    if (i != top.i && k < V) {
      const uint32_t key = order_key(lv(i));
      if (key < tau || (key == tau && i > cut)) continue;
    }
    offer(best, score(i), i);
  }
  best = block_all_reduce<kSampleThreads>(best, ArgBestOp{});
  if (threadIdx.x == 0) p.out[r] = isnan(score(top.i)) || !best.valid ? top.i : best.i;
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::sample(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& logits, const SampleParams& sp,
                           const Tensor<int64_t, Cuda>& counter) {
  using namespace cuda::kernels;
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t k = (sp.top_k <= 0 || sp.top_k > V) ? V : sp.top_k;
  const SampleKernelParams<T> p{logits.data(), logits.stride(0), V,          k,
                                out.data(),    counter.data(),   sp.temperature, sp.seed,
                                sp.salt,       sp.row_temperature, sp.row_top_k, sp.row_seed,
                                sp.row_counter};
  launch(sample_kernel<T>, unsigned(N), kSampleThreads, 0, 1, p);
}

namespace cuda::kernels {

// ---- random_normal --------------------------------------------------------------------

template <class T>
__global__ void random_normal_kernel(T* out, int64_t n, float std, uint64_t seed, uint64_t key) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(std * math::truncated_normal(seed, key, uint64_t(i)));
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::random_normal(const Tensor<T, Cuda>& out, float std, uint64_t seed, uint64_t key) {
  using namespace cuda::kernels;
  const int64_t n = out.numel();
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 65535));
  launch(random_normal_kernel<T>, unsigned(blocks), threads, 0, 1, out.data(), n, std, seed, key);
}

}  // namespace ttt
