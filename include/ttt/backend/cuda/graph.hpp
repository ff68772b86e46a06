#pragma once
// FrameGraph<Cuda>: the first `warmup` frames run eagerly (lazily created state and arena
// chunks settle), the next one is captured from the thread's stream and every later frame
// replays the graph. The work must be deterministic device work: same allocations in the
// same order (an Arena), dynamic values read from device memory, no synchronisation.
#include <cuda_runtime_api.h>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/core/graph.hpp"

namespace ttt {

template <>
class FrameGraph<Cuda> {
 public:
  FrameGraph() = default;
  FrameGraph(const FrameGraph&) = delete;
  FrameGraph& operator=(const FrameGraph&) = delete;
  ~FrameGraph() { reset(); }

  void set_enabled(bool on) {
    if (!on) reset();
    enabled_ = on;
  }
  bool captured() const { return exec_ != nullptr; }

  template <class F>
  void run(F&& work) {
    cudaStream_t st = cuda::Context::get().stream();
    if (!enabled_ || eager_ < kWarmup) {
      work();
      ++eager_;
      return;
    }
    if (!exec_) {
      TTT_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      try {
        work();
      } catch (...) {
        cudaGraph_t g = nullptr;
        cudaStreamEndCapture(st, &g);
        if (g) cudaGraphDestroy(g);
        throw;
      }
      TTT_CUDA_CHECK(cudaStreamEndCapture(st, &graph_));
      TTT_CUDA_CHECK(cudaGraphInstantiate(&exec_, graph_, 0));
    }
    TTT_CUDA_CHECK(cudaGraphLaunch(exec_, st));
  }

 private:
  static constexpr int kWarmup = 2;
  void reset() {
    if (exec_) cudaGraphExecDestroy(exec_);
    if (graph_) cudaGraphDestroy(graph_);
    exec_ = nullptr;
    graph_ = nullptr;
    eager_ = 0;
  }
  bool enabled_ = true;
  int eager_ = 0;
  cudaGraph_t graph_ = nullptr;
  cudaGraphExec_t exec_ = nullptr;
};

}  // namespace ttt
