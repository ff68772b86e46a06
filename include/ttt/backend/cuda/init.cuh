#pragma once
// Kernels<Cuda>::random_normal: seeded weights made on the device, element i from
// math::truncated_normal (the CPU backend draws the very same numbers).
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/math.hpp"

namespace ttt {
namespace cuda_detail {

template <class T>
__global__ void random_normal_kernel(T* out, int64_t n, float std, uint64_t seed, uint64_t key) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = from_f32<T>(std * math::truncated_normal(seed, key, uint64_t(i)));
}

}  // namespace cuda_detail

template <class T>
void Kernels<Cuda>::random_normal(const Tensor<T, Cuda>& out, float std, uint64_t seed, uint64_t key) {
  const int64_t n = out.numel();
  const int threads = 256;
  const int blocks = int(std::min<int64_t>((n + threads - 1) / threads, 65535));
  cuda_detail::random_normal_kernel<T><<<blocks, threads, 0, cuda::Context::get().stream()>>>(out.data(), n, std, seed, key);
  TTT_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ttt
