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
// At batch 1 the depformer samples its 8 audio rows one after another, so a row's latency is
// on the frame's critical path: rows of up to kSampleCache x kSampleThreads logits (Moshi's
// audio 2048) sit in registers for all passes; each radix pass counts its histogram with one
// shared-memory atomic per distinct bin per warp (the logits' top bytes are few: a plain atomic
// per element serialises on them), and the pass's bin is found by a block scan over the 256
// bins instead of one thread walking them.
constexpr int kSampleThreads = 512;
constexpr int kSampleCache = 4;

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

// kCache > 0: V <= kCache * kSampleThreads, the row read once into registers; 0: any V, read
// from memory (L1) on each pass.
template <class T, int kCache>
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
  auto load = [&](int64_t i) {
    const float x = to_f32(l[i]);
    return isnan(x) ? -INFINITY : x;
  };
  float cache[kCache > 0 ? kCache : 1];
  if constexpr (kCache > 0) {
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t i = int64_t(c) * kSampleThreads + threadIdx.x;
      cache[c] = i < V ? load(i) : -INFINITY;
    }
  }
  // fn(i, valid, logit) for this thread's elements, in block-uniform steps of kSampleThreads
  // (every thread takes every step, so warp collectives inside fn see full warps).
  auto each = [&](auto&& fn) {
    if constexpr (kCache > 0) {
#pragma unroll
      for (int c = 0; c < kCache; ++c) {
        const int64_t i = int64_t(c) * kSampleThreads + threadIdx.x;
        fn(i, i < V, cache[c]);
      }
    } else {
      for (int64_t base = 0; base < V; base += kSampleThreads) {
        const int64_t i = base + threadIdx.x;
        fn(i, i < V, i < V ? load(i) : -INFINITY);
      }
    }
  };

  // 1. top (every value is a candidate: -inf ties resolve to the smaller index).
  ArgBest top{0.f, 0, false};
  each([&](int64_t i, bool valid, float x) {
    if (valid) offer(top, x, i);
  });
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
    using BinScan = cub::BlockScan<int64_t, kSampleThreads>;
    __shared__ unsigned hist[256];
    __shared__ typename BinScan::TempStorage bin_tmp;
    __shared__ uint32_t s_prefix;
    __shared__ int64_t s_need;
    static_assert(kSampleThreads >= 256, "one thread per bin");
    const unsigned lane = threadIdx.x & 31u;
    uint32_t prefix = 0, mask = 0;
    int64_t need = k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      if (threadIdx.x < 256) hist[threadIdx.x] = 0;
      __syncthreads();
      each([&](int64_t, bool valid, float x) {
        const uint32_t key = order_key(x);
        // 256: not counted. Lanes holding the same bin add once, through their lowest lane.
        const unsigned bin = (valid && (key & mask) == prefix) ? (key >> shift) & 255u : 256u;
        const unsigned peers = __match_any_sync(0xffffffffu, bin);
        if (bin < 256u && lane == unsigned(__ffs(peers) - 1)) atomicAdd(&hist[bin], unsigned(__popc(peers)));
      });
      __syncthreads();
      // Thread t holds bin 255 - t: the inclusive sum is the count at or above that bin; the
      // pass's bin is the one where it first reaches `need`.
      const int64_t cnt = threadIdx.x < 256 ? int64_t(hist[255 - threadIdx.x]) : 0;
      int64_t incl;
      BinScan(bin_tmp).InclusiveSum(cnt, incl);
      if (cnt > 0 && incl >= need && incl - cnt < need) {
        s_prefix = prefix | (uint32_t(255 - threadIdx.x) << shift);
        s_need = need - (incl - cnt);
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      mask |= 0xffu << shift;
      __syncthreads();  // hist, bin_tmp and s_* are rewritten next pass
    }
    tau = prefix;
    // The need-th index (in index order) among the keys equal to tau.
    using BlockScan = cub::BlockScan<int, kSampleThreads>;
    __shared__ typename BlockScan::TempStorage scan_tmp;
    __shared__ int64_t s_cut;
    int64_t seen = 0;
    bool found = false;
    each([&](int64_t i, bool valid, float x) {
      if (found) return;  // uniform: seen is the same in every thread
      const int hit = (valid && order_key(x) == tau) ? 1 : 0;
      int before, total;
      BlockScan(scan_tmp).ExclusiveSum(hit, before, total);
      if (hit && seen + before == need - 1) s_cut = i;
      seen += total;
      __syncthreads();
      found = seen >= need;
    });
    cut = s_cut;
  }

  // 3. the race.
  auto score = [&](int64_t i, float x) {
    const float e = Philox::exponential(seed, ctr, key0 + uint64_t(i));
    return (x - m) / temperature - logf(e);
  };
  ArgBest best{0.f, 0, false};
  each([&](int64_t i, bool valid, float x) {
    if (!valid) return;
    if (i != top.i && k < V) {
      const uint32_t key = order_key(x);
      if (key < tau || (key == tau && i > cut)) return;
    }
    offer(best, score(i, x), i);
  });
  best = block_all_reduce<kSampleThreads>(best, ArgBestOp{});
  if (threadIdx.x == 0) p.out[r] = isnan(score(top.i, load(top.i))) || !best.valid ? top.i : best.i;
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
  if (V <= int64_t(kSampleCache) * kSampleThreads) launch(sample_kernel<T, kSampleCache>, unsigned(N), kSampleThreads, 0, 1, p);
  else launch(sample_kernel<T, 0>, unsigned(N), kSampleThreads, 0, 1, p);
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
