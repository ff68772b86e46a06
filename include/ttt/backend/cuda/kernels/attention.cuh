#pragma once
// Kernels<Cuda> attention (nvcc only): masked attention over a key ring (split over the keys,
// flash-decoding style, when the rows alone do not fill the GPU) and kv_write into the ring,
// with the keys and values stored as T or quantised (QuantKv: codes and a scale per row).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/quant_codes.cuh"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- attention ------------------------------------------------------------------------

// One block per (query row, split of the keys). Per split: each thread scores whole keys
// (scores in shared memory), then the block forms softmax weights and threads over D
// accumulate the weighted values (coalesced rows of V, masked keys skipped). With more
// than one split, partial (max, sum, acc[D]) rows are merged by attention_combine_kernel
// (flash-decoding), so a single decoding query still spreads over the GPU.
constexpr int kAttnThreads = 256, kAttnMaxChunk = 2048, kAttnMinChunk = 128;

// How the kernel reads keys and values: as T, or as codes of format F with one fp32 scale
// per row (the scale multiplies the row's score and its softmax weight, never each element).
template <class T>
struct DenseKv {
  using Elem = T;
  static constexpr bool quantised = false;
  static constexpr int vec = kVec<T>;  // elements per 16-byte load
  __device__ static void load_vec(const Elem* p, float (&out)[kVec<T>]) { load16(p, out); }
  __device__ static void unpack(const uint4& u, float (&out)[kVec<T>]) { unpack16<T>(u, out); }
  __device__ static float load(const Elem* p) { return to_f32(*p); }
};
template <class F>
struct CodesKv {
  using Elem = uint8_t;
  using Format = F;
  static constexpr bool quantised = true;
  static constexpr int vec = 16;
  __device__ static void load_vec(const Elem* p, float (&out)[16]) {
    decode16<F>(*reinterpret_cast<const uint4*>(p), out);
  }
  __device__ static void unpack(const uint4& u, float (&out)[16]) { decode16<F>(u, out); }
  __device__ static float load(const Elem* p) { return decode1<F>(*p); }
};

template <class T, class KV>
struct AttentionKernelParams {
  using Elem = typename KV::Elem;
  const T* q;
  const Elem* k;
  const Elem* v;
  const float* k_scale;  // [B, Hk, S] when KV is quantised
  const float* v_scale;
  T* out;
  const int64_t* q_pos;
  const int64_t* k_pos;
  float* partial;  // [rows, splits, D + 2] when splits > 1
  int64_t qs[3], ks[3], vs[3], os[3];  // strides of dims 0..2 (the last is 1)
  int64_t qps[2], kps[2];
  int64_t T_, H, Hk, S, D, context, chunk;
  int64_t prefix, prefix_context;  // keys [0, prefix): the second key set (AttentionParams)
  const float* prefix_bias;        // [H] on the device, may be null
  float scale;
  int splits;
  bool vec_k;  // key rows 16-byte aligned
};

template <class KV>
__device__ inline float dot_key(const typename KV::Elem* k, const float* q, int64_t D, bool vec) {
  float dot = 0.f;
  if (vec) {
    constexpr int kV = KV::vec;
#pragma unroll 4
    for (int64_t d = 0; d < D; d += kV) {
      float kf[kV];
      KV::load_vec(k + d, kf);
#pragma unroll
      for (int j = 0; j < kV; ++j) dot += q[d + j] * kf[j];
    }
  } else {
    for (int64_t d = 0; d < D; ++d) dot += q[d] * KV::load(k + d);
  }
  return dot;
}

__host__ __device__ inline int64_t attention_q_floats(int64_t D) { return (D + 3) / 4 * 4; }

// Where a block works: its row (b * T + t) * H + h is blockIdx.x, its keys [s0, s1) the
// blockIdx.y-th split, its K/V head hk = h / (H / Hk) (grouped queries), and srow the quantised
// scales' row of the head's slot 0. Both attention kernels start from it.
struct AttentionBlock {
  int64_t row, b, t, h, hk, s0, s1, srow;
};

template <class P>
__device__ inline AttentionBlock attention_block(const P& p) {
  AttentionBlock a;
  a.row = blockIdx.x;
  a.h = a.row % p.H, a.t = (a.row / p.H) % p.T_, a.b = a.row / (p.H * p.T_);
  a.hk = a.h / (p.H / p.Hk);
  a.s0 = int64_t(blockIdx.y) * p.chunk, a.s1 = min64(p.S, a.s0 + p.chunk);
  a.srow = (a.b * p.Hk + a.hk) * p.S;
  return a;
}

template <class T, class KV>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttentionKernelParams<T, KV> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  extern __shared__ float smem[];
  const int64_t D = p.D;
  // qf is padded to a multiple of 4 floats: the compiler reads it 16 bytes at a time, also in
  // the tail of an odd D, and those lanes must not be w's, which other threads are writing
  // (compute-sanitizer racecheck reported it; the extra values were never used).
  float* qf = smem;                      // [D], padded to attention_q_floats(D)
  float* w = smem + attention_q_floats(D);  // [chunk]: scores, then softmax weights
  float* red = w + p.chunk;        // [kAttnThreads]: per-group partial sums of phase 3
  const auto [row, b, t, h, hk, s0, s1, srow] = attention_block(p);
  const typename KV::Elem* kb = p.k + b * p.ks[0] + hk * p.ks[1];
  const typename KV::Elem* vb = p.v + b * p.vs[0] + hk * p.vs[1];

  const T* qrow = p.q + b * p.qs[0] + t * p.qs[1] + h * p.qs[2];
  for (int64_t d = threadIdx.x; d < D; d += kAttnThreads) qf[d] = to_f32(qrow[d]);
  __syncthreads();

  // Phase 1: masked scores.
  const int64_t qp = p.q_pos[b * p.qps[0] + t * p.qps[1]];
  float m = -INFINITY;
  for (int64_t s = s0 + threadIdx.x; s < s1; s += kAttnThreads) {
    // kp <= qp before subtracting, as on the CPU: session positions may be arbitrary.
    const int64_t kp = p.k_pos[b * p.kps[0] + s * p.kps[1]];
    const bool in_prefix = s < p.prefix;
    const int64_t ctx = in_prefix ? p.prefix_context : p.context;
    float sc = -INFINITY;
    if (kp >= 0 && kp <= qp && (ctx <= 0 || qp - kp < ctx)) {
      float dot = dot_key<KV>(kb + s * p.ks[2], qf, D, p.vec_k);
      if constexpr (KV::quantised) dot *= p.k_scale[srow + s];
      sc = dot * p.scale + (in_prefix && p.prefix_bias ? p.prefix_bias[h] : 0.f);
      m = fmaxf(m, sc);
    }
    w[s - s0] = sc;
  }
  m = block_all_reduce<kAttnThreads>(m, MaxOp{});

  // Phase 2: weights (a masked key, or a split that sees none, weighs 0); a quantised
  // value row's scale joins its weight here (z sums the weights without it).
  float z = 0.f;
  for (int64_t s = s0 + threadIdx.x; s < s1; s += kAttnThreads) {
    const float sc = w[s - s0];
    const float e = sc == -INFINITY ? 0.f : expf(sc - m);
    if constexpr (KV::quantised) w[s - s0] = e * p.v_scale[srow + s];
    else w[s - s0] = e;
    z += e;
  }
  z = block_all_reduce<kAttnThreads>(z, SumOp{});  // its barrier publishes w

  // Phase 3: acc[d] = sum_s w_s v[s, d]; G groups of `span` threads split the keys.
  const int span = int(min64(D, kAttnThreads)), G = kAttnThreads / span;
  const int g = threadIdx.x / span, dl = threadIdx.x % span;
  const bool single = p.splits == 1;
  float* part = single ? nullptr : p.partial + (row * p.splits + blockIdx.y) * (D + 2);
  T* const o = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
  auto finish = [&](int64_t d, float a) {
    if (single) {
      o[d] = from_f32<T>(m == -INFINITY ? 0.f : a * (1.f / z));
    } else {
      part[2 + d] = a;
    }
  };
  if (g < G) {
    for (int64_t d = dl; d < D; d += span) {
      float a = 0.f;
      int64_t s = s0 + g;
      // Four keys per step so that four rows of V are in flight.
      for (; s + 3 * G < s1; s += 4 * G) {
        float ws[4], xs[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) ws[u] = w[s + u * G - s0];
#pragma unroll
        for (int u = 0; u < 4; ++u) xs[u] = ws[u] != 0.f ? KV::load(vb + (s + u * G) * p.vs[2] + d) : 0.f;
#pragma unroll
        for (int u = 0; u < 4; ++u) a += ws[u] * xs[u];
      }
      for (; s < s1; s += G) {
        const float ws = w[s - s0];
        if (ws != 0.f) a += ws * KV::load(vb + s * p.vs[2] + d);
      }
      if (G == 1) finish(d, a);
      else red[g * span + dl] = a;
    }
  }
  if (G > 1) {
    __syncthreads();
    if (threadIdx.x < D) {
      float a = 0.f;
      for (int j = 0; j < G; ++j) a += red[j * span + threadIdx.x];
      finish(threadIdx.x, a);
    }
  }
  if (!single && threadIdx.x == 0) {
    part[0] = m;
    part[1] = z;
  }
}

template <class T, class KV>
__global__ void __launch_bounds__(kAttnThreads) attention_combine_kernel(const AttentionKernelParams<T, KV> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t row = blockIdx.x, D = p.D, width = D + 2;
  const int64_t h = row % p.H, t = (row / p.H) % p.T_, b = row / (p.H * p.T_);
  const float* part = p.partial + row * p.splits * width;
  float m = -INFINITY;
  for (int j = 0; j < p.splits; ++j) m = fmaxf(m, part[j * width]);
  float z = 0.f;
  for (int j = 0; j < p.splits; ++j)
    if (part[j * width] != -INFINITY) z += part[j * width + 1] * expf(part[j * width] - m);
  T* o = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
  for (int64_t d = threadIdx.x; d < D; d += kAttnThreads) {
    float a = 0.f;
    for (int j = 0; j < p.splits; ++j)
      if (part[j * width] != -INFINITY) a += part[j * width + 2 + d] * expf(part[j * width] - m);
    o[d] = from_f32<T>(m == -INFINITY ? 0.f : a * (1.f / z));
  }
}

// ---- attention over 16-byte rows ------------------------------------------------------------
// Decoding at batch > 1 streams every row's keys and values once: nothing is reused, so what
// counts is keeping the memory system busy. attention_kernel above gives each thread a whole key
// (a warp's load touches 32 rows) and reads V one element per load. Here a group of
// L = D * sizeof(Elem) / 16 lanes holds one key: each lane one 16-byte piece of the key row and
// of the value row, so every load is 16 bytes, a warp's load covers 32 / L whole rows, and the
// K and V pieces of kAttnVecUnroll keys per group are in flight together. Each group keeps an
// online softmax over its keys: m = max score, z = sum_s e^(score_s - m),
// acc = sum_s e^(score_s - m) v_s (its lane's slice; a quantised row's scale joins its weight in
// acc, not in z), rescaled by e^(m_old - m_new) when the max grows. The block then merges its
// groups the same way and writes the output or, split, the (m, z, acc) row that
// attention_combine_kernel merges exactly as it merges attention_kernel's.
// The block first lists its split's visible keys (position mask) in shared memory, reading the
// positions coalesced, 128 at a time; the groups then walk that list. A ring that is not yet
// full (the first 4 minutes of a conversation) costs only its written slots, not 3000 rounds of
// dependent position loads (measured: 85 us per call at batch 8 under ncu before this).
constexpr int kAttnVecThreads = 128, kAttnVecUnroll = 4, kAttnVecMaxChunk = 1024;

template <class T, class KV, int L>
__global__ void __launch_bounds__(kAttnVecThreads) attention_vec_kernel(const AttentionKernelParams<T, KV> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int kV = KV::vec, G = kAttnVecThreads / L, U = kAttnVecUnroll, D = L * kV;
  __shared__ float s_m[G], s_z[G], s_f[G];
  __shared__ float s_acc[G * D];  // [G, D]: kAttnVecThreads * kV floats
  __shared__ int s_key[kAttnVecMaxChunk];  // visible keys of the split, as s - s0, in order
  __shared__ int s_cnt[kAttnVecThreads / 32];
  const int lane = int(threadIdx.x) % L, grp = int(threadIdx.x) / L;
  const auto [row, b, t, h, hk, s0, s1, srow] = attention_block(p);
  const typename KV::Elem* kb = p.k + b * p.ks[0] + hk * p.ks[1] + lane * kV;
  const typename KV::Elem* vb = p.v + b * p.vs[0] + hk * p.vs[1] + lane * kV;
  const int64_t* kpos = p.k_pos + b * p.kps[0];
  const int64_t qp = p.q_pos[b * p.qps[0] + t * p.qps[1]];

  // The visible keys: n of them, compacted in order (a ballot per warp, then the warps'
  // counts in order). n is the same for every thread.
  int n = 0;
  const int warp = int(threadIdx.x) / 32, wl = int(threadIdx.x) % 32;
  for (int64_t base = s0; base < s1; base += kAttnVecThreads) {
    const int64_t s = base + threadIdx.x;
    bool vis = false;
    if (s < s1) {
      // kp <= qp before subtracting, as on the CPU: session positions may be arbitrary.
      const int64_t kp = kpos[s * p.kps[1]];
      const int64_t ctx = s < p.prefix ? p.prefix_context : p.context;
      vis = kp >= 0 && kp <= qp && (ctx <= 0 || qp - kp < ctx);
    }
    const unsigned bal = __ballot_sync(0xffffffffu, vis);
    if (wl == 0) s_cnt[warp] = __popc(bal);
    __syncthreads();
    int off = n, total = 0;
#pragma unroll
    for (int w = 0; w < kAttnVecThreads / 32; ++w) {
      off += w < warp ? s_cnt[w] : 0;
      total += s_cnt[w];
    }
    if (vis) s_key[off + __popc(bal & ((1u << wl) - 1u))] = int(s - s0);
    n += total;
    __syncthreads();  // s_cnt is rewritten next round; s_key complete after the last
  }

  const T* qrow = p.q + b * p.qs[0] + t * p.qs[1] + h * p.qs[2] + lane * kV;
  float qv[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) qv[j] = to_f32(qrow[j]);
  const float bias = p.prefix_bias ? p.prefix_bias[h] : 0.f;

  float m = -INFINITY, z = 0.f, acc[kV];
#pragma unroll
  for (int j = 0; j < kV; ++j) acc[j] = 0.f;
  // Every lane runs the same iterations (the shuffles below need the whole warp).
  for (int i0 = 0; i0 < n; i0 += G * U) {
    bool ok[U];
    int64_t s[U];  // this group's u-th visible key of the step
    uint4 kr[U], vr[U];
    float ksc[U], vsc[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int i = i0 + grp + u * G;
      ok[u] = i < n;
      s[u] = ok[u] ? s0 + s_key[i] : s0;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (ok[u]) {
        kr[u] = *reinterpret_cast<const uint4*>(kb + s[u] * p.ks[2]);
        vr[u] = *reinterpret_cast<const uint4*>(vb + s[u] * p.vs[2]);
        if constexpr (KV::quantised) ksc[u] = p.k_scale[srow + s[u]], vsc[u] = p.v_scale[srow + s[u]];
      }
    }
    float sc[U];
    float mu = m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float dot = 0.f;
      if (ok[u]) {
        float kf[kV];
        KV::unpack(kr[u], kf);
#pragma unroll
        for (int j = 0; j < kV; ++j) dot += qv[j] * kf[j];
      }
#pragma unroll
      for (int o = L / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if constexpr (KV::quantised) dot *= ok[u] ? ksc[u] : 0.f;
      sc[u] = ok[u] ? dot * p.scale + (s[u] < p.prefix ? bias : 0.f) : -INFINITY;
      mu = fmaxf(mu, sc[u]);
    }
    if (mu == -INFINITY) continue;  // nothing valid yet (the same for the whole group)
    const float c = expf(m - mu);   // 0 while m is -inf
    z *= c;
#pragma unroll
    for (int j = 0; j < kV; ++j) acc[j] *= c;
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (!ok[u]) continue;
      const float e = expf(sc[u] - mu);  // a valid key scoring -inf weighs 0
      z += e;
      float w = e;
      if constexpr (KV::quantised) w *= vsc[u];
      float vf[kV];
      KV::unpack(vr[u], vf);
#pragma unroll
      for (int j = 0; j < kV; ++j) acc[j] += w * vf[j];
    }
    m = mu;
  }

  // Merge the groups: M = max m_g, each group's sums scaled by e^(m_g - M).
  if (lane == 0) s_m[grp] = m, s_z[grp] = z;
#pragma unroll
  for (int j = 0; j < kV; ++j) s_acc[grp * D + lane * kV + j] = acc[j];
  __syncthreads();
  float M = -INFINITY;
  for (int g = 0; g < G; ++g) M = fmaxf(M, s_m[g]);
  if (threadIdx.x < G) s_f[threadIdx.x] = s_m[threadIdx.x] == -INFINITY ? 0.f : expf(s_m[threadIdx.x] - M);
  __syncthreads();
  float Z = 0.f;
  for (int g = 0; g < G; ++g) Z += s_z[g] * s_f[g];
  const bool single = p.splits == 1;
  float* part = single ? nullptr : p.partial + (row * p.splits + blockIdx.y) * (D + 2);
  T* o = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
  for (int d = int(threadIdx.x); d < D; d += kAttnVecThreads) {
    float a = 0.f;
    for (int g = 0; g < G; ++g) a += s_acc[g * D + d] * s_f[g];
    if (single) o[d] = from_f32<T>(M == -INFINITY ? 0.f : a * (1.f / Z));
    else part[2 + d] = a;
  }
  if (!single && threadIdx.x == 0) {
    part[0] = M;
    part[1] = Z;
  }
}

// TTT_ATTN_VEC=0 keeps every shape on attention_kernel (an A/B switch for the benchmarks).
inline bool attention_vec_enabled() {
  static const bool v = [] {
    const char* e = std::getenv("TTT_ATTN_VEC");
    return !(e && std::string(e) == "0");
  }();
  return v;
}

// Lanes per key row for attention_vec_kernel (1..32, a power of two), or 0 where the rows are
// not whole 16-byte pieces at 16-byte aligned addresses (then attention_kernel runs).
template <class T, class KV>
int attention_vec_lanes(const AttentionKernelParams<T, KV>& p, int64_t D) {
  constexpr int kV = KV::vec;
  const int64_t bytes = D * int64_t(sizeof(typename KV::Elem));
  if (!attention_vec_enabled() || bytes % 16 != 0) return 0;
  const int64_t L = bytes / 16;
  if (L > 32 || (L & (L - 1)) != 0) return 0;
  for (int i = 0; i < 3; ++i)
    if (p.ks[i] % kV != 0 || p.vs[i] % kV != 0) return 0;
  if (!aligned16(p.k) || !aligned16(p.v)) return 0;
  return int(L);
}

template <class T, class KV>
void launch_attention_vec(const AttentionKernelParams<T, KV>& p, int L, dim3 grid) {
  switch (L) {
    case 1: launch(attention_vec_kernel<T, KV, 1>, grid, kAttnVecThreads, 0, 1, p); break;
    case 2: launch(attention_vec_kernel<T, KV, 2>, grid, kAttnVecThreads, 0, 1, p); break;
    case 4: launch(attention_vec_kernel<T, KV, 4>, grid, kAttnVecThreads, 0, 1, p); break;
    case 8: launch(attention_vec_kernel<T, KV, 8>, grid, kAttnVecThreads, 0, 1, p); break;
    case 16: launch(attention_vec_kernel<T, KV, 16>, grid, kAttnVecThreads, 0, 1, p); break;
    default: launch(attention_vec_kernel<T, KV, 32>, grid, kAttnVecThreads, 0, 1, p); break;
  }
}

}  // namespace cuda::kernels

namespace cuda::kernels {

// Splits the keys, fills the rest of `p` (q, out, positions, shapes; the caller set k, v,
// their strides and scales) and launches the kernel and, when split, the combine.
template <class T, class KV>
void launch_attention(AttentionKernelParams<T, KV>& p, const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q,
                      int64_t Hk, int64_t S, const Tensor<int64_t, Cuda>& q_pos, const Tensor<int64_t, Cuda>& k_pos,
                      const AttentionParams& ap) {
  const int64_t Bn = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t rows = Bn * Tn * H;
  const int lanes = attention_vec_lanes(p, D);
  // Enough splits to give the GPU ~4 blocks per SM (8 of the smaller vector blocks), each
  // split at least kAttnMinChunk keys and at most kAttnMaxChunk (attention_kernel keeps the
  // scores in shared memory) or kAttnVecMaxChunk (so that a large batch still makes several
  // waves of blocks, not one uneven one).
  const int64_t target = (lanes ? 8 : 4) * int64_t(cuda::Context::get().sm_count());
  const int64_t max_chunk = lanes ? kAttnVecMaxChunk : kAttnMaxChunk;
  int64_t splits = rows >= target ? 1 : (target + rows - 1) / rows;
  splits = std::min(splits, (S + kAttnMinChunk - 1) / kAttnMinChunk);
  splits = std::max({splits, (S + max_chunk - 1) / max_chunk, int64_t(1)});
  TTT_CHECK(splits <= 65535, "attention: ", S, " keys is too many for the CUDA kernel");
  const int64_t chunk = (S + splits - 1) / splits;
  const size_t smem = lanes ? 0 : size_t(attention_q_floats(D) + chunk + kAttnThreads) * sizeof(float);
  TTT_CHECK(smem <= 48 * 1024, "attention: head dimension ", D, " is too large for the CUDA kernel");

  p.q = q.data(), p.out = out.data();
  p.q_pos = q_pos.data(), p.k_pos = k_pos.data();
  for (int i = 0; i < 3; ++i) p.qs[i] = q.stride(i), p.os[i] = out.stride(i);
  p.qps[0] = q_pos.stride(0), p.qps[1] = q_pos.stride(1);
  p.kps[0] = k_pos.stride(0), p.kps[1] = k_pos.stride(1);
  p.T_ = Tn, p.H = H, p.Hk = Hk, p.S = S, p.D = D, p.context = ap.context, p.chunk = chunk;
  p.prefix = ap.prefix, p.prefix_context = ap.prefix_context, p.prefix_bias = ap.prefix_bias;
  p.scale = ap.scale;
  p.splits = int(splits);
  constexpr int kV = KV::vec;
  p.vec_k = p.ks[0] % kV == 0 && p.ks[1] % kV == 0 && p.ks[2] % kV == 0 && D % kV == 0 && aligned16(p.k);

  Tensor<float, Cuda> partial;
  if (splits > 1) {
    partial = Tensor<float, Cuda>::empty({rows * splits * (D + 2)});
    p.partial = partial.data();
  }
  if (lanes) launch_attention_vec(p, lanes, dim3(unsigned(rows), unsigned(splits)));
  else launch(attention_kernel<T, KV>, dim3(unsigned(rows), unsigned(splits)), kAttnThreads, smem, 1, p);
  if (splits > 1) launch(attention_combine_kernel<T, KV>, unsigned(rows), kAttnThreads, 0, 1, p);
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::attention(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q, const Tensor<T, Cuda>& k,
                              const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& q_pos,
                              const Tensor<int64_t, Cuda>& k_pos, const AttentionParams& ap) {
  using namespace cuda::kernels;
  AttentionKernelParams<T, DenseKv<T>> p{};
  p.k = k.data(), p.v = v.data();
  for (int i = 0; i < 3; ++i) p.ks[i] = k.stride(i), p.vs[i] = v.stride(i);
  launch_attention(p, out, q, k.size(1), k.size(2), q_pos, k_pos, ap);
}

template <class T, class F>
void Kernels<Cuda>::attention_q(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q, const QuantKv<F, Cuda>& k,
                                const QuantKv<F, Cuda>& v, const Tensor<int64_t, Cuda>& q_pos,
                                const Tensor<int64_t, Cuda>& k_pos, const AttentionParams& ap) {
  using namespace cuda::kernels;
  AttentionKernelParams<T, CodesKv<F>> p{};
  p.k = k.codes.data(), p.v = v.codes.data();
  p.k_scale = k.scale.data(), p.v_scale = v.scale.data();
  for (int i = 0; i < 3; ++i) p.ks[i] = k.codes.stride(i), p.vs[i] = v.codes.stride(i);
  launch_attention(p, out, q, k.size(1), k.size(2), q_pos, k_pos, ap);
}

namespace cuda::kernels {

// ---- kv_write -------------------------------------------------------------------------

template <class T, class KV>
struct KvWriteParams {
  using Elem = typename KV::Elem;
  Elem* ring_k;
  Elem* ring_v;
  float* ring_k_scale;  // [B, H, C] when KV is quantised
  float* ring_v_scale;
  int64_t* ring_pos;
  const T* k;
  const T* v;
  const int64_t* pos;
  const uint8_t* mask;  // null: every batch item executes
  int64_t ks[3], vs[3], ps[2];
  int64_t T_, H, C, D;
};

constexpr int kKvWriteThreads = 128;

// dst[0, D) = src as T, or quantised by quantize_row (as quantize_rows_kernel stores a weight
// row): the same bytes as the CPU.
template <class T, class KV>
__device__ inline void kv_store_row(typename KV::Elem* dst, float* scale, const T* src, int64_t D) {
  if constexpr (KV::quantised) {
    const float s = quantize_row<kKvWriteThreads, typename KV::Format>(src, D, dst);
    if (threadIdx.x == 0) *scale = s;
  } else {
    for (int64_t d = threadIdx.x; d < D; d += kKvWriteThreads) dst[d] = src[d];
  }
}

// One block per (b, t, h), threads over d. A token whose slot a later token of the same
// call also writes is skipped, so the ring ends as after the CPU's sequential writes
// (last writer wins).
template <class T, class KV>
__global__ void __launch_bounds__(kKvWriteThreads) kv_write_kernel(const KvWriteParams<T, KV> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t bt = blockIdx.x, h = blockIdx.y;
  const int64_t b = bt / p.T_, t = bt % p.T_;
  if (p.mask && !p.mask[b]) return;
  auto slot_of = [&](int64_t tt) {
    const int64_t pos = p.pos[b * p.ps[0] + tt * p.ps[1]];
    return ((pos % p.C) + p.C) % p.C;
  };
  const int64_t slot = slot_of(t);
  int later = 0;
  for (int64_t t2 = t + 1 + threadIdx.x; t2 < p.T_; t2 += blockDim.x) later |= slot_of(t2) == slot;
  if (__syncthreads_or(later)) return;
  if (threadIdx.x == 0 && h == 0) p.ring_pos[b * p.C + slot] = p.pos[b * p.ps[0] + t * p.ps[1]];
  const int64_t row = (b * p.H + h) * p.C + slot;
  float* k_scale = nullptr;
  float* v_scale = nullptr;
  if constexpr (KV::quantised) k_scale = p.ring_k_scale + row, v_scale = p.ring_v_scale + row;
  kv_store_row<T, KV>(p.ring_k + row * p.D, k_scale, p.k + b * p.ks[0] + t * p.ks[1] + h * p.ks[2], p.D);
  kv_store_row<T, KV>(p.ring_v + row * p.D, v_scale, p.v + b * p.vs[0] + t * p.vs[1] + h * p.vs[2], p.D);
}

template <class T, class KV>
void launch_kv_write(KvWriteParams<T, KV>& p, const Shape& ring, const Tensor<int64_t, Cuda>& ring_pos,
                     const Tensor<T, Cuda>& k, const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& positions,
                     const Tensor<uint8_t, Cuda>& exec_mask) {
  p.ring_pos = ring_pos.data(), p.k = k.data(), p.v = v.data(), p.pos = positions.data();
  p.mask = exec_mask.defined() ? exec_mask.data() : nullptr;
  for (int i = 0; i < 3; ++i) p.ks[i] = k.stride(i), p.vs[i] = v.stride(i);
  p.ps[0] = positions.stride(0), p.ps[1] = positions.stride(1);
  p.T_ = k.size(1), p.H = ring.d[1], p.C = ring.d[2], p.D = ring.d[3];
  const int64_t blocks = ring.d[0] * p.T_;
  if (blocks == 0 || p.H == 0) return;
  launch(kv_write_kernel<T, KV>, dim3(unsigned(blocks), unsigned(p.H)), kKvWriteThreads, 0, 1, p);
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::kv_write(const Tensor<T, Cuda>& ring_k, const Tensor<T, Cuda>& ring_v,
                             const Tensor<int64_t, Cuda>& ring_pos, const Tensor<T, Cuda>& k,
                             const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& positions,
                             const Tensor<uint8_t, Cuda>& exec_mask) {
  using namespace cuda::kernels;
  KvWriteParams<T, DenseKv<T>> p{};
  p.ring_k = ring_k.data(), p.ring_v = ring_v.data();
  launch_kv_write(p, ring_k.shape(), ring_pos, k, v, positions, exec_mask);
}

template <class T, class F>
void Kernels<Cuda>::kv_write_q(const QuantKv<F, Cuda>& ring_k, const QuantKv<F, Cuda>& ring_v,
                               const Tensor<int64_t, Cuda>& ring_pos, const Tensor<T, Cuda>& k,
                               const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& positions,
                               const Tensor<uint8_t, Cuda>& exec_mask) {
  using namespace cuda::kernels;
  KvWriteParams<T, CodesKv<F>> p{};
  p.ring_k = ring_k.codes.data(), p.ring_v = ring_v.codes.data();
  p.ring_k_scale = ring_k.scale.data(), p.ring_v_scale = ring_v.scale.data();
  launch_kv_write(p, ring_k.codes.shape(), ring_pos, k, v, positions, exec_mask);
}

}  // namespace ttt
