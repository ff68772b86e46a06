#pragma once
// Device-side pieces shared by the TTT kernels (nvcc only): the inner loop's launch
// parameters, the shared-memory layout of the fp32 kernels, cluster helpers, the row
// statistics and LayerNorm pieces. Included by every layers/cuda/*.cuh.
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/layers/cuda/ttt_kernels.hpp"

namespace ttt::layers::cuda_kernels {

using namespace ::ttt::cuda::device;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
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
  float* out;         // [B, nh, L, f] with strides out_sb, out_sh, out_st (d contiguous)
  int64_t out_sb, out_sh, out_st;
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
  const int32_t* phase;   // [B] each item's mini-batch phase, made on the device
  const uint8_t* commit;  // [B] or null (every item commits)
  InnerSmem sm;
  // Checkpoints (TttCheckpoints; null: none): the state before every ck_every-th mini-batch of
  // the call, into rows [(m / ck_every) B + b] of ck_W1 [Mc B, nh, f, F] / ck_b1 [Mc B, nh, 1, F].
  // Written by ttt_linear_tc_kernel only (TttKernels<Cuda>::inner_checkpointed).
  float* ck_W1;
  float* ck_b1;
  int ck_every;
};

// ---- device helpers -----------------------------------------------------------------------

__device__ __forceinline__ float* dynamic_smem() {
  extern __shared__ float4 ttt_inner_smem[];  // float4: 16-byte alignment for vector accesses
  return reinterpret_cast<float*>(ttt_inner_smem);
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

__device__ __forceinline__ float* out_row(const InnerParams& p, int b, int h, int64_t t) {
  return p.out + b * p.out_sb + h * p.out_sh + t * p.out_st;
}

__device__ __forceinline__ int item_phase(const InnerParams& p, int b) { return p.phase[b]; }
__device__ __forceinline__ bool item_commit(const InnerParams& p, int b) { return !p.commit || p.commit[b] != 0; }


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

// ttt-video-dit's ln_reconstruction_target on one head's row, by one warp (lanes read each
// other's k and v: the caller's writes of them are fenced by __syncwarp first):
// v <- k + w ⊙ (d - mean(d)) / (std_unbiased(d) + eps) + b, d = v - k.
__device__ __forceinline__ void ln_target_row(float* v, const float* k, const float* w, const float* bias, int f,
                                              float eps) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int j = lane; j < f; j += 32) s += v[j] - k[j];
  const float m = warp_sum(s) / float(f);
  float ss = 0.f;
  for (int j = lane; j < f; j += 32) {
    const float d = v[j] - k[j] - m;
    ss += d * d;
  }
  const float sd = sqrtf(warp_sum(ss) / float(f > 1 ? f - 1 : 1));
  const float inv = 1.f / (sd + eps);
  for (int j = lane; j < f; j += 32) v[j] = k[j] + (w[j] * ((v[j] - k[j] - m) * inv) + bias[j]);
}

}  // namespace ttt::layers::cuda_kernels
