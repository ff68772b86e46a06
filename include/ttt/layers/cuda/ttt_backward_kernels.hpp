#pragma once
// TttBackwardKernels<Cuda>: declarations only (any C++ compiler). The definitions are CUDA
// kernels in ttt/layers/cuda/ttt_backward.cuh, compiled once per program through ttt/cuda.cuh.
//
// inner_backward() runs the contract of ttt_backward_kernels.hpp on the device: one thread
// block per (b, h) walks that head's checkpoint groups and mini-batches in reverse (the
// chain over mini-batches is sequential, heads are independent), recomputing each
// mini-batch's forward from its start state, all in fp32.
#include <cstdint>

#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/layers/ttt_backward_kernels.hpp"

namespace ttt::layers {

// Knobs for tests and benchmarks (process-wide).
struct TttBackwardCudaTuning {
  bool local_in_smem = true;   // per-mini-batch buffers in shared memory where they fit
  bool carry_in_smem = false;  // the carry (d loss / d state) in shared memory where it fits too
  bool state_in_smem = false;  // each mini-batch's start state staged in shared memory where it fits
  // Block size: 256, 512 or 1024; 0 picks per path what measured fastest (H100, C 4096, 32
  // heads, L 8192; docs/training.md): 512 for the split path, 256 for TTT-Linear's one-kernel
  // path, 1024 for TTT-MLP. The carry in shared memory measured slower (TTT-Linear 71.2 ms
  // against 63.7 in global at 256 threads).
  int threads = 0;
  // TTT-Linear with a checkpoint per mini-batch (group 1): the carry-free work of all
  // mini-batches as one parallel kernel, then the chain alone (ttt_backward_split.cuh), at 512
  // threads (256 where `threads` says so), its buffers and carry in shared memory. Off: the
  // one-kernel path (also for threads 1024 or local_in_smem off).
  bool split = true;
  int split_chunk = 0;  // mini-batches per chunk of the split path (0: by its memory budget)
  // The split path's free kernel of chunk c - 1 on a side stream beside the chain of chunk c
  // (two slot buffers of 128 MiB at most, chunks of ~M / 8 mini-batches).
  bool split_overlap = true;
};

template <>
struct TttBackwardKernels<Cuda> {
  static void inner_backward(const TttInnerBackwardArgs<Cuda>& a);
  static TttBackwardCudaTuning& tuning() {
    static TttBackwardCudaTuning t;
    return t;
  }
  // Bytes of global scratch one call needs (per (b, h): the rebuilt states of a checkpoint
  // group and the per-mini-batch intermediates).
  static int64_t workspace_bytes(TttConfig::Kind kind, int64_t batch, int64_t heads, int64_t f, int64_t F, int64_t K,
                                 int64_t group);
};

}  // namespace ttt::layers
