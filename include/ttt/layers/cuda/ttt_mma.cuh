#pragma once
// TTT inner loops on tensor cores (nvcc only; TttOperands::bf16): mma.sync m16n8k16 with bf16
// operands and float accumulation. The fast weights, the running sums, the LayerNorm
// statistics and the gradients stay float; only the operands of the matrix products are
// rounded to bf16. Contract and semantics: ttt/layers/ttt_kernels.hpp (the same segments,
// phases and commit rules as the fp32 kernels of ttt_kernels.cuh).
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

namespace ttt::layers {
namespace cuda_detail {
namespace tc {

constexpr int kTile = 16;  // tokens of a segment tile (K <= 16)

// ---- fragments ------------------------------------------------------------------------------
// m16n8k16 (PTX ISA), g = lane / 4, t = lane % 4:
//   A 16x16: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B 16x8:  b[0] = (2t..2t+1, g), b[1] = (2t+8..2t+9, g)
//   C 16x8:  c[0], c[1] = (g, 2t), (g, 2t+1); c[2], c[3] = (g+8, 2t), (g+8, 2t+1)

__device__ __forceinline__ uint32_t pack(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();  // the host plans these kernels only on devices of compute capability >= 8.0
#endif
}

// The A fragment of a 16x16 tile held as two accumulator tiles (columns 0-7 and 8-15).
__device__ __forceinline__ void a_from_c(uint32_t (&a)[4], const float (&c0)[4], const float (&c1)[4]) {
  a[0] = pack(c0[0], c0[1]);
  a[1] = pack(c0[2], c0[3]);
  a[2] = pack(c1[0], c1[1]);
  a[3] = pack(c1[2], c1[3]);
}
__device__ __forceinline__ void a_from_c4(uint32_t (&a)[4], const float4& c0, const float4& c1) {
  a[0] = pack(c0.x, c0.y);
  a[1] = pack(c0.z, c0.w);
  a[2] = pack(c1.x, c1.y);
  a[3] = pack(c1.z, c1.w);
}

// B fragment of Xᵀ (k = features k0.., n = tokens n0..) from X [tokens][features] float in
// shared memory, row stride ld (ld = 8 mod 32 keeps the half-warps conflict-free).
__device__ __forceinline__ void b_rows(uint32_t (&b)[2], const float* X, int ld, int n0, int k0, int g, int t) {
  const float2 lo = *reinterpret_cast<const float2*>(X + (n0 + g) * ld + k0 + 2 * t);
  const float2 hi = *reinterpret_cast<const float2*>(X + (n0 + g) * ld + k0 + 2 * t + 8);
  b[0] = pack(lo.x, lo.y);
  b[1] = pack(hi.x, hi.y);
}

// B fragment of X (k = tokens 0..15, n = features n0..n0+7) from X [tokens][features].
__device__ __forceinline__ void b_cols(uint32_t (&b)[2], const float* X, int ld, int n0, int g, int t) {
  const float* c = X + n0 + g;
  b[0] = pack(c[(2 * t) * ld], c[(2 * t + 1) * ld]);
  b[1] = pack(c[(2 * t + 8) * ld], c[(2 * t + 9) * ld]);
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned s = unsigned(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void zero(float (&c)[4]) { c[0] = c[1] = c[2] = c[3] = 0.f; }

// ---- asynchronous copies ----------------------------------------------------------------------

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const unsigned s = unsigned(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Rows [0, n) of q, k, v (tokens row0.., [rows, HD] float) into X [3][16][LD], rows >= n
// zero-filled; lr into lrs [16] (0 past n).
template <int HD, int LD>
__device__ __forceinline__ void issue_segment(const InnerParams& p, int64_t row0, int n, float* X, float* lrs) {
  constexpr int C4 = HD / 4, PER = kTile * C4;
  for (int e = threadIdx.x; e < 3 * PER; e += blockDim.x) {
    const int which = e / PER, r = (e % PER) / C4, c = (e % C4) * 4;
    const float* base = which == 0 ? p.xq : which == 1 ? p.xk : p.xv;
    const bool ok = r < n;
    cp_async16(X + (which * kTile + r) * LD + c, base + (ok ? (row0 + r) * HD + c : 0), ok);
  }
  if (threadIdx.x < kTile) {
    const int i = threadIdx.x;
    cp_async4(lrs + i, p.lr + (i < n ? row0 + i : 0), i < n);
  }
  cp_async_commit();
}

// ---- column statistics ----------------------------------------------------------------------
// A thread holds, for a pair of accumulator tiles z0 (tokens 0-7) and z1 (tokens 8-15), four
// token columns ("slots" s = 0..3: tile s / 2, column 2t + s % 2) of two rows each (g, g+8).

__device__ __forceinline__ int slot_token(int s, int t) { return 8 * (s >> 1) + 2 * t + (s & 1); }
__device__ __forceinline__ float slot_val(const float (&z0)[4], const float (&z1)[4], int s, int hi) {
  return (s < 2 ? z0 : z1)[(s & 1) + 2 * hi];
}

// Welford (mean, M2) of each slot over the warp's 16 rows; lanes 0..3 publish to red[warp][token].
__device__ __forceinline__ void stats_partial(const float (&z0)[4], const float (&z1)[4], float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
  float mean[4], m2[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const float a = slot_val(z0, z1, s, 0), c = slot_val(z0, z1, s, 1);
    mean[s] = 0.5f * (a + c);
    m2[s] = 0.5f * (a - c) * (a - c);
  }
  float n = 2.f;
#pragma unroll
  for (int off = 4; off < 32; off <<= 1, n *= 2.f) {
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      const float om = __shfl_xor_sync(0xffffffffu, mean[s], off), oq = __shfl_xor_sync(0xffffffffu, m2[s], off);
      const float d = om - mean[s];
      mean[s] += 0.5f * d;
      m2[s] += oq + 0.5f * n * d * d;
    }
  }
  if (lane < 4)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      float* r = red + (warp * kTile + slot_token(s, t)) * 2;
      r[0] = mean[s];
      r[1] = m2[s];
    }
}

// The CTA's statistics of each slot (merged in warp order: identical in every thread).
template <int NW>
__device__ __forceinline__ void stats_final(const float* red, int rows, float eps, float (&mu)[4], float (&rstd)[4]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int tok = slot_token(s, t);
    float m = red[tok * 2], q = red[tok * 2 + 1], na = 16.f;
#pragma unroll
    for (int w = 1; w < NW; ++w) {
      const float mb = red[(w * kTile + tok) * 2], qb = red[(w * kTile + tok) * 2 + 1];
      const float nn = na + 16.f, d = mb - m;
      m += d * (16.f / nn);
      q += qb + d * d * (na * 16.f / nn);
      na = nn;
    }
    mu[s] = m;
    rstd[s] = 1.f / sqrtf(q / float(rows) + eps);
  }
}

// Two sums per slot over the warp's rows; lanes 0..3 publish.
__device__ __forceinline__ void sums_partial(float (&a)[4], float (&c)[4], float* red) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, t = lane & 3;
#pragma unroll
  for (int off = 4; off < 32; off <<= 1)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      a[s] += __shfl_xor_sync(0xffffffffu, a[s], off);
      c[s] += __shfl_xor_sync(0xffffffffu, c[s], off);
    }
  if (lane < 4)
#pragma unroll
    for (int s = 0; s < 4; ++s) {
      float* r = red + (warp * kTile + slot_token(s, t)) * 2;
      r[0] = a[s];
      r[1] = c[s];
    }
}
template <int NW>
__device__ __forceinline__ void sums_final(const float* red, float (&a)[4], float (&c)[4]) {
  const int t = threadIdx.x & 3;
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int tok = slot_token(s, t);
    float x = 0.f, y = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      x += red[(w * kTile + tok) * 2];
      y += red[(w * kTile + tok) * 2 + 1];
    }
    a[s] = x;
    c[s] = y;
  }
}

// The LayerNorm-L2 gradient (ln_fused_l2_bwd) of the key columns z0/z1 (rows o0 = 16w + g and
// o0 + 8 of `rows`) against the target V - K, into G (same layout). Two CTA-wide rounds.
template <int NW>
__device__ __forceinline__ void ln_l2_grad(const float (&z0)[4], const float (&z1)[4], const float* Ks,
                                           const float* Vs, int ld, int o0, float gam0, float gam1, float bet0,
                                           float bet1, int rows, float eps, float* red_a, float* red_b,
                                           float (&G0)[4], float (&G1)[4]) {
  const int t = threadIdx.x & 3;
  stats_partial(z0, z1, red_a);
  __syncthreads();
  float mu[4], rstd[4];
  stats_final<NW>(red_a, rows, eps, mu, rstd);
  float xh[4][2], gh[4][2], sa[4], sc[4];
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int tok = slot_token(s, t);
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) {
      const int o = o0 + 8 * hi;
      const float gm = hi ? gam1 : gam0, bt = hi ? bet1 : bet0;
      const float x = (slot_val(z0, z1, s, hi) - mu[s]) * rstd[s];
      const float target = Vs[tok * ld + o] - Ks[tok * ld + o];
      xh[s][hi] = x;
      gh[s][hi] = (gm * x + bt - target) * gm;
    }
    sa[s] = gh[s][0] + gh[s][1];
    sc[s] = gh[s][0] * xh[s][0] + gh[s][1] * xh[s][1];
  }
  sums_partial(sa, sc, red_b);
  __syncthreads();
  sums_final<NW>(red_b, sa, sc);
  const float fr = float(rows);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    float* G = s < 2 ? G0 : G1;
#pragma unroll
    for (int hi = 0; hi < 2; ++hi) G[(s & 1) + 2 * hi] = (fr * gh[s][hi] - sa[s] - xh[s][hi] * sc[s]) * (rstd[s] / fr);
  }
}

// M[i][j] = τ_{p+i} lr_j (M[i][j] + 1) for j <= i < n, else 0, on the accumulator tiles of
// Q Kᵀ (i = query token, rows; j = key token, columns).
__device__ __forceinline__ void eta_mask(float (&m0)[4], float (&m1)[4], const float* taus, const float* lrv, int pp,
                                         int n, int g, int t) {
#pragma unroll
  for (int jt = 0; jt < 2; ++jt)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      float& v = jt ? m1[c] : m0[c];
      const int i = g + ((c & 2) ? 8 : 0), j = 8 * jt + 2 * t + (c & 1);
      v = (j <= i && i < n) ? taus[pp + i] * lrv[j] * (v + 1.f) : 0.f;
    }
}

// B fragments of Mᵀ (k = key token j, n = query tokens 0-7 / 8-15) from M's accumulator tiles.
__device__ __forceinline__ void b_from_mask(uint32_t (&b0)[2], uint32_t (&b1)[2], const float (&m0)[4],
                                            const float (&m1)[4]) {
  b0[0] = pack(m0[0], m0[1]);
  b0[1] = pack(m1[0], m1[1]);
  b1[0] = pack(m0[2], m0[3]);
  b1[1] = pack(m1[2], m1[3]);
}

// A fragment of s * Gᵀ ((m = feature rows, k = key tokens), G given as two accumulator tiles)
// with per-token scales: l[0..3] = scale of tokens 2t, 2t+1, 2t+8, 2t+9.
__device__ __forceinline__ void a_scaled(uint32_t (&a)[4], const float (&G0)[4], const float (&G1)[4],
                                         const float (&l)[4]) {
  a[0] = pack(G0[0] * l[0], G0[1] * l[1]);
  a[1] = pack(G0[2] * l[0], G0[3] * l[1]);
  a[2] = pack(G1[0] * l[2], G1[1] * l[3]);
  a[3] = pack(G1[2] * l[2], G1[3] * l[3]);
}

// Σ_j lr_j G[row][j] over the thread's 4 token columns, then over the 4 lanes of the row
// (xor 1, 2: every lane of the row gets the same sum).
__device__ __forceinline__ void lr_row_sums(const float (&G0)[4], const float (&G1)[4], const float (&l)[4],
                                            float& r0, float& r1) {
  r0 = G0[0] * l[0] + G0[1] * l[1] + G1[0] * l[2] + G1[1] * l[3];
  r1 = G0[2] * l[0] + G0[3] * l[1] + G1[2] * l[2] + G1[3] * l[3];
  r0 += __shfl_xor_sync(0xffffffffu, r0, 1);
  r1 += __shfl_xor_sync(0xffffffffu, r1, 1);
  r0 += __shfl_xor_sync(0xffffffffu, r0, 2);
  r1 += __shfl_xor_sync(0xffffffffu, r1, 2);
}

// Fast weights held as Wᵀ accumulator fragments: W [in, out] row-major in global memory (row
// stride ld, the CTA's first output column at W), this thread's rows o0 / o0 + 8 of Wᵀ.
template <int NT>
__device__ __forceinline__ void load_frags(float (&Wt)[NT][4], const float* W, int64_t ld, int o0, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int r = 8 * j + 2 * t;
    Wt[j][0] = W[r * ld + o0];
    Wt[j][1] = W[(r + 1) * ld + o0];
    Wt[j][2] = W[r * ld + o0 + 8];
    Wt[j][3] = W[(r + 1) * ld + o0 + 8];
  }
}
template <int NT>
__device__ __forceinline__ void store_frags(const float (&Wt)[NT][4], float* W, int64_t ld, int o0, int t) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    const int r = 8 * j + 2 * t;
    W[r * ld + o0] = Wt[j][0];
    W[(r + 1) * ld + o0] = Wt[j][1];
    W[r * ld + o0 + 8] = Wt[j][2];
    W[(r + 1) * ld + o0 + 8] = Wt[j][3];
  }
}
__device__ __forceinline__ float4 load_frag4(const float* W, int64_t ld, int o0, int t, int j) {
  const int r = 8 * j + 2 * t;
  return make_float4(W[r * ld + o0], W[(r + 1) * ld + o0], W[r * ld + o0 + 8], W[(r + 1) * ld + o0 + 8]);
}
__device__ __forceinline__ void store_frag4(float* W, int64_t ld, int o0, int t, int j, float4 v) {
  const int r = 8 * j + 2 * t;
  W[r * ld + o0] = v.x;
  W[(r + 1) * ld + o0] = v.y;
  W[r * ld + o0 + 8] = v.z;
  W[(r + 1) * ld + o0 + 8] = v.w;
}

// Fast-weight fragments in registers (RegFrags) or in shared memory, one float4 per thread
// and 8-column tile, conflict-free (SmemFrags).
template <int NT>
struct RegFrags {
  float (&w)[NT][4];
  __device__ __forceinline__ float4 get(int j) const { return make_float4(w[j][0], w[j][1], w[j][2], w[j][3]); }
  __device__ __forceinline__ void set(int j, float4 v) const { w[j][0] = v.x, w[j][1] = v.y, w[j][2] = v.z, w[j][3] = v.w; }
};
struct SmemFrags {
  float* base;  // this thread's slot of tile 0; tile j at base + 128 j
  __device__ __forceinline__ float4 get(int j) const { return *reinterpret_cast<const float4*>(base + 128 * j); }
  __device__ __forceinline__ void set(int j, float4 v) const { *reinterpret_cast<float4*>(base + 128 * j) = v; }
};

// Wᵀ -= τ_{K-1} (S + (lr ⊙ G)ᵀ X) at a mini-batch end, else S += (lr ⊙ G)ᵀ X, with S in
// global memory (Sg, same layout as W) when `s_live`, known zero otherwise. X [tokens][in]
// in shared memory supplies the B fragments.
template <int NT, class Frags>
__device__ __forceinline__ void update_weights(const Frags& W, const uint32_t (&au)[4], const float* X, int ld,
                                               float* Sg, int64_t sld, int o0, int g, int t, bool s_live,
                                               bool complete, bool write_s, float tl) {
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    uint32_t bx[2];
    b_cols(bx, X, ld, 8 * j, g, t);
    float d[4] = {0.f, 0.f, 0.f, 0.f};
    mma(d, au, bx);
    if (s_live) {
      const float4 s = load_frag4(Sg, sld, o0, t, j);
      d[0] += s.x, d[1] += s.y, d[2] += s.z, d[3] += s.w;
    }
    if (complete) {
      float4 w = W.get(j);
      w.x -= tl * d[0], w.y -= tl * d[1], w.z -= tl * d[2], w.w -= tl * d[3];
      W.set(j, w);
    } else if (write_s) {
      store_frag4(Sg, sld, o0, t, j, make_float4(d[0], d[1], d[2], d[3]));
    }
  }
}

// Bias of the rows o0 / o0 + 8 with its running sum Sb (shared memory, written by lane t = 0).
__device__ __forceinline__ void update_bias(float& b0, float& b1, float* Sb, int o0, int t, float d0, float d1,
                                            bool complete, float tl) {
  const float s0 = Sb[o0] + d0, s1 = Sb[o0 + 8] + d1;
  __syncwarp();
  if (complete) {
    b0 -= tl * s0;
    b1 -= tl * s1;
  }
  if (t == 0) {
    Sb[o0] = complete ? 0.f : s0;
    Sb[o0 + 8] = complete ? 0.f : s1;
  }
  __syncwarp();
}

// The first layer of a segment on both paths: zz = Wᵀ [Q; K]ᵀ (query tiles 0, 1; key tiles
// 2, 3), mm = Q Kᵀ (from the same fragments), and with `carry` cr = Sᵀ Qᵀ with S read from global
// memory (row stride sld). W is held as accumulator fragments (Wt [2 KS][4]).
template <int KS, int LD>
__device__ __forceinline__ void first_layer(const float (&Wt)[2 * KS][4], const float* Qs, const float* Ks,
                                            const float* Sg, int64_t sld, int o0, int g, int t, bool carry,
                                            float (&zz)[4][4], float (&mm)[2][4], float (&cr)[2][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) zero(zz[i]);
  zero(mm[0]), zero(mm[1]), zero(cr[0]), zero(cr[1]);
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4], bq0[2], bq1[2], bk0[2], bk1[2];
    a_from_c(a, Wt[2 * kk], Wt[2 * kk + 1]);
    b_rows(bq0, Qs, LD, 0, 16 * kk, g, t);
    b_rows(bq1, Qs, LD, 8, 16 * kk, g, t);
    b_rows(bk0, Ks, LD, 0, 16 * kk, g, t);
    b_rows(bk1, Ks, LD, 8, 16 * kk, g, t);
    mma(zz[0], a, bq0);
    mma(zz[1], a, bq1);
    mma(zz[2], a, bk0);
    mma(zz[3], a, bk1);
    const uint32_t aq[4] = {bq0[0], bq1[0], bq0[1], bq1[1]};  // Q's A fragment, from its B fragments
    mma(mm[0], aq, bk0);
    mma(mm[1], aq, bk1);
    if (carry) {
      uint32_t as[4];
      a_from_c4(as, load_frag4(Sg, sld, o0, t, 2 * kk), load_frag4(Sg, sld, o0, t, 2 * kk + 1));
      mma(cr[0], as, bq0);
      mma(cr[1], as, bq1);
    }
  }
}

// z (query tiles) -= Gᵀ Mᵀ: the attention-like term (η ⊙ (Q Kᵀ + 1)) G of the query path,
// M given as its accumulator tiles (which are Mᵀ's B fragments).
__device__ __forceinline__ void sub_g_mask(float (&z0)[4], float (&z1)[4], const float (&G0)[4], const float (&G1)[4],
                                           const float (&m0)[4], const float (&m1)[4]) {
  uint32_t ag[4], bm0[2], bm1[2];
  const float neg[4] = {-1.f, -1.f, -1.f, -1.f};
  a_scaled(ag, G0, G1, neg);
  b_from_mask(bm0, bm1, m0, m1);
  mma(z0, ag, bm0);
  mma(z1, ag, bm1);
}

// out = q + LN(z) for the query tiles z0 / z1 (rows o0, o0 + 8 of the head, statistics
// already published in `red`), token rows t0 + i for i < n that `mine(i)` selects.
template <int NW, int HD, int LD, class Mine>
__device__ __forceinline__ void write_outputs(const InnerParams& p, int b, int h, int64_t t0, int n,
                                              const float (&z0)[4], const float (&z1)[4], const float* red,
                                              const float* Qs, int o0, float gam0, float gam1, float bet0, float bet1,
                                              Mine mine) {
  const int t = threadIdx.x & 3;
  float mu[4], rstd[4];
  stats_final<NW>(red, HD, p.eps, mu, rstd);
#pragma unroll
  for (int s = 0; s < 4; ++s) {
    const int i = slot_token(s, t);
    if (i >= n || !mine(i)) continue;
    float* row = out_row(p, b, h, t0 + i);
    row[o0] = Qs[i * LD + o0] + (gam0 * ((slot_val(z0, z1, s, 0) - mu[s]) * rstd[s]) + bet0);
    row[o0 + 8] = Qs[i * LD + o0 + 8] + (gam1 * ((slot_val(z0, z1, s, 1) - mu[s]) * rstd[s]) + bet1);
  }
}

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
  for (int64_t t0 = 0; t0 < p.L;) {
    const int n = n_next;
    const bool complete = pp + n == K;
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

}  // namespace tc
}  // namespace cuda_detail
}  // namespace ttt::layers
