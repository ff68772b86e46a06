#pragma once
// FrameGraph<B>: runs one streaming frame's device work. On backends without graphs it
// simply calls the work; the CUDA specialisation (backend/cuda/graph.hpp) captures it once
// into a CUDA graph and replays it, so a frame costs one launch instead of hundreds.
#include <cstddef>
#include <cstdint>
#include <utility>

#include "ttt/core/backend.hpp"

namespace ttt {

template <class B>
class FrameGraph {
 public:
  void set_enabled(bool) {}
  template <class F>
  void run(F&& work) {
    std::forward<F>(work)();
  }
  // `key`: what the work depends on beyond device memory (one graph per key on CUDA).
  template <class F>
  void run(uint64_t, F&& work) {
    std::forward<F>(work)();
  }
  bool captured() const { return false; }
  size_t num_kernels(uint64_t = 0) const { return 0; }
};

}  // namespace ttt
