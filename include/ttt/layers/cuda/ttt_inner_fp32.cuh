#pragma once
// The fp32 TTT-Linear / TTT-MLP inner kernels (nvcc only): TttKernels<Cuda>::inner for the
// shapes that neither the tensor-core nor the one-token kernels take.
//
// The inner loop (contract: ttt/layers/ttt_kernels.hpp; semantics: layers/cpu/ttt_kernels.hpp).
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

#include <cstdint>

#include "ttt/layers/cuda/ttt_inner_common.cuh"

namespace ttt::layers::cuda_kernels {
namespace fp32 {

// ---- TTT-Linear ---------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads) ttt_linear_kernel(const InnerParams p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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

}  // namespace fp32
}  // namespace ttt::layers::cuda_kernels
