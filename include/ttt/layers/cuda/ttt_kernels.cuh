#pragma once
// TttKernels<Cuda> definitions (nvcc only; ttt/cuda.cuh includes this once per program).
//
// The inner loop (contract: ttt/layers/ttt_kernels.hpp; semantics: ttt_kernels_cpu.hpp).
// Grid: one thread-block cluster of nc CTAs per (b, h), blockIdx.x = (b * nh + h) * nc + rank.
// Each cluster runs that head's whole call: the segments (cut at mini-batch boundaries, the
// first at the item's phase) one after the other, so decode is one launch per token and a
// prefill of L tokens is one launch. CTA `rank` owns the column slice
// [rank Fc, (rank+1) Fc), Fc = F / nc, of W1 / S1 / b1 / Sb1 and, for TTT-MLP, the same rows
// of W2 / S2; these live in shared memory from the first token to the last and go back to
// global memory once, at the end, for items that commit. Everything is fp32 FMA (the tests
// compare with the host within 1e-5).
//
// Per segment of n <= K tokens (R = rows of the segment buffers, rows >= n held at zero):
//   linear:  ZZ = [Q; K] W + b (the query and key paths, one product); attnᵀ = η ⊙ (K Qᵀ + 1);
//            cluster sync; each CTA reads the full key rows Z of its peers (DSMEM) for the
//            LayerNorm statistics and forms G for its columns; z̄ = ZZ_q − τ(Q S + Sb) − attn G;
//            S += (lr K)ᵀ G, and at the mini-batch end W −= τ_{K-1} S, S = 0 (fused in the
//            product's epilogue); cluster sync; out = q + LN(z̄) with the rows split over CTAs.
//   mlp:     the same for layer 1 on the CTA's hidden slice; layer 2's products over the hidden
//            dimension are partial sums per CTA (Z2, Ab W2, Ab A1ᵀ) that every CTA adds up in
//            rank order from its peers' shared memory, so all CTAs hold identical Z2 / G2.
// Buffers written by one CTA and read by its peers are next written only after a later
// cluster barrier that every reader has passed (linear alternates two ZZ buffers for that).
//
// Products are block-wide FMA tiles: A is kept transposed in shared memory (one 16-byte load
// gives a thread its TM rows), B row-major (16-byte loads of 4 columns); a warp covers a
// 4 x 8 grid of tiles where the shape allows, so both loads are single shared-memory
// wavefronts. The epilogue is a per-element functor (bias, GELU, masks, state updates).
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/kernels.cuh"
#include "ttt/layers/cuda/ttt_inner_common.cuh"
#include "ttt/layers/cuda/ttt_decode.cuh"
#include "ttt/layers/cuda/ttt_kernels.hpp"
#include "ttt/layers/cuda/ttt_mma.cuh"

namespace ttt::layers {
namespace cuda_detail {

// ---- TTT-Linear ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) ttt_linear_kernel(const InnerParams p) {
  float* sm = dynamic_smem();
  const int nc = p.nc, rank = cluster_rank(nc);
  const int64_t bh = blockIdx.x / nc;
  const int b = int(bh / p.nh), h = int(bh % p.nh);
  const int f = p.f, F = p.F, Fc = p.Fc, c0 = rank * Fc, K = p.K, R = p.R, R2 = 2 * R;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* W = sm + p.sm.W1;      // [f, Fc]
  float* S = sm + p.sm.S1;      // [f, Fc]
  float* bias = sm + p.sm.b1;   // [Fc]
  float* Sb = sm + p.sm.Sb1;    // [Fc]
  float* tau = sm + p.sm.tau;   // [K]
  float* gam = sm + p.sm.gam;   // [f]
  float* bet = sm + p.sm.bet;   // [f]
  float* QKt = sm + p.sm.QKt;   // [f, 2R]
  float* lrK = sm + p.sm.lrK;   // [R, f]
  float* T = sm + p.sm.T;       // [R, f]
  float* lrv = sm + p.sm.lrv;   // [R]
  float* G = sm + p.sm.G;       // [R, Fc]
  float* attn = sm + p.sm.attn; // [R, R]
  float* row = sm + p.sm.rowbuf + warp * f;
  float* Wg = p.W1 + bh * f * F + c0;
  float* Sg = p.S1 + bh * f * F + c0;
  float* bg = p.b1 + bh * F + c0;
  float* Sbg = p.Sb1 + bh * F + c0;

  copy_tile(W, Fc, Wg, F, f, Fc);
  copy_tile(S, Fc, Sg, F, f, Fc);
  copy_vec(bias, bg, Fc);
  copy_vec(Sb, Sbg, Fc);
  copy_vec(tau, p.tau, K);
  copy_vec(gam, p.ln_w + h * f, f);
  copy_vec(bet, p.ln_b + h * f, f);
  const bool commit = item_commit(p, b);
  const float tl = p.tau[K - 1];

  int pp = item_phase(p, b), buf = 0;
  for (int64_t t0 = 0; t0 < p.L;) {
    const int n = int(min64(p.L - t0, K - pp));
    const int64_t row0 = bh * p.L + t0;
    const bool complete = pp + n == K;
    float* ZZ = sm + p.sm.ZZ + buf * R2 * Fc;  // [2R, Fc]
    load_segment(p, row0, n, QKt, lrK, T, lrv);
    __syncthreads();

    // Query and key paths at the mini-batch-start weights; the masked attention.
    gemm(R2, Fc, f, QKt, R2, W, Fc, [&](int m, int c, float v) { ZZ[m * Fc + c] = v + bias[c]; });
    gemm(R, R, f, QKt + R, R2, QKt, R2, [&](int j, int i, float v) {
      attn[j * R + i] = (j <= i && i < n) ? tau[pp + i] * lrv[j] * (v + 1.f) : 0.f;
    });
    cluster_sync(nc);

    // G on this CTA's columns; the row statistics need the whole key rows of the cluster.
    for (int i = warp; i < n; i += kWarps) {
      gather_row(row, F, [&](int j) {
        const int s = j / Fc;
        return peer(ZZ, s, nc)[(R + i) * Fc + (j - s * Fc)];
      });
      __syncwarp();
      const LnBwd lb = ln_bwd_row(row, T + i * f, gam, bet, F, p.eps);
      for (int c = lane; c < Fc; c += 32) G[i * Fc + c] = lb.grad(c0 + c, row, T + i * f, gam, bet, F);
      __syncwarp();
    }
    __syncthreads();

    // z̄ = Q W + b − τ (Q S + Sb) − attn G on this CTA's columns.
    if (pp > 0) {
      gemm(R, Fc, f, QKt, R2, S, Fc, [&](int i, int c, float v) {
        if (i < n) ZZ[i * Fc + c] -= tau[pp + i] * (v + Sb[c]);
      });
      __syncthreads();
    }
    gemm(R, Fc, n, attn, R, G, Fc, [&](int i, int c, float v) { ZZ[i * Fc + c] -= v; });
    // Running sums; the mini-batch end moves the weights (W is not read again this segment).
    gemm(f, Fc, n, lrK, f, G, Fc, [&](int d, int c, float v) {
      const float s = S[d * Fc + c] + v;
      if (complete) {
        W[d * Fc + c] -= tl * s;
        S[d * Fc + c] = 0.f;
      } else {
        S[d * Fc + c] = s;
      }
    });
    for (int c = threadIdx.x; c < Fc; c += kThreads) {
      float s = Sb[c];
      for (int j = 0; j < n; ++j) s += lrv[j] * G[j * Fc + c];
      if (complete) {
        bias[c] -= tl * s;
        Sb[c] = 0.f;
      } else {
        Sb[c] = s;
      }
    }
    cluster_sync(nc);

    // out = q + LN(z̄): rows split over the cluster, whole rows gathered from the peers.
    for (int i = rank + nc * warp; i < n; i += nc * kWarps) {
      gather_row(row, F, [&](int j) {
        const int s = j / Fc;
        return peer(ZZ, s, nc)[i * Fc + (j - s * Fc)];
      });
      __syncwarp();
      residual_ln_row(out_row(p, b, h, t0 + i), p.xq + (row0 + i) * f, row, gam, bet, F, p.eps);
      __syncwarp();
    }
    t0 += n;
    pp = complete ? 0 : pp + n;
    buf ^= 1;
    __syncthreads();
  }

  if (commit) {
    copy_tile(Wg, F, W, Fc, f, Fc);
    copy_tile(Sg, F, S, Fc, f, Fc);
    copy_vec(bg, bias, Fc);
    copy_vec(Sbg, Sb, Fc);
  }
  cluster_sync(nc);  // peers may still read this CTA's shared memory
}

// ---- TTT-MLP ------------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) ttt_mlp_kernel(const InnerParams p) {
  float* sm = dynamic_smem();
  const int nc = p.nc, rank = cluster_rank(nc);
  const int64_t bh = blockIdx.x / nc;
  const int b = int(bh / p.nh), h = int(bh % p.nh);
  const int f = p.f, F = p.F, Fc = p.Fc, c0 = rank * Fc, K = p.K, R = p.R, R2 = 2 * R;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* W1 = sm + p.sm.W1;        // [f, Fc]
  float* S1 = sm + p.sm.S1;        // [f, Fc]
  float* b1 = sm + p.sm.b1;        // [Fc]
  float* Sb1 = sm + p.sm.Sb1;      // [Fc]
  float* W2 = sm + p.sm.W2;        // [Fc, f]
  float* S2 = sm + p.sm.S2;        // [Fc, f]
  float* b2 = sm + p.sm.b2;        // [f]
  float* Sb2 = sm + p.sm.Sb2;      // [f]
  float* tau = sm + p.sm.tau;      // [K]
  float* gam = sm + p.sm.gam;      // [f]
  float* bet = sm + p.sm.bet;      // [f]
  float* QKt = sm + p.sm.QKt;      // [f, 2R]
  float* lrK = sm + p.sm.lrK;      // [R, f]
  float* T = sm + p.sm.T;          // [R, f]
  float* AbT = sm + p.sm.T;        // [Fc, R] (after T is consumed)
  float* lrv = sm + p.sm.lrv;      // [R]
  float* ZZ = sm + p.sm.ZZ;        // [2R, Fc]
  float* G1 = sm + p.sm.G;         // [R, Fc]
  float* attn1 = sm + p.sm.attn;   // [R, R]
  float* A1T = sm + p.sm.A1T;      // [Fc, R]
  float* lrA1 = sm + p.sm.lrA1;    // [R, Fc]
  float* P1 = sm + p.sm.P1;        // [R, f]
  float* G2 = sm + p.sm.G2;        // [R, f]
  float* G2T = sm + p.sm.G2T;      // [f, R]
  float* Zb2 = sm + p.sm.G2T;      // [R, f] (after G2T is consumed)
  float* P2 = sm + p.sm.P2;        // [R, R]
  float* P2z = P2 + R * R;         // [R, f]
  float* attn2 = sm + p.sm.attn2;  // [R, R]
  float* row = sm + p.sm.rowbuf + warp * f;
  float* W1g = p.W1 + bh * f * F + c0;
  float* S1g = p.S1 + bh * f * F + c0;
  float* b1g = p.b1 + bh * F + c0;
  float* Sb1g = p.Sb1 + bh * F + c0;
  float* W2g = p.W2 + (bh * F + c0) * f;
  float* S2g = p.S2 + (bh * F + c0) * f;
  float* b2g = p.b2 + bh * f;
  float* Sb2g = p.Sb2 + bh * f;

  copy_tile(W1, Fc, W1g, F, f, Fc);
  copy_tile(S1, Fc, S1g, F, f, Fc);
  copy_tile(W2, f, W2g, f, Fc, f);
  copy_tile(S2, f, S2g, f, Fc, f);
  copy_vec(b1, b1g, Fc);
  copy_vec(Sb1, Sb1g, Fc);
  copy_vec(b2, b2g, f);
  copy_vec(Sb2, Sb2g, f);
  copy_vec(tau, p.tau, K);
  copy_vec(gam, p.ln_w + h * f, f);
  copy_vec(bet, p.ln_b + h * f, f);
  const bool commit = item_commit(p, b);
  const float tl = p.tau[K - 1];

  int pp = item_phase(p, b);
  for (int64_t t0 = 0; t0 < p.L;) {
    const int n = int(min64(p.L - t0, K - pp));
    const int64_t row0 = bh * p.L + t0;
    const bool complete = pp + n == K;
    load_segment(p, row0, n, QKt, lrK, T, lrv);
    __syncthreads();

    // Layer 1 on both paths (this CTA's hidden slice); gelu of the key path.
    gemm(R2, Fc, f, QKt, R2, W1, Fc, [&](int m, int c, float v) {
      const float z = v + b1[c];
      ZZ[m * Fc + c] = z;
      if (m >= R) {
        const int j = m - R;
        const float a = gelu(z);
        A1T[c * R + j] = a;
        lrA1[j * Fc + c] = lrv[j] * a;
      }
    });
    gemm(R, R, f, QKt + R, R2, QKt, R2, [&](int j, int i, float v) {
      attn1[j * R + i] = (j <= i && i < n) ? tau[pp + i] * lrv[j] * (v + 1.f) : 0.f;
    });
    __syncthreads();

    // This CTA's part of Z2 = gelu(Z1) W2 (summed over the cluster below).
    gemm(R, f, Fc, A1T, R, W2, f, [&](int i, int d, float v) { P1[i * f + d] = v; });
    cluster_sync(nc);

    // G2 = ln_fused_l2_bwd(Z2, v − k), whole rows, identical in every CTA.
    for (int i = warp; i < n; i += kWarps) {
      for (int d = lane; d < f; d += 32)
        row[d] = peer_sum(b2[d], nc, [&](int s) { return peer(P1, s, nc)[i * f + d]; });
      __syncwarp();
      const LnBwd lb = ln_bwd_row(row, T + i * f, gam, bet, f, p.eps);
      for (int d = lane; d < f; d += 32) {
        const float g = lb.grad(d, row, T + i * f, gam, bet, f);
        G2[i * f + d] = g;
        G2T[d * R + i] = g;
      }
      __syncwarp();
    }
    for (int e = threadIdx.x; e < (R - n) * f; e += kThreads) {
      const int i = n + e / f, d = e % f;
      G2[i * f + d] = 0.f;
      G2T[d * R + i] = 0.f;
    }
    __syncthreads();

    // G1 = (G2 W2ᵀ) ⊙ gelu'(Z1); the carry of the running sums into the query path.
    gemm<true>(R, Fc, f, G2T, R, W2, f, [&](int i, int c, float v) {
      G1[i * Fc + c] = v * gelu_tanh_bwd(ZZ[(R + i) * Fc + c]);
    });
    if (pp > 0) {
      gemm(R, Fc, f, QKt, R2, S1, Fc, [&](int i, int c, float v) {
        if (i < n) ZZ[i * Fc + c] -= tau[pp + i] * (v + Sb1[c]);
      });
    }
    __syncthreads();

    // Ab = gelu(z̄1) (transposed, over the consumed target); layer 1's sums and commit.
    gemm(R, Fc, n, attn1, R, G1, Fc, [&](int i, int c, float v) { AbT[c * R + i] = gelu(ZZ[i * Fc + c] - v); });
    gemm(f, Fc, n, lrK, f, G1, Fc, [&](int d, int c, float v) {
      const float s = S1[d * Fc + c] + v;
      if (complete) {
        W1[d * Fc + c] -= tl * s;
        S1[d * Fc + c] = 0.f;
      } else {
        S1[d * Fc + c] = s;
      }
    });
    for (int c = threadIdx.x; c < Fc; c += kThreads) {
      float s = Sb1[c];
      for (int j = 0; j < n; ++j) s += lrv[j] * G1[j * Fc + c];
      if (complete) {
        b1[c] -= tl * s;
        Sb1[c] = 0.f;
      } else {
        Sb1[c] = s;
      }
    }
    __syncthreads();

    // This CTA's parts of Ab A1ᵀ and of Ab W2 − τ Ab S2.
    gemm(R, R, Fc, A1T, R, AbT, R, [&](int j, int i, float v) { P2[j * R + i] = v; });
    gemm(R, f, Fc, AbT, R, W2, f, [&](int i, int d, float v) { P2z[i * f + d] = v; });
    if (pp > 0) {
      __syncthreads();
      gemm(R, f, Fc, AbT, R, S2, f, [&](int i, int d, float v) {
        if (i < n) P2z[i * f + d] -= tau[pp + i] * v;
      });
    }
    cluster_sync(nc);

    for (int e = threadIdx.x; e < R * R; e += kThreads) {
      const int j = e / R, i = e - j * R;
      float v = 0.f;
      if (j <= i && i < n) {
        const float a = peer_sum(0.f, nc, [&](int s) { return peer(P2, s, nc)[e]; });
        v = tau[pp + i] * lrv[j] * (a + 1.f);
      }
      attn2[e] = v;
    }
    __syncthreads();

    // z̄2 = Ab W2 + b2 − τ (Ab S2 + Sb2) − attn2 G2; layer 2's sums and commit.
    gemm(R, f, n, attn2, R, G2, f, [&](int i, int d, float v) {
      if (i < n) {
        const float z0 = pp > 0 ? b2[d] - tau[pp + i] * Sb2[d] : b2[d];
        Zb2[i * f + d] = peer_sum(z0, nc, [&](int s) { return peer(P2z, s, nc)[i * f + d]; }) - v;
      }
    });
    gemm(Fc, f, n, lrA1, Fc, G2, f, [&](int e, int d, float v) {
      const float s = S2[e * f + d] + v;
      if (complete) {
        W2[e * f + d] -= tl * s;
        S2[e * f + d] = 0.f;
      } else {
        S2[e * f + d] = s;
      }
    });
    __syncthreads();
    for (int d = threadIdx.x; d < f; d += kThreads) {
      float s = Sb2[d];
      for (int j = 0; j < n; ++j) s += lrv[j] * G2[j * f + d];
      if (complete) {
        b2[d] -= tl * s;
        Sb2[d] = 0.f;
      } else {
        Sb2[d] = s;
      }
    }
    for (int i = rank + nc * warp; i < n; i += nc * kWarps)
      residual_ln_row(out_row(p, b, h, t0 + i), p.xq + (row0 + i) * f, Zb2 + i * f, gam, bet, f, p.eps);
    t0 += n;
    pp = complete ? 0 : pp + n;
    __syncthreads();
  }

  if (commit) {
    copy_tile(W1g, F, W1, Fc, f, Fc);
    copy_tile(S1g, F, S1, Fc, f, Fc);
    copy_tile(W2g, f, W2, f, Fc, f);
    copy_tile(S2g, f, S2, f, Fc, f);
    copy_vec(b1g, b1, Fc);
    copy_vec(Sb1g, Sb1, Fc);
    if (rank == 0) {
      copy_vec(b2g, b2, f);
      copy_vec(Sb2g, Sb2, f);
    }
  }
  cluster_sync(nc);  // peers may still read this CTA's shared memory
}

// ---- causal conv, l2_normalize, ln_target ------------------------------------------------

struct ConvParams {
  const float* x;   // [B, L, C]
  float* hist;      // [B, C, kc]
  const float* wq;  // [C, kc]
  const float* bq;  // [C]
  const float* wk;
  const float* bk;
  float* oq;  // [B, L, C]
  float* ok;
  int64_t B, L, C;
  int kc;
  const uint8_t* commit;  // [B] or null (every item commits)
};

struct FlagsParams {
  const int64_t* pos;  // [B, L] with strides ps
  int64_t ps0, ps1;
  const uint8_t* exec;  // [B] or null
  int64_t* out;         // [B, L] contiguous
  int32_t* phase;       // [B] or null
  uint8_t* commit;      // [B] or null
  int64_t B, L, add, mod;
};

__global__ void __launch_bounds__(256) call_flags_kernel(const FlagsParams p) {
  const int64_t n = p.B * p.L;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / p.L, t = idx % p.L;
    int64_t v = p.pos[b * p.ps0 + t * p.ps1] + p.add;
    if (p.mod > 0) v = ((v % p.mod) + p.mod) % p.mod;
    p.out[idx] = v;
    if (t == 0) {
      if (p.phase) p.phase[b] = int32_t(v);
      if (p.commit) p.commit[b] = p.exec ? uint8_t(p.exec[b] != 0) : uint8_t(1);
    }
  }
}

__global__ void __launch_bounds__(256) causal_conv_kernel(const ConvParams p) {
  const int64_t n = p.B * p.L * p.C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = idx % p.C, bt = idx / p.C, t = bt % p.L, b = bt / p.L;
    const float* hist = p.hist + (b * p.C + c) * p.kc;
    float aq = p.bq[c], ak = p.bk[c];
    for (int m = 0; m < p.kc; ++m) {
      const int64_t src = t - p.kc + 1 + m;  // < 0: from the history, hist[kc + src]
      const float xv = src >= 0 ? p.x[(b * p.L + src) * p.C + c] : hist[p.kc + src];
      aq += p.wq[c * p.kc + m] * xv;
      ak += p.wk[c * p.kc + m] * xv;
    }
    p.oq[idx] = aq;
    p.ok[idx] = ak;
  }
}

// The history of committing items becomes the last kc inputs of [history, x] (after the
// outputs have read the old one: a separate launch).
__global__ void __launch_bounds__(256) conv_history_kernel(const ConvParams p) {
  const int64_t n = p.B * p.C;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t b = idx / p.C, c = idx % p.C;
    if (p.commit && !p.commit[b]) continue;
    float* hist = p.hist + idx * p.kc;
    // Reads run ahead of writes (j + L >= j), so in-place is safe.
    for (int64_t j = 0; j < p.kc; ++j) {
      const int64_t s = p.L + j;  // index into [hist (kc), x (L)]
      hist[j] = s < p.kc ? hist[s] : p.x[(b * p.L + s - p.kc) * p.C + c];
    }
  }
}

struct RowsParams {
  float* x;  // rows of n elements: row r at Σ_d coord_d(r) * stride[d], element stride `inner`
  int64_t rows, n, inner;
  int64_t size[3], stride[3];  // outer dimensions, padded with 1 in front
};

__global__ void __launch_bounds__(256) l2_normalize_kernel(const RowsParams p) {
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); r < p.rows; r += int64_t(gridDim.x) * warps) {
    int64_t off = 0, rest = r;
    for (int d = 2; d >= 0; --d) {
      off += (rest % p.size[d]) * p.stride[d];
      rest /= p.size[d];
    }
    float* x = p.x + off;
    float ss = 0.f;
    for (int64_t j = lane; j < p.n; j += 32) ss += x[j * p.inner] * x[j * p.inner];
    ss = warp_sum(ss);
    const float inv = 1.f / fmaxf(sqrtf(ss), 1e-12f);
    for (int64_t j = lane; j < p.n; j += 32) x[j * p.inner] *= inv;
  }
}

struct LnTargetParams {
  float* v;        // [B, L, nh, f] contiguous
  const float* k;  // [B, L, nh, f] contiguous
  const float* w;  // [nh, f]
  const float* bias;
  int64_t rows;
  int nh, f;
  float eps;
};

__global__ void __launch_bounds__(256) ln_target_kernel(const LnTargetParams p) {
  const int warps = blockDim.x >> 5;
  for (int64_t r = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); r < p.rows; r += int64_t(gridDim.x) * warps) {
    const int h = int(r % p.nh), f = p.f;
    ln_target_row(p.v + r * f, p.k + r * f, p.w + h * f, p.bias + h * f, f, p.eps);
  }
}

// ---- prologue and post_norm ----------------------------------------------------------------

template <class T>
struct PrologueParams {
  const T* proj;  // [B, L, >= 3C + nh], strides proj_b, proj_t, last dimension dense
  int64_t proj_b, proj_t;
  const int64_t* pos;  // [B, L], strides pos_b, pos_t
  int64_t pos_b, pos_t;
  const uint8_t* exec;  // [B] or null
  const float* lr_bias;  // [nh]
  const float* ln_w;     // [nh, f]
  const float* ln_b;
  float* xq;  // [B, nh, L, f]
  float* xk;
  float* xv;
  float* lr;        // [B, nh, L]
  int32_t* phase;   // [B] or null
  uint8_t* commit;  // [B] or null
  int64_t B, L, K;
  int nh, f;
  float theta, lr_scale, ln_eps;
  int l2, ln_target;
};

// One warp per (b, t, h): the same arithmetic, in the same order, as the separate kernels it
// replaces (cast, l2_normalize_kernel, rope_kernel, ln_target_kernel, the lr's sigmoid).
template <class T>
__global__ void __launch_bounds__(256) prologue_kernel(const PrologueParams<T> p) {
  const int lane = threadIdx.x & 31, f = p.f, half = f / 2;
  const int64_t C = int64_t(p.nh) * f, n = p.B * p.L * p.nh;
  const int64_t step = (int64_t(gridDim.x) * blockDim.x) >> 5;
  for (int64_t w = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; w < n; w += step) {
    const int h = int(w % p.nh);
    const int64_t bt = w / p.nh, b = bt / p.L, t = bt % p.L;
    const T* row = p.proj + b * p.proj_b + t * p.proj_t;
    const T* rq = row + h * f;
    const T* rk = row + C + h * f;
    const T* rv = row + 2 * C + h * f;
    const int64_t raw = p.pos[b * p.pos_b + t * p.pos_t];
    const int64_t pm = ((raw % p.K) + p.K) % p.K;
    const float pos = float(pm);
    const int64_t o = ((b * p.nh + h) * p.L + t) * f;
    float sq = 1.f, sk = 1.f;
    if (p.l2) {
      float a = 0.f, c = 0.f;
      for (int j = lane; j < f; j += 32) {
        const float x = to_f32(rq[j]), y = to_f32(rk[j]);
        a += x * x;
        c += y * y;
      }
      sq = 1.f / fmaxf(sqrtf(warp_sum(a)), 1e-12f);
      sk = 1.f / fmaxf(sqrtf(warp_sum(c)), 1e-12f);
    }
    for (int i = lane; i < half; i += 32) {
      float sn, cs;
      sincosf(::ttt::cuda::detail::rope_freq_rn(i, f, p.theta) * pos, &sn, &cs);
      float re = to_f32(rq[2 * i]), im = to_f32(rq[2 * i + 1]);
      if (p.l2) re *= sq, im *= sq;
      p.xq[o + 2 * i] = re * cs - im * sn;
      p.xq[o + 2 * i + 1] = re * sn + im * cs;
      re = to_f32(rk[2 * i]), im = to_f32(rk[2 * i + 1]);
      if (p.l2) re *= sk, im *= sk;
      p.xk[o + 2 * i] = re * cs - im * sn;
      p.xk[o + 2 * i + 1] = re * sn + im * cs;
      p.xv[o + 2 * i] = to_f32(rv[2 * i]);
      p.xv[o + 2 * i + 1] = to_f32(rv[2 * i + 1]);
    }
    if (p.ln_target) {
      __syncwarp();  // the lanes read each other's k and v
      ln_target_row(p.xv + o, p.xk + o, p.ln_w + h * f, p.ln_b + h * f, f, p.ln_eps);
    }
    if (lane == 0) {
      p.lr[(b * p.nh + h) * p.L + t] = p.lr_scale * ::ttt::math::sigmoid(to_f32(row[3 * C + h]) + p.lr_bias[h]);
      if (t == 0 && h == 0) {
        if (p.phase) p.phase[b] = int32_t(pm);
        if (p.commit) p.commit[b] = p.exec ? uint8_t(p.exec[b] != 0) : uint8_t(1);
      }
    }
  }
}

template <class T>
struct PostNormParams {
  const float* in;  // [rows, n] dense
  T* out;           // [rows, n] dense
  const float* w;   // [n]
  const float* b;
  int64_t rows, n;
  float eps;
};

// layer_norm_kernel's arithmetic (two passes, the same order) on a float input with a T
// output; rows up to 16 values a thread stay in registers (one read of the row, not three).
template <class T>
__global__ void __launch_bounds__(::ttt::cuda::detail::kRowThreads) post_norm_kernel(const PostNormParams<T> p) {
  using namespace ::ttt::cuda::detail;
  constexpr int kPer = 16;
  for (int64_t r = blockIdx.x; r < p.rows; r += gridDim.x) {
    const float* x = p.in + r * p.n;
    T* o = p.out + r * p.n;
    if (p.n <= int64_t(kRowThreads) * kPer) {
      float v[kPer];
      float s = 0.f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * kRowThreads;
        v[k] = j < p.n ? x[j] : 0.f;
        s += v[k];
      }
      const float mu = block_all_reduce<kRowThreads>(s, SumOp{}) / float(p.n);
      float ss = 0.f;
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * kRowThreads;
        const float d = v[k] - mu;
        if (j < p.n) ss += d * d;
      }
      const float var = block_all_reduce<kRowThreads>(ss, SumOp{}) / float(p.n);
      const float rstd = 1.f / sqrtf(var + p.eps);
#pragma unroll
      for (int k = 0; k < kPer; ++k) {
        const int64_t j = threadIdx.x + int64_t(k) * kRowThreads;
        if (j >= p.n) continue;
        float y = (v[k] - mu) * rstd;
        y *= p.w[j];
        y += p.b[j];
        o[j] = from_f32<T>(y);
      }
      continue;
    }
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < p.n; j += kRowThreads) s += x[j];
    const float mu = block_all_reduce<kRowThreads>(s, SumOp{}) / float(p.n);
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < p.n; j += kRowThreads) {
      const float d = x[j] - mu;
      ss += d * d;
    }
    const float var = block_all_reduce<kRowThreads>(ss, SumOp{}) / float(p.n);
    const float rstd = 1.f / sqrtf(var + p.eps);
    for (int64_t j = threadIdx.x; j < p.n; j += kRowThreads) {
      float v = (x[j] - mu) * rstd;
      v *= p.w[j];
      v += p.b[j];
      o[j] = from_f32<T>(v);
    }
  }
}

// ---- host side -----------------------------------------------------------------------------

inline cudaStream_t stream() { return ::ttt::cuda::Context::get().stream(); }

// Grid-stride launches: enough blocks to fill the GPU, no more.
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads;
  const int64_t cap = int64_t(::ttt::cuda::Context::get().sm_count()) * 16;
  return unsigned(std::max<int64_t>(1, std::min(want, cap)));
}

template <class P>
void launch(void (*kernel)(P), unsigned grid, unsigned block, size_t smem, int cluster, const P& p) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(grid, 1, 1);
  cfg.blockDim = dim3(block, 1, 1);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream();
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(cluster);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = cluster > 1 ? attr : nullptr;
  cfg.numAttrs = cluster > 1 ? 1 : 0;
  TTT_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, p));
  TTT_CUDA_CHECK(cudaGetLastError());
}

struct DeviceInfo {
  int device = -1;
  int sm_count = 0;
  int smem_optin = 0;  // bytes of dynamic shared memory a block may opt into
  int cc_major = 0;
  bool clusters = false;
};

inline const DeviceInfo& device_info() {
  thread_local DeviceInfo info;
  int dev = 0;
  TTT_CUDA_CHECK(cudaGetDevice(&dev));
  if (info.device != dev) {
    info.device = dev;
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, dev));
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev));
    int cl = 0;
    TTT_CUDA_CHECK(cudaDeviceGetAttribute(&cl, cudaDevAttrClusterLaunch, dev));
#if defined(_CG_HAS_CLUSTER_GROUP)
    info.clusters = cl != 0;
#else
    info.clusters = false;
#endif
  }
  return info;
}

using InnerKernel = void (*)(InnerParams);

inline InnerKernel inner_kernel(bool mlp) { return mlp ? ttt_mlp_kernel : ttt_linear_kernel; }

// The tensor-core kernel for a shape (null when none): TTT-Linear with f = 64 or 128,
// TTT-MLP with f = 128 (hidden units in CTAs of 128).
inline InnerKernel tc_kernel(bool mlp, int64_t f) {
  if (mlp) return f == 128 ? tc::ttt_mlp_tc_kernel : nullptr;
  if (f == 64) return tc::ttt_linear_tc_kernel<64>;
  if (f == 128) return tc::ttt_linear_tc_kernel<128>;
  return nullptr;
}
inline int64_t tc_smem(bool mlp, int64_t f) {
  if (mlp) return int64_t(tc::MlpLayout::bytes);
  return f == 64 ? int64_t(tc::LinearLayout<64>::bytes) : int64_t(tc::LinearLayout<128>::bytes);
}
inline int tc_threads(bool mlp, int64_t f) { return mlp ? tc::MlpLayout::THREADS : int(2 * f); }

// Head dims with a one-token TTT-Linear kernel (clusters of f / 32 CTAs: f > 32 needs them).
inline bool has_decode_kernel(int64_t f) {
  return f == 32 || ((f == 64 || f == 128) && device_info().clusters);
}

// Launches the one-token TTT-Linear kernel (fused: the whole step, see ttt_decode.cuh).
template <class T, bool kFused>
void launch_decode(const dec::DecodeParams<T>& dp, int64_t f, int64_t heads) {
  if (f == 32) {
    if constexpr (!kFused) launch(dec::ttt_linear_decode_kernel<T, 32, false>, unsigned(heads), 64u, 0, 1, dp);
  } else if (f == 64) {
    launch(dec::ttt_linear_decode_kernel<T, 64, kFused>, unsigned(heads * 2), 128u, 0, 2, dp);
  } else {
    launch(dec::ttt_linear_decode_kernel<T, 128, kFused>, unsigned(heads * 4), 256u, 0, 4, dp);
  }
}

// Raises a kernel's dynamic shared-memory limit once per size (a host-side attribute).
inline void allow_smem(InnerKernel k, int64_t bytes) {
  struct Entry {
    int device;
    InnerKernel kernel;
    int64_t bytes;
  };
  thread_local std::vector<Entry> done;
  const int device = device_info().device;
  for (const Entry& e : done)
    if (e.device == device && e.kernel == k && e.bytes >= bytes) return;
  if (bytes > 48 * 1024) TTT_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
  done.push_back({device, k, bytes});
}

// Whether clusters of nc CTAs of `threads` threads and `bytes` shared memory can be resident
// at all (cached: the occupancy query is a host call that a decode step should not pay).
inline int resident_clusters(InnerKernel k, int nc, int threads, int64_t bytes) {
  struct Entry {
    int device;
    InnerKernel kernel;
    int nc;
    int64_t bytes;
    int count;
  };
  thread_local std::vector<Entry> cache;
  const int device = device_info().device;
  for (const Entry& e : cache)
    if (e.device == device && e.kernel == k && e.nc == nc && e.bytes == bytes) return e.count;
  allow_smem(k, bytes);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(nc), 1, 1);
  cfg.blockDim = dim3(unsigned(threads), 1, 1);
  cfg.dynamicSmemBytes = size_t(bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(nc);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int count = 0;
  if (nc > 1) {
    if (cudaOccupancyMaxActiveClusters(&count, k, &cfg) != cudaSuccess) {
      (void)cudaGetLastError();
      count = 0;
    }
  } else {
    int per_sm = 0;
    TTT_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, k, threads, size_t(bytes)));
    count = per_sm * device_info().sm_count;
  }
  cache.push_back({device, k, nc, bytes, count});
  return count;
}
inline bool clusters_fit(InnerKernel k, int nc, int threads, int64_t bytes) {
  return resident_clusters(k, nc, threads, bytes) > 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Empty when the tensors suit the kernels (contiguous, 16-byte aligned, expected shapes).
inline std::string device_layout_problem(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, bool mlp) {
  const Tensor<float, Cuda>* all[] = {&a.xq, &a.xk, &a.xv, &a.lr, &a.tau, &a.ln_weight, &a.ln_bias,
                                      &s.W1, &s.b1, &s.W1_grad, &s.b1_grad, &s.W2, &s.b2, &s.W2_grad, &s.b2_grad};
  const int n_all = mlp ? 15 : 11;
  for (int i = 0; i < n_all; ++i)
    if (!all[i]->defined() || !all[i]->is_contiguous()) return "a tensor is undefined or not contiguous";
  if (!a.out.defined() || a.out.rank() != 4 || a.out.stride(3) != 1) return "out's last dimension is not dense";
  const Tensor<float, Cuda>* vec[] = {&a.xq, &a.xk, &a.xv, &s.W1, &s.W1_grad, &s.W2, &s.W2_grad};
  for (int i = 0; i < (mlp ? 7 : 5); ++i)
    if (!aligned16(vec[i]->data())) return "a tensor is not 16-byte aligned";
  return {};
}

// The InnerParams fields every inner kernel reads: state, ttt_norm, tau, output and sizes.
// The caller sets the inputs, the launch shape (R, nc, Fc, sm) and the flags.
inline InnerParams state_params(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, bool mlp, int64_t Bn,
                                int64_t nh, int64_t L, int64_t f, int64_t F) {
  InnerParams p{};
  p.tau = a.tau.data(), p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data();
  p.out = a.out.data(), p.out_sb = a.out.stride(0), p.out_sh = a.out.stride(1), p.out_st = a.out.stride(2);
  p.W1 = s.W1.data(), p.b1 = s.b1.data(), p.S1 = s.W1_grad.data(), p.Sb1 = s.b1_grad.data();
  if (mlp) p.W2 = s.W2.data(), p.b2 = s.b2.data(), p.S2 = s.W2_grad.data(), p.Sb2 = s.b2_grad.data();
  p.L = L, p.nh = int(nh), p.f = int(f), p.F = int(F), p.K = int(a.mini_batch_size), p.eps = a.eps;
  p.batch = int(Bn);
  return p;
}

}  // namespace cuda_detail

TttCudaPlan TttKernels<Cuda>::plan(TttConfig::Kind kind, int64_t batch, int64_t heads, int64_t L, int64_t f,
                                   int64_t F, int64_t K, TttOperands operands) {
  using namespace cuda_detail;
  TttCudaPlan pl;
  const bool mlp = kind == TttConfig::Kind::mlp;
  const TttCudaTuning& tune = tuning();
  if (tune.host_fallback) {
    pl.why_host = "host fallback requested";
    return pl;
  }
  if (f % 4 != 0 || F % 4 != 0) {
    pl.why_host = "head_dim and inner width must be multiples of 4";
    return pl;
  }
  if (f > 4096 || F > 65536 || K > 4096 || K <= 0) {
    pl.why_host = "sizes outside the kernels' range";
    return pl;
  }
  const DeviceInfo& dev = device_info();
  if (!mlp && L == 1 && F == f && K <= 32 && has_decode_kernel(f) && tune.decode_kernel && tune.cluster == 0) {
    pl.device = true;
    pl.decode = true;
    pl.cluster = f == 32 ? 1 : int(f / 32);
    pl.rows = 1;
    return pl;
  }
  if (mlp && L == 1 && f == dec::MlpDecodeLayout::HD && F % dec::MlpDecodeLayout::FH == 0 &&
      F / dec::MlpDecodeLayout::FH <= dec::MlpDecodeLayout::MAX_NC && (F == dec::MlpDecodeLayout::FH || dev.clusters) &&
      tune.decode_kernel && tune.cluster == 0) {
    pl.device = true;
    pl.decode = true;
    pl.cluster = int(F / dec::MlpDecodeLayout::FH);
    pl.rows = 1;
    return pl;
  }
  if (operands == TttOperands::bf16 && tune.tensor_cores && tune.cluster == 0 && K <= tc::kTile &&
      dev.cc_major >= 8) {
    const InnerKernel k = tc_kernel(mlp, f);
    const int nc = mlp ? int(F / tc::MlpLayout::FC) : 1;
    const bool shape_ok = mlp ? (F % tc::MlpLayout::FC == 0 && nc >= 1 && nc <= tc::kMaxMlpCluster) : F == f;
    const int64_t bytes = k ? tc_smem(mlp, f) : 0;
    if (k && shape_ok && bytes <= dev.smem_optin && (nc == 1 || (dev.clusters && clusters_fit(k, nc, tc_threads(mlp, f), bytes)))) {
      pl.device = true;
      pl.tensor_cores = true;
      pl.cluster = nc;
      pl.rows = tc::kTile;
      pl.smem_bytes = bytes;
      pl.resident = resident_clusters(k, nc, tc_threads(mlp, f), bytes);
      return pl;
    }
  }
  const int R = int(ceil4(std::min(K, std::max<int64_t>(L, 1))));
  struct Option {
    int nc;
    int64_t bytes;
  };
  std::vector<Option> options;
  for (int nc = 1; nc <= kMaxCluster; nc *= 2) {
    if (F % nc != 0 || (F / nc) % 4 != 0) continue;
    if (nc > 1 && !dev.clusters) continue;
    const int64_t bytes = int64_t(inner_smem(mlp, int(f), int(F), nc, R, int(K)).total) * int64_t(sizeof(float));
    if (bytes > dev.smem_optin) continue;
    if (nc > 1 && !clusters_fit(inner_kernel(mlp), nc, kThreads, bytes)) continue;
    options.push_back({nc, bytes});
  }
  const Option* pick = nullptr;
  if (tune.cluster > 0) {
    for (const Option& o : options)
      if (o.nc == tune.cluster) pick = &o;
    TTT_CHECK(pick, "TttKernels<Cuda>: cluster size ", tune.cluster, " is not feasible for ", mlp ? "mlp" : "linear",
              " f=", f, " F=", F, " K=", K, " on this device");
  } else if (!options.empty()) {
    // The smallest cluster that spreads the heads over most of the GPU (a cluster of CTAs per
    // (b, h) only pays when there are fewer heads than SMs), else the largest that fits.
    const int64_t target = std::max<int64_t>(1, int64_t(dev.sm_count) * 3 / 4);
    pick = &options.back();
    for (const Option& o : options)
      if (batch * heads * o.nc >= target) {
        pick = &o;
        break;
      }
  }
  if (!pick) {
    pl.why_host = "the state does not fit in shared memory at any cluster size";
    return pl;
  }
  pl.device = true;
  pl.cluster = pick->nc;
  pl.rows = R;
  pl.smem_bytes = pick->bytes;
  return pl;
}

void TttKernels<Cuda>::inner(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s) {
  using namespace cuda_detail;
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), K = a.mini_batch_size;
  const int64_t F = s.W1.size(3);
  TTT_CHECK(a.phase.defined() && a.phase.numel() == Bn && a.phase.is_contiguous() &&
                (!a.commit.defined() || (a.commit.numel() == Bn && a.commit.is_contiguous())),
            "TttKernels<Cuda>::inner: phase / commit must be contiguous [", Bn, "]");
  TTT_CHECK(mlp || F == f, "TttKernels<Cuda>::inner: TTT-Linear needs W1 [B, nh, f, f], got inner width ", F,
            " for head_dim ", f);
  if (L == 0 || Bn == 0 || nh == 0) return;
  const TttCudaPlan pl = plan(a.kind, Bn, nh, L, f, F, K, a.operands);
  if (!pl.device || !device_layout_problem(a, s, mlp).empty()) {
    inner_on_host(a, s);
    return;
  }

  InnerParams p = state_params(a, s, mlp, Bn, nh, L, f, F);
  p.phase = a.phase.data();
  p.commit = a.commit.defined() ? a.commit.data() : nullptr;
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data();
  p.R = pl.rows, p.nc = pl.cluster, p.Fc = int(F) / pl.cluster;
  p.sm = pl.tensor_cores || pl.decode ? InnerSmem{} : inner_smem(mlp, p.f, p.F, p.nc, p.R, p.K);
  const InnerKernel kernel = pl.tensor_cores ? tc_kernel(mlp, f) : inner_kernel(mlp);
  const unsigned threads = unsigned(pl.tensor_cores ? tc_threads(mlp, f) : kThreads);
  if (pl.decode && mlp) {
    launch(dec::ttt_mlp_decode_kernel, unsigned(Bn * nh * pl.cluster), unsigned(dec::MlpDecodeLayout::THREADS), 0,
           pl.cluster, p);
  } else if (pl.decode) {
    dec::DecodeParams<float> dp{};
    dp.in = p;
    launch_decode<float, false>(dp, f, Bn * nh);
  } else {
    allow_smem(kernel, pl.smem_bytes);
    launch(kernel, unsigned(Bn * nh * pl.cluster), threads, size_t(pl.smem_bytes), pl.cluster, p);
  }
}

void TttKernels<Cuda>::causal_conv(const Tensor<float, Cuda>& out_q, const Tensor<float, Cuda>& out_k,
                                          const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& history,
                                          const Tensor<float, Cuda>& wq, const Tensor<float, Cuda>& bq,
                                          const Tensor<float, Cuda>& wk, const Tensor<float, Cuda>& bk,
                                          const Tensor<uint8_t, Cuda>& commit) {
  using namespace cuda_detail;
  const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), kc = history.size(2);
  for (const Tensor<float, Cuda>* t : {&out_q, &out_k, &x, &history, &wq, &bq, &wk, &bk})
    TTT_CHECK(t->is_contiguous(), "TttKernels<Cuda>::causal_conv: tensors must be contiguous");
  TTT_CHECK(!commit.defined() || (commit.numel() == Bn && commit.is_contiguous()),
            "TttKernels<Cuda>::causal_conv: commit must be contiguous [", Bn, "]");
  if (Bn == 0 || C == 0) return;
  ConvParams p{x.data(), history.data(), wq.data(), bq.data(), wk.data(), bk.data(), out_q.data(), out_k.data(),
               Bn, L, C, int(kc), commit.defined() ? commit.data() : nullptr};
  if (L > 0) launch(causal_conv_kernel, blocks_for(Bn * L * C, 256), 256, 0, 1, p);
  launch(conv_history_kernel, blocks_for(Bn * C, 256), 256, 0, 1, p);
}

void TttKernels<Cuda>::call_flags(const Tensor<int64_t, Cuda>& positions, const Tensor<uint8_t, Cuda>& exec,
                                  int64_t add, int64_t mod, const Tensor<int64_t, Cuda>& out_pos,
                                  const Tensor<int32_t, Cuda>& phase, const Tensor<uint8_t, Cuda>& commit) {
  using namespace cuda_detail;
  TTT_CHECK(positions.rank() == 2 && out_pos.shape() == positions.shape() && out_pos.is_contiguous(),
            "call_flags: positions ", positions.shape().str(), " and out ", out_pos.shape().str());
  const int64_t Bn = positions.size(0), L = positions.size(1);
  TTT_CHECK((!phase.defined() || (phase.numel() == Bn && phase.is_contiguous())) &&
                (!commit.defined() || (commit.numel() == Bn && commit.is_contiguous())) &&
                (!exec.defined() || (exec.numel() == Bn && exec.is_contiguous())),
            "call_flags: phase, commit and exec must be contiguous [", Bn, "]");
  if (Bn == 0 || L == 0) return;
  FlagsParams p{positions.data(), positions.stride(0), positions.stride(1), exec.defined() ? exec.data() : nullptr,
                out_pos.data(), phase.defined() ? phase.data() : nullptr, commit.defined() ? commit.data() : nullptr,
                Bn, L, add, mod};
  launch(call_flags_kernel, blocks_for(Bn * L, 256), 256, 0, 1, p);
}

template <class T>
void TttKernels<Cuda>::prologue(const TttPrologue<T, Cuda>& a) {
  using namespace cuda_detail;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), C = nh * f;
  TTT_CHECK(a.proj.rank() == 3 && a.proj.size(0) == Bn && a.proj.size(1) == L && a.proj.size(2) >= 3 * C + nh &&
                a.proj.stride(2) == 1,
            "TttKernels<Cuda>::prologue: proj ", a.proj.shape().str(), " for ", nh, " heads of ", f);
  TTT_CHECK(a.positions.rank() == 2 && a.positions.size(0) == Bn && a.positions.size(1) == L,
            "TttKernels<Cuda>::prologue: positions ", a.positions.shape().str());
  for (const Tensor<float, Cuda>* t : {&a.xq, &a.xk, &a.xv, &a.lr, &a.lr_bias, &a.ln_weight, &a.ln_bias})
    TTT_CHECK(t->is_contiguous(), "TttKernels<Cuda>::prologue: tensors must be contiguous");
  TTT_CHECK(f % 2 == 0, "TttKernels<Cuda>::prologue: odd head_dim ", f);
  if (Bn == 0 || L == 0) return;
  PrologueParams<T> p{};
  p.proj = a.proj.data(), p.proj_b = a.proj.stride(0), p.proj_t = a.proj.stride(1);
  p.pos = a.positions.data(), p.pos_b = a.positions.stride(0), p.pos_t = a.positions.stride(1);
  p.exec = a.exec.defined() ? a.exec.data() : nullptr;
  p.lr_bias = a.lr_bias.data(), p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data();
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data();
  p.phase = a.phase.defined() ? a.phase.data() : nullptr;
  p.commit = a.commit.defined() ? a.commit.data() : nullptr;
  p.B = Bn, p.L = L, p.K = a.mini_batch_size, p.nh = int(nh), p.f = int(f);
  p.theta = a.rope_theta, p.lr_scale = a.lr_scale, p.ln_eps = a.ln_eps;
  p.l2 = a.l2_norm_qk ? 1 : 0, p.ln_target = a.ln_target ? 1 : 0;
  launch(prologue_kernel<T>, blocks_for(Bn * L * nh * 32, 256), 256, 0, 1, p);
}

template <class T>
bool TttKernels<Cuda>::step(const TttStep<T, Cuda>& st, const TttFastWeights<Cuda>& s) {
  using namespace cuda_detail;
  if constexpr (std::is_same_v<T, ::ttt::f16>) {
    return false;
  } else {
    const TttInnerArgs<Cuda>& a = st.in;
    const TttPrologue<T, Cuda>& pr = st.pro;
    const TttCudaTuning& tune = tuning();
    if (a.kind != TttConfig::Kind::linear || pr.l2_norm_qk || pr.ln_target || !tune.decode_kernel || !tune.fused_step ||
        tune.cluster != 0 || tune.host_fallback)
      return false;
    if (!st.y.defined() || st.y.rank() != 3 || !st.y.is_contiguous() || !a.out.defined() || a.out.rank() != 4)
      return false;
    const int64_t Bn = st.y.size(0), L = st.y.size(1), C = st.y.size(2), nh = a.out.size(1), f = a.out.size(3);
    const int64_t F = s.W1.defined() ? s.W1.size(3) : 0;
    if (L != 1 || F != f || (f != 64 && f != 128) || !has_decode_kernel(f) || nh * f != C ||
        a.mini_batch_size > 32)
      return false;
    if (!pr.proj.defined() || pr.proj.rank() != 3 || pr.proj.stride(2) != 1 || pr.proj.size(2) < 3 * C + nh)
      return false;
    if (!pr.positions.defined()) return false;
    if (a.out.stride(3) != 1 || !st.post_weight.is_contiguous() || !st.post_bias.is_contiguous()) return false;
    for (const Tensor<float, Cuda>* t : {&s.W1, &s.b1, &s.W1_grad, &s.b1_grad, &a.tau, &a.ln_weight, &a.ln_bias})
      if (!t->defined() || !t->is_contiguous()) return false;
    if (!aligned16(s.W1.data()) || !aligned16(s.W1_grad.data())) return false;

    dec::DecodeParams<T> dp{};
    InnerParams& p = dp.in;
    p = state_params(a, s, false, Bn, nh, 1, f, f);
    p.nc = 1;
    TTT_CHECK(pr.positions.rank() == 2 && pr.positions.size(0) == Bn, "TttKernels<Cuda>::step: positions ",
              pr.positions.shape().str(), " for batch ", Bn);
    dp.pos = pr.positions.data(), dp.pos_b = pr.positions.stride(0);
    dp.exec = pr.exec.defined() ? pr.exec.data() : nullptr;
    dp.proj = pr.proj.data(), dp.proj_b = pr.proj.stride(0);
    dp.lr_bias = pr.lr_bias.data(), dp.lr_scale = pr.lr_scale, dp.theta = pr.rope_theta;
    dp.y = st.y.data(), dp.pn_w = st.post_weight.data(), dp.pn_b = st.post_bias.data(), dp.pn_eps = st.post_eps;
    // Completion counters [B] (zero between calls: the last CTA of an item resets its own)
    // and per-CTA LayerNorm partials [B, nh, f / 32, 2]: the session's when it has a workspace.
    const Shape cshape{Bn}, sshape{Bn * nh * (f / 32) * 2};
    const Tensor<int32_t, Cuda> counters = st.workspace ? st.workspace->template get<int32_t>("ttt.step.counters", cshape)
                                                        : Tensor<int32_t, Cuda>::zeros(cshape);
    const Tensor<float, Cuda> scratch = st.workspace ? st.workspace->template get<float>("ttt.step.scratch", sshape)
                                                     : Tensor<float, Cuda>::empty(sshape);
    dp.counters = counters.data();
    dp.scratch = scratch.data();
    launch_decode<T, true>(dp, f, Bn * nh);
    return true;
  }
}

template <class T>
void TttKernels<Cuda>::post_norm(const Tensor<T, Cuda>& out, const Tensor<float, Cuda>& in,
                                 const Tensor<float, Cuda>& weight, const Tensor<float, Cuda>& bias, float eps) {
  using namespace cuda_detail;
  TTT_CHECK(in.is_contiguous() && out.is_contiguous() && out.shape() == in.shape() && weight.is_contiguous() &&
                bias.is_contiguous(),
            "TttKernels<Cuda>::post_norm: contiguous tensors of one shape, got ", in.shape().str(), " and ",
            out.shape().str());
  const int64_t n = in.size(-1), rows = n > 0 ? in.numel() / n : 0;
  if (rows == 0) return;
  PostNormParams<T> p{in.data(), out.data(), weight.data(), bias.data(), rows, n, eps};
  const unsigned grid = unsigned(std::min<int64_t>(rows, int64_t(::ttt::cuda::Context::get().sm_count()) * 8));
  launch(post_norm_kernel<T>, grid, ::ttt::cuda::detail::kRowThreads, 0, 1, p);
}

#define TTT_CUDA_INSTANTIATE_TTT_IO(T)                                                                         \
  template void TttKernels<Cuda>::prologue<T>(const TttPrologue<T, Cuda>&);                                    \
  template bool TttKernels<Cuda>::step<T>(const TttStep<T, Cuda>&, const TttFastWeights<Cuda>&);                \
  template void TttKernels<Cuda>::post_norm<T>(const Tensor<T, Cuda>&, const Tensor<float, Cuda>&,             \
                                               const Tensor<float, Cuda>&, const Tensor<float, Cuda>&, float);
TTT_CUDA_INSTANTIATE_TTT_IO(float)
TTT_CUDA_INSTANTIATE_TTT_IO(::ttt::bf16)
TTT_CUDA_INSTANTIATE_TTT_IO(::ttt::f16)
#undef TTT_CUDA_INSTANTIATE_TTT_IO

void TttKernels<Cuda>::l2_normalize(const Tensor<float, Cuda>& x) {
  using namespace cuda_detail;
  const int64_t n = x.size(-1);
  if (x.numel() == 0 || n == 0) return;
  TTT_CHECK(x.rank() >= 1 && x.rank() <= 4, "l2_normalize: rank ", x.rank());
  RowsParams p{};
  p.x = x.data();
  p.n = n;
  p.inner = x.stride(-1);
  p.rows = x.numel() / n;
  const int outer = x.rank() - 1;
  for (int j = 0; j < 3; ++j) p.size[j] = 1, p.stride[j] = 0;
  for (int i = 0; i < outer; ++i) {
    p.size[3 - outer + i] = x.size(i);
    p.stride[3 - outer + i] = x.stride(i);
  }
  launch(l2_normalize_kernel, blocks_for(p.rows * 32, 256), 256, 0, 1, p);
}

void TttKernels<Cuda>::ln_target(const Tensor<float, Cuda>& xv, const Tensor<float, Cuda>& xk,
                                        const Tensor<float, Cuda>& weight, const Tensor<float, Cuda>& bias, float eps) {
  using namespace cuda_detail;
  TTT_CHECK(xv.rank() == 4 && xk.shape() == xv.shape() && xv.is_contiguous() && xk.is_contiguous() &&
                weight.is_contiguous() && bias.is_contiguous(),
            "TttKernels<Cuda>::ln_target: xv and xk must be contiguous [B, L, nh, f] of one shape");
  const int64_t nh = xv.size(2), f = xv.size(3);
  if (xv.numel() == 0) return;
  LnTargetParams p{xv.data(), xk.data(), weight.data(), bias.data(), xv.numel() / f, int(nh), int(f), eps};
  launch(ln_target_kernel, blocks_for(p.rows * 32, 256), 256, 0, 1, p);
}

}  // namespace ttt::layers
