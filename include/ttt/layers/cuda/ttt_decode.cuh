#pragma once
// TTT-Linear decode (nvcc only): calls of one token, in float (both operand precisions, the
// reference's numbers). A decode step's work is a few matrix-vector products over the head's
// fast weight W and running sum S and one rank-1 update, so the kernel is a single pass over
// them: a cluster of f / 32 CTAs of 2f threads per (b, h), each CTA holding 32 rows of W and
// S, thread (row group, column quad) 4 rows x 4 columns in registers (16-byte loads,
// coalesced along the rows). The CTAs exchange their partial k W, q W and q S once through
// distributed shared memory; the column owners (threads < f) of every CTA then finish the
// LayerNorms (identically), and every thread applies S += lr kᵀ g (and at the mini-batch end
// W -= τ_{K-1} S, S = 0) to the values it holds and stores them once.
// Per token (ttt_reference d.2; the contract of ttt_kernels.hpp with n = 1):
//   z = k W + b, g = ln_fused_l2_bwd(z, v - k), z̄ = q W + b - τ_p (q S + Sb + lr (q·k + 1) g),
//   out = q + LN(z̄), S += lr kᵀ g, Sb += lr g.
// Statistics: Welford partials merged in warp order (one barrier per LayerNorm).
//
// The fused variant (kFused) is a whole one-token layer step between the two projections:
// it reads the token's q | k | v | lr-logit row of the fused projection (the prologue's RoPE
// and sigmoid, same arithmetic), and the last CTA of a batch item to finish (a per-item
// counter, reset by that CTA) applies post_norm over the item's heads and writes the layer's
// T output. Three launches (prologue, inner, post_norm) become one.
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/backend/math.hpp"
#include "ttt/layers/cuda/ttt_inner_common.cuh"

namespace ttt::layers::cuda_kernels::decode {

constexpr int kRowGroups = 16;

struct Welford {
  float n, mean, m2;
};
__device__ __forceinline__ Welford merge(const Welford& a, const Welford& b) {
  const float n = a.n + b.n;
  if (n == 0.f) return a;
  const float d = b.mean - a.mean, wb = b.n / n;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}
__device__ __forceinline__ Welford shfl_xor(const Welford& w, int off) {
  return {__shfl_xor_sync(0xffffffffu, w.n, off), __shfl_xor_sync(0xffffffffu, w.mean, off),
          __shfl_xor_sync(0xffffffffu, w.m2, off)};
}

// Over the column owners (threads < HD, HD / 32 whole warps): the Welford statistics of `x`
// and the sum of `extra`, merged in warp order (identical in every owner). red: 4 * HD / 32.
// Every thread of the CTA arrives at the barrier.
template <int HD>
__device__ __forceinline__ Welford owner_stats(float x, float& extra, float* red) {
  constexpr int NW = HD / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  Welford w{1.f, x, 0.f};
  if (threadIdx.x < HD) {
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) w = merge(w, shfl_xor(w, off));
    extra = warp_sum(extra);
    if (lane == 0) red[4 * warp] = w.n, red[4 * warp + 1] = w.mean, red[4 * warp + 2] = w.m2, red[4 * warp + 3] = extra;
  }
  __syncthreads();
  Welford t{red[0], red[1], red[2]};
  float e = red[3];
#pragma unroll
  for (int i = 1; i < NW; ++i) t = merge(t, Welford{red[4 * i], red[4 * i + 1], red[4 * i + 2]}), e += red[4 * i + 3];
  extra = e;
  return t;
}
// Two sums over the column owners, in warp order. red: 2 * HD / 32.
template <int HD>
__device__ __forceinline__ void owner_sum2(float& a, float& b, float* red) {
  constexpr int NW = HD / 32;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (threadIdx.x < HD) {
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) red[2 * warp] = a, red[2 * warp + 1] = b;
  }
  __syncthreads();
  float x = 0.f, y = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) x += red[2 * w], y += red[2 * w + 1];
  a = x, b = y;
}

// Σ over the row groups, in order, of column `col` of a partial-sum array [RG][CQ] float4
// (one float4 per thread: row group, column quad).
template <int RG, int CQ>
__device__ __forceinline__ float column_sum(const float4 (&part)[RG][CQ], int col) {
  const float* p = reinterpret_cast<const float*>(&part[0][0]);
  float v = 0.f;
#pragma unroll
  for (int g = 0; g < RG; ++g) v += p[g * 4 * CQ + col];
  return v;
}

template <class T>
struct DecodeParams {
  InnerParams in;  // state, flags, tau, ttt_norm, eps; xq / xk / xv / lr when not fused
  // Fused step only:
  const T* proj;  // [B, >= 3C + nh] the token's fused projection row, row stride proj_b
  int64_t proj_b;
  const int64_t* pos;  // [B] stream positions (device flags; null: in.phase / in.commit)
  int64_t pos_b;
  const uint8_t* exec;  // [B] or null
  const float* lr_bias;  // [nh]
  float lr_scale, theta;
  T* y;                  // [B, C] post_norm output
  const float* pn_w;     // [C]
  const float* pn_b;
  float pn_eps;
  int* counters;   // [B] zero between calls
  float* scratch;  // [B, nh * NC, 2] per-CTA statistics of the output row
};

// Cluster barrier halves (sm_90): arrive after the last read of a peer's shared memory,
// wait before the buffer is rewritten or the CTA exits.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

// A head's rows are split over a cluster of HD / 32 CTAs (32 rows of W and S each): the
// state traffic of a step (read W and S, write S) spreads over that many SMs, and the CTAs
// exchange their partial column sums once per token through distributed shared memory.
template <int HD>
struct DecodeLayout {
  static constexpr int NC = HD / 32;          // CTAs per head
  static constexpr int ROWS = 32;             // rows of W / S per CTA
  static constexpr int CQ = HD / 4;           // column quads
  static constexpr int RG = 8, RPT = ROWS / RG;  // row groups of RPT rows
  static constexpr int THREADS = CQ * RG;     // 2 HD
};

template <class T, int HD, bool kFused>
__global__ void __launch_bounds__(2 * HD) ttt_linear_decode_kernel(const DecodeParams<T> dp) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  using Lay = DecodeLayout<HD>;
  constexpr int NC = Lay::NC, RPT = Lay::RPT, RG = Lay::RG, CQ = Lay::CQ, NTH = Lay::THREADS;
  static_assert(HD >= 32 && HD % 32 == 0, "column owners fill whole warps");
  const InnerParams& p = dp.in;
  __shared__ float4 part[3][RG][CQ];        // partial k W, q W, q S per row group
  __shared__ __align__(16) float cpart[3][HD];  // this CTA's column sums, read by the cluster
  __shared__ float qv[HD], kv[HD], vv[HD], gvec[HD];
  __shared__ float red[3][4 * (HD / 32)];
  __shared__ float misc[4];
  const int tid = threadIdx.x, cq = tid % CQ, rg = tid / CQ, c = 4 * cq;
  const int rank = cluster_rank(NC);
  const int r0 = rank * Lay::ROWS + rg * RPT;  // this thread's first row
  const int64_t bh = blockIdx.x / NC;
  const int b = int(bh / p.nh), h = int(bh % p.nh), K = p.K;
  float* Wg = p.W1 + bh * HD * HD;
  float* Sg = p.S1 + bh * HD * HD;
  float* bg = p.b1 + bh * HD;
  float* Sbg = p.Sb1 + bh * HD;
  const bool owner = tid < HD;
  // The columns whose outputs, bias and running sum this CTA writes.
  const bool mine = owner && tid / (HD / NC) == rank;
  // Every global load that does not depend on another is issued here, before any is used:
  // after the projections stream 134 MB through L2 all of them miss, and a chain of
  // dependent misses (phase -> tau[phase] -> ...) would cost a DRAM round trip each.
  // The fused step makes its flags from the token's position and the exec mask; the plain
  // kernel reads the prologue's.
  const int64_t raw_pos = kFused ? dp.pos[b * dp.pos_b] : 0;
  const bool dev_commit = kFused && dp.exec ? dp.exec[b] != 0 : true;
  float4 w[RPT], s[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    w[i] = *reinterpret_cast<const float4*>(Wg + (r0 + i) * HD + c);
    s[i] = *reinterpret_cast<const float4*>(Sg + (r0 + i) * HD + c);
  }
  float bias = 0.f, sb = 0.f, gam = 0.f, bet = 0.f;
  if (owner) bias = bg[tid], sb = Sbg[tid], gam = p.ln_w[h * HD + tid], bet = p.ln_b[h * HD + tid];
  __shared__ float taus[32];
  if (tid >= NTH - 32) taus[tid - (NTH - 32)] = tid - (NTH - 32) < K ? p.tau[tid - (NTH - 32)] : 0.f;
  float in0 = 0.f, in1 = 0.f, in2 = 0.f, in3 = 0.f;  // the first token's raw inputs (fused)
  if constexpr (kFused) {
    const int64_t C = int64_t(p.nh) * HD;
    const T* pr = dp.proj + b * dp.proj_b;
    if (tid < HD / 2) {
      in0 = to_f32(pr[h * HD + 2 * tid]), in1 = to_f32(pr[h * HD + 2 * tid + 1]);
      in2 = to_f32(pr[C + h * HD + 2 * tid]), in3 = to_f32(pr[C + h * HD + 2 * tid + 1]);
    } else if (tid < HD) {
      const int i = tid - HD / 2;
      in0 = to_f32(pr[2 * C + h * HD + 2 * i]), in1 = to_f32(pr[2 * C + h * HD + 2 * i + 1]);
    } else if (tid == HD) {
      in0 = to_f32(pr[3 * C + h]) + dp.lr_bias[h];
    } else if (tid == HD + 1 || tid == HD + 2) {
      // post_norm's weights of this CTA's columns into L2 for whichever CTA normalises the row.
      const float* wp = (tid == HD + 1 ? dp.pn_w : dp.pn_b) + h * HD + rank * (HD / NC);
      asm volatile("prefetch.global.L2 [%0];\n" ::"l"(wp));
    }
  }
  int pp;
  bool commit;
  if constexpr (kFused) {
    pp = int(((raw_pos % K) + K) % K);
    commit = dev_commit;
  } else {
    pp = item_phase(p, b);
    commit = item_commit(p, b);
  }
  const float fh = float(HD);
  float last_out = 0.f;  // this thread's output of the last token (mine columns)

  for (int64_t tok = 0; tok < p.L; ++tok) {
    const int64_t row = bh * p.L + tok;
    const bool complete = pp + 1 == K;
    if constexpr (kFused) {
      // The prologue for one token (prologue_kernel's arithmetic): RoPE at the phase. (The
      // fused step is planned for one-token calls only: the inputs loaded above.)
      if (tid < HD / 2) {
        const int i = tid;
        float sn, cs;
        sincosf(rope_freq_rn(i, HD, dp.theta) * float(pp), &sn, &cs);
        qv[2 * i] = in0 * cs - in1 * sn, qv[2 * i + 1] = in0 * sn + in1 * cs;
        kv[2 * i] = in2 * cs - in3 * sn, kv[2 * i + 1] = in2 * sn + in3 * cs;
      } else if (tid < HD) {
        const int i = tid - HD / 2;
        vv[2 * i] = in0, vv[2 * i + 1] = in1;
      } else if (tid == HD) {
        misc[0] = dp.lr_scale * ::ttt::math::sigmoid(in0);
      }
    } else {
      if (owner) {
        qv[tid] = p.xq[row * HD + tid], kv[tid] = p.xk[row * HD + tid], vv[tid] = p.xv[row * HD + tid];
      } else if (tid == HD) {
        misc[0] = p.lr[row];
      }
    }
    __syncthreads();
    const float lr = misc[0], tau = taus[pp], tl = taus[K - 1];

    float4 zk = make_float4(0.f, 0.f, 0.f, 0.f), zq = zk, qs = zk;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const float kr = kv[r0 + i], qr = qv[r0 + i];
      zk.x = fmaf(kr, w[i].x, zk.x), zk.y = fmaf(kr, w[i].y, zk.y), zk.z = fmaf(kr, w[i].z, zk.z);
      zk.w = fmaf(kr, w[i].w, zk.w);
      zq.x = fmaf(qr, w[i].x, zq.x), zq.y = fmaf(qr, w[i].y, zq.y), zq.z = fmaf(qr, w[i].z, zq.z);
      zq.w = fmaf(qr, w[i].w, zq.w);
      qs.x = fmaf(qr, s[i].x, qs.x), qs.y = fmaf(qr, s[i].y, qs.y), qs.z = fmaf(qr, s[i].z, qs.z);
      qs.w = fmaf(qr, s[i].w, qs.w);
    }
    part[0][rg][cq] = zk, part[1][rg][cq] = zq, part[2][rg][cq] = qs;
    __syncthreads();
    if (tok > 0 && NC > 1) cluster_wait();  // every peer has read the previous token's cpart
    if (owner) {
      cpart[0][tid] = column_sum(part[0], tid), cpart[1][tid] = column_sum(part[1], tid);
      cpart[2][tid] = column_sum(part[2], tid);
    }
    if (NC > 1) {
      cluster_arrive();
      cluster_wait();
    } else {
      __syncthreads();
    }

    // Column owners: z, q W and q S of column tid over the cluster (rank order: identical in
    // every CTA), then the two LayerNorms over the head.
    float z = 0.f, zqv = 0.f, qsv = 0.f, qd = 0.f, target = 0.f, qk = 0.f;
    if (owner) {
      float a[NC][3];
#pragma unroll
      for (int r = 0; r < NC; ++r) {
        const float* pc = peer(&cpart[0][0], r, NC);
        a[r][0] = pc[tid], a[r][1] = pc[HD + tid], a[r][2] = pc[2 * HD + tid];
      }
#pragma unroll
      for (int r = 0; r < NC; ++r) z += a[r][0], zqv += a[r][1], qsv += a[r][2];
      // The carry of the running sums enters only mid mini-batch (the host's rule).
      z += bias, zqv += bias, qsv = pp > 0 ? qsv + sb : 0.f;
      qd = qv[tid];
      target = vv[tid] - kv[tid];
      qk = qd * kv[tid];
    }
    if (NC > 1) cluster_arrive();  // this CTA is done with its peers' cpart
    const Welford st = owner_stats<HD>(z, qk, red[0]);
    const float mu = st.mean, rstd = 1.f / sqrtf(st.m2 / fh + p.eps);
    const float xh = (z - mu) * rstd, gh = (gam * xh + bet - target) * gam;
    float sg = owner ? gh : 0.f, sgz = owner ? gh * xh : 0.f;
    owner_sum2<HD>(sg, sgz, red[1]);
    const float g = (fh * gh - sg - xh * sgz) * (rstd / fh);
    const float zb = zqv - tau * (qsv + lr * (qk + 1.f) * g);
    if (owner) gvec[tid] = g;
    float unused = 0.f;
    const Welford sb2 = owner_stats<HD>(zb, unused, red[2]);  // its barrier also publishes gvec
    if (owner) {
      const float rb = 1.f / sqrtf(sb2.m2 / fh + p.eps);
      last_out = qd + (gam * ((zb - sb2.mean) * rb) + bet);
      if (mine) out_row(p, b, h, tok)[tid] = last_out;
      sb += lr * g;
      if (complete) bias -= tl * sb, sb = 0.f;
    }

    // S += lr kᵀ g on the values this thread holds; the mini-batch end moves W.
    const float4 gv = *reinterpret_cast<const float4*>(gvec + c);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const float a = lr * kv[r0 + i];
      s[i].x = fmaf(a, gv.x, s[i].x), s[i].y = fmaf(a, gv.y, s[i].y), s[i].z = fmaf(a, gv.z, s[i].z);
      s[i].w = fmaf(a, gv.w, s[i].w);
      if (complete) {
        w[i].x -= tl * s[i].x, w[i].y -= tl * s[i].y, w[i].z -= tl * s[i].z, w[i].w -= tl * s[i].w;
        s[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    pp = complete ? 0 : pp + 1;
    if (tok + 1 < p.L) __syncthreads();  // the next token rewrites the shared vectors
  }

  if constexpr (kFused) {
    // post_norm over the item's C = nh HD outputs. Each CTA publishes the Welford statistics
    // of the columns it wrote (one warp's 32 columns); the item's last CTA to finish merges
    // them in a fixed order and normalises the row in one pass. The counter goes before the
    // state stores, so its fence waits for the output row only.
    constexpr int per = HD / NC;  // columns per CTA: one warp
    static_assert(per == 32, "one warp of output columns per CTA");
    const int slot = h * NC + rank, slots = p.nh * NC;
    if (tid / 32 == rank) {  // the warp of this CTA's columns (p.L == 1: last_out is the row)
      Welford wv{1.f, last_out, 0.f};
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) wv = merge(wv, shfl_xor(wv, off));
      if ((tid & 31) == 0) {
        dp.scratch[(int64_t(b) * slots + slot) * 2] = wv.mean;
        dp.scratch[(int64_t(b) * slots + slot) * 2 + 1] = wv.m2;
      }
    }
    __threadfence();
    __syncthreads();
    if (tid == 0) misc[1] = float(atomicAdd(dp.counters + b, 1) == slots - 1);
    __syncthreads();
    if (misc[1] != 0.f) {
      __threadfence();
      // Merge the partials in a fixed tree (strided per thread, lanes, then warps in order).
      constexpr int NWT = NTH / 32;
      __shared__ float wred[NWT][3];
      Welford acc{0.f, 0.f, 0.f};
      for (int i = tid; i < slots; i += NTH)
        acc = merge(acc, Welford{32.f, __ldcg(dp.scratch + (int64_t(b) * slots + i) * 2),
                                 __ldcg(dp.scratch + (int64_t(b) * slots + i) * 2 + 1)});
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) acc = merge(acc, shfl_xor(acc, off));
      if ((tid & 31) == 0) wred[tid >> 5][0] = acc.n, wred[tid >> 5][1] = acc.mean, wred[tid >> 5][2] = acc.m2;
      __syncthreads();
      Welford tot{0.f, 0.f, 0.f};
#pragma unroll
      for (int wi = 0; wi < NWT; ++wi) tot = merge(tot, Welford{wred[wi][0], wred[wi][1], wred[wi][2]});
      const int64_t C = int64_t(p.nh) * HD;
      const float mu = tot.mean, rstd = 1.f / sqrtf(tot.m2 / float(C) + dp.pn_eps);
      const float* orow = out_row(p, b, 0, 0);  // token-major: the item's row of C floats
      for (int64_t j = tid; j < C; j += NTH) {
        float v = (__ldcg(orow + j) - mu) * rstd;
        v *= dp.pn_w[j];
        v += dp.pn_b[j];
        dp.y[b * C + j] = from_f32<T>(v);
      }
      if (tid == 0) dp.counters[b] = 0;
    }
  }

  if (commit) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      *reinterpret_cast<float4*>(Wg + (r0 + i) * HD + c) = w[i];
      *reinterpret_cast<float4*>(Sg + (r0 + i) * HD + c) = s[i];
    }
    if (mine) bg[tid] = bias, Sbg[tid] = sb;
  }

  if (NC > 1) cluster_wait();  // peers may still read this CTA's cpart
}

// ---- TTT-MLP decode ---------------------------------------------------------------------------
// One token, f = 128, a cluster of F / 128 CTAs per (b, h), CTA r owning hidden units
// [128 r, 128 r + 128): its columns of W1 / S1 and rows of W2 / S2. The state is too large to
// hold (512 KB per head at F = 512), so each matrix slice streams through registers once per
// pass that needs it (thread (row group rg, column quad cq): 16 rows x 4 columns, 16-byte
// loads along the rows); the re-reads hit L2. Passes:
//   A  z1 = k W1 + b1, q W1, q S1 over the slice; a = gelu(z1)
//   B  partial a W2 -> cluster sum: z2; G2 = ln_fused_l2_bwd(z2, v - k)
//   C  g1 = (G2 W2ᵀ) ⊙ gelu'(z1); z̄1 = q W1 + b1 - τ (q S1 + Sb1 + lr (q·k + 1) g1); ā = gelu(z̄1)
//   D  partial ā W2 - τ ā S2 and ā·a -> cluster sum: z̄2 = ... - τ (Sb2 + lr (ā·a + 1) G2)
//   E  S1 += lr kᵀ g1, S2 += lr aᵀ G2 (and the mini-batch end), stored once.
struct MlpDecodeLayout {
  static constexpr int HD = 128, FH = 128, CQ = 32, RG = 8, RPT = 16, THREADS = 256, MAX_NC = 4;
};

__device__ __forceinline__ float4 ld4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ void st4(float* p, float4 v) { *reinterpret_cast<float4*>(p) = v; }
__device__ __forceinline__ void fma4(float4& acc, float a, float4 w) {
  acc.x = fmaf(a, w.x, acc.x), acc.y = fmaf(a, w.y, acc.y), acc.z = fmaf(a, w.z, acc.z), acc.w = fmaf(a, w.w, acc.w);
}

__global__ void __launch_bounds__(MlpDecodeLayout::THREADS) ttt_mlp_decode_kernel(const InnerParams p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  using Lay = MlpDecodeLayout;
  constexpr int HD = Lay::HD, FH = Lay::FH, CQ = Lay::CQ, RG = Lay::RG, RPT = Lay::RPT;
  __shared__ float4 part[3][RG][CQ];
  __shared__ float gpart[FH][CQ + 1];
  __shared__ float qv[HD], kv[HD], vv[HD], avec[FH], abar[FH], g1v[FH], g2v[HD];
  __shared__ __align__(16) float cp1[HD], cp2[HD + 4];  // partials read by the cluster
  __shared__ float red[4][4 * (HD / 32)];
  __shared__ float misc[4];
  const int nc = p.nc, rank = cluster_rank(nc);
  const int tid = threadIdx.x, cq = tid % CQ, rg = tid / CQ, c = 4 * cq, r0 = rg * RPT;
  const int64_t bh = blockIdx.x / nc;
  const int b = int(bh / p.nh), h = int(bh % p.nh), K = p.K, F = p.F, c0 = rank * FH;
  float* W1g = p.W1 + bh * HD * F + c0;  // [in][F] from this CTA's first hidden unit
  float* S1g = p.S1 + bh * HD * F + c0;
  float* W2g = p.W2 + (bh * F + c0) * HD;  // [hidden][out] from this CTA's first hidden unit
  float* S2g = p.S2 + (bh * F + c0) * HD;
  const bool owner = tid < HD, commit = item_commit(p, b);
  const int pp = item_phase(p, b);
  const bool carry = pp > 0, complete = pp + 1 == K;
  const int64_t row = bh * p.L;  // L = 1
  if (owner) qv[tid] = p.xq[row * HD + tid], kv[tid] = p.xk[row * HD + tid], vv[tid] = p.xv[row * HD + tid];
  if (tid == HD) misc[0] = p.lr[row];
  float b1 = 0.f, sb1 = 0.f, b2 = 0.f, sb2 = 0.f, gam = 0.f, bet = 0.f;
  if (owner) {
    b1 = p.b1[bh * F + c0 + tid], sb1 = p.Sb1[bh * F + c0 + tid];
    b2 = p.b2[bh * HD + tid], sb2 = p.Sb2[bh * HD + tid];
    gam = p.ln_w[h * HD + tid], bet = p.ln_b[h * HD + tid];
  }
  const float tau = p.tau[pp], tl = p.tau[K - 1], fh = float(HD);
  __syncthreads();
  const float lr = misc[0];

  // A: layer 1 on both paths over the slice.
  {
    float4 z = make_float4(0.f, 0.f, 0.f, 0.f), zq = z, qs = z;
#pragma unroll 4
    for (int i = 0; i < RPT; ++i) {
      const int r = r0 + i;
      const float4 w = ld4(W1g + r * F + c);
      fma4(z, kv[r], w);
      fma4(zq, qv[r], w);
      if (carry) fma4(qs, qv[r], ld4(S1g + r * F + c));
    }
    part[0][rg][cq] = z, part[1][rg][cq] = zq, part[2][rg][cq] = qs;
  }
  __syncthreads();
  float z1 = 0.f, zq1 = 0.f, qs1 = 0.f, da = 0.f, a1 = 0.f;
  if (owner) {
    z1 = column_sum(part[0], tid), zq1 = column_sum(part[1], tid), qs1 = column_sum(part[2], tid);
    z1 += b1, zq1 += b1, qs1 = carry ? qs1 + sb1 : 0.f;
    a1 = gelu(z1), da = gelu_tanh_bwd(z1);
    avec[tid] = a1;
  }
  __syncthreads();

  // B: this CTA's part of a W2, summed over the cluster; G2.
  {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int i = 0; i < RPT; ++i) fma4(acc, avec[r0 + i], ld4(W2g + (r0 + i) * HD + c));
    part[0][rg][cq] = acc;
  }
  __syncthreads();
  if (owner) {
    cp1[tid] = column_sum(part[0], tid);
  }
  cluster_sync(nc);
  float z2 = 0.f, target = 0.f, qk = 0.f;
  if (owner) {
    float v[Lay::MAX_NC];
#pragma unroll
    for (int r = 0; r < Lay::MAX_NC; ++r) v[r] = r < nc ? peer(cp1, r, nc)[tid] : 0.f;
#pragma unroll
    for (int r = 0; r < Lay::MAX_NC; ++r)
      if (r < nc) z2 += v[r];
    z2 += b2;
    target = vv[tid] - kv[tid];
    qk = qv[tid] * kv[tid];
  }
  const Welford st = owner_stats<HD>(z2, qk, red[0]);
  const float mu = st.mean, rstd = 1.f / sqrtf(st.m2 / fh + p.eps);
  const float xh = (z2 - mu) * rstd, gh = (gam * xh + bet - target) * gam;
  float sg = owner ? gh : 0.f, sgz = owner ? gh * xh : 0.f;
  owner_sum2<HD>(sg, sgz, red[1]);
  const float g2 = (fh * gh - sg - xh * sgz) * (rstd / fh);
  if (owner) g2v[tid] = g2;
  __syncthreads();

  // C: g1 = (G2 W2ᵀ) ⊙ gelu'(z1) (row dot products, reduced through shared memory); ā.
  {
    const float4 gq = ld4(g2v + c);
#pragma unroll 4
    for (int i = 0; i < RPT; ++i) {
      const float4 w = ld4(W2g + (r0 + i) * HD + c);
      gpart[r0 + i][cq] = gq.x * w.x + gq.y * w.y + gq.z * w.z + gq.w * w.w;
    }
  }
  __syncthreads();
  float g1 = 0.f, ab = 0.f;
  if (owner) {
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < CQ; ++j) v += gpart[tid][j];
    g1 = v * da;
    const float zb1 = zq1 - tau * (qs1 + lr * (qk + 1.f) * g1);
    ab = gelu(zb1);
    abar[tid] = ab, g1v[tid] = g1;
  }
  float aa = owner ? ab * a1 : 0.f, unused = 0.f;
  owner_sum2<HD>(aa, unused, red[2]);  // its barrier publishes abar and g1v

  // D: this CTA's part of ā W2 - τ ā S2 and of ā·a, summed over the cluster; out.
  {
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 4
    for (int i = 0; i < RPT; ++i) {
      const int r = r0 + i;
      fma4(acc, abar[r], ld4(W2g + r * HD + c));
      if (carry) fma4(acc, -tau * abar[r], ld4(S2g + r * HD + c));
    }
    part[0][rg][cq] = acc;
  }
  __syncthreads();
  if (owner) {
    cp2[tid] = column_sum(part[0], tid);
    if (tid == 0) cp2[HD] = aa;
  }
  cluster_sync(nc);  // also: every CTA is done with cp1
  float zb2 = 0.f;
  if (owner) {
    float v[Lay::MAX_NC], w[Lay::MAX_NC];
#pragma unroll
    for (int r = 0; r < Lay::MAX_NC; ++r) {
      v[r] = r < nc ? peer(cp2, r, nc)[tid] : 0.f;
      w[r] = r < nc ? peer(cp2, r, nc)[HD] : 0.f;
    }
    float aat = 0.f;
#pragma unroll
    for (int r = 0; r < Lay::MAX_NC; ++r)
      if (r < nc) zb2 += v[r], aat += w[r];
    zb2 += b2 - tau * ((carry ? sb2 : 0.f) + lr * (aat + 1.f) * g2);
  }
  const Welford so = owner_stats<HD>(zb2, unused, red[3]);
  if (owner && tid / (HD / nc) == rank) {
    const float ro = 1.f / sqrtf(so.m2 / fh + p.eps);
    out_row(p, b, h, 0)[tid] = qv[tid] + (gam * ((zb2 - so.mean) * ro) + bet);
  }

  // E: the running sums (always accumulated onto what is stored) and the mini-batch end.
  if (commit) {
    const float4 gq1 = ld4(g1v + c), gq2 = ld4(g2v + c);
#pragma unroll 4
    for (int i = 0; i < RPT; ++i) {
      const int r = r0 + i;
      float4 sv = ld4(S1g + r * F + c);
      fma4(sv, lr * kv[r], gq1);
      if (complete) {
        float4 w = ld4(W1g + r * F + c);
        w.x -= tl * sv.x, w.y -= tl * sv.y, w.z -= tl * sv.z, w.w -= tl * sv.w;
        st4(W1g + r * F + c, w);
        sv = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      st4(S1g + r * F + c, sv);
      float4 s2 = ld4(S2g + r * HD + c);
      fma4(s2, lr * avec[r], gq2);
      if (complete) {
        float4 w = ld4(W2g + r * HD + c);
        w.x -= tl * s2.x, w.y -= tl * s2.y, w.z -= tl * s2.z, w.w -= tl * s2.w;
        st4(W2g + r * HD + c, w);
        s2 = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      st4(S2g + r * HD + c, s2);
    }
    if (owner) {
      sb1 += lr * g1, sb2 += lr * g2;
      if (complete) b1 -= tl * sb1, sb1 = 0.f, b2 -= tl * sb2, sb2 = 0.f;
      p.b1[bh * F + c0 + tid] = b1, p.Sb1[bh * F + c0 + tid] = sb1;
      if (rank == 0) p.b2[bh * HD + tid] = b2, p.Sb2[bh * HD + tid] = sb2;
    }
  }
  cluster_sync(nc);  // peers may still read this CTA's cp2
}

}  // namespace ttt::layers::cuda_kernels::decode
