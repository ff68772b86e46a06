#pragma once
// TTT-Linear decode (nvcc only): calls of one token, in float (both operand precisions, the
// reference's numbers). A decode step's work is a few matrix-vector products over the head's
// fast weight W and running sum S and one rank-1 update, so the kernel is a single pass over
// them: one CTA of 4f threads per (b, h), thread (row group rg, column quad cq) holds rows
// [rg f/16, (rg+1) f/16) x columns [4 cq, 4 cq + 4) of W and S in registers (16-byte loads,
// coalesced along the rows), forms its partial k W, q W and q S, and the column owners
// (threads < f) finish the LayerNorms. Then every thread applies S += lr kᵀ g (and at the
// mini-batch end W -= τ_{K-1} S, S = 0) to the values it holds and stores them once.
// Per token (ttt_reference d.2; the contract of ttt_kernels.hpp with n = 1):
//   z = k W + b, g = ln_fused_l2_bwd(z, v - k), z̄ = q W + b - τ_p (q S + Sb + lr (q·k + 1) g),
//   out = q + LN(z̄), S += lr kᵀ g, Sb += lr g.
// The statistics are two-pass in float, as the fp32 kernels compute them.
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/layers/cuda/ttt_inner_common.cuh"

namespace ttt::layers {
namespace cuda_detail {
namespace dec {

constexpr int kRowGroups = 16;

// Σ over the column owners (threads < HD, HD / 32 warps) of two values, in warp order:
// identical in every owner. `red` holds 2 * HD / 32 floats; the caller's threads all arrive.
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
  if (threadIdx.x < HD) {
    float x = 0.f, y = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) x += red[2 * w], y += red[2 * w + 1];
    a = x, b = y;
  }
  __syncthreads();  // `red` is reused by the next call
}

template <int HD>
struct DecodeLayout {
  static constexpr int RPT = HD / kRowGroups, CQ = HD / 4, THREADS = 4 * HD;
};

template <int HD>
__global__ void __launch_bounds__(4 * HD) ttt_linear_decode_kernel(const InnerParams p) {
  using Lay = DecodeLayout<HD>;
  constexpr int RPT = Lay::RPT, CQ = Lay::CQ;
  static_assert(HD >= 32 && HD % 32 == 0, "column owners fill whole warps");
  __shared__ float4 part[3][kRowGroups][CQ];  // partial k W, q W, q S per row group
  __shared__ float gvec[HD];
  __shared__ float red[2 * (HD / 32)];
  const int tid = threadIdx.x, cq = tid % CQ, rg = tid / CQ, r0 = rg * RPT, c = 4 * cq;
  const int64_t bh = blockIdx.x;
  const int b = int(bh / p.nh), h = int(bh % p.nh), K = p.K;
  float* Wg = p.W1 + bh * HD * HD;
  float* Sg = p.S1 + bh * HD * HD;
  float* bg = p.b1 + bh * HD;
  float* Sbg = p.Sb1 + bh * HD;
  const bool commit = item_commit(p, b), owner = tid < HD;
  int pp = item_phase(p, b);
  const float tl = p.tau[K - 1];

  float4 w[RPT], s[RPT];
#pragma unroll
  for (int i = 0; i < RPT; ++i) {
    w[i] = *reinterpret_cast<const float4*>(Wg + (r0 + i) * HD + c);
    s[i] = *reinterpret_cast<const float4*>(Sg + (r0 + i) * HD + c);
  }
  float bias = 0.f, sb = 0.f, gam = 0.f, bet = 0.f;
  if (owner) bias = bg[tid], sb = Sbg[tid], gam = p.ln_w[h * HD + tid], bet = p.ln_b[h * HD + tid];
  const float fh = float(HD);

  for (int64_t tok = 0; tok < p.L; ++tok) {
    const int64_t row = bh * p.L + tok;
    const float* q = p.xq + row * HD;
    const float* k = p.xk + row * HD;
    const float lr = p.lr[row], tau = p.tau[pp];
    const bool complete = pp + 1 == K;
    float4 zk = make_float4(0.f, 0.f, 0.f, 0.f), zq = zk, qs = zk;
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const float kr = k[r0 + i], qr = q[r0 + i];
      zk.x = fmaf(kr, w[i].x, zk.x), zk.y = fmaf(kr, w[i].y, zk.y), zk.z = fmaf(kr, w[i].z, zk.z);
      zk.w = fmaf(kr, w[i].w, zk.w);
      zq.x = fmaf(qr, w[i].x, zq.x), zq.y = fmaf(qr, w[i].y, zq.y), zq.z = fmaf(qr, w[i].z, zq.z);
      zq.w = fmaf(qr, w[i].w, zq.w);
      qs.x = fmaf(qr, s[i].x, qs.x), qs.y = fmaf(qr, s[i].y, qs.y), qs.z = fmaf(qr, s[i].z, qs.z);
      qs.w = fmaf(qr, s[i].w, qs.w);
    }
    part[0][rg][cq] = zk, part[1][rg][cq] = zq, part[2][rg][cq] = qs;
    __syncthreads();

    // Column owners: z, q W and q S of column tid, then the two LayerNorms over the head.
    float z = 0.f, zqv = 0.f, qsv = 0.f, qd = 0.f, kd = 0.f, target = 0.f;
    if (owner) {
      const float* p0 = reinterpret_cast<const float*>(&part[0][0][0]);
      const float* p1 = reinterpret_cast<const float*>(&part[1][0][0]);
      const float* p2 = reinterpret_cast<const float*>(&part[2][0][0]);
#pragma unroll
      for (int g = 0; g < kRowGroups; ++g) z += p0[g * HD + tid], zqv += p1[g * HD + tid], qsv += p2[g * HD + tid];
      z += bias, zqv += bias, qsv += sb;
      qd = q[tid], kd = k[tid];
      target = p.xv[row * HD + tid] - kd;
    }
    float sz = z, qk = qd * kd;
    owner_sum2<HD>(sz, qk, red);
    const float mu = sz / fh;
    float dv = owner ? (z - mu) * (z - mu) : 0.f, unused = 0.f;
    owner_sum2<HD>(dv, unused, red);
    const float rstd = 1.f / sqrtf(dv / fh + p.eps);
    const float xh = (z - mu) * rstd, gh = (gam * xh + bet - target) * gam;
    float sg = owner ? gh : 0.f, sgz = owner ? gh * xh : 0.f;
    owner_sum2<HD>(sg, sgz, red);
    const float g = (fh * gh - sg - xh * sgz) * (rstd / fh);
    const float zb = zqv - tau * (qsv + lr * (qk + 1.f) * g);
    float szb = owner ? zb : 0.f;
    owner_sum2<HD>(szb, unused, red);
    const float mub = szb / fh;
    float dvb = owner ? (zb - mub) * (zb - mub) : 0.f;
    owner_sum2<HD>(dvb, unused, red);
    if (owner) {
      const float rb = 1.f / sqrtf(dvb / fh + p.eps);
      out_row(p, b, h, tok)[tid] = qd + (gam * ((zb - mub) * rb) + bet);
      gvec[tid] = g;
      sb += lr * g;
      if (complete) bias -= tl * sb, sb = 0.f;
    }
    __syncthreads();

    // S += lr kᵀ g on the values this thread holds; the mini-batch end moves W.
    const float4 gv = *reinterpret_cast<const float4*>(gvec + c);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const float a = lr * k[r0 + i];
      s[i].x = fmaf(a, gv.x, s[i].x), s[i].y = fmaf(a, gv.y, s[i].y), s[i].z = fmaf(a, gv.z, s[i].z);
      s[i].w = fmaf(a, gv.w, s[i].w);
      if (complete) {
        w[i].x -= tl * s[i].x, w[i].y -= tl * s[i].y, w[i].z -= tl * s[i].z, w[i].w -= tl * s[i].w;
        s[i] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
    }
    pp = complete ? 0 : pp + 1;
    __syncthreads();  // gvec and part are rewritten by the next token
  }

  if (commit) {
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      *reinterpret_cast<float4*>(Wg + (r0 + i) * HD + c) = w[i];
      *reinterpret_cast<float4*>(Sg + (r0 + i) * HD + c) = s[i];
    }
    if (owner) bg[tid] = bias, Sbg[tid] = sb;
  }
}

}  // namespace dec
}  // namespace cuda_detail
}  // namespace ttt::layers
