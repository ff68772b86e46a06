#pragma once
// FrameGraph<Cuda>: the first `warmup` frames run eagerly (lazily created state and arena
// chunks settle); after that a frame is captured from the thread's stream the first time its
// key is seen and replayed whenever the key comes back. The work must be deterministic device
// work: same allocations in the same order (an Arena), dynamic values read from device
// memory, no synchronisation. The key names whatever host-decided work a frame does (e.g. the
// In-Place TTT chunk update of every C-th frame); most frames share key 0. Past kMaxGraphs
// keys, frames of a new key run eagerly.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

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
  bool captured() const { return !graphs_.empty(); }
  size_t num_graphs() const { return graphs_.size(); }
  // Kernel nodes of the graph captured for `key` (0 when none is): what one replay launches.
  size_t num_kernels(uint64_t key = 0) const {
    for (const auto& g : graphs_) {
      if (g.key != key) continue;
      size_t n = 0;
      TTT_CUDA_CHECK(cudaGraphGetNodes(g.graph, nullptr, &n));
      std::vector<cudaGraphNode_t> nodes(n);
      TTT_CUDA_CHECK(cudaGraphGetNodes(g.graph, nodes.data(), &n));
      size_t kernels = 0;
      for (auto node : nodes) {
        cudaGraphNodeType t{};
        TTT_CUDA_CHECK(cudaGraphNodeGetType(node, &t));
        kernels += t == cudaGraphNodeTypeKernel;
      }
      return kernels;
    }
    return 0;
  }

  template <class F>
  void run(F&& work) {
    run(0, static_cast<F&&>(work));
  }

  template <class F>
  void run(uint64_t key, F&& work) {
    cudaStream_t st = cuda::Context::get().stream();
    if (!enabled_ || eager_ < kWarmup) {
      work();
      ++eager_;
      return;
    }
    Entry* e = nullptr;
    for (auto& g : graphs_)
      if (g.key == key) e = &g;
    if (!e) {
      if (graphs_.size() >= kMaxGraphs) {
        work();
        return;
      }
      Entry n{key, nullptr, nullptr};
      TTT_CUDA_CHECK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
      bool ok = true;
      try {
        work();
      } catch (const Error&) {
        // Typically a first-time allocation (a new arena chunk) that capture does not
        // allow. Nothing ran and the work changes no host state: run this frame eagerly
        // (the arena grows) and capture the key when it comes back. Other errors stand.
        ok = false;
      }
      cudaGraph_t g = nullptr;
      const cudaError_t end = cudaStreamEndCapture(st, &g);
      if (!ok || end != cudaSuccess) {
        if (g) cudaGraphDestroy(g);
        (void)cudaGetLastError();
        // Work that never captures (a host round trip inside) runs eagerly from now on.
        if (++failed_ >= 4) enabled_ = false;
        work();
        return;
      }
      n.graph = g;
      TTT_CUDA_CHECK(cudaGraphInstantiate(&n.exec, n.graph, 0));
      graphs_.push_back(n);
      e = &graphs_.back();
    }
    TTT_CUDA_CHECK(cudaGraphLaunch(e->exec, st));
  }

 private:
  static constexpr int kWarmup = 2;
  static constexpr size_t kMaxGraphs = 64;
  struct Entry {
    uint64_t key;
    cudaGraph_t graph;
    cudaGraphExec_t exec;
  };
  void reset() {
    for (auto& g : graphs_) {
      if (g.exec) cudaGraphExecDestroy(g.exec);
      if (g.graph) cudaGraphDestroy(g.graph);
    }
    graphs_.clear();
    eager_ = 0;
    failed_ = 0;
  }
  bool enabled_ = true;
  int eager_ = 0;
  int failed_ = 0;
  std::vector<Entry> graphs_;
};

}  // namespace ttt
