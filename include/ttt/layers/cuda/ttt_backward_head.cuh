#pragma once
// The device pieces of the TTT inner-loop backward shared by its kernels (nvcc only): the
// buffer layout of one (b, h) (Workspace), the kernels' parameters, and Head, one (b, h)'s
// per-mini-batch steps (key path, query path, update, and the backward pieces), each a block-wide
// sequence of small products (ttt_backward_common.cuh). Math and notation:
// layers/cpu/ttt_backward_kernels.hpp, which Head follows step by step. The kernels that walk
// mini-batches with these steps: ttt_backward.cuh (one block per (b, h), everything in order)
// and ttt_backward_split.cuh (TTT-Linear: the carry-independent steps of all mini-batches in
// parallel, then the chain).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ttt/layers/cuda/ttt_backward_common.cuh"

namespace ttt::layers::cuda_kernels::bwd {

// Offsets (floats) into one (b, h)'s per-mini-batch buffers ("local": shared memory when they
// fit, else global scratch). K-row buffers: [K, F] ("F"), [K, f] ("f"), [K, K] ("KK"), [K] ("K");
// TTT-MLP's own buffers are left out (offset 0, never touched) for TTT-Linear. The rebuilt
// states of a checkpoint group are global: states_total floats per (b, h).
struct Workspace {
  int64_t state_n = 0;       // floats of one state: W1, b1 (, W2, b2)
  int64_t states_total = 0;  // [group][state_n] (group > 1), global
  int64_t Z1 = 0, A1 = 0, P = 0, H = 0, G1 = 0, Zb1 = 0, Ab = 0, dG1 = 0, dA1 = 0, dAb = 0, dZb1 = 0, LG = 0, U = 0,
          dZ1 = 0, dP = 0;  // F
  int64_t T = 0, Z2 = 0, xh = 0, gh = 0, G2 = 0, Zb2 = 0, xb = 0, dQ = 0, dK = 0, dZq = 0, dG2 = 0, dgh = 0, dxh = 0,
          dZ2 = 0, dT = 0;                                          // f
  int64_t S1 = 0, E1 = 0, S2 = 0, E2 = 0, dS = 0, dE = 0;          // KK
  int64_t rstd = 0, rstdb = 0;                                     // K
  int64_t local_total = 0;
};

// n floats rounded up to whole 16-byte chunks (each buffer starts 16-byte aligned).
__host__ __device__ inline int64_t round4(int64_t n) { return (n + 3) / 4 * 4; }

// Hands out consecutive 16-byte aligned offsets (floats) of a layout.
struct Bump {
  int64_t at = 0;
  int64_t operator()(int64_t n) {
    const int64_t o = at;
    at += round4(n);
    return o;
  }
};

inline Workspace make_workspace(bool mlp, int64_t f, int64_t F, int64_t K, int64_t group) {
  Workspace w;
  Bump take;
  w.state_n = f * F + F + (mlp ? F * f + f : 0);
  w.states_total = group > 1 ? group * w.state_n : 0;
  for (int64_t* o : {&w.Z1, &w.G1, &w.Zb1, &w.dG1, &w.LG, &w.U, &w.dZ1}) *o = take(K * F);
  if (mlp)
    for (int64_t* o : {&w.A1, &w.P, &w.H, &w.Ab, &w.dA1, &w.dAb, &w.dZb1, &w.dP}) *o = take(K * F);
  for (int64_t* o : {&w.T, &w.xh, &w.gh, &w.xb, &w.dQ, &w.dK, &w.dZq, &w.dgh, &w.dxh, &w.dT}) *o = take(K * f);
  if (mlp)
    for (int64_t* o : {&w.Z2, &w.G2, &w.Zb2, &w.dG2, &w.dZ2}) *o = take(K * f);
  for (int64_t* o : {&w.S1, &w.E1, &w.dS, &w.dE}) *o = take(K * K);
  if (mlp)
    for (int64_t* o : {&w.S2, &w.E2}) *o = take(K * K);
  w.rstd = take(K), w.rstdb = take(K);
  w.local_total = take.at;
  return w;
}

// Floats of the small shared-memory part: τ, γ, β, dτ, dγ, dβ, dlr, a row scratch.
__host__ __device__ inline int64_t small_smem_floats(int64_t f, int64_t K) { return 4 * K + 4 * f; }

struct Params {
  const float *xq, *xk, *xv, *lr;  // [B, nh, L, f], [B, nh, L]
  const float *tau, *ln_w, *ln_b;  // [K], [nh, f], [nh, f]
  const float *W1c, *b1c, *W2c, *b2c;
  const float* dout;  // [B, nh, L, f] with strides dout_sb, dout_sh, dout_st
  int64_t dout_sb, dout_sh, dout_st;
  float *dxq, *dxk, *dxv, *dlr, *dtau, *dln_w, *dln_b, *dW1, *db1, *dW2, *db2;
  float* ws_states;  // [B nh][w.states_total] (group > 1)
  float* ws_local;   // [B nh][w.local_total], or null: the buffers live in shared memory
  bool carry_in_smem;  // the carry in shared memory (after the local buffers), copied out at the end
  // Each mini-batch's start state copied into shared memory (after the carry) before its four
  // products read it, instead of four passes over the checkpoint in L2.
  bool state_in_smem;
  Workspace w;
  int64_t L;
  int B, nh, f, F, K, group;
  bool mlp;
  float eps;
};

// A state (fast weights) or its gradient.
struct State {
  float *W1, *b1, *W2, *b2;
};

// Block-wide copy of a state (W1 [f, F], b1 [F] (, W2 [F, f], b2 [f])).
__device__ inline void copy_state(const State& from, const State& to, int f, int F, bool mlp) {
  auto copy = [](const float* a, float* b, int64_t n) {
    for (int64_t e = threadIdx.x; e < n; e += nthreads()) b[e] = a[e];
  };
  copy(from.W1, to.W1, int64_t(f) * F), copy(from.b1, to.b1, F);
  if (mlp) copy(from.W2, to.W2, int64_t(F) * f), copy(from.b2, to.b2, f);
}

// Shared memory: τ, γ, β [K], [f], [f]; running dτ [K], dγ, dβ [f], this mini-batch's dlr [K]
// and a [K] per-row scratch; then the local buffers when they fit.
__device__ __forceinline__ float* smem() {
  extern __shared__ float4 ttt_bwd_smem[];
  return reinterpret_cast<float*>(ttt_bwd_smem);
}

struct Head {
  const Params& p;
  int f, F, K;
  const float *q, *k, *v, *lr;  // this head's rows
  float *tau, *gam, *bet, *dtau, *dgam, *dbet, *dlr, *rowk;
  float* ws;
  // The current mini-batch.
  int64_t t0;
  int n;

  __device__ float* buf(int64_t off) const { return ws + off; }

  // Key path from start state w: T, Z1 (A1, Z2), x̂, rstd, ĝ, G (G1 or G2) (P, H, G1).
  __device__ __forceinline__ void keys(const State& w) {
    const Workspace& o = p.w;
    const float* X = k + t0 * f;
    const float* V = v + t0 * f;
    float *T = buf(o.T), *Z1 = buf(o.Z1), *A1 = buf(o.A1), *Z2 = buf(o.Z2);
    for (int e = threadIdx.x; e < n * f; e += nthreads()) T[e] = V[e] - X[e];
    const float* b1 = w.b1;
    const bool mlp = p.mlp;
    mm<false, false>(n, F, f, X, f, w.W1, F, [&](int i, int c, float a) {
      const float z = a + b1[c];
      Z1[i * F + c] = z;
      if (mlp) A1[i * F + c] = gelu_f(z);
    });
    __syncthreads();
    if (mlp) {
      const float* b2 = w.b2;
      mm<false, false>(n, f, F, A1, F, w.W2, f, [&](int i, int d, float a) { Z2[i * f + d] = a + b2[d]; });
      __syncthreads();
    }
    const float* Zk = mlp ? Z2 : Z1;
    float *xh = buf(o.xh), *gh = buf(o.gh), *rstd = buf(o.rstd), *G = mlp ? buf(o.G2) : buf(o.G1);
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x >> 5; i < n; i += nwarps()) {
      const float r = ln_row(Zk + i * f, f, p.eps, xh + i * f);
      for (int j = lane; j < f; j += 32) gh[i * f + j] = (gam[j] * xh[i * f + j] + bet[j] - T[i * f + j]) * gam[j];
      ln_project_row(G + i * f, gh + i * f, xh + i * f, r, f);
      if (lane == 0) rstd[i] = r;
    }
    __syncthreads();
    if (mlp) {
      float *P = buf(o.P), *H = buf(o.H), *G1 = buf(o.G1);
      // P = G2 W2ᵀ, H = gelu_bwd(Z1), G1 = P ⊙ H
      mm<false, true>(n, F, f, G, f, w.W2, f, [&](int i, int c, float a) {
        const float h = gelu_bwd_trunc(Z1[i * F + c]);
        P[i * F + c] = a;
        H[i * F + c] = h;
        G1[i * F + c] = a * h;
      });
      __syncthreads();
    }
  }

  // E = tril(η ⊙ (S + 1)) from S [n, n] (ld K) in place of its epilogue.
  __device__ __forceinline__ void eta(int i, int j, float s, float* S, float* E) const {
    S[i * K + j] = s;
    E[i * K + j] = j <= i ? tau[i] * lr[t0 + j] * (s + 1.f) : 0.f;
  }

  // Query path from w: S1, E1, Z̄1 (Ā, S2, E2, Z̄2), x̄, rstd̄.
  __device__ __forceinline__ void queries(const State& w) {
    const Workspace& o = p.w;
    const float* Q = q + t0 * f;
    const float* X = k + t0 * f;
    float *S1 = buf(o.S1), *E1 = buf(o.E1), *Zb1 = buf(o.Zb1);
    const float* b1 = w.b1;
    mm<false, true>(n, n, f, Q, f, X, f, [&](int i, int j, float s) { eta(i, j, s, S1, E1); });
    mm<false, false>(n, F, f, Q, f, w.W1, F, [&](int i, int c, float a) { Zb1[i * F + c] = a + b1[c]; });
    __syncthreads();
    mm<false, false>(n, F, n, E1, K, buf(o.G1), F, [&](int i, int c, float a) { Zb1[i * F + c] -= a; });
    __syncthreads();
    const float* Zb = Zb1;
    if (p.mlp) {
      float *Ab = buf(o.Ab), *S2 = buf(o.S2), *E2 = buf(o.E2), *Zb2 = buf(o.Zb2);
      for (int e = threadIdx.x; e < n * F; e += nthreads()) Ab[e] = gelu_f(Zb1[e]);
      __syncthreads();
      const float* b2 = w.b2;
      mm<false, true>(n, n, F, Ab, F, buf(o.A1), F, [&](int i, int j, float s) { eta(i, j, s, S2, E2); });
      mm<false, false>(n, f, F, Ab, F, w.W2, f, [&](int i, int d, float a) { Zb2[i * f + d] = a + b2[d]; });
      __syncthreads();
      mm<false, false>(n, f, n, E2, K, buf(o.G2), f, [&](int i, int d, float a) { Zb2[i * f + d] -= a; });
      __syncthreads();
      Zb = Zb2;
    }
    float *xb = buf(o.xb), *rstdb = buf(o.rstdb);
    for (int i = threadIdx.x >> 5; i < n; i += nwarps()) {
      const float r = ln_row(Zb + i * f, f, p.eps, xb + i * f);
      if ((threadIdx.x & 31) == 0) rstdb[i] = r;
    }
    __syncthreads();
  }

  // The end-of-mini-batch update w -> nw (full mini-batch; after keys(w)): W' = W − τl Xᵀ diag(lr) G.
  __device__ __forceinline__ void update(const State& w, const State& nw) {
    const Workspace& o = p.w;
    const float tl = tau[K - 1];
    auto step = [&](const float* W, const float* b, float* Wn, float* bn, const float* X, int xw, const float* G,
                    int gw) {
      float* LG = buf(o.LG);
      for (int e = threadIdx.x; e < n * gw; e += nthreads()) LG[e] = lr[t0 + e / gw] * G[e];
      __syncthreads();
      mm<true, false>(xw, gw, n, X, xw, LG, gw, [&](int d, int c, float a) { Wn[d * gw + c] = W[d * gw + c] - tl * a; });
      col_sums(n, gw, LG, [&](int c, float s) { bn[c] = b[c] - tl * s; });
      __syncthreads();
    };
    step(w.W1, w.b1, nw.W1, nw.b1, k + t0 * f, f, buf(o.G1), F);
    if (p.mlp) step(w.W2, w.b2, nw.W2, nw.b2, buf(o.A1), F, buf(o.G2), f);
  }

  // Backward of the update through the carry d (= dW', db'), before d is added to: given
  // X [n, xw], G [n, gw]: dX += LG (−τl dW')ᵀ, dG += −τl lr ⊙ U, dlr += −τl Σ U ⊙ G,
  // dτl −= Σ LG ⊙ U, with LG = diag(lr) G and U = X dW' + db'.
  __device__ __forceinline__ void update_backward(const float* dWn, const float* dbn, const float* X, int xw, const float* G, int gw,
                                  float* dX, float* dG) {
    const Workspace& o = p.w;
    const float tl = tau[K - 1];
    float *LG = buf(o.LG), *U = buf(o.U);
    for (int e = threadIdx.x; e < n * gw; e += nthreads()) LG[e] = lr[t0 + e / gw] * G[e];
    __syncthreads();
    mm<false, true>(n, xw, gw, LG, gw, dWn, gw, [&](int i, int d, float a) { dX[i * xw + d] -= tl * a; });
    mm<false, false>(n, gw, xw, X, xw, dWn, gw, [&](int i, int c, float a) { U[i * gw + c] = a + dbn[c]; });
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x >> 5; i < n; i += nwarps()) {
      float sug = 0.f, slu = 0.f;
      for (int c = lane; c < gw; c += 32) {
        const float u = U[i * gw + c];
        sug += u * G[i * gw + c];
        slu += u * LG[i * gw + c];
        dG[i * gw + c] -= tl * lr[t0 + i] * u;
      }
      sug = warp_sum(sug), slu = warp_sum(slu);
      if (lane == 0) {
        dlr[i] -= tl * sug;
        rowk[i] = slu;
      }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float s = 0.f;
      for (int i = 0; i < n; ++i) s += rowk[i];
      dtau[K - 1] -= s;
    }
    __syncthreads();
  }

  // Backward of Z̄ −= E G, E = tril(η ⊙ (X Yᵀ + 1)) given dZ̄ [n, gw]: dG −= Eᵀ dZ̄, and through
  // dE = −dZ̄ Gᵀ: dX += dS Y, dY += dSᵀ X (dS = dE ⊙ η), dτ, dlr.
  __device__ __forceinline__ void eta_backward(const float* dZb, const float* G, int gw, const float* Sm, const float* E,
                               const float* X, const float* Y, int xw, float* dG, float* dX, float* dY) {
    const Workspace& o = p.w;
    float *dS = buf(o.dS), *dE = buf(o.dE);
    mm<true, false>(n, gw, n, E, K, dZb, gw, [&](int i, int c, float a) { dG[i * gw + c] -= a; });
    mm<false, true>(n, n, gw, dZb, gw, G, gw, [&](int i, int j, float a) {
      const float e = j <= i ? -a : 0.f;
      dE[i * K + j] = e * (Sm[i * K + j] + 1.f);
      dS[i * K + j] = e * tau[i] * lr[t0 + j];
    });
    __syncthreads();
    // dτ_i += Σ_j dE_ij lr_j (S_ij + 1), dlr_j += Σ_i dE_ij τ_i (S_ij + 1)
    if (threadIdx.x < n) {
      const int i = threadIdx.x;
      float s = 0.f;
      for (int j = 0; j <= i; ++j) s += dE[i * K + j] * lr[t0 + j];
      dtau[i] += s;
    } else if (threadIdx.x >= 64 && threadIdx.x < 64 + n) {
      const int j = threadIdx.x - 64;
      float s = 0.f;
      for (int i = j; i < n; ++i) s += dE[i * K + j] * tau[i];
      dlr[j] += s;
    }
    mm<false, false>(n, xw, n, dS, K, Y, xw, [&](int i, int d, float a) { dX[i * xw + d] += a; });
    mm<true, false>(n, xw, n, dS, K, X, xw, [&](int j, int d, float a) { dY[j * xw + d] += a; });
    __syncthreads();
  }

  // Backward of G = ln_fused_l2_bwd(Z, T) given dG [n, f]: dZ, dT (overwritten), dγ, dβ.
  __device__ __forceinline__ void ln_l2_backward(const float* dG, const float* G, float* dZ, float* dT) {
    const Workspace& o = p.w;
    const float *xh = buf(o.xh), *gh = buf(o.gh), *rstd = buf(o.rstd), *T = buf(o.T);
    float *dgh = buf(o.dgh), *dxh = buf(o.dxh);
    const int lane = threadIdx.x & 31;
    for (int i = threadIdx.x >> 5; i < n; i += nwarps()) {
      const int r0 = i * f;
      const float r = rstd[i];
      ln_project_row(dgh + r0, dG + r0, xh + r0, r, f);
      float c = 0.f, m = 0.f, sgg = 0.f;
      for (int j = lane; j < f; j += 32) {
        c += gh[r0 + j] * xh[r0 + j];
        m += dG[r0 + j] * xh[r0 + j];
        sgg += dG[r0 + j] * G[r0 + j];
      }
      c = warp_sum(c) / float(f), m = warp_sum(m) / float(f), sgg = warp_sum(sgg);
      const float dsig = -r * sgg;
      for (int j = lane; j < f; j += 32) {
        const float g = gam[j], d = dgh[r0 + j];
        dxh[r0 + j] = -r * c * dG[r0 + j] - r * m * gh[r0 + j] + g * g * d;
        dT[r0 + j] = -d * g;
      }
      ln_project_row(dZ + r0, dxh + r0, xh + r0, r, f);
      for (int j = lane; j < f; j += 32) dZ[r0 + j] += (dsig / float(f)) * xh[r0 + j];
    }
    __syncthreads();
    for (int j = threadIdx.x; j < f; j += nthreads()) {
      float sg = 0.f, sb = 0.f;
      for (int i = 0; i < n; ++i) {
        const float d = dgh[i * f + j];
        sg += d * (2.f * gam[j] * xh[i * f + j] + bet[j] - T[i * f + j]);
        sb += d * gam[j];
      }
      dgam[j] += sg;
      dbet[j] += sb;
    }
    __syncthreads();
  }

  // The output path's backward, the start of every mini-batch's backward: out = Q + γ x̄ + β
  // gives dQ = dO, dγ += Σ dO x̄, dβ += Σ dO and dZq = LN-backward(dO ⊙ γ) (each row by its warp,
  // not followed by a barrier); dK, dG1 (dG2, dA1) and dlr start at zero.
  __device__ __forceinline__ void output_backward(const float* dout) {
    const Workspace& o = p.w;
    const bool mlp = p.mlp;
    float *dQ = buf(o.dQ), *dK = buf(o.dK), *dZq = buf(o.dZq), *dG1 = buf(o.dG1), *dG2 = buf(o.dG2);
    float* dA1 = buf(o.dA1);
    const float *xb = buf(o.xb), *rstdb = buf(o.rstdb);
    for (int e = threadIdx.x; e < n * f; e += nthreads()) {
      const int i = e / f, j = e - i * f;
      const float g = dout[i * p.dout_st + j];
      dQ[e] = g;
      dZq[e] = g * gam[j];
      dK[e] = 0.f;
      if (mlp) dG2[e] = 0.f;
    }
    for (int e = threadIdx.x; e < n * F; e += nthreads()) {
      dG1[e] = 0.f;
      if (mlp) dA1[e] = 0.f;
    }
    if (threadIdx.x < K) dlr[threadIdx.x] = 0.f;
    for (int j = threadIdx.x; j < f; j += nthreads()) {
      float sg = 0.f, sb = 0.f;
      for (int i = 0; i < n; ++i) {
        const float g = dout[i * p.dout_st + j];
        sg += g * xb[i * f + j];
        sb += g;
      }
      dgam[j] += sg;
      dbet[j] += sb;
    }
    __syncthreads();
    for (int i = threadIdx.x >> 5; i < n; i += nwarps()) ln_project_row(dZq + i * f, dZq + i * f, xb + i * f, rstdb[i], f);
  }

  // The carry-free part of a TTT-Linear mini-batch's backward (after keys(w), queries(w)):
  // everything but the update's backward and what flows from it. Leaves dQ (final), dK (its
  // η-path part), dG1 = −Eᵀ dZ̄ (η path), dZ̄ (= dZq) in the buffers; dlr [n] this mini-batch's
  // η-path part; adds its dτ (η path), dγ, dβ (output path) to the running sums. The chain
  // (backward_chain) adds the rest; together they are backward() up to the order of the sums.
  __device__ __forceinline__ void backward_free(const State& w, const float* dout) {
    const Workspace& o = p.w;
    const float* Q = q + t0 * f;
    const float* X = k + t0 * f;
    float *dQ = buf(o.dQ), *dK = buf(o.dK), *dZq = buf(o.dZq), *dG1 = buf(o.dG1);
    const float* G1 = buf(o.G1);
    output_backward(dout);
    __syncthreads();
    // Z̄1 = Q W1 + b1 − E1 G1 (F = f): dQ += dZ̄ W1ᵀ; the η path.
    mm<false, true>(n, f, F, dZq, F, w.W1, F, [&](int i, int e, float a) { dQ[i * f + e] += a; });
    __syncthreads();
    eta_backward(dZq, G1, F, buf(o.S1), buf(o.E1), Q, X, f, dG1, dQ, dK);
  }

  // The chain part of a TTT-Linear mini-batch's backward: given the carry d (d / d(state after)),
  // the buffers G1, x̂, ĝ, rstd, T (key path), dZq (= dZ̄), dG1 and dK (backward_free's parts),
  // and dlr zeroed: the update's backward, the key path's LayerNorm backward, the carry turned
  // into d / d(start state) in place, dT, and dK but for its dZ1 W1ᵀ term: that one feeds
  // nothing later in the chain, so the split path adds it in a kernel of its own
  // (ttt_linear_post_kernel) from dZ1, which this leaves in buf(o.dZ1). It is the one product
  // of the chain that reads the start state (W1's 64 KiB once per row of dZ1, from L2).
  __device__ __forceinline__ void backward_chain(const State& d, bool full) {
    const Workspace& o = p.w;
    const float* Q = q + t0 * f;
    const float* X = k + t0 * f;
    float *dK = buf(o.dK), *dG1 = buf(o.dG1), *dZ1 = buf(o.dZ1), *dT = buf(o.dT);
    const float *G1 = buf(o.G1), *dZb = buf(o.dZq);
    if (full) update_backward(d.W1, d.b1, X, f, G1, F, dK, dG1);
    ln_l2_backward(dG1, G1, dZ1, dT);
    // Z1 = K W1 + b1 and Z̄1 = Q W1 + b1 − ...: dW1 += Kᵀ dZ1 + Qᵀ dZ̄, db1 += Σ dZ1 + Σ dZ̄.
    mm<true, false>(f, F, n, X, f, dZ1, F, [&](int e, int c, float a) { d.W1[e * F + c] += a; });
    __syncthreads();  // the next product may give an element of d.W1 to another thread
    mm<true, false>(f, F, n, Q, f, dZb, F, [&](int e, int c, float a) { d.W1[e * F + c] += a; });
    for (int c = threadIdx.x; c < F; c += nthreads()) {
      float s = 0.f;
      for (int i = 0; i < n; ++i) s += dZ1[i * F + c] + dZb[i * F + c];
      d.b1[c] += s;
    }
    __syncthreads();
  }

  // Backward of the current mini-batch from start state w (after keys(w), queries(w)); the
  // carry d turns from d / d(state after) into d / d(state before) in place.
  __device__ __forceinline__ void backward(const State& w, const State& d, bool full, const float* dout) {
    const Workspace& o = p.w;
    const float* Q = q + t0 * f;
    const float* X = k + t0 * f;
    const bool mlp = p.mlp;
    float *dQ = buf(o.dQ), *dK = buf(o.dK), *dZq = buf(o.dZq), *dG1 = buf(o.dG1), *dG2 = buf(o.dG2);
    float *dA1 = buf(o.dA1), *dAb = buf(o.dAb);
    const float *G1 = buf(o.G1), *G2 = buf(o.G2), *A1 = buf(o.A1);
    output_backward(dout);
    // The update's backward reads the carry before anything is added to it.
    if (full) {
      update_backward(d.W1, d.b1, X, f, G1, F, dK, dG1);
      if (mlp) update_backward(d.W2, d.b2, A1, F, G2, f, dA1, dG2);
    } else {
      __syncthreads();
    }
    const float* dZb1 = dZq;
    if (mlp) {
      // Z̄2 = Ā W2 + b2 − E2 G2
      const float* Ab = buf(o.Ab);
      float* W2d = d.W2;
      mm<true, false>(F, f, n, Ab, F, dZq, f, [&](int e, int c, float a) { W2d[e * f + c] += a; });
      col_sums(n, f, dZq, [&](int c, float s) { d.b2[c] += s; });
      mm<false, true>(n, F, f, dZq, f, w.W2, f, [&](int i, int c, float a) { dAb[i * F + c] = a; });
      __syncthreads();
      eta_backward(dZq, G2, f, buf(o.S2), buf(o.E2), Ab, A1, F, dG2, dAb, dA1);
      float *dZb = buf(o.dZb1);
      const float* Zb1 = buf(o.Zb1);
      for (int e = threadIdx.x; e < n * F; e += nthreads()) dZb[e] = dAb[e] * gelu_grad(Zb1[e]);
      __syncthreads();
      dZb1 = dZb;
    }
    // Z̄1 = Q W1 + b1 − E1 G1
    {
      float* W1d = d.W1;
      mm<true, false>(f, F, n, Q, f, dZb1, F, [&](int e, int c, float a) { W1d[e * F + c] += a; });
      col_sums(n, F, dZb1, [&](int c, float s) { d.b1[c] += s; });
      mm<false, true>(n, f, F, dZb1, F, w.W1, F, [&](int i, int e, float a) { dQ[i * f + e] += a; });
      __syncthreads();
      eta_backward(dZb1, G1, F, buf(o.S1), buf(o.E1), Q, X, f, dG1, dQ, dK);
    }
    // The key path.
    float *dZ1 = buf(o.dZ1), *dT = buf(o.dT);
    if (mlp) {
      float *dP = buf(o.dP), *dZ2 = buf(o.dZ2);
      const float *P = buf(o.P), *H = buf(o.H), *Z1 = buf(o.Z1);
      // G1 = P ⊙ H, P = G2 W2ᵀ, H = gelu_bwd(Z1)
      for (int e = threadIdx.x; e < n * F; e += nthreads()) {
        dP[e] = dG1[e] * H[e];
        dZ1[e] = dG1[e] * P[e] * gelu_bwd_trunc_grad(Z1[e]);
      }
      __syncthreads();
      mm<false, false>(n, f, F, dP, F, w.W2, f, [&](int i, int c, float a) { dG2[i * f + c] += a; });
      mm<true, false>(F, f, n, dP, F, G2, f, [&](int e, int c, float a) { d.W2[e * f + c] += a; });
      __syncthreads();
      ln_l2_backward(dG2, G2, dZ2, dT);
      // Z2 = A1 W2 + b2, A1 = gelu(Z1)
      mm<false, true>(n, F, f, dZ2, f, w.W2, f, [&](int i, int c, float a) {
        dZ1[i * F + c] += (dA1[i * F + c] + a) * gelu_grad(Z1[i * F + c]);
      });
      mm<true, false>(F, f, n, A1, F, dZ2, f, [&](int e, int c, float a) { d.W2[e * f + c] += a; });
      col_sums(n, f, dZ2, [&](int c, float s) { d.b2[c] += s; });
      __syncthreads();
    } else {
      ln_l2_backward(dG1, G1, dZ1, dT);
    }
    // Z1 = K W1 + b1, T = V − K
    mm<true, false>(f, F, n, X, f, dZ1, F, [&](int e, int c, float a) { d.W1[e * F + c] += a; });
    col_sums(n, F, dZ1, [&](int c, float s) { d.b1[c] += s; });
    mm<false, true>(n, f, F, dZ1, F, w.W1, F, [&](int i, int e, float a) { dK[i * f + e] += a; });
    __syncthreads();
    const int64_t row = (int64_t(blockIdx.x) * p.L + t0) * f;
    for (int e = threadIdx.x; e < n * f; e += nthreads()) {
      p.dxq[row + e] = dQ[e];
      p.dxk[row + e] = dK[e] - dT[e];
      p.dxv[row + e] = dT[e];
    }
    if (threadIdx.x < n) p.dlr[int64_t(blockIdx.x) * p.L + t0 + threadIdx.x] = dlr[threadIdx.x];
    __syncthreads();
  }
};

// One (b, h)'s Head with τ, γ, β loaded into the small shared-memory part and the running
// dτ, dγ, dβ zeroed; the caller sets ws (the local buffers) and t0 / n per mini-batch.
__device__ __forceinline__ Head make_head(const Params& p, int task) {
  const int f = p.f, K = p.K, h = task % p.nh;
  float* sm = smem();
  Head hd{p, f, p.F, K};
  hd.q = p.xq + int64_t(task) * p.L * f;
  hd.k = p.xk + int64_t(task) * p.L * f;
  hd.v = p.xv + int64_t(task) * p.L * f;
  hd.lr = p.lr + int64_t(task) * p.L;
  hd.tau = sm, hd.gam = sm + K, hd.bet = sm + K + f, hd.dtau = sm + K + 2 * f, hd.dgam = sm + 2 * K + 2 * f;
  hd.dbet = sm + 2 * K + 3 * f, hd.dlr = sm + 2 * K + 4 * f, hd.rowk = sm + 3 * K + 4 * f;
  for (int i = threadIdx.x; i < K; i += nthreads()) hd.tau[i] = p.tau[i], hd.dtau[i] = 0.f;
  for (int j = threadIdx.x; j < f; j += nthreads()) {
    hd.gam[j] = p.ln_w[h * f + j], hd.bet[j] = p.ln_b[h * f + j];
    hd.dgam[j] = 0.f, hd.dbet[j] = 0.f;
  }
  return hd;
}

}  // namespace ttt::layers::cuda_kernels::bwd
