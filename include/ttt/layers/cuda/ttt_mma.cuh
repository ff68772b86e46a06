#pragma once
// TTT inner loops on tensor cores (nvcc only; TttOperands::bf16): mma.sync m16n8k16 with bf16
// operands and float accumulation. The fast weights, the running sums, the LayerNorm
// statistics and the gradients stay float; only the operands of the matrix products are
// rounded to bf16. Contract and semantics: ttt/layers/ttt_kernels.hpp (the same segments,
// phases and commit rules as the fp32 kernels of ttt_inner_fp32.cuh).
//
// The "transposed world". Every product is computed with the feature dimension as the M rows
// of the mma and the segment's 16 tokens as the N columns: Zᵀ = Wᵀ Xᵀ. Then
//   - the fast weight lives in registers for the whole call, as the accumulator fragments of
//     Wᵀ (warp w owns output rows 16w..16w+15, every input column), and is updated in place
//     by one more mma per 8 columns (Wᵀ -= τ (lr ⊙ G)ᵀ K): no shared-memory round trip and no
//     barrier for the state;
//   - an accumulator fragment pair is, packed to bf16, an A fragment (the FlashAttention
//     identity), and an accumulator fragment of X is the B fragment of Xᵀ: Q Kᵀ comes from
//     the B fragments already loaded for Wᵀ [Q; K]ᵀ, and the masked attention (η ⊙ Q Kᵀ)
//     feeds Gᵀ (η ⊙ Q Kᵀ)ᵀ straight from registers;
//   - the LayerNorms run down the M rows, per token column: a warp reduces its 16 rows with
//     three shuffles, the warps meet in shared memory (Welford partials, merged in warp order
//     so every thread gets identical statistics).
// A segment of n <= 16 tokens is one 16-column tile (columns >= n zero-filled by cp.async;
// lr = 0 there removes them from every sum). Segment inputs are double-buffered: the next
// segment's q, k, v, lr load while this one computes.
//
// The running sums S (W1_grad, ...) stay in global memory: they are only non-zero in a
// call's first segment (read for its carry and its update) and after its last, incomplete
// one (written); every completed mini-batch zeroes them. TTT-Linear: one CTA of 2f threads
// per (b, h), f = 64 or 128. TTT-MLP: f = 128, a cluster of F / 128 CTAs per (b, h), CTA r
// owning hidden units [128 r, 128 r + 128) of W1's columns and W2's rows; the second layer's
// partial products and Ā Aᵀ are summed over the cluster through distributed shared memory.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/layers/cuda/ttt_inner_common.cuh"
#include "ttt/layers/cuda/ttt_mma_common.cuh"

namespace ttt::layers::cuda_kernels::mma {

// ---- TTT-Linear -------------------------------------------------------------------------------

template <int HD>
struct LinearLayout {
  static constexpr int NW = HD / 16, NT = HD / 8, KS = HD / 16, THREADS = NW * 32, LD = HD + 8;
  static constexpr int X = 0;                       // [2][3][16][LD] q, k, v
  static constexpr int LR = X + 2 * 3 * kTile * LD;  // [2][16]
  static constexpr int SB = LR + 2 * kTile;         // [HD]
  static constexpr int TAU = SB + HD;               // [16]
  static constexpr int RED = TAU + kTile;           // [3][NW][16][2]
  static constexpr int TOTAL = RED + 3 * NW * kTile * 2;
  static constexpr size_t bytes = size_t(TOTAL) * sizeof(float);
};

template <int HD>
__global__ void __launch_bounds__(HD * 2, 1) ttt_linear_tc_kernel(const InnerParams p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  using Lay = LinearLayout<HD>;
  constexpr int NW = Lay::NW, NT = Lay::NT, KS = Lay::KS, LD = Lay::LD;
  float* sm = dynamic_smem();
  float* X0 = sm + Lay::X;
  float* lr0 = sm + Lay::LR;
  float* Sb = sm + Lay::SB;
  float* taus = sm + Lay::TAU;
  float* red = sm + Lay::RED;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t bh = blockIdx.x;
  const int b = int(bh / p.nh), h = int(bh % p.nh), K = p.K;
  const int o0 = warp * 16 + g, o1 = o0 + 8;
  float* Wg = p.W1 + bh * HD * HD;
  float* Sg = p.S1 + bh * HD * HD;
  float* bg = p.b1 + bh * HD;
  float* Sbg = p.Sb1 + bh * HD;
  const bool commit = item_commit(p, b);
  int pp = item_phase(p, b);
  int n_next = int(min64(p.L, K - pp));
  issue_segment<HD, LD>(p, bh * p.L, n_next, X0, lr0);  // in flight while the state comes in

  float Wt[NT][4];
  load_frags<NT>(Wt, Wg, HD, o0, t);
  float bias0 = bg[o0], bias1 = bg[o1];
  for (int i = threadIdx.x; i < HD; i += blockDim.x) Sb[i] = Sbg[i];
  if (threadIdx.x < kTile) taus[threadIdx.x] = int(threadIdx.x) < K ? p.tau[threadIdx.x] : 0.f;
  const float gam0 = p.ln_w[h * HD + o0], gam1 = p.ln_w[h * HD + o1];
  const float bet0 = p.ln_b[h * HD + o0], bet1 = p.ln_b[h * HD + o1];
  const float tl = p.tau[K - 1];
  bool s_live = true;  // S in global memory may be non-zero (until a mini-batch completes)

  int buf = 0;
  int64_t mb = 0;  // mini-batches started in this call (checkpoints)
  for (int64_t t0 = 0; t0 < p.L;) {
    const int n = n_next;
    const bool complete = pp + n == K;
    if (p.ck_W1 && pp == 0 && mb++ % p.ck_every == 0) {  // the state before this mini-batch
      const int64_t row = ((mb - 1) / p.ck_every * p.batch + b) * p.nh + h;
      store_frags<NT>(Wt, p.ck_W1 + row * HD * HD, HD, o0, t);
      if (t == 0) p.ck_b1[row * HD + o0] = bias0, p.ck_b1[row * HD + o1] = bias1;
    }
    cp_async_wait_all();
    __syncthreads();
    if (t0 + n < p.L) {  // this segment completes its mini-batch; the next one starts at phase 0
      n_next = int(min64(p.L - t0 - n, K));
      issue_segment<HD, LD>(p, bh * p.L + t0 + n, n_next, X0 + (buf ^ 1) * 3 * kTile * LD, lr0 + (buf ^ 1) * kTile);
    }
    const float* Qs = X0 + buf * 3 * kTile * LD;
    const float* Ks = Qs + kTile * LD;
    const float* Vs = Ks + kTile * LD;
    const float* lrv = lr0 + buf * kTile;

    // Zᵀ = Wᵀ [Q; K]ᵀ (query tiles 0, 1; key tiles 2, 3), M = Q Kᵀ, carry Sᵀ Qᵀ.
    float zz[4][4], mm[2][4], cr[2][4];
    const bool carry = pp > 0;
    first_layer<KS, LD>(Wt, Qs, Ks, Sg, HD, o0, g, t, carry, zz, mm, cr);
#pragma unroll
    for (int i = 0; i < 4; ++i) zz[i][0] += bias0, zz[i][1] += bias0, zz[i][2] += bias1, zz[i][3] += bias1;

    // G = ln_fused_l2_bwd(Z_k, V - K) at the mini-batch-start weights.
    float gk[2][4];
    ln_l2_grad<NW>(zz[2], zz[3], Ks, Vs, LD, o0, gam0, gam1, bet0, bet1, HD, p.eps, red, red + NW * kTile * 2, gk[0],
                   gk[1]);

    // z̄ = Q W + b - (η ⊙ (Q Kᵀ + 1)) G - τ (Q S + Sb).
    eta_mask(mm[0], mm[1], taus, lrv, pp, n, g, t);
    sub_g_mask(zz[0], zz[1], gk[0], gk[1], mm[0], mm[1]);
    if (carry) {
#pragma unroll
      for (int it = 0; it < 2; ++it)
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          const int i = 8 * it + 2 * t + (c & 1);
          if (i < n) zz[it][c] -= taus[pp + i] * (cr[it][c] + Sb[c < 2 ? o0 : o1]);
        }
    }
    stats_partial(zz[0], zz[1], red + 2 * NW * kTile * 2);

    // S += (lr ⊙ G)ᵀ K; at the mini-batch end W -= τ_{K-1} S, S = 0 (registers, no barrier).
    {
      const float l[4] = {lrv[2 * t], lrv[2 * t + 1], lrv[2 * t + 8], lrv[2 * t + 9]};
      uint32_t au[4];
      a_scaled(au, gk[0], gk[1], l);
      update_weights<NT>(RegFrags<NT>{Wt}, au, Ks, LD, Sg, HD, o0, g, t, s_live, complete, commit, tl);
      float d0, d1;
      lr_row_sums(gk[0], gk[1], l, d0, d1);
      update_bias(bias0, bias1, Sb, o0, t, d0, d1, complete, tl);
      if (complete) s_live = false;
    }
    __syncthreads();

    // out = q + LN(z̄), token-major rows.
    write_outputs<NW, HD, LD>(p, b, h, t0, n, zz[0], zz[1], red + 2 * NW * kTile * 2, Qs, o0, gam0, gam1, bet0, bet1,
                              [](int) { return true; });
    t0 += n;
    pp = complete ? 0 : pp + n;
    buf ^= 1;
  }

  if (commit) {
    store_frags<NT>(Wt, Wg, HD, o0, t);
    if (!s_live) {  // a mini-batch completed: the sums are zero (an incomplete last one wrote them)
      const bool last_complete = pp == 0;
      if (last_complete)
#pragma unroll
        for (int j = 0; j < NT; ++j) store_frag4(Sg, HD, o0, t, j, make_float4(0.f, 0.f, 0.f, 0.f));
    }
    if (t == 0) {
      bg[o0] = bias0, bg[o1] = bias1;
      Sbg[o0] = Sb[o0], Sbg[o1] = Sb[o1];
    }
  }
}

// ---- TTT-MLP ----------------------------------------------------------------------------------

struct MlpLayout {
  static constexpr int HD = 128, FC = 128;  // head_dim, hidden units per CTA
  static constexpr int NW = 8, NT = 16, KS = 8, THREADS = 256, LD = HD + 8, LDW = FC + 8;
  static constexpr int X = 0;                              // [2][3][16][LD] q, k, v
  static constexpr int LR = X + 2 * 3 * kTile * LD;         // [2][16]
  static constexpr int AS = LR + 2 * kTile;                // [16][LD] gelu(Z1) of the keys [token][hidden]
  static constexpr int AB = AS + kTile * LD;               // [16][LD] gelu(z̄1) of the queries
  static constexpr int G2 = AB + kTile * LD;               // [16][LD] G2 [token][out]
  static constexpr int W2S = G2 + kTile * LD;              // bf16 [out HD][LDW]: W2ᵀ for G2 W2ᵀ
  static constexpr int W2F = W2S + HD * LDW / 2;           // [NW][16][32][4] W2ᵀ fragments (float master)
  static constexpr int P2 = W2F + HD * FC;                 // [NW][2][32][4] partial Z2ᵀ
  static constexpr int PB = P2 + NW * 2 * 128;             // [NW][2][32][4] partial z̄2ᵀ
  static constexpr int PQ = PB + NW * 2 * 128;             // [2][32][4] partial Ā Aᵀ
  static constexpr int SB1 = PQ + 2 * 128;                 // [FC]
  static constexpr int SB2 = SB1 + FC;                     // [HD]
  static constexpr int TAU = SB2 + HD;                     // [16]
  static constexpr int RED = TAU + kTile;                  // [3][NW][16][2]
  static constexpr int TOTAL = RED + 3 * NW * kTile * 2;
  static constexpr size_t bytes = size_t(TOTAL) * sizeof(float);
};

__device__ __forceinline__ float4 add4(float4 a, float4 b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

constexpr int kMaxMlpCluster = 4;  // F <= 512 (expansion 4 of head_dim 128)

// Σ over the cluster (rank order) of the float4 at `slot` of every CTA's shared memory, the
// distributed-shared-memory loads issued together.
__device__ __forceinline__ float4 cluster_sum4(const float* slot, int nc) {
  float4 v[kMaxMlpCluster];
#pragma unroll
  for (int r = 0; r < kMaxMlpCluster; ++r)
    v[r] = r < nc ? *reinterpret_cast<const float4*>(peer(slot, r, nc)) : make_float4(0.f, 0.f, 0.f, 0.f);
  float4 s = v[0];
#pragma unroll
  for (int r = 1; r < kMaxMlpCluster; ++r)
    if (r < nc) s = add4(s, v[r]);
  return s;
}

__device__ __forceinline__ void store_w2_bf16(__nv_bfloat16* W2s, const SmemFrags& W2f, int o0, int t) {
  constexpr int LDW = MlpLayout::LDW;
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int hid = 8 * j + 2 * t;
    const float4 w = W2f.get(j);
    *reinterpret_cast<uint32_t*>(W2s + o0 * LDW + hid) = pack(w.x, w.y);
    *reinterpret_cast<uint32_t*>(W2s + (o0 + 8) * LDW + hid) = pack(w.z, w.w);
  }
}

__global__ void __launch_bounds__(MlpLayout::THREADS, 1) ttt_mlp_tc_kernel(const InnerParams p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  using Lay = MlpLayout;
  constexpr int NW = Lay::NW, NT = Lay::NT, KS = Lay::KS, LD = Lay::LD, LDW = Lay::LDW, HD = Lay::HD, FC = Lay::FC;
  float* sm = dynamic_smem();
  float* X0 = sm + Lay::X;
  float* lr0 = sm + Lay::LR;
  float* As = sm + Lay::AS;
  float* Ab = sm + Lay::AB;
  float* G2s = sm + Lay::G2;
  __nv_bfloat16* W2s = reinterpret_cast<__nv_bfloat16*>(sm + Lay::W2S);
  float* Sb1 = sm + Lay::SB1;
  float* Sb2 = sm + Lay::SB2;
  float* taus = sm + Lay::TAU;
  float* red = sm + Lay::RED;
  const int nc = p.nc, rank = cluster_rank(nc);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  const int64_t bh = blockIdx.x / nc;
  const int b = int(bh / p.nh), h = int(bh % p.nh), K = p.K, F = p.F, c0 = rank * FC;
  const int o0 = warp * 16 + g, o1 = o0 + 8;  // this thread's rows: hidden units of W1ᵀ, outputs of W2ᵀ
  float* P2f = sm + Lay::P2 + (warp * 2 * 32 + lane) * 4;  // + tile * 128
  float* PBf = sm + Lay::PB + (warp * 2 * 32 + lane) * 4;
  float* PQf = sm + Lay::PQ + lane * 4;
  // Global state: W1 [f, F] (this CTA's columns from c0), W2 [F, f] (rows from c0).
  float* W1g = p.W1 + bh * HD * F + c0;
  float* S1g = p.S1 + bh * HD * F + c0;
  float* b1g = p.b1 + bh * F + c0;
  float* Sb1g = p.Sb1 + bh * F + c0;
  float* W2g = p.W2 + (bh * F + c0) * HD;  // W2ᵀ fragment (out, hid) = W2[hid][out]
  float* S2g = p.S2 + (bh * F + c0) * HD;
  float* b2g = p.b2 + bh * HD;
  float* Sb2g = p.Sb2 + bh * HD;
  const bool commit = item_commit(p, b);
  int pp = item_phase(p, b);
  int n_next = int(min64(p.L, K - pp));
  issue_segment<HD, LD>(p, bh * p.L, n_next, X0, lr0);

  // W1ᵀ rows = hidden units (columns of W1 [in, hid]); W2ᵀ rows = outputs: W2ᵀ (out, hid) is
  // W2 [hid][out], i.e. the "W [in, out]" layout of load_frags with in = hid.
  float W1t[NT][4];
  load_frags<NT>(W1t, W1g, F, o0, t);
  const SmemFrags W2f{sm + Lay::W2F + (warp * NT * 32 + lane) * 4};
#pragma unroll
  for (int j = 0; j < NT; ++j) W2f.set(j, load_frag4(W2g, HD, o0, t, j));
  store_w2_bf16(W2s, W2f, o0, t);
  float b1_0 = b1g[o0], b1_1 = b1g[o1], b2_0 = b2g[o0], b2_1 = b2g[o1];
  for (int i = threadIdx.x; i < FC; i += blockDim.x) Sb1[i] = Sb1g[i];
  for (int i = threadIdx.x; i < HD; i += blockDim.x) Sb2[i] = Sb2g[i];
  if (threadIdx.x < kTile) taus[threadIdx.x] = int(threadIdx.x) < K ? p.tau[threadIdx.x] : 0.f;
  const float gam0 = p.ln_w[h * HD + o0], gam1 = p.ln_w[h * HD + o1];
  const float bet0 = p.ln_b[h * HD + o0], bet1 = p.ln_b[h * HD + o1];
  const float tl = p.tau[K - 1];
  bool s_live = true;

  int buf = 0;
  for (int64_t t0 = 0; t0 < p.L;) {
    const int n = n_next;
    const bool complete = pp + n == K, carry = pp > 0;
    cp_async_wait_all();
    __syncthreads();
    if (t0 + n < p.L) {
      n_next = int(min64(p.L - t0 - n, K));
      issue_segment<HD, LD>(p, bh * p.L + t0 + n, n_next, X0 + (buf ^ 1) * 3 * kTile * LD, lr0 + (buf ^ 1) * kTile);
    }
    const float* Qs = X0 + buf * 3 * kTile * LD;
    const float* Ks = Qs + kTile * LD;
    const float* Vs = Ks + kTile * LD;
    const float* lrv = lr0 + buf * kTile;
    const float l[4] = {lrv[2 * t], lrv[2 * t + 1], lrv[2 * t + 8], lrv[2 * t + 9]};

    // (1) Layer 1 on both paths: Z1ᵀ = W1ᵀ [Q; K]ᵀ + b1, M1 = Q Kᵀ, carry S1ᵀ Qᵀ.
    float zz[4][4], mm[2][4], cr[2][4];
    first_layer<KS, LD>(W1t, Qs, Ks, S1g, F, o0, g, t, carry, zz, mm, cr);
#pragma unroll
    for (int i = 0; i < 4; ++i) zz[i][0] += b1_0, zz[i][1] += b1_0, zz[i][2] += b1_1, zz[i][3] += b1_1;
    // The key path's activations (to shared memory, [token][hidden]) and gelu'.
    float dk[2][4];
#pragma unroll
    for (int jt = 0; jt < 2; ++jt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float z = zz[2 + jt][c];
        dk[jt][c] = gelu_tanh_bwd(z);
        As[(8 * jt + 2 * t + (c & 1)) * LD + (c < 2 ? o0 : o1)] = gelu(z);
      }
    eta_mask(mm[0], mm[1], taus, lrv, pp, n, g, t);
    __syncthreads();

    // (2) Z2ᵀ = Σ_cluster W2ᵀ Aᵀ + b2.
    float z2[2][4];
    {
      float pz[2][4];
      zero(pz[0]), zero(pz[1]);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4], b0[2], b1[2];
        a_from_c4(a, W2f.get(2 * kk), W2f.get(2 * kk + 1));
        b_rows(b0, As, LD, 0, 16 * kk, g, t);
        b_rows(b1, As, LD, 8, 16 * kk, g, t);
        mma(pz[0], a, b0);
        mma(pz[1], a, b1);
      }
      *reinterpret_cast<float4*>(P2f) = make_float4(pz[0][0], pz[0][1], pz[0][2], pz[0][3]);
      *reinterpret_cast<float4*>(P2f + 128) = make_float4(pz[1][0], pz[1][1], pz[1][2], pz[1][3]);
      cluster_sync(nc);
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const float4 s = cluster_sum4(P2f + it * 128, nc);
        z2[it][0] = s.x + b2_0, z2[it][1] = s.y + b2_0, z2[it][2] = s.z + b2_1, z2[it][3] = s.w + b2_1;
      }
    }

    // (3) G2 = ln_fused_l2_bwd(Z2, V - K); to shared memory for G2 W2ᵀ.
    float g2[2][4];
    ln_l2_grad<NW>(z2[0], z2[1], Ks, Vs, LD, o0, gam0, gam1, bet0, bet1, HD, p.eps, red, red + NW * kTile * 2, g2[0],
                   g2[1]);
#pragma unroll
    for (int jt = 0; jt < 2; ++jt)
#pragma unroll
      for (int c = 0; c < 4; ++c) G2s[(8 * jt + 2 * t + (c & 1)) * LD + (c < 2 ? o0 : o1)] = g2[jt][c];
    __syncthreads();

    // (4) G1ᵀ = (W2 G2ᵀ) ⊙ gelu'(Z1): A = W2 [hidden, out] from the bf16 copy (ldmatrix.trans).
    float g1[2][4];
    zero(g1[0]), zero(g1[1]);
    {
      const int q = lane >> 3, rr = lane & 7;
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4], b0[2], b1[2];
        ldmatrix_x4_trans(a, W2s + (16 * kk + rr + ((q & 2) ? 8 : 0)) * LDW + 16 * warp + ((q & 1) ? 8 : 0));
        b_rows(b0, G2s, LD, 0, 16 * kk, g, t);
        b_rows(b1, G2s, LD, 8, 16 * kk, g, t);
        mma(g1[0], a, b0);
        mma(g1[1], a, b1);
      }
#pragma unroll
      for (int jt = 0; jt < 2; ++jt)
#pragma unroll
        for (int c = 0; c < 4; ++c) g1[jt][c] *= dk[jt][c];
    }

    // (5) z̄1 = Q W1 + b1 - (η ⊙ (Q Kᵀ + 1)) G1 - τ (Q S1 + Sb1); Ā = gelu(z̄1) to shared memory.
    sub_g_mask(zz[0], zz[1], g1[0], g1[1], mm[0], mm[1]);
#pragma unroll
    for (int it = 0; it < 2; ++it)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = 8 * it + 2 * t + (c & 1);
        float z = zz[it][c];
        if (carry && i < n) z -= taus[pp + i] * (cr[it][c] + Sb1[c < 2 ? o0 : o1]);
        Ab[i * LD + (c < 2 ? o0 : o1)] = gelu(z);
      }
    // Layer 1's sums and commit (registers; S1 in global memory).
    {
      uint32_t au[4];
      a_scaled(au, g1[0], g1[1], l);
      update_weights<NT>(RegFrags<NT>{W1t}, au, Ks, LD, S1g, F, o0, g, t, s_live, complete, commit, tl);
      float d0, d1;
      lr_row_sums(g1[0], g1[1], l, d0, d1);
      update_bias(b1_0, b1_1, Sb1, o0, t, d0, d1, complete, tl);
    }
    __syncthreads();

    // (6) Partial z̄2ᵀ = W2ᵀ Āᵀ - τ S2ᵀ Āᵀ (old W2, S2) and Ā Aᵀ (warp 0), then layer 2's update.
    {
      float pz[2][4], pc[2][4];
      zero(pz[0]), zero(pz[1]), zero(pc[0]), zero(pc[1]);
#pragma unroll
      for (int kk = 0; kk < KS; ++kk) {
        uint32_t a[4], b0[2], b1[2];
        a_from_c4(a, W2f.get(2 * kk), W2f.get(2 * kk + 1));
        b_rows(b0, Ab, LD, 0, 16 * kk, g, t);
        b_rows(b1, Ab, LD, 8, 16 * kk, g, t);
        mma(pz[0], a, b0);
        mma(pz[1], a, b1);
        if (carry) {
          uint32_t as[4];
          a_from_c4(as, load_frag4(S2g, HD, o0, t, 2 * kk), load_frag4(S2g, HD, o0, t, 2 * kk + 1));
          mma(pc[0], as, b0);
          mma(pc[1], as, b1);
        }
      }
      if (carry)
#pragma unroll
        for (int it = 0; it < 2; ++it)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = 8 * it + 2 * t + (c & 1);
            if (i < n) pz[it][c] -= taus[pp + i] * pc[it][c];
          }
      *reinterpret_cast<float4*>(PBf) = make_float4(pz[0][0], pz[0][1], pz[0][2], pz[0][3]);
      *reinterpret_cast<float4*>(PBf + 128) = make_float4(pz[1][0], pz[1][1], pz[1][2], pz[1][3]);
      if (warp == 0) {
        // Ā Aᵀ [i, j] over this CTA's hidden units: A operand Ā [i][hid], B operand Aᵀ.
        float qa[2][4];
        zero(qa[0]), zero(qa[1]);
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
          uint32_t b0[2], b1[2], b2[2], b3[2];
          b_rows(b0, Ab, LD, 0, 16 * kk, g, t);
          b_rows(b1, Ab, LD, 8, 16 * kk, g, t);
          const uint32_t a[4] = {b0[0], b1[0], b0[1], b1[1]};
          b_rows(b2, As, LD, 0, 16 * kk, g, t);
          b_rows(b3, As, LD, 8, 16 * kk, g, t);
          mma(qa[0], a, b2);
          mma(qa[1], a, b3);
        }
        *reinterpret_cast<float4*>(PQf) = make_float4(qa[0][0], qa[0][1], qa[0][2], qa[0][3]);
        *reinterpret_cast<float4*>(PQf + 128) = make_float4(qa[1][0], qa[1][1], qa[1][2], qa[1][3]);
      }
      uint32_t au[4];
      a_scaled(au, g2[0], g2[1], l);
      update_weights<NT>(W2f, au, As, LD, S2g, HD, o0, g, t, s_live, complete, commit, tl);
      if (complete) store_w2_bf16(W2s, W2f, o0, t);  // every warp is past its G2 W2ᵀ (barrier above)
    }
    cluster_sync(nc);

    // (7) z̄2 = Σ partials + b2 - τ Sb2 - (η ⊙ (Ā Aᵀ + 1)) G2; out = q + LN(z̄2).
    {
      float m2[2][4], zb[2][4];
#pragma unroll
      for (int jt = 0; jt < 2; ++jt) {
        const float4 s = cluster_sum4(sm + Lay::PQ + jt * 128 + lane * 4, nc);
        m2[jt][0] = s.x, m2[jt][1] = s.y, m2[jt][2] = s.z, m2[jt][3] = s.w;
      }
      eta_mask(m2[0], m2[1], taus, lrv, pp, n, g, t);
#pragma unroll
      for (int it = 0; it < 2; ++it) {
        const float4 s = cluster_sum4(PBf + it * 128, nc);
        zb[it][0] = s.x + b2_0, zb[it][1] = s.y + b2_0, zb[it][2] = s.z + b2_1, zb[it][3] = s.w + b2_1;
        if (carry)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            const int i = 8 * it + 2 * t + (c & 1);
            if (i < n) zb[it][c] -= taus[pp + i] * Sb2[c < 2 ? o0 : o1];
          }
      }
      sub_g_mask(zb[0], zb[1], g2[0], g2[1], m2[0], m2[1]);
      stats_partial(zb[0], zb[1], red + 2 * NW * kTile * 2);
      float d0, d1;
      lr_row_sums(g2[0], g2[1], l, d0, d1);
      update_bias(b2_0, b2_1, Sb2, o0, t, d0, d1, complete, tl);
      if (complete) s_live = false;
      __syncthreads();
      write_outputs<NW, HD, LD>(p, b, h, t0, n, zb[0], zb[1], red + 2 * NW * kTile * 2, Qs, o0, gam0, gam1, bet0,
                                bet1, [&](int i) { return i % nc == rank; });
    }
    t0 += n;
    pp = complete ? 0 : pp + n;
    buf ^= 1;
  }

  if (commit) {
    store_frags<NT>(W1t, W1g, F, o0, t);
#pragma unroll
    for (int j = 0; j < NT; ++j) store_frag4(W2g, HD, o0, t, j, W2f.get(j));
    if (!s_live && pp == 0)
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        store_frag4(S1g, F, o0, t, j, make_float4(0.f, 0.f, 0.f, 0.f));
        store_frag4(S2g, HD, o0, t, j, make_float4(0.f, 0.f, 0.f, 0.f));
      }
    if (t == 0) {
      b1g[o0] = b1_0, b1g[o1] = b1_1;
      Sb1g[o0] = Sb1[o0], Sb1g[o1] = Sb1[o1];
      if (rank == 0) {
        b2g[o0] = b2_0, b2g[o1] = b2_1;
        Sb2g[o0] = Sb2[o0], Sb2g[o1] = Sb2[o1];
      }
    }
  }
  cluster_sync(nc);  // peers may still read this CTA's shared memory
}

}  // namespace ttt::layers::cuda_kernels::mma
