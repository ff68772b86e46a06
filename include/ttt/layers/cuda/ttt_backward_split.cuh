#pragma once
// The TTT-Linear inner backward split in two kernels (nvcc only; used by ttt_backward.cuh for
// TTT-Linear with a checkpoint per mini-batch, where every mini-batch's start state is stored).
//
// Why: the one-block-per-(b, h) kernel walks ~40 dependent block-wide steps per mini-batch on
// one SM per head (32 of the H100's 132 SMs at batch 1), but most of a mini-batch's backward
// does not depend on the carry (d loss / d state after it): the key and query paths, the
// output path's LayerNorm backward, dQ, and the η path (Head::backward_free). Only the update's
// backward, the key path's LayerNorm backward and the carry's own sums form the chain
// (Head::backward_chain: 4 small products instead of ~12).
//
//   free kernel   grid (b, h) x mini-batch of a chunk: recompute keys / queries from the stored
//                 start state, backward_free, and write per (b, h, m) a slot of G1, x̂, rstd,
//                 dG1, dZ̄ and the mini-batch's dτ / dγ / dβ parts (dQ goes to dxq, the η-path
//                 dK to dxk, the η-path dlr to dlr);
//   chain kernel  grid (b, h): the chunk's mini-batches in reverse, the carry in shared memory
//                 (loaded from / stored to dW1 / db1 between chunks), backward_chain from the
//                 slots, dxv and dlr completed, dxk but for dZ1 W1ᵀ (dZ1 into the slot);
//   post kernel   grid (b, h) x mini-batch of a chunk: dxk += dZ1 W1ᵀ (the chain's one read of
//                 the start state, which nothing in the chain needs).
// Chunks of mini-batches (latest first) bound the slots' memory (kSplitSlotBudget); with
// TttBackwardCudaTuning::split_overlap the free kernel of the next chunk runs on a side stream
// beside the chain (two slot buffers; ttt_backward.cuh). Measured (H100, C 4096, 32 heads,
// L 8192, 512 threads): 31.2 ms against 63.7 for the one-kernel path (docs/training.md).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ttt/layers/cuda/ttt_backward_head.cuh"

namespace ttt::layers::cuda_kernels::bwd {

// One (b, h, m)'s slot (floats, 16-byte aligned pieces): G1 [K, F], x̂ [K, f], dG1 [K, F],
// dZ̄ [K, F], rstd [K], dτ [K], dγ [f], dβ [f].
struct Slot {
  int64_t G1 = 0, xh = 0, dG1 = 0, dZb = 0, rstd = 0, dtau = 0, dgam = 0, dbet = 0, total = 0;
};

inline Slot make_slot(int64_t f, int64_t F, int64_t K) {
  Slot s;
  Bump take;
  s.G1 = take(K * F), s.xh = take(K * f), s.dG1 = take(K * F), s.dZb = take(K * F);
  s.rstd = take(K), s.dtau = take(K), s.dgam = take(f), s.dbet = take(f);
  s.total = take.at;
  return s;
}

// The free kernel's buffers: only those keys(), queries() and backward_free() touch, for
// TTT-Linear (the others keep offset 0 and are never touched), ~94 KiB at f 128 instead of
// ~140, so that two blocks share an SM and hide each other's latency.
inline Workspace make_free_workspace(int64_t f, int64_t F, int64_t K) {
  Workspace w;
  Bump take;
  w.state_n = f * F + F;
  for (int64_t* o : {&w.Z1, &w.G1, &w.Zb1, &w.dG1}) *o = take(K * F);
  for (int64_t* o : {&w.T, &w.xh, &w.gh, &w.xb, &w.dQ, &w.dK, &w.dZq}) *o = take(K * f);
  for (int64_t* o : {&w.S1, &w.E1, &w.dS, &w.dE}) *o = take(K * K);
  w.rstd = take(K), w.rstdb = take(K);
  w.local_total = take.at;
  return w;
}

// Bytes of slots one chunk may hold (all (b, h) of a chunk of mini-batches).
inline constexpr int64_t kSplitSlotBudget = int64_t(256) << 20;

struct SplitParams {
  Params p;      // the chain kernel's: the buffers of one (b, h) (p.w) in shared memory
  Params pf;     // the free kernel's: p with the compact buffers (make_free_workspace)
  Slot s;
  float* slots;  // [B nh][m_hi - m_lo][s.total]
  int64_t m_lo, m_hi;
  bool first;    // the chunk of the last mini-batches: the carry and the running sums start at 0
};

__device__ __forceinline__ State checkpoint_state(const Params& p, int task, int64_t m) {
  const int b = task / p.nh, h = task % p.nh;
  const int64_t row = (m * p.B + b) * int64_t(p.nh) + h;  // group 1: checkpoint m = start of m
  return State{const_cast<float*>(p.W1c) + row * p.f * p.F, const_cast<float*>(p.b1c) + row * p.F, nullptr, nullptr};
}

template <int NT>
__global__ void __launch_bounds__(NT, NT <= 256 ? 2 : 1) ttt_linear_free_kernel(const __grid_constant__ SplitParams sp) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const Params& p = sp.pf;
  const int64_t mc = sp.m_hi - sp.m_lo;
  const int task = int(blockIdx.x / mc);
  const int64_t ml = blockIdx.x - int64_t(task) * mc, m = sp.m_lo + ml;
  const int f = p.f, F = p.F, K = p.K, b = task / p.nh, h = task % p.nh;
  Head hd = make_head(p, task);
  hd.ws = smem() + small_smem_floats(f, K);
  hd.t0 = m * K;
  hd.n = int(min(int64_t(K), p.L - hd.t0));
  __syncthreads();
  const State w = checkpoint_state(p, task, m);
  hd.keys(w);
  hd.queries(w);
  hd.backward_free(w, p.dout + b * p.dout_sb + h * p.dout_sh + hd.t0 * p.dout_st);
  const Workspace& o = p.w;
  const int n = hd.n;
  const int64_t row = (int64_t(task) * p.L + hd.t0) * f;
  for (int e = threadIdx.x; e < n * f; e += nthreads()) {
    p.dxq[row + e] = hd.buf(o.dQ)[e];
    p.dxk[row + e] = hd.buf(o.dK)[e];
  }
  if (threadIdx.x < n) p.dlr[int64_t(task) * p.L + hd.t0 + threadIdx.x] = hd.dlr[threadIdx.x];
  float* slot = sp.slots + (int64_t(task) * mc + ml) * sp.s.total;
  for (int e = threadIdx.x; e < n * F; e += nthreads()) {
    slot[sp.s.G1 + e] = hd.buf(o.G1)[e];
    slot[sp.s.dG1 + e] = hd.buf(o.dG1)[e];
    slot[sp.s.dZb + e] = hd.buf(o.dZq)[e];
  }
  for (int e = threadIdx.x; e < n * f; e += nthreads()) slot[sp.s.xh + e] = hd.buf(o.xh)[e];
  for (int i = threadIdx.x; i < K; i += nthreads()) {
    if (i < n) slot[sp.s.rstd + i] = hd.buf(o.rstd)[i];
    slot[sp.s.dtau + i] = hd.dtau[i];
  }
  for (int j = threadIdx.x; j < f; j += nthreads()) slot[sp.s.dgam + j] = hd.dgam[j], slot[sp.s.dbet + j] = hd.dbet[j];
}

template <int NT>
__global__ void __launch_bounds__(NT, 1) ttt_linear_chain_kernel(const __grid_constant__ SplitParams sp) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const Params& p = sp.p;
  const int64_t mc = sp.m_hi - sp.m_lo, L = p.L, M = (L + p.K - 1) / p.K;
  const int task = blockIdx.x;
  const int f = p.f, F = p.F, K = p.K;
  Head hd = make_head(p, task);
  hd.ws = smem() + small_smem_floats(f, K);
  const Workspace& o = p.w;
  // The running sums and the carry (after the local buffers) continue from the later chunk.
  if (!sp.first) {
    for (int i = threadIdx.x; i < K; i += nthreads()) hd.dtau[i] = p.dtau[int64_t(task) * K + i];
    for (int j = threadIdx.x; j < f; j += nthreads()) {
      hd.dgam[j] = p.dln_w[int64_t(task) * f + j];
      hd.dbet[j] = p.dln_b[int64_t(task) * f + j];
    }
  }
  float* cs = hd.ws + o.local_total;
  const State out{p.dW1 + int64_t(task) * f * F, p.db1 + int64_t(task) * F, nullptr, nullptr};
  const State d{cs, cs + f * F, nullptr, nullptr};
  if (sp.first) {
    for (int e = threadIdx.x; e < f * F + F; e += nthreads()) cs[e] = 0.f;  // W1 then b1, contiguous
  } else {
    copy_state(out, d, f, F, false);
  }
  __syncthreads();
  for (int64_t ml = mc - 1; ml >= 0; --ml) {
    const int64_t m = sp.m_lo + ml;
    hd.t0 = m * K;
    const int n = hd.n = int(min(int64_t(K), L - hd.t0));
    float* slot = sp.slots + (int64_t(task) * mc + ml) * sp.s.total;
    const int64_t row = (int64_t(task) * L + hd.t0) * f;
    const float *X = hd.k + hd.t0 * f, *V = hd.v + hd.t0 * f;
    float *G1 = hd.buf(o.G1), *dG1 = hd.buf(o.dG1), *dZb = hd.buf(o.dZq), *xh = hd.buf(o.xh), *T = hd.buf(o.T);
    float *gh = hd.buf(o.gh), *dK = hd.buf(o.dK), *rstd = hd.buf(o.rstd);
    for (int e = threadIdx.x; e < n * F; e += nthreads()) {
      G1[e] = slot[sp.s.G1 + e];
      dG1[e] = slot[sp.s.dG1 + e];
      dZb[e] = slot[sp.s.dZb + e];
    }
    // T = V − K and ĝ = (γ x̂ + β − T) γ as the key path made them.
    for (int e = threadIdx.x; e < n * f; e += nthreads()) {
      const int j = e % f;
      const float x = slot[sp.s.xh + e], t = V[e] - X[e];
      xh[e] = x;
      T[e] = t;
      gh[e] = (hd.gam[j] * x + hd.bet[j] - t) * hd.gam[j];
      dK[e] = p.dxk[row + e];
    }
    for (int i = threadIdx.x; i < K; i += nthreads()) {
      if (i < n) rstd[i] = slot[sp.s.rstd + i];
      hd.dtau[i] += slot[sp.s.dtau + i];
      hd.dlr[i] = 0.f;
    }
    for (int j = threadIdx.x; j < f; j += nthreads()) hd.dgam[j] += slot[sp.s.dgam + j], hd.dbet[j] += slot[sp.s.dbet + j];
    __syncthreads();
    hd.backward_chain(d, n == K && m + 1 < M);
    const float *dT = hd.buf(o.dT), *dZ1 = hd.buf(o.dZ1);
    for (int e = threadIdx.x; e < n * f; e += nthreads()) {
      p.dxk[row + e] = dK[e] - dT[e];
      p.dxv[row + e] = dT[e];
    }
    // dZ1 over the slot's dG1, read above: ttt_linear_post_kernel adds dZ1 W1ᵀ to dxk.
    for (int e = threadIdx.x; e < n * F; e += nthreads()) slot[sp.s.dG1 + e] = dZ1[e];
    if (threadIdx.x < n) p.dlr[int64_t(task) * L + hd.t0 + threadIdx.x] += hd.dlr[threadIdx.x];
    __syncthreads();
  }
  copy_state(d, out, f, F, false);
  for (int i = threadIdx.x; i < K; i += nthreads()) p.dtau[int64_t(task) * K + i] = hd.dtau[i];
  for (int j = threadIdx.x; j < f; j += nthreads()) {
    p.dln_w[int64_t(task) * f + j] = hd.dgam[j];
    p.dln_b[int64_t(task) * f + j] = hd.dbet[j];
  }
}

// The last term of dK that the chain leaves out (Head::backward_chain): Z1 = K W1 + b1 gives
// dK += dZ1 W1ᵀ, with dZ1 in the slot (over dG1) and W1 the mini-batch's stored start state.
// Every (b, h, m) of a chunk at once, after that chunk's chain; off the chain's path, on the
// side stream beside the next chain when overlapped.
template <int NT>
__global__ void __launch_bounds__(NT) ttt_linear_post_kernel(const __grid_constant__ SplitParams sp) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const Params& p = sp.p;
  const int64_t mc = sp.m_hi - sp.m_lo;
  const int task = int(blockIdx.x / mc);
  const int64_t ml = blockIdx.x - int64_t(task) * mc, m = sp.m_lo + ml, t0 = m * p.K;
  const int f = p.f, F = p.F, n = int(min(int64_t(p.K), p.L - t0));
  const float* dZ1 = sp.slots + (int64_t(task) * mc + ml) * sp.s.total + sp.s.dG1;  // [n, F]
  float* dK = p.dxk + (int64_t(task) * p.L + t0) * f;                                // [n, f]
  mm<false, true>(n, f, F, dZ1, F, checkpoint_state(p, task, m).W1, F, [&](int i, int e, float a) { dK[i * f + e] += a; });
}
constexpr int kSplitPostThreads = 256;

// Shared memory of the two kernels: the small part, then the free kernel's compact buffers, or
// the chain kernel's full ones (w) and the carry (one state) after them.
inline int64_t split_free_smem(int64_t f, int64_t F, int64_t K) {
  return (small_smem_floats(f, K) + make_free_workspace(f, F, K).local_total) * int64_t(sizeof(float));
}
inline int64_t split_chain_smem(const Workspace& w, int64_t f, int64_t K) {
  return (small_smem_floats(f, K) + w.local_total + round4(w.state_n)) * int64_t(sizeof(float));
}

// Mini-batches per chunk: as many as kSplitSlotBudget holds for all (b, h), at least one.
inline int64_t split_chunk(const Slot& s, int64_t bh, int64_t M) {
  const int64_t per = bh * s.total * int64_t(sizeof(float));
  return std::clamp<int64_t>(kSplitSlotBudget / std::max<int64_t>(per, 1), 1, M);
}

}  // namespace ttt::layers::cuda_kernels::bwd
