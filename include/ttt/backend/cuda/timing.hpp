#pragma once
// Timer<Cuda> and the CUDA memory bandwidth (backend/timing.hpp has the CPU side): CUDA events
// recorded on the thread's stream around the work.
#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/memory.hpp"
#include "ttt/backend/timing.hpp"

namespace ttt {

template <>
struct Timer<Cuda> {
  cudaEvent_t a = nullptr, b = nullptr;
  Timer() {
    TTT_CUDA_CHECK(cudaEventCreate(&a));
    TTT_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Timer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  Timer(const Timer&) = delete;
  Timer& operator=(const Timer&) = delete;
  void start() { TTT_CUDA_CHECK(cudaEventRecord(a, cuda::Context::get().stream())); }
  double stop_ms() {
    TTT_CUDA_CHECK(cudaEventRecord(b, cuda::Context::get().stream()));
    TTT_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    TTT_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return double(ms);
  }
  template <class F>
  double ms(F&& f) {
    start();
    f();
    return stop_ms();
  }
};

// Device-to-device copies of 1 GiB, the best of five; bytes read + written.
template <>
inline double memory_bandwidth_gbs<Cuda>() {
  const size_t n = size_t(1) << 30;
  auto src = Memory<Cuda>::allocate(n), dst = Memory<Cuda>::allocate(n);
  Memory<Cuda>::zero(src.get(), n);
  Timer<Cuda> t;
  double best = 1e30;
  for (int i = 0; i < 5; ++i) best = std::min(best, t.ms([&] { Memory<Cuda>::copy(dst.get(), src.get(), n); }));
  return 2.0 * double(n) / (best * 1e-3) / 1e9;
}

}  // namespace ttt
