#pragma once
// Device pieces of the tensor-core TTT kernels (nvcc only; the kernels and the layout of
// their data: ttt_mma.cuh): m16n8k16 bf16 fragments and their conversions, cp.async copies of
// a segment's inputs, the per-token-column LayerNorm statistics and gradient, and the weight
// fragments and their in-register updates.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/layers/cuda/ttt_inner_common.cuh"

namespace ttt::layers::cuda_kernels::mma {

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

}  // namespace ttt::layers::cuda_kernels::mma
