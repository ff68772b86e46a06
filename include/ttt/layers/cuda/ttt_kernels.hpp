#pragma once
// TttKernels<Cuda>: declarations only (any C++ compiler). The definitions are CUDA kernels in
// ttt/layers/cuda/ttt_kernels.cuh, compiled once per program through ttt/cuda.cuh.
//
// inner() runs the contract of ttt_kernels.hpp on the device. Every (b, h) is one thread-block
// cluster of `nc` CTAs (nc = 1, 2, 4 or 8) that keeps the head's fast weights AND running sums
// in shared memory for the whole call: CTA r owns the columns [r F/nc, (r+1) F/nc) of W1 / S1
// (and the matching rows of W2 / S2 for TTT-MLP). Row statistics and the partial products of
// the second MLP layer are exchanged through distributed shared memory. The call's segments
// run one after the other inside the kernel, so a decode step is one launch and a prefill of
// L tokens is one launch too.
//
// Shapes the kernels do not handle (head_dim or inner width not a multiple of 4, unaligned or
// non-contiguous tensors, state too large for shared memory at any cluster size) take the
// host round trip (TttKernels<Cpu>::inner on copies): slow, exact, never silently wrong.
#include <cstdint>
#include <vector>

#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/layers/ttt_kernels.hpp"

namespace ttt::layers {

// Knobs for tests and benchmarks. Process-wide; the defaults choose by shape.
struct TttCudaTuning {
  int cluster = 0;             // CTAs per (b, h): 0 = automatic, else 1, 2, 4 or 8 (throws if infeasible)
  bool host_fallback = false;  // run the inner loop on the host (the reference path)
  bool tensor_cores = true;    // bf16-operand calls on the tensor-core kernels where the shape allows
  bool decode_kernel = true;   // one-token calls on the decode kernels (ttt_decode.cuh)
  bool fused_step = true;      // one-token TTT-Linear steps as one kernel (TttKernels<Cuda>::step)
};

// What inner() launches for a shape (reported by the benchmark and the tests).
struct TttCudaPlan {
  bool device = false;   // false: host round trip
  bool tensor_cores = false;  // the bf16-operand tensor-core kernels (ttt_mma.cuh)
  bool decode = false;        // a one-token kernel (ttt_decode.cuh, float)
  int cluster = 0;       // CTAs per (b, h)
  int resident = 0;      // clusters (CTAs when cluster = 1) resident at once on the device; 0 = not queried
  int rows = 0;          // segment rows held in shared memory (min(K, L) rounded up to 4)
  int64_t smem_bytes = 0;
  const char* why_host = "";  // when !device
};

template <>
struct TttKernels<Cuda> {
  static void inner(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s);
  // inner() writing checkpoints on the way (TttCheckpoints), where a kernel can; false (nothing
  // run) otherwise: the caller then runs inner() one checkpoint group at a time.
  static bool inner_checkpointed(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s,
                                 const TttCheckpoints<Cuda>& ck);
  // `operands` bf16 may pick the tensor-core kernels; fp32 never does.
  static TttCudaPlan plan(TttConfig::Kind kind, int64_t batch, int64_t heads, int64_t L, int64_t f, int64_t F,
                          int64_t K, TttOperands operands = TttOperands::fp32);
  // See TttPrologue and TttKernels<Cpu>::post_norm (instantiated for float, bf16 and f16).
  template <class T>
  static void prologue(const TttPrologue<T, Cuda>& a);
  // A one-token TTT-Linear step (no video options) as one kernel (ttt_decode.cuh); false for
  // any other call. Instantiated for float, bf16 and f16 (f16: always false).
  template <class T>
  static bool step(const TttStep<T, Cuda>& st, const TttFastWeights<Cuda>& s);
  template <class T>
  static void post_norm(const Tensor<T, Cuda>& out, const Tensor<float, Cuda>& in, const Tensor<float, Cuda>& weight,
                        const Tensor<float, Cuda>& bias, float eps);

  static void causal_conv(const Tensor<float, Cuda>& out_q, const Tensor<float, Cuda>& out_k,
                          const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& history,
                          const Tensor<float, Cuda>& wq, const Tensor<float, Cuda>& bq, const Tensor<float, Cuda>& wk,
                          const Tensor<float, Cuda>& bk, const Tensor<uint8_t, Cuda>& commit);
  // See TttKernels<Cpu>::call_flags.
  static void call_flags(const Tensor<int64_t, Cuda>& positions, const Tensor<uint8_t, Cuda>& exec, int64_t add,
                         int64_t mod, const Tensor<int64_t, Cuda>& out_pos, const Tensor<int32_t, Cuda>& phase,
                         const Tensor<uint8_t, Cuda>& commit);
  static void l2_normalize(const Tensor<float, Cuda>& x);
  static void ln_target(const Tensor<float, Cuda>& xv, const Tensor<float, Cuda>& xk, const Tensor<float, Cuda>& weight,
                        const Tensor<float, Cuda>& bias, float eps);

  static TttCudaTuning& tuning() {
    static TttCudaTuning t;
    return t;
  }
};

}  // namespace ttt::layers
