#pragma once
// Timing for benchmarks (never for tests): Timer<B> gives the milliseconds a piece of work
// takes on backend B, median() the statistic every benchmark reports, and
// memory_bandwidth_gbs<B>() the measured bandwidth that a benchmark's hardware floor divides
// its bytes by. The CPU times with the host clock (the work is synchronous); CUDA records
// events on the thread's stream (backend/cuda/timing.hpp), so host launch overhead counts
// only where it delays the GPU.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "ttt/core/backend.hpp"
#include "ttt/core/host_memory.hpp"

namespace ttt {

// Primary template: a backend without a specialisation does not compile.
template <class B>
struct Timer {
  static_assert(sizeof(B) == 0, "Timer<B>: no timer for this backend");
};

template <>
struct Timer<Cpu> {
  std::chrono::steady_clock::time_point t0;
  void start() { t0 = std::chrono::steady_clock::now(); }
  double stop_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); }
  template <class F>
  double ms(F&& f) {
    start();
    f();
    return stop_ms();
  }
};

// The median (mean of the middle two for an even count); 0 for no samples.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// GB/s a backend moves. CPU: reads of 1 GiB with all OpenMP threads (a frame's weights are
// read, not written), the best of five passes.
template <class B>
double memory_bandwidth_gbs();

template <>
inline double memory_bandwidth_gbs<Cpu>() {
  const size_t n = size_t(256) << 20;  // floats
  std::vector<float> buf(n, 1.f);
  double best = 0;
  for (int rep = 0; rep < 5; ++rep) {
    const auto t0 = std::chrono::steady_clock::now();
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (size_t i = 0; i < n; i += 16) {
      float a = 0;
      for (size_t j = 0; j < 16; ++j) a += buf[i + j];
      s += a;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < 0) std::printf("impossible\n");  // keeps the reads
    best = std::max(best, double(n * sizeof(float)) / dt / 1e9);
  }
  return best;
}

}  // namespace ttt
