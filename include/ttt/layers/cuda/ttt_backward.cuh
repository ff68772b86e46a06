#pragma once
// TttBackwardKernels<Cuda> definitions (nvcc only; ttt/cuda.cuh includes this once per
// program): the backward of the TTT inner loop (contract: layers/ttt_backward_kernels.hpp;
// math and notation: layers/cpu/ttt_backward_kernels.hpp, which this follows step by step).
//
// Grid: one block per (b, h) (256, 512 or 1024 threads: TttBackwardCudaTuning). The block
// walks the checkpoint groups in reverse; per group it rebuilds the start states of the
// group's mini-batches from the checkpoint (key path + update, into a per-(b, h) global
// scratch; group 1 reads the checkpoint itself), then walks the group's mini-batches in
// reverse: recompute the mini-batch's forward from its start state (key path, query path),
// then its backward.
// The carry (d loss / d start state) lives in the outputs dW1 / db1 (/ dW2 / db2) of the
// (b, h) (or, by the tuning, in shared memory where it fits): it starts at zero and the backward
// of mini-batch m turns the gradient of the state after m into that of the state before m
// IN PLACE. That works because the update's backward (the only reader of the old carry)
// runs first in each mini-batch, and every other term only adds to the carry (W' = W − ...,
// so d W += d W').
//
// Per-mini-batch intermediates ([n, F], [n, f], [n, n]; 17 K F floats for TTT-Linear, 30 for
// TTT-MLP) live in shared memory when they fit (TTT-Linear up to f = 128), else in a per-(b, h)
// global scratch (L1 / L2 resident); τ, γ, β and the running dτ / dγ / dβ / dlr in shared
// memory. All products are fp32 FMA (block-wide small GEMMs). Optionally (tuning) the carry
// or each mini-batch's start state, which four products read, sit in shared memory after the
// local buffers where they fit.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/layers/cuda/ttt_backward_common.cuh"
#include "ttt/layers/cuda/ttt_backward_kernels.hpp"

#include "ttt/layers/cuda/ttt_backward_head.cuh"
#include "ttt/layers/cuda/ttt_backward_split.cuh"

namespace ttt::layers::cuda_kernels::bwd {

__device__ __noinline__ void backward_outlined(Head& hd, const State& w, const State& d, bool full, const float* dout) {
  hd.backward(w, d, full, dout);
}

template <int NT>
__global__ void __launch_bounds__(NT, 1) ttt_inner_backward_kernel(const __grid_constant__ Params p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int task = blockIdx.x, b = task / p.nh, h = task % p.nh;
  const int f = p.f, F = p.F, K = p.K;
  Head hd = make_head(p, task);
  float* const after_small = smem() + small_smem_floats(f, K);
  hd.ws = p.ws_local ? p.ws_local + int64_t(task) * p.w.local_total : after_small;
  // The carry, from zero: this (b, h)'s outputs, or a shared-memory copy of them (after the
  // local buffers) written out at the end. It is read by two products and added to by two more
  // in every mini-batch; in shared memory it measured slower for TTT-Linear (the L1 keeps much
  // of it, and the local buffers' traffic already loads shared memory), so it is off by default.
  const State out{p.dW1 + int64_t(task) * f * F, p.db1 + int64_t(task) * F,
                  p.mlp ? p.dW2 + int64_t(task) * F * f : nullptr, p.mlp ? p.db2 + int64_t(task) * f : nullptr};
  float* region = after_small + (p.ws_local ? 0 : p.w.local_total);  // what follows the local buffers
  float* const cs = p.carry_in_smem ? region : nullptr;
  if (cs) region += round4(p.w.state_n);
  // The start state of the current mini-batch, staged in shared memory (see Params).
  float* const ss = p.state_in_smem ? region : nullptr;
  const State d = cs ? State{cs, cs + f * F, p.mlp ? cs + f * F + F : nullptr,
                             p.mlp ? cs + f * F + F + int64_t(F) * f : nullptr}
                     : out;
  for (int e = threadIdx.x; e < f * F; e += nthreads()) {
    d.W1[e] = 0.f;
    if (p.mlp) d.W2[e] = 0.f;
  }
  for (int e = threadIdx.x; e < F; e += nthreads()) d.b1[e] = 0.f;
  if (p.mlp)
    for (int e = threadIdx.x; e < f; e += nthreads()) d.b2[e] = 0.f;
  __syncthreads();

  const int64_t L = p.L, M = (L + K - 1) / K, G = p.group, Mc = (M + G - 1) / G;
  auto scratch = [&](int64_t s) {
    float* base = p.ws_states + int64_t(task) * p.w.states_total + s * p.w.state_n;
    return State{base, base + f * F, base + f * F + F, base + f * F + F + int64_t(F) * f};
  };
  for (int64_t c = Mc - 1; c >= 0; --c) {
    const int64_t m0 = c * G, m1 = min(M, m0 + G);
    const int64_t row = (c * p.B + b) * int64_t(p.nh) + h;
    const State ck{const_cast<float*>(p.W1c) + row * f * F, const_cast<float*>(p.b1c) + row * F,
                   p.mlp ? const_cast<float*>(p.W2c) + row * F * f : nullptr,
                   p.mlp ? const_cast<float*>(p.b2c) + row * f : nullptr};
    auto state = [&](int64_t m) { return m == m0 ? ck : scratch(m - m0); };
    // Rebuild the start states inside the group.
    for (int64_t m = m0; m + 1 < m1; ++m) {
      hd.t0 = m * K, hd.n = K;
      hd.keys(state(m));
      hd.update(state(m), state(m + 1));
    }
    for (int64_t m = m1 - 1; m >= m0; --m) {
      hd.t0 = m * K;
      hd.n = int(min(int64_t(K), L - hd.t0));
      State w = state(m);
      if (ss) {
        const State to{ss, ss + f * F, p.mlp ? ss + f * F + F : nullptr, p.mlp ? ss + f * F + F + int64_t(F) * f : nullptr};
        copy_state(w, to, f, F, p.mlp);
        __syncthreads();
        w = to;
      }
      hd.keys(w);
      hd.queries(w);
      const float* dout = p.dout + b * p.dout_sb + h * p.dout_sh + hd.t0 * p.dout_st;
      // Inlined at 256 threads (228 registers, no spills); called at 512 and 1024, whose
      // register budgets (128, 64) spill far more with everything inlined (ptxas -v).
      if constexpr (NT <= 256) hd.backward(w, d, hd.n == K && m + 1 < M, dout);
      else backward_outlined(hd, w, d, hd.n == K && m + 1 < M, dout);
    }
  }
  if (cs) copy_state(d, out, f, F, p.mlp);
  for (int i = threadIdx.x; i < K; i += nthreads()) p.dtau[int64_t(task) * K + i] = hd.dtau[i];
  for (int j = threadIdx.x; j < f; j += nthreads()) {
    p.dln_w[int64_t(task) * f + j] = hd.dgam[j];
    p.dln_b[int64_t(task) * f + j] = hd.dbet[j];
  }
}

// A side stream and the events that order it against the context's stream, released at the
// end of the scope (both may still have work pending then: CUDA frees them when it is done).
struct SideStream {
  cudaStream_t stream = nullptr;
  std::vector<cudaEvent_t> events;
  explicit SideStream(bool make) {
    if (make) TTT_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  }
  SideStream(const SideStream&) = delete;
  SideStream& operator=(const SideStream&) = delete;
  ~SideStream() {
    for (cudaEvent_t e : events) cudaEventDestroy(e);
    if (stream) cudaStreamDestroy(stream);
  }
  // An event recorded on st now.
  cudaEvent_t record(cudaStream_t st) {
    cudaEvent_t e = nullptr;
    TTT_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    events.push_back(e);
    TTT_CUDA_CHECK(cudaEventRecord(e, st));
    return e;
  }
};

}  // namespace ttt::layers::cuda_kernels::bwd

namespace ttt::layers {

int64_t TttBackwardKernels<Cuda>::workspace_bytes(TttConfig::Kind kind, int64_t batch, int64_t heads,
                                                         int64_t f, int64_t F, int64_t K, int64_t group) {
  using namespace cuda_kernels::bwd;
  const auto w = make_workspace(kind == TttConfig::Kind::mlp, f, F, K, group);
  const int64_t one = batch * heads * (w.states_total + w.local_total) * int64_t(sizeof(float));
  if (kind == TttConfig::Kind::mlp || group != 1 || F != f) return one;
  // The split path's slots when it is taken: at most kSplitSlotBudget (one chunk, or two
  // half-budget buffers when overlapped).
  return std::max(one, kSplitSlotBudget);
}

void TttBackwardKernels<Cuda>::inner_backward(const TttInnerBackwardArgs<Cuda>& a) {
  using namespace cuda_kernels::bwd;
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3);
  const int64_t K = a.mini_batch_size, F = a.W1c.size(3), G = a.group;
  const int64_t Mc = ttt_num_checkpoints(L, K, G);
  const char* where = "TttBackwardKernels<Cuda>::inner_backward";
  TTT_CHECK(G >= 1, where, ": group must be >= 1, got ", G);
  TTT_CHECK(K >= 1 && K <= 64, where, ": mini_batch_size must be in [1, 64], got ", K);
  TTT_CHECK(a.W1c.size(0) == Mc * Bn && a.b1c.size(0) == Mc * Bn && (!mlp || a.W2c.size(0) == Mc * Bn), where,
            ": checkpoints ", a.W1c.shape().str(), " for ", Mc, " checkpoints of batch ", Bn);
  for (const Tensor<float, Cuda>* t : {&a.xq, &a.xk, &a.xv, &a.lr, &a.dxq, &a.dxk, &a.dxv, &a.dlr, &a.W1c, &a.b1c,
                                       &a.dtau, &a.dln_weight, &a.dln_bias, &a.dW1, &a.db1, &a.tau, &a.ln_weight,
                                       &a.ln_bias})
    TTT_CHECK(t->is_contiguous(), where, ": inputs and outputs must be contiguous");
  if (mlp)
    for (const Tensor<float, Cuda>* t : {&a.W2c, &a.b2c, &a.dW2, &a.db2})
      TTT_CHECK(t->is_contiguous(), where, ": inputs and outputs must be contiguous");
  TTT_CHECK(a.dout.stride(3) == 1, where, ": dout needs a unit last stride");
  if (Bn == 0 || nh == 0 || L == 0) return;

  Params p{};
  p.w = make_workspace(mlp, f, F, K, G);
  // The local buffers in shared memory when they fit beside the small part (TTT-Linear at f
  // 128: ~140 KiB), else in global scratch (L1 / L2 resident).
  int device = 0, optin = 0;
  TTT_CUDA_CHECK(cudaGetDevice(&device));
  TTT_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int64_t small = small_smem_floats(f, K) * int64_t(sizeof(float));
  const int64_t local = p.w.local_total * int64_t(sizeof(float));
  const TttBackwardCudaTuning& tune = TttBackwardKernels<Cuda>::tuning();
  TTT_CHECK(tune.threads == 0 || tune.threads == 256 || tune.threads == 512 || tune.threads == 1024, where,
            ": tuning().threads must be 256, 512 or 1024 (0: per kind), got ", tune.threads);
  const int threads = tune.threads != 0 ? tune.threads : mlp ? 1024 : 256;
  const bool in_smem = tune.local_in_smem && small + local <= optin;
  // The carry (one state's floats) after them when it fits too: TTT-Linear at f 128 with the
  // local buffers (~208 KiB in all); TTT-MLP's two matrices only for small heads (not f 128).
  const int64_t state_bytes = round4(p.w.state_n) * int64_t(sizeof(float));
  p.carry_in_smem = tune.carry_in_smem && small + (in_smem ? local : 0) + state_bytes <= optin;
  // The staged start state after them when it fits too (TTT-Linear at f 128 with the local
  // buffers and the carry in global memory: ~210 KiB).
  const int64_t used = small + (in_smem ? local : 0) + (p.carry_in_smem ? state_bytes : 0);
  p.state_in_smem = tune.state_in_smem && used + state_bytes <= optin;
  const auto ws_states = Tensor<float, Cuda>::empty({std::max<int64_t>(1, Bn * nh * p.w.states_total)});
  const auto ws_local = Tensor<float, Cuda>::empty({in_smem ? 1 : Bn * nh * p.w.local_total});
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data();
  p.tau = a.tau.data(), p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data();
  p.W1c = a.W1c.data(), p.b1c = a.b1c.data();
  if (mlp) p.W2c = a.W2c.data(), p.b2c = a.b2c.data();
  p.dout = a.dout.data(), p.dout_sb = a.dout.stride(0), p.dout_sh = a.dout.stride(1), p.dout_st = a.dout.stride(2);
  p.dxq = a.dxq.data(), p.dxk = a.dxk.data(), p.dxv = a.dxv.data(), p.dlr = a.dlr.data();
  p.dtau = a.dtau.data(), p.dln_w = a.dln_weight.data(), p.dln_b = a.dln_bias.data();
  p.dW1 = a.dW1.data(), p.db1 = a.db1.data();
  if (mlp) p.dW2 = a.dW2.data(), p.db2 = a.db2.data();
  p.ws_states = ws_states.data();
  p.ws_local = in_smem ? nullptr : ws_local.data();
  p.L = L, p.B = int(Bn), p.nh = int(nh), p.f = int(f), p.F = int(F), p.K = int(K), p.group = int(G);
  p.mlp = mlp, p.eps = a.eps;
  // TTT-Linear with a checkpoint per mini-batch (every start state stored): the carry-free work
  // of all mini-batches in parallel, then the chain (ttt_backward_split.cuh). Built for 256 and
  // 512 threads, with the local buffers and the carry in shared memory (carry_in_smem and
  // state_in_smem do not apply); 1024 threads or local_in_smem off run the one-kernel path below.
  if (tune.split && tune.local_in_smem && !mlp && G == 1 && F == f && threads != 1024 &&
      split_chain_smem(p.w, f, K) <= optin) {
    p.ws_local = nullptr, p.carry_in_smem = p.state_in_smem = false;
    const Slot s = make_slot(f, F, K);
    const int64_t BH = Bn * nh, M = (L + K - 1) / K;
    // Overlapped: two slot buffers, each half the budget, and chunks of ~M/8 mini-batches so
    // that the first free kernel (not hidden) is short.
    const bool overlap = tune.split_overlap && M > 1;
    const int64_t by_budget = split_chunk(s, BH, M) / (overlap ? 2 : 1);
    const int64_t chunk = tune.split_chunk > 0 ? std::min<int64_t>(tune.split_chunk, M)
                          : overlap            ? std::clamp<int64_t>((M + 7) / 8, 1, std::max<int64_t>(by_budget, 1))
                                               : std::max<int64_t>(by_budget, 1);
    const int64_t per_buffer = BH * chunk * s.total;
    const auto slots = Tensor<float, Cuda>::empty({per_buffer * (overlap ? 2 : 1)});
    SplitParams sp{p, p, s, slots.data(), 0, 0, true};
    sp.pf.w = make_free_workspace(f, F, K);
    const size_t free_smem = size_t(split_free_smem(f, F, K)), chain_smem = size_t(split_chain_smem(p.w, f, K));
    auto go = [&](auto free_kernel, auto chain_kernel, int nt) {
      using ::ttt::cuda::device::launch_on;
      auto post_kernel = ttt_linear_post_kernel<kSplitPostThreads>;
      TTT_CUDA_CHECK(cudaFuncSetAttribute(free_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(free_smem)));
      // The whole carve-out as shared memory, so that two free blocks fit on an SM.
      TTT_CUDA_CHECK(cudaFuncSetAttribute(free_kernel, cudaFuncAttributePreferredSharedMemoryCarveout, 100));
      TTT_CUDA_CHECK(cudaFuncSetAttribute(chain_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(chain_smem)));
      const cudaStream_t ms = ::ttt::cuda::Context::get().stream();
      // Without overlap everything runs on the context's stream, in order: free(c), chain(c),
      // post(c). With it, free and post kernels run on a side stream, in the order free(c),
      // post(c + 1) (the chunk before, in processing order), free(c - 1), ...: free(c) after the
      // main stream's work so far; chain(c) on the main stream after free(c); post(c) after
      // chain(c). So free(c - 1) runs beside chain(c) on the SMs the chain (one block per
      // (b, h)) leaves idle, post(c) right after it, and a slot buffer is rewritten (free(c - 2))
      // only after the post that last read it, which itself waited for its chain.
      SideStream side(overlap);
      if (overlap) TTT_CUDA_CHECK(cudaStreamWaitEvent(side.stream, side.record(ms)));
      SplitParams prev = sp;
      cudaEvent_t prev_chain = nullptr;
      auto post = [&](cudaStream_t st, const SplitParams& q) {
        launch_on(st, post_kernel, unsigned(BH * (q.m_hi - q.m_lo)), unsigned(kSplitPostThreads), 0, 1, q);
      };
      int64_t c = 0;
      for (int64_t hi = M; hi > 0; hi -= chunk, ++c) {  // the latest chunk first: the carry flows backwards
        sp.m_lo = std::max<int64_t>(0, hi - chunk), sp.m_hi = hi, sp.first = hi == M;
        const int buf = overlap ? int(c % 2) : 0;
        sp.slots = slots.data() + buf * per_buffer;
        const unsigned free_grid = unsigned(BH * (hi - sp.m_lo));
        if (!overlap) {
          launch_on(ms, free_kernel, free_grid, unsigned(nt), free_smem, 1, sp);
          launch_on(ms, chain_kernel, unsigned(BH), unsigned(nt), chain_smem, 1, sp);
          post(ms, sp);
          continue;
        }
        launch_on(side.stream, free_kernel, free_grid, unsigned(nt), free_smem, 1, sp);
        TTT_CUDA_CHECK(cudaStreamWaitEvent(ms, side.record(side.stream)));
        if (prev_chain) {  // the previous chunk's post, behind this chunk's free kernel
          TTT_CUDA_CHECK(cudaStreamWaitEvent(side.stream, prev_chain));
          post(side.stream, prev);
        }
        launch_on(ms, chain_kernel, unsigned(BH), unsigned(nt), chain_smem, 1, sp);
        prev_chain = side.record(ms);
        prev = sp;
      }
      if (overlap && prev_chain) {  // the last chunk's post; the main stream goes on after it
        TTT_CUDA_CHECK(cudaStreamWaitEvent(side.stream, prev_chain));
        post(side.stream, prev);
        TTT_CUDA_CHECK(cudaStreamWaitEvent(ms, side.record(side.stream)));
      }
    };
    // 512 threads unless the tuning names 256: measured on an H100 (C 4096, 32 heads, L 8192,
    // overlapped) 31.2 ms against 39.2 at 256 (in order: 36.9 / 42.6; the one-kernel path 63.7).
    if (tune.threads == 256) go(ttt_linear_free_kernel<256>, ttt_linear_chain_kernel<256>, 256);
    else go(ttt_linear_free_kernel<512>, ttt_linear_chain_kernel<512>, 512);
    return;
  }
  const size_t smem = size_t(used + (p.state_in_smem ? state_bytes : 0));
  auto run = [&](auto kernel, int threads) {
    TTT_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    ::ttt::cuda::device::launch(kernel, unsigned(Bn * nh), unsigned(threads), smem, 1, p);
  };
  if (threads == 1024) run(ttt_inner_backward_kernel<1024>, 1024);
  else if (threads == 512) run(ttt_inner_backward_kernel<512>, 512);
  else run(ttt_inner_backward_kernel<256>, 256);
}

}  // namespace ttt::layers
