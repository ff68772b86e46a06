#pragma once
// The TTT layer's kernels around the inner loop (nvcc only): the per-call flags
// (call_flags), the video options (causal conv and its history, l2_normalize, ln_target), the
// prologue (the projection's q | k | v | lr-logit row to the inner loop's inputs, one pass)
// and post_norm. Their params structs; the entry points are in ttt_kernels.cuh.
#include <cuda_runtime.h>

#include <cstdint>

#include "ttt/backend/math.hpp"
#include "ttt/layers/cuda/ttt_inner_common.cuh"

namespace ttt::layers::cuda_kernels {

// Grid-stride launches of the element- and row-wise kernels below: at most this many blocks
// per SM (device::grid_for).
constexpr int kAuxBlocksPerSm = 16;

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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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
      sincosf(rope_freq_rn(i, f, p.theta) * pos, &sn, &cs);
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
__global__ void __launch_bounds__(kRowThreads) post_norm_kernel(const PostNormParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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

}  // namespace ttt::layers::cuda_kernels
