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
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/layers/cuda/ttt_kernels.hpp"

namespace ttt::layers {
namespace cuda_detail {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kInlineItems = 64;  // batch items whose phase / commit travel in the params struct
constexpr int kMaxCluster = 8;    // the portable cluster size
constexpr int kCopyBatch = 8;     // 16-byte loads in flight per thread when staging the state

inline int64_t ceil4(int64_t x) { return (x + 3) / 4 * 4; }

// ---- shared-memory layout of the inner kernels ------------------------------------------

// Offsets in floats, each a multiple of 4 (16 bytes). Slices: Fc = F / nc.
struct InnerSmem {
  int W1 = 0, S1 = 0, b1 = 0, Sb1 = 0;  // [f, Fc] x2, [Fc] x2: this CTA's columns of W1 / S1
  int W2 = 0, S2 = 0, b2 = 0, Sb2 = 0;  // mlp: [Fc, f] x2 (this CTA's rows of W2 / S2), [f] x2 (whole)
  int tau = 0, gam = 0, bet = 0;        // [K], [f], [f]
  int QKt = 0;   // [f, 2R]: column i < R is q_i, column R + i is k_i (A of the products, transposed)
  int lrK = 0;   // [R, f]: lr_i k_i (the running sums' left factor, transposed)
  int T = 0;     // [R, f]: v - k (mlp: then Abᵀ [Fc, R] once the target is consumed)
  int lrv = 0;   // [R]
  int ZZ = 0;    // [2R, Fc] (linear: two of them): rows < R query path, rows >= R key path
  int G = 0;     // [R, Fc]: G (linear) / G1 (mlp) on this CTA's columns
  int attn = 0;  // [R, R]: η ⊙ (Q Kᵀ + 1) transposed (attn[j][i])
  int A1T = 0, lrA1 = 0;  // mlp: [Fc, R] gelu(Z1)ᵀ, [R, Fc] lr ⊙ gelu(Z1)
  int P1 = 0;             // mlp: [R, f] this CTA's part of gelu(Z1) W2
  int G2 = 0, G2T = 0;    // mlp: [R, f], [f, R] (G2T then holds z̄2 [R, f])
  int P2 = 0;             // mlp: [R, R] part of Ab A1ᵀ (transposed), then [R, f] part of Ab W2 (- carry)
  int attn2 = 0;          // mlp: [R, R]
  int rowbuf = 0;         // [kWarps, f]: one row per warp for the LayerNorms
  int total = 0;
};

inline InnerSmem inner_smem(bool mlp, int f, int F, int nc, int R, int K) {
  InnerSmem s;
  int at = 0;
  auto take = [&](int64_t n) {
    const int o = at;
    at += int(ceil4(n));
    return o;
  };
  const int Fc = F / nc;
  s.W1 = take(f * Fc), s.S1 = take(f * Fc), s.b1 = take(Fc), s.Sb1 = take(Fc);
  if (mlp) s.W2 = take(Fc * f), s.S2 = take(Fc * f), s.b2 = take(f), s.Sb2 = take(f);
  s.tau = take(K), s.gam = take(f), s.bet = take(f);
  s.QKt = take(f * 2 * R), s.lrK = take(R * f);
  s.T = take(mlp ? std::max(R * f, Fc * R) : R * f);
  s.lrv = take(R);
  s.ZZ = take((mlp ? 1 : 2) * 2 * R * Fc);
  s.G = take(R * Fc);
  s.attn = take(R * R);
  if (mlp) {
    s.A1T = take(Fc * R), s.lrA1 = take(R * Fc), s.P1 = take(R * f);
    s.G2 = take(R * f), s.G2T = take(R * f);
    s.P2 = take(R * R + R * f), s.attn2 = take(R * R);
  }
  s.rowbuf = take(kWarps * f);
  s.total = at;
  return s;
}

struct InnerParams {
  const float* xq;    // [B, nh, L, f]
  const float* xk;    // [B, nh, L, f]
  const float* xv;    // [B, nh, L, f]
  const float* lr;    // [B, nh, L]
  const float* tau;   // [K]
  const float* ln_w;  // [nh, f]
  const float* ln_b;  // [nh, f]
  float* out;         // [B, nh, L, f]
  float* W1;          // [B, nh, f, F]
  float* b1;          // [B, nh, 1, F]
  float* W2;          // [B, nh, F, f] (mlp)
  float* b2;          // [B, nh, 1, f] (mlp)
  float* S1;          // running sums, shapes of W1, b1, W2, b2
  float* Sb1;
  float* S2;
  float* Sb2;
  int64_t L;
  int nh, f, F, K, R, nc, Fc;
  float eps;
  int batch;
  int flags_dev;             // phase / commit come from phase_dev / commit_dev
  const int32_t* phase_dev;  // [B] on the device (batch > kInlineItems, or made on the device)
  const uint8_t* commit_dev;
  int32_t phase[kInlineItems];
  uint8_t commit[kInlineItems];
  InnerSmem sm;
};

// ---- device helpers -----------------------------------------------------------------------

__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 ttt_inner_smem[];  // float4: 16-byte alignment for vector accesses
  return reinterpret_cast<float*>(ttt_inner_smem);
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The same formula as the host's gelu_rows (Eigen), with CUDA's tanhf.
__device__ __forceinline__ float gelu(float x) {
  return 0.5f * x * (1.f + tanhf(0.79788456080286536f * (x + 0.044715f * (x * x * x))));
}

#if defined(_CG_HAS_CLUSTER_GROUP)
__device__ __forceinline__ int cluster_rank(int nc) {
  return nc > 1 ? int(cooperative_groups::this_cluster().block_rank()) : 0;
}
// Cluster-wide barrier with release/acquire semantics for shared memory (a block barrier
// when the "cluster" is one CTA).
__device__ __forceinline__ void cluster_sync(int nc) {
  if (nc > 1) cooperative_groups::this_cluster().sync();
  else __syncthreads();
}
// `p` (this CTA's shared memory) at the same offset in CTA `rank` of the cluster.
__device__ __forceinline__ const float* peer(const float* p, int rank, int nc) {
  return nc > 1 ? cooperative_groups::this_cluster().map_shared_rank(const_cast<float*>(p), rank) : p;
}
#else
// Built for an architecture without clusters: the host never launches nc > 1 there.
__device__ __forceinline__ int cluster_rank(int nc) { return 0; }
__device__ __forceinline__ void cluster_sync(int nc) { __syncthreads(); }
__device__ __forceinline__ const float* peer(const float* p, int rank, int nc) { return p; }
#endif

template <int N>
__device__ __forceinline__ void load_vec(const float* p, float (&v)[N]) {
  if constexpr (N == 4) {
    const float4 t = *reinterpret_cast<const float4*>(p);
    v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
  } else if constexpr (N == 2) {
    const float2 t = *reinterpret_cast<const float2*>(p);
    v[0] = t.x, v[1] = t.y;
  } else {
    v[0] = p[0];
  }
}

// C[M, N] = op over a block: acc(m, n) = Σ_k At[k lda + m] B(k, n), B(k, n) = B[k ldb + n]
// (or B[n ldb + k] with kBT); epi(m, n, acc) once per element, by the thread that owns it.
// Each thread owns TM x 4 outputs; M % TM == 0, N % 4 == 0, lda and ldb multiples of 4,
// 16-byte aligned operands (kBT reads B one float at a time).
template <int TM, bool kBT, class Epi>
__device__ __forceinline__ void gemm_tm(int M, int N, int Kd, const float* At, int lda, const float* B, int ldb,
                                        Epi& epi) {
  const int MT = M / TM, NT = N >> 2, tiles = MT * NT;
  const bool grouped = MT % 4 == 0 && NT % 8 == 0;
  for (int idx = threadIdx.x; idx < tiles; idx += kThreads) {
    int mt, nt;
    if (grouped) {  // 32 consecutive tiles form a 4 x 8 block: one wavefront per operand load
      const int g = idx >> 5, lane = idx & 31, gn = NT >> 3;
      mt = (g / gn) * 4 + (lane >> 3);
      nt = (g % gn) * 8 + (lane & 7);
    } else {
      mt = idx / NT;
      nt = idx - mt * NT;
    }
    const int m0 = mt * TM, n0 = nt * 4;
    float acc[TM][4];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
#pragma unroll 4
    for (int k = 0; k < Kd; ++k) {
      float a[TM], b[4];
      load_vec<TM>(At + k * lda + m0, a);
      if constexpr (kBT) {
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = B[(n0 + j) * ldb + k];
      } else {
        load_vec<4>(B + k * ldb + n0, b);
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) epi(m0 + i, n0 + j, acc[i][j]);
  }
}

// Picks the tile height that keeps every thread busy: 4 rows when there are enough tiles.
template <bool kBT = false, class Epi>
__device__ __forceinline__ void gemm(int M, int N, int Kd, const float* At, int lda, const float* B, int ldb, Epi epi) {
  const int t4 = (M >> 2) * (N >> 2);
  if (t4 >= kThreads) gemm_tm<4, kBT>(M, N, Kd, At, lda, B, ldb, epi);
  else if (2 * t4 >= kThreads) gemm_tm<2, kBT>(M, N, Kd, At, lda, B, ldb, epi);
  else gemm_tm<1, kBT>(M, N, Kd, At, lda, B, ldb, epi);
}

// dst[r * ld_dst + c] = src[r * ld_src + c] for a rows x cols tile (cols % 4 == 0, 16-byte
// aligned rows), kCopyBatch loads in flight per thread: staging the state is latency-bound.
__device__ __forceinline__ void copy_tile(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int rows,
                                          int cols) {
  const int c4 = cols >> 2, total = rows * c4;
  for (int base = threadIdx.x; base < total; base += kThreads * kCopyBatch) {
    float4 v[kCopyBatch];
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int e = base + u * kThreads;
      if (e < total) {
        const int r = e / c4, c = (e - r * c4) * 4;
        v[u] = *reinterpret_cast<const float4*>(src + r * ld_src + c);
      }
    }
#pragma unroll
    for (int u = 0; u < kCopyBatch; ++u) {
      const int e = base + u * kThreads;
      if (e < total) {
        const int r = e / c4, c = (e - r * c4) * 4;
        *reinterpret_cast<float4*>(dst + r * ld_dst + c) = v[u];
      }
    }
  }
}

__device__ __forceinline__ void copy_vec(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) dst[i] = src[i];
}

__device__ __forceinline__ int item_phase(const InnerParams& p, int b) {
  return p.flags_dev ? p.phase_dev[b] : p.phase[b];
}
__device__ __forceinline__ bool item_commit(const InnerParams& p, int b) {
  return (p.flags_dev ? (p.commit_dev ? p.commit_dev[b] : uint8_t(1)) : p.commit[b]) != 0;
}

// Mean and 1/sqrt(biased var + eps) of a row in shared memory, by one warp (two passes, as
// the host does).
struct RowStats {
  float mu, rstd;
};
__device__ __forceinline__ RowStats row_stats(const float* z, int n, float eps) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int j = lane; j < n; j += 32) s += z[j];
  const float mu = warp_sum(s) / float(n);
  float v = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float d = z[j] - mu;
    v += d * d;
  }
  const float var = warp_sum(v) / float(n);
  return {mu, 1.f / sqrtf(var + eps)};
}

// The sums of ln_fused_l2_bwd for row z (width n) and target t: Σĝ and Σĝẑ, with
// ĝ = (γ ẑ + β − t) γ; the gradient is then (n ĝ_j − Σĝ − ẑ_j Σĝẑ) rstd / n.
struct LnBwd {
  RowStats st;
  float sg, sgz;
  __device__ __forceinline__ float grad(int j, const float* z, const float* t, const float* gam, const float* bet,
                                        int n) const {
    const float xh = (z[j] - st.mu) * st.rstd;
    const float gh = (gam[j] * xh + bet[j] - t[j]) * gam[j];
    return (float(n) * gh - sg - xh * sgz) * (st.rstd / float(n));
  }
};
__device__ __forceinline__ LnBwd ln_bwd_row(const float* z, const float* t, const float* gam, const float* bet, int n,
                                            float eps) {
  const int lane = threadIdx.x & 31;
  LnBwd r;
  r.st = row_stats(z, n, eps);
  float a = 0.f, c = 0.f;
  for (int j = lane; j < n; j += 32) {
    const float xh = (z[j] - r.st.mu) * r.st.rstd;
    const float gh = (gam[j] * xh + bet[j] - t[j]) * gam[j];
    a += gh;
    c += gh * xh;
  }
  r.sg = warp_sum(a);
  r.sgz = warp_sum(c);
  return r;
}

// out_i = q_i + LN(z) for a row z in shared memory (one warp).
__device__ __forceinline__ void residual_ln_row(float* out, const float* q, const float* z, const float* gam,
                                                const float* bet, int n, float eps) {
  const RowStats st = row_stats(z, n, eps);
  for (int j = threadIdx.x & 31; j < n; j += 32) out[j] = q[j] + (gam[j] * ((z[j] - st.mu) * st.rstd) + bet[j]);
}

// The segment's inputs: QKt (q and k transposed), lr ⊙ k, v − k and lr, zero past row n.
// Consecutive lanes take consecutive tokens (conflict-free transposed stores); all of a
// thread's global loads are issued before its stores (one round trip per segment).
constexpr int kSegBatch = 2;
__device__ __forceinline__ void load_segment(const InnerParams& p, int64_t row0, int n, float* QKt, float* lrK,
                                             float* T, float* lrv) {
  const int f = p.f, R = p.R, R2 = 2 * R, total = R * (f >> 2);
  const float* q = p.xq + row0 * f;
  const float* k = p.xk + row0 * f;
  const float* v = p.xv + row0 * f;
  const float* lr = p.lr + row0;
  for (int base = threadIdx.x; base < total; base += kThreads * kSegBatch) {
    float4 qv[kSegBatch], kv[kSegBatch], vv[kSegBatch];
    float l[kSegBatch];
#pragma unroll
    for (int u = 0; u < kSegBatch; ++u) {
      const int e = base + u * kThreads, i = e % R, d = (e / R) * 4;
      qv[u] = kv[u] = vv[u] = make_float4(0.f, 0.f, 0.f, 0.f);
      l[u] = 0.f;
      if (e < total && i < n) {
        qv[u] = *reinterpret_cast<const float4*>(q + int64_t(i) * f + d);
        kv[u] = *reinterpret_cast<const float4*>(k + int64_t(i) * f + d);
        vv[u] = *reinterpret_cast<const float4*>(v + int64_t(i) * f + d);
        l[u] = lr[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kSegBatch; ++u) {
      const int e = base + u * kThreads, i = e % R, d = (e / R) * 4;
      if (e >= total) continue;
      const float4 a = qv[u], b = kv[u], c = vv[u];
      QKt[(d + 0) * R2 + i] = a.x, QKt[(d + 1) * R2 + i] = a.y, QKt[(d + 2) * R2 + i] = a.z;
      QKt[(d + 3) * R2 + i] = a.w;
      QKt[(d + 0) * R2 + R + i] = b.x, QKt[(d + 1) * R2 + R + i] = b.y, QKt[(d + 2) * R2 + R + i] = b.z;
      QKt[(d + 3) * R2 + R + i] = b.w;
      *reinterpret_cast<float4*>(lrK + i * f + d) = make_float4(l[u] * b.x, l[u] * b.y, l[u] * b.z, l[u] * b.w);
      *reinterpret_cast<float4*>(T + i * f + d) = make_float4(c.x - b.x, c.y - b.y, c.z - b.z, c.w - b.w);
    }
  }
  for (int i = threadIdx.x; i < R; i += kThreads) lrv[i] = i < n ? lr[i] : 0.f;
}

// row[j] = get(j) for j < n by one warp, four loads in flight per lane before the stores
// (get reads peers' shared memory: a generic load the compiler cannot move above a store).
template <class Get>
__device__ __forceinline__ void gather_row(float* row, int n, Get get) {
  for (int j0 = threadIdx.x & 31; j0 < n; j0 += 128) {
    float v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = j0 + 32 * u < n ? get(j0 + 32 * u) : 0.f;
#pragma unroll
    for (int u = 0; u < 4; ++u)
      if (j0 + 32 * u < n) row[j0 + 32 * u] = v[u];
  }
}

// init + Σ_s get(s) over the cluster in rank order (identical in every CTA), the loads
// issued together.
template <class Get>
__device__ __forceinline__ float peer_sum(float init, int nc, Get get) {
  float v[kMaxCluster];
#pragma unroll
  for (int s = 0; s < kMaxCluster; ++s) v[s] = s < nc ? get(s) : 0.f;
  float z = init;
#pragma unroll
  for (int s = 0; s < kMaxCluster; ++s)
    if (s < nc) z += v[s];
  return z;
}

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
      residual_ln_row(p.out + (row0 + i) * f, p.xq + (row0 + i) * f, row, gam, bet, F, p.eps);
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
      residual_ln_row(p.out + (row0 + i) * f, p.xq + (row0 + i) * f, Zb2 + i * f, gam, bet, f, p.eps);
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
  const uint8_t* commit_dev;          // [B] on the device when non-null
  uint8_t commit[kInlineItems];
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
    if (!(p.commit_dev ? p.commit_dev[b] : p.commit[b])) continue;
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
  const int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
  for (int64_t r = int64_t(blockIdx.x) * warps + (threadIdx.x >> 5); r < p.rows; r += int64_t(gridDim.x) * warps) {
    const int h = int(r % p.nh), f = p.f;
    float* v = p.v + r * f;
    const float* k = p.k + r * f;
    float s = 0.f;
    for (int j = lane; j < f; j += 32) s += v[j] - k[j];
    const float m = warp_sum(s) / float(f);
    float ss = 0.f;
    for (int j = lane; j < f; j += 32) {
      const float d = v[j] - k[j] - m;
      ss += d * d;
    }
    const float sd = sqrtf(warp_sum(ss) / float(f > 1 ? f - 1 : 1));
    const float inv = 1.f / (sd + p.eps);
    for (int j = lane; j < f; j += 32)
      v[j] = k[j] + (p.w[h * f + j] * ((v[j] - k[j] - m) * inv) + p.bias[h * f + j]);
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

inline auto inner_kernel(bool mlp) { return mlp ? ttt_mlp_kernel : ttt_linear_kernel; }

// Raises the kernel's dynamic shared-memory limit once per size (a host-side attribute).
inline void allow_smem(bool mlp, int64_t bytes) {
  thread_local int64_t allowed[2] = {-1, -1};
  int64_t& a = allowed[mlp ? 1 : 0];
  if (bytes > 48 * 1024 && bytes > a) {
    TTT_CUDA_CHECK(cudaFuncSetAttribute(inner_kernel(mlp), cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    a = bytes;
  }
}

// Whether clusters of nc CTAs of `bytes` shared memory can be resident at all (cached: the
// occupancy query is a host call that a decode step should not pay).
inline bool clusters_fit(bool mlp, int nc, int64_t bytes) {
  struct Entry {
    int device;
    bool mlp;
    int nc;
    int64_t bytes;
    bool fits;
  };
  thread_local std::vector<Entry> cache;
  const int device = device_info().device;
  for (const Entry& e : cache)
    if (e.device == device && e.mlp == mlp && e.nc == nc && e.bytes == bytes) return e.fits;
  allow_smem(mlp, bytes);
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(nc), 1, 1);
  cfg.blockDim = dim3(kThreads, 1, 1);
  cfg.dynamicSmemBytes = size_t(bytes);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = unsigned(nc);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int count = 0;
  if (cudaOccupancyMaxActiveClusters(&count, inner_kernel(mlp), &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    count = 0;
  }
  cache.push_back({device, mlp, nc, bytes, count > 0});
  return count > 0;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Empty when the tensors suit the kernels (contiguous, 16-byte aligned, expected shapes).
inline std::string device_layout_problem(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, bool mlp) {
  const Tensor<float, Cuda>* all[] = {&a.xq, &a.xk, &a.xv, &a.lr, &a.tau, &a.ln_weight, &a.ln_bias, &a.out,
                                      &s.W1, &s.b1, &s.W1_grad, &s.b1_grad, &s.W2, &s.b2, &s.W2_grad, &s.b2_grad};
  const int n_all = mlp ? 16 : 12;
  for (int i = 0; i < n_all; ++i)
    if (!all[i]->defined() || !all[i]->is_contiguous()) return "a tensor is undefined or not contiguous";
  const Tensor<float, Cuda>* vec[] = {&a.xq, &a.xk, &a.xv, &a.out, &s.W1, &s.W1_grad, &s.W2, &s.W2_grad};
  for (int i = 0; i < (mlp ? 8 : 6); ++i)
    if (!aligned16(vec[i]->data())) return "a tensor is not 16-byte aligned";
  return {};
}

}  // namespace cuda_detail

TttCudaPlan TttKernels<Cuda>::plan(TttConfig::Kind kind, int64_t batch, int64_t heads, int64_t L, int64_t f,
                                          int64_t F, int64_t K) {
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
    if (nc > 1 && !clusters_fit(mlp, nc, bytes)) continue;
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
  TTT_CHECK(a.phase_dev.defined() || int64_t(a.phase.size()) == Bn, "TttKernels<Cuda>::inner: ", a.phase.size(),
            " phases for batch ", Bn);
  TTT_CHECK(mlp || F == f, "TttKernels<Cuda>::inner: TTT-Linear needs W1 [B, nh, f, f], got inner width ", F,
            " for head_dim ", f);
  TTT_CHECK(a.commit.empty() || int64_t(a.commit.size()) == Bn, "TttKernels<Cuda>::inner: ", a.commit.size(),
            " commit flags for batch ", Bn);
  if (L == 0 || Bn == 0 || nh == 0) return;
  const TttCudaPlan pl = plan(a.kind, Bn, nh, L, f, F, K);
  if (!pl.device || !device_layout_problem(a, s, mlp).empty()) {
    inner_on_host(a, s);
    return;
  }

  InnerParams p{};
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data(), p.tau = a.tau.data();
  p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data(), p.out = a.out.data();
  p.W1 = s.W1.data(), p.b1 = s.b1.data(), p.S1 = s.W1_grad.data(), p.Sb1 = s.b1_grad.data();
  if (mlp) p.W2 = s.W2.data(), p.b2 = s.b2.data(), p.S2 = s.W2_grad.data(), p.Sb2 = s.b2_grad.data();
  p.L = L;
  p.nh = int(nh), p.f = int(f), p.F = int(F), p.K = int(K), p.R = pl.rows, p.nc = pl.cluster;
  p.Fc = int(F) / pl.cluster;
  p.eps = a.eps;
  p.batch = int(Bn);
  p.sm = inner_smem(mlp, p.f, p.F, p.nc, p.R, p.K);
  if (a.phase_dev.defined()) {
    // Flags made on the device (graph-safe): nothing of this step travels in the params.
    TTT_CHECK(a.phase_dev.numel() == Bn && a.phase_dev.is_contiguous() &&
                  (!a.commit_dev.defined() || (a.commit_dev.numel() == Bn && a.commit_dev.is_contiguous())),
              "TttKernels<Cuda>::inner: phase_dev / commit_dev must be contiguous [", Bn, "]");
    p.flags_dev = 1;
    p.phase_dev = a.phase_dev.data();
    p.commit_dev = a.commit_dev.defined() ? a.commit_dev.data() : nullptr;
    allow_smem(mlp, pl.smem_bytes);
    launch(inner_kernel(mlp), unsigned(Bn * nh * pl.cluster), kThreads, size_t(pl.smem_bytes), pl.cluster, p);
    return;
  }
  std::vector<int32_t> phase(static_cast<size_t>(Bn));
  std::vector<uint8_t> commit(static_cast<size_t>(Bn));
  for (int64_t b = 0; b < Bn; ++b) {
    phase[size_t(b)] = int32_t(((a.phase[size_t(b)] % K) + K) % K);
    commit[size_t(b)] = a.commit.empty() || a.commit[size_t(b)] ? 1 : 0;
  }
  Tensor<int32_t, Cuda> phase_dev;
  Tensor<uint8_t, Cuda> commit_dev;
  if (Bn <= kInlineItems) {
    std::copy(phase.begin(), phase.end(), p.phase);
    std::copy(commit.begin(), commit.end(), p.commit);
  } else {
    // Stream-ordered: the caching allocator hands these blocks out again only to later work.
    phase_dev = Tensor<int32_t, Cpu>::from_vector({Bn}, phase).to<Cuda>();
    commit_dev = Tensor<uint8_t, Cpu>::from_vector({Bn}, commit).to<Cuda>();
    p.flags_dev = 1;
    p.phase_dev = phase_dev.data();
    p.commit_dev = commit_dev.data();
  }
  allow_smem(mlp, pl.smem_bytes);
  launch(inner_kernel(mlp), unsigned(Bn * nh * pl.cluster), kThreads, size_t(pl.smem_bytes), pl.cluster, p);
}

void TttKernels<Cuda>::causal_conv(const Tensor<float, Cuda>& out_q, const Tensor<float, Cuda>& out_k,
                                          const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& history,
                                          const Tensor<float, Cuda>& wq, const Tensor<float, Cuda>& bq,
                                          const Tensor<float, Cuda>& wk, const Tensor<float, Cuda>& bk,
                                          const std::vector<uint8_t>& commit,
                                          const Tensor<uint8_t, Cuda>& commit_dev) {
  using namespace cuda_detail;
  const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), kc = history.size(2);
  for (const Tensor<float, Cuda>* t : {&out_q, &out_k, &x, &history, &wq, &bq, &wk, &bk})
    TTT_CHECK(t->is_contiguous(), "TttKernels<Cuda>::causal_conv: tensors must be contiguous");
  TTT_CHECK(commit.empty() || int64_t(commit.size()) == Bn, "causal_conv: ", commit.size(), " commit flags for batch ",
            Bn);
  if (Bn == 0 || C == 0) return;
  std::vector<uint8_t> flags(static_cast<size_t>(Bn), 1);
  for (size_t b = 0; b < commit.size(); ++b) flags[b] = commit[b] ? 1 : 0;
  ConvParams p{x.data(), history.data(), wq.data(), bq.data(), wk.data(), bk.data(), out_q.data(), out_k.data(),
               Bn, L, C, int(kc), nullptr, {}};
  Tensor<uint8_t, Cuda> flags_dev;
  if (commit_dev.defined()) {
    TTT_CHECK(commit_dev.numel() == Bn && commit_dev.is_contiguous(), "causal_conv: commit_dev must be contiguous [",
              Bn, "]");
    p.commit_dev = commit_dev.data();
  } else if (Bn <= kInlineItems) {
    std::copy(flags.begin(), flags.end(), p.commit);
  } else {
    flags_dev = Tensor<uint8_t, Cpu>::from_vector({Bn}, flags).to<Cuda>();
    p.commit_dev = flags_dev.data();
  }
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
