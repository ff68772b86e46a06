#pragma once
// Kernels<Cuda> for quantised weights (nvcc only; formats in core/quant.hpp): per-row
// quantisation, dequantisation, and linear / fused_linear with an int8 or fp8 e4m3 weight.
//  - up to gemv_q_max_rows() input rows (default kGemvQDefaultRows: one decoding stream or
//    two): a GEMV that streams the 1-byte codes with 16-byte loads (16 weights per lane and
//    load), decodes them in registers, accumulates in fp32 against x staged in shared memory
//    (with fused_linear's norm prologue) and applies the row scale once per output (with the
//    GLU epilogue);
//  - more rows (a batch of streams, prefill, teacher forcing): tile by tile of output rows,
//    the codes are decoded to T (exact: every int8 and e4m3 value is a bf16 / f16 / f32) in a
//    per-thread scratch buffer and cuBLAS multiplies the tile with fp32 results; one epilogue
//    kernel then applies the row scales and the residual or GLU. The same arithmetic as the
//    GEMV (fp32 sums of code * x, scale once per output, the same roundings), so the two
//    paths agree to the fp32 summation order.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/kernels/linear.cuh"
#include "ttt/backend/cuda/quant_codes.cuh"
#include "ttt/backend/math.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/core/quant.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

// ---- quantise / dequantise -----------------------------------------------------------

template <class T>
struct QuantizeParams {
  const T* w;  // [N, K]
  uint8_t* q;  // [N, K]
  float* scale;  // [N]
  int64_t N, K;
};

// One block per row: |w| maximum, then the codes (the CPU's formula, same bytes).
template <class F, class T>
__global__ void __launch_bounds__(kRowThreads) quantize_rows_kernel(const QuantizeParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  for (int64_t n = blockIdx.x; n < p.N; n += gridDim.x) {
    const float s = quantize_row<kRowThreads, F>(p.w + n * p.K, p.K, p.q + n * p.K);
    if (threadIdx.x == 0) p.scale[n] = s;
  }
}

template <class T>
struct DequantizeParams {
  const uint8_t* q;
  const float* scale;
  T* out;
  int64_t N, K;
};

template <class F, class T>
__global__ void dequantize_kernel(const DequantizeParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t total = p.N * p.K;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
    p.out[i] = from_f32<T>(p.scale[i / p.K] * F::decode(p.q[i]));
}

// ---- GEMV with a quantised weight (R <= 8) -----------------------------------------------

constexpr int kGemvQThreads = 256, kGemvQWarps = kGemvQThreads / 32, kGemvQRowsPerWarp = 2;
constexpr int kGemvQTileBytes = 4096;  // x per row and tile, as T (32 KiB for 8 rows)
constexpr int kGemvQMaxRows = 8;       // the kernel's variants: 1, 2, 4 and 8 rows
// Rows up to which linear_q / fused_linear_q take the GEMV by default. Measured on the H200
// (7B, ttt-moshi bench, fp8): batch 1 7.68 ms per frame with the GEMV (bf16 with cuBLAS: 7.58),
// but batch 8 31.7 ms against bf16's 9.4: each extra row adds fp32 accumulators per lane
// (75 registers at 1 row, 3 blocks per SM) and another pass over x in shared memory per
// decoded chunk, so the kernel stops streaming at the bandwidth it has at one row. From
// 3 rows the dequantise + cuBLAS path below runs instead. 2 is the brief's cut, not yet a
// measured one: `tools/gpu_check.sh bench-quant` times batch 2 both ways
// (TTT_GEMV_Q_MAX_ROWS=1 forces the cuBLAS path there) to settle it.
constexpr int kGemvQDefaultRows = 2;

// Rows up to which linear_q uses the GEMV (TTT_GEMV_Q_MAX_ROWS, 0..8, or
// Kernels<Cuda>::set_gemv_q_max_rows override the default).
inline int64_t& gemv_q_max_rows() {
  static int64_t v = [] {
    const char* e = std::getenv("TTT_GEMV_Q_MAX_ROWS");
    const int64_t n = e ? std::atoll(e) : kGemvQDefaultRows;
    return std::max<int64_t>(0, std::min<int64_t>(n, kGemvQMaxRows));
  }();
  return v;
}

template <class T>
struct GemvQParams {
  const uint8_t* w;    // [N, K] codes
  const float* scale;  // [N]
  const T* x;          // [R, K]
  T* y;                // [R, N] ([R, N / 2] with glu)
  int64_t N, K;
  int R;
  float beta;
  bool vec;  // code rows 16-byte aligned (K % 16 == 0): vector loads
  GemvNorm norm = GemvNorm::none;
  const T* norm_w = nullptr;
  const T* norm_b = nullptr;
  float eps = 0.f;
  bool glu = false;
  Unary act = Unary::identity;
  int split = 1;
};

// The bf16 GEMV's structure (linear.cuh): a warp streams two rows (or a GLU gate/value
// pair), `split` warps share a row group for small matrices, x is staged (normalised) per
// tile. A lane's 16-byte chunk holds 16 codes, matched with 16 x values from shared memory.
template <class T, class F, int kR>
__global__ void __launch_bounds__(kGemvQThreads) gemv_q_kernel(const GemvQParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  constexpr int kTile = kGemvQTileBytes / int(sizeof(T));  // elements of x (and codes) per tile
  constexpr int kLoads = kTile / 16 / 32;
  constexpr int kXv = kVec<T>;
  __shared__ __align__(16) unsigned char xs_raw[kR * kGemvQTileBytes];
  __shared__ float stat_mu[kR], stat_scale[kR];
  __shared__ float partial[kGemvQWarps][kGemvQRowsPerWarp][kR];
  T* xs = reinterpret_cast<T*>(xs_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = p.split, groups = kGemvQWarps / S, group = warp / S, slice = warp % S;
  const int64_t H = p.N / 2;
  const int64_t per_group = p.glu ? 1 : kGemvQRowsPerWarp;
  const int64_t o0 = (int64_t(blockIdx.x) * groups + group) * per_group;
  int64_t wrow[kGemvQRowsPerWarp];
  bool wok[kGemvQRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kGemvQRowsPerWarp; ++i) {
    wrow[i] = p.glu ? (i == 0 ? o0 : o0 + H) : o0 + i;
    wok[i] = p.glu ? o0 < H : wrow[i] < p.N;
  }

  uint4 wv[kGemvQRowsPerWarp][kLoads];
  auto load_w = [&](int64_t k0, int len) {
    const int chunks = len / 16;
#pragma unroll
    for (int i = 0; i < kGemvQRowsPerWarp; ++i)
#pragma unroll
      for (int c = 0; c < kLoads; ++c) {
        const int ch = c * 32 + lane;
        wv[i][c] = (c % S == slice && wok[i] && ch < chunks)
                       ? __ldg(reinterpret_cast<const uint4*>(p.w + wrow[i] * p.K + k0) + ch)
                       : make_uint4(0, 0, 0, 0);
      }
  };
  if (p.vec) load_w(0, int(min64(kTile, p.K)));

  gemv_norm_prologue<T>(p, warp, lane, stat_mu, stat_scale);

  float acc[kGemvQRowsPerWarp][kR];
#pragma unroll
  for (int i = 0; i < kGemvQRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[i][r] = 0.f;

  for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
    const int len = int(min64(kTile, p.K - k0));
    if (p.vec && k0 > 0) load_w(k0, len);
    __syncthreads();
    for (int i = threadIdx.x; i < kR * len; i += kGemvQThreads) {
      const int r = i / len, j = i - r * len;
      T v{};
      if (r < p.R) v = gemv_norm_value<T>(p, r, k0 + j, stat_mu[r], stat_scale[r]);
      xs[r * kTile + j] = v;
    }
    __syncthreads();
    if (p.vec) {
      const int chunks = len / 16;
#pragma unroll
      for (int c = 0; c < kLoads; ++c) {
        const int ch = c * 32 + lane;
        if (c % S == slice && ch < chunks) {
          float wf[kGemvQRowsPerWarp][16];
#pragma unroll
          for (int i = 0; i < kGemvQRowsPerWarp; ++i) decode16<F>(wv[i][c], wf[i]);
#pragma unroll
          for (int r = 0; r < kR; ++r) {
#pragma unroll
            for (int h = 0; h < 16 / kXv; ++h) {
              float xf[kXv];
              load16(xs + r * kTile + ch * 16 + h * kXv, xf);
#pragma unroll
              for (int i = 0; i < kGemvQRowsPerWarp; ++i)
#pragma unroll
                for (int j = 0; j < kXv; ++j) acc[i][r] += wf[i][h * kXv + j] * xf[j];
            }
          }
        }
      }
    } else {
      for (int j = lane + 32 * slice; j < len; j += 32 * S) {
#pragma unroll
        for (int i = 0; i < kGemvQRowsPerWarp; ++i) {
          if (!wok[i]) continue;
          const float wf = F::decode(p.w[wrow[i] * p.K + k0 + j]);
#pragma unroll
          for (int r = 0; r < kR; ++r) acc[i][r] += wf * to_f32(xs[r * kTile + j]);
        }
      }
    }
  }
  gemv_reduce(acc, partial, warp, lane, S, group, slice);
  if (slice != 0 || lane != 0) return;
  float sc[kGemvQRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kGemvQRowsPerWarp; ++i) sc[i] = wok[i] ? p.scale[wrow[i]] : 0.f;
  if (p.glu) {
    if (o0 >= H) return;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= p.R) break;
      gemv_store_glu(p.y + r * H + o0, p.act, sc[0] * acc[0][r], sc[1] * acc[1][r]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kGemvQRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r)
      if (wok[i] && r < p.R) gemv_store(p.y + r * p.N + wrow[i], sc[i] * acc[i][r], p.beta);
}

template <class T, class F>
void launch_gemv_q(GemvQParams<T> p) {
  const CodeRows<F> rows{p.w, p.scale};
  if (p.vec && gemv_stream_fits<T>(rows, p.R, p.K)) {
    launch_gemv_stream(GemvStreamParams<T, CodeRows<F>>{rows, p.x, p.y, p.N, p.K, p.R, p.beta, p.norm, p.norm_w,
                                                        p.norm_b, p.eps, p.glu, p.act});
    return;
  }
  const int64_t outs = p.glu ? p.N / 2 : p.N;
  const int64_t per_group = p.glu ? 1 : kGemvQRowsPerWarp;
  const int64_t chunk_groups =
      std::max<int64_t>(1, (std::min<int64_t>(p.K, kGemvQTileBytes / int64_t(sizeof(T))) / 16 + 31) / 32);
  const int64_t want = 2 * int64_t(Context::get().sm_count());
  int S = 1;
  auto blocks_for = [&](int s) { return (outs + (kGemvQWarps / s) * per_group - 1) / ((kGemvQWarps / s) * per_group); };
  while (S < kGemvQWarps && blocks_for(S) < want && chunk_groups >= 2 * S) S *= 2;
  p.split = S;
  const unsigned grid = unsigned(blocks_for(S));
  if (grid == 0) return;
  if (p.R <= 1) launch(gemv_q_kernel<T, F, 1>, grid, kGemvQThreads, 0, 1, p);
  else if (p.R <= 2) launch(gemv_q_kernel<T, F, 2>, grid, kGemvQThreads, 0, 1, p);
  else if (p.R <= 4) launch(gemv_q_kernel<T, F, 4>, grid, kGemvQThreads, 0, 1, p);
  else launch(gemv_q_kernel<T, F, 8>, grid, kGemvQThreads, 0, 1, p);
}

template <class T, class F>
GemvQParams<T> gemv_q_params(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w,
                             float beta) {
  const int64_t K = x.size(1);
  return GemvQParams<T>{w.data.data(), w.scale.data(), x.data(), y.data(), w.size(0), K, int(x.size(0)), beta,
                        aligned16(w.data.data()) && K % 16 == 0};
}

// ---- more rows: decode tiles to T, cuBLAS, epilogue ----------------------------------------

// Output rows of the weight decoded per cuBLAS call: the tile (as T) is written and then read
// right away by the GEMM, so at 16 MiB (a third of the H200's 50 MB L2) it should stay in L2
// and HBM sees mostly the 1-byte codes; decoding the whole weight at once moves 5 bytes per
// weight through HBM (1 read, 2 written, 2 read), 2.5x bf16's. More tiles cost more kernel
// launches (a 7B temporal layer's four products: 25 tiles of 16 MiB, 54 kernels; 8 tiles of
// 64 MiB). Not yet measured
// against other sizes: TTT_DEQUANT_TILE_MIB (0: the whole weight in one tile) varies it, and
// `tools/gpu_check.sh bench-quant` compares 16, 64 and 0 at batch 8.
constexpr int64_t kDequantTileBytes = int64_t(16) << 20;
// fp32 results [R, N] up to this size live in the scratch (every streaming batch up to ~180
// rows of the widest 7B product); larger ones (prefill) are a temporary of their own.
constexpr int64_t kDequantAccBytes = int64_t(64) << 20;

struct DequantLimits {
  int64_t tile_bytes = -1, acc_bytes = -1;  // negative: the defaults above
};
inline DequantLimits& dequant_limits() {
  static DequantLimits v = [] {
    DequantLimits l;
    if (const char* e = std::getenv("TTT_DEQUANT_TILE_MIB")) l.tile_bytes = std::max<int64_t>(0, std::atoll(e)) << 20;
    return l;
  }();
  return v;
}
inline int64_t dequant_tile_bytes() {
  const int64_t b = dequant_limits().tile_bytes;
  return b < 0 ? kDequantTileBytes : b;
}
inline int64_t dequant_acc_bytes() {
  const int64_t b = dequant_limits().acc_bytes;
  return b < 0 ? kDequantAccBytes : b;
}

// The scratch of the dequantising path: one buffer per host thread and device, shared by every
// call on the thread's stream (its calls are ordered there, so one tile and one result buffer
// serve a whole model). Not from a step's arena, which would keep a tile per call of a frame
// (a 7B frame's weights: 14 GB). It is made at its default size (tile + results, 80 MiB) the
// first time and only grows beyond that for a wider weight or TTT_DEQUANT_TILE_MIB=0; a
// buffer it outgrows stays allocated until the thread ends, because a CUDA graph captured
// earlier may still replay with its address.
inline char* dequant_scratch(size_t bytes) {
  struct Scratch {
    std::shared_ptr<void> buf;
    size_t bytes = 0;
    std::vector<std::shared_ptr<void>> retired;
  };
  thread_local std::vector<Scratch> by_device;
  int dev = 0;
  TTT_CUDA_CHECK(cudaGetDevice(&dev));
  if (size_t(dev) >= by_device.size()) by_device.resize(size_t(dev) + 1);
  Scratch& s = by_device[size_t(dev)];
  if (s.bytes < bytes) {
    const size_t n = std::max(bytes, size_t(kDequantTileBytes + kDequantAccBytes));
    auto p = Memory<Cuda>::allocate(n);  // inside a capture: throws, and FrameGraph runs the frame eagerly
    if (s.buf) s.retired.push_back(std::move(s.buf));
    s.buf = std::move(p);
    s.bytes = n;
  }
  return static_cast<char*>(s.buf.get());
}

// out[i] = decode(q[i]) as T, exactly (int8 codes are integers up to 127, e4m3 values have 4
// significant bits and exponents -9..8: all exact in bf16, f16 and f32). 16 codes per thread
// and 16-byte load when q is 16-byte aligned.
template <class F, class T>
__global__ void decode_codes_kernel(const uint8_t* __restrict__ q, T* __restrict__ out, int64_t n, bool vec) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t done = 0;
  if (vec) {
    const int64_t chunks = n / 16;
    for (int64_t c = tid; c < chunks; c += stride) {
      float f[16];
      decode16<F>(__ldg(reinterpret_cast<const uint4*>(q) + c), f);
      // out + 16c is 16-byte aligned: the scratch is, and 16 T are 32 or 64 bytes.
      alignas(16) T v[16];
#pragma unroll
      for (int i = 0; i < 16; ++i) v[i] = from_f32<T>(f[i]);
      uint4* dst = reinterpret_cast<uint4*>(out + 16 * c);
#pragma unroll
      for (int j = 0; j < int(sizeof(T)); ++j) dst[j] = reinterpret_cast<const uint4*>(v)[j];
    }
    done = chunks * 16;
  }
  for (int64_t i = done + tid; i < n; i += stride) out[i] = from_f32<T>(F::decode(q[i]));
}

template <class T>
struct QuantEpilogueParams {
  const float* acc;    // [R, N] fp32 sums of code * x
  const float* scale;  // [N]
  T* y;                // [R, N] ([R, N / 2] with glu)
  int64_t R, N;
  float beta;
  bool glu;
  Unary act;
};

// y = scale * acc (+ beta * y), or act(gate) * value with gate and value each rounded to T
// first: the GEMV's epilogue, element for element.
template <class T>
__global__ void quant_epilogue_kernel(const QuantEpilogueParams<T> p) {
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
  const int64_t outs = p.glu ? p.N / 2 : p.N, total = p.R * outs;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t r = i / outs, o = i - r * outs;
    const float* a = p.acc + r * p.N;
    if (p.glu) {
      const float g = to_f32(from_f32<T>(p.scale[o] * a[o])), u = to_f32(from_f32<T>(p.scale[o + outs] * a[o + outs]));
      p.y[i] = from_f32<T>(math::apply(p.act, g, 1.f) * u);
    } else {
      const float v = p.scale[o] * a[o];
      p.y[i] = from_f32<T>(p.beta != 0.f ? v + p.beta * to_f32(p.y[i]) : v);
    }
  }
}

// y (+)= x [R, K] @ (scale * decode(w))^T with the epilogue of `f` (norm already applied to x):
// tiles of whole output rows of w are decoded into the scratch, each multiplied by cuBLAS
// into its columns of the fp32 result, then one epilogue kernel writes y.
template <class T, class F>
void linear_q_dequant(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w, float beta,
                      bool glu, Unary act) {
  auto& ctx = Context::get();
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  const int64_t tile_bytes = dequant_tile_bytes();
  // Rows per tile: whole rows, a multiple of 64 when there are more (cuBLAS's tiles).
  int64_t rows = tile_bytes == 0 ? N : std::max<int64_t>(1, tile_bytes / std::max<int64_t>(1, K * int64_t(sizeof(T))));
  if (rows > 64) rows = rows / 64 * 64;
  rows = std::min(rows, N);
  const size_t tile_sz = (size_t(rows * K) * sizeof(T) + 255) / 256 * 256;
  const size_t acc_sz = size_t(R * N) * sizeof(float);
  const bool acc_in_scratch = int64_t(acc_sz) <= dequant_acc_bytes();
  char* scratch = dequant_scratch(tile_sz + (acc_in_scratch ? acc_sz : 0));
  T* tile = reinterpret_cast<T*>(scratch);
  Tensor<float, Cuda> acc_t;
  float* acc = reinterpret_cast<float*>(scratch + tile_sz);
  if (!acc_in_scratch) {
    acc_t = Tensor<float, Cuda>::empty({R, N});
    acc = acc_t.data();
  }
  const uint8_t* codes = w.data.data();
  const cudaDataType_t t = cuda_type<T>();
  const float one = 1.f, zero = 0.f;
  TTT_CUBLAS_CHECK(cublasSetMathMode(ctx.cublas(), cublasMath_t(CUBLAS_DEFAULT_MATH |
                                                                CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n = std::min(rows, N - n0), count = n * K;
    const uint8_t* src = codes + n0 * K;
    launch(decode_codes_kernel<F, T>, grid_for((count + 15) / 16, 256, 8), 256, 0, 1, src, tile, count,
           aligned16(src));
    // acc^T [n, R] (column-major, ld N, at column n0) = tile [n, K] x^T: the tile row-major
    // is its transpose column-major (op T); x row-major [R, K] is x^T column-major (op N).
    TTT_CUBLAS_CHECK(cublasGemmEx(ctx.cublas(), CUBLAS_OP_T, CUBLAS_OP_N, checked_int(n, "N"), checked_int(R, "M"),
                                  checked_int(K, "K"), &one, tile, t, checked_int(std::max<int64_t>(1, K), "ld"),
                                  x.data(), t, checked_int(std::max<int64_t>(1, K), "ld"), &zero, acc + n0, CUDA_R_32F,
                                  checked_int(N, "ldc"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  QuantEpilogueParams<T> p{acc, w.scale.data(), y.data(), R, N, beta, glu, act};
  launch(quant_epilogue_kernel<T>, grid_for(R * (glu ? N / 2 : N), 256, 8), 256, 0, 1, p);
}

}  // namespace cuda::kernels

template <class F, class T>
void Kernels<Cuda>::quantize_rows(const QuantWeight<F, Cuda>& out, const Tensor<T, Cuda>& w) {
  using namespace cuda::kernels;
  const int64_t N = w.size(0);
  QuantizeParams<T> p{w.data(), out.data.data(), out.scale.data(), N, w.size(1)};
  launch(quantize_rows_kernel<F, T>, unsigned(std::min<int64_t>(N, 65535)), kRowThreads, 0, 1, p);
}

template <class T, class F>
void Kernels<Cuda>::dequantize(const Tensor<T, Cuda>& out, const QuantWeight<F, Cuda>& w) {
  using namespace cuda::kernels;
  DequantizeParams<T> p{w.data.data(), w.scale.data(), out.data(), w.size(0), w.size(1)};
  launch(dequantize_kernel<F, T>, grid_for(w.numel(), 256, 8), 256, 0, 1, p);
}

template <class T, class F>
void Kernels<Cuda>::linear_q(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w,
                             float beta) {
  using namespace cuda::kernels;
  if (x.size(0) <= gemv_q_max_rows()) {
    launch_gemv_q<T, F>(gemv_q_params(y, x, w, beta));
    return;
  }
  linear_q_dequant(y, x, w, beta, false, Unary::identity);
}

template <class T, class F>
void Kernels<Cuda>::fused_linear_q(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w,
                                   const FusedLinear<T, Cuda>& f) {
  using namespace cuda::kernels;
  if (x.size(0) > gemv_q_max_rows()) {
    // The norm as the standalone kernels compute it (the GEMV's prologue matches them).
    Tensor<T, Cuda> xn = x;
    if (f.norm != FusedNorm::none) {
      xn = Tensor<T, Cuda>::empty(x.shape());
      if (f.norm == FusedNorm::rms) Kernels<Cuda>::rms_norm(xn, x, f.norm_weight, f.eps);
      else Kernels<Cuda>::layer_norm(xn, x, f.norm_weight, f.norm_bias, f.eps);
    }
    linear_q_dequant(y, xn, w, f.glu ? 0.f : f.beta, f.glu, f.act);
    return;
  }
  auto p = gemv_q_params(y, x, w, f.beta);
  p.norm = f.norm == FusedNorm::rms ? GemvNorm::rms : f.norm == FusedNorm::layer ? GemvNorm::layer : GemvNorm::none;
  p.norm_w = f.norm_weight.defined() ? f.norm_weight.data() : nullptr;
  p.norm_b = f.norm_bias.defined() ? f.norm_bias.data() : nullptr;
  p.eps = f.eps;
  p.glu = f.glu;
  p.act = f.act;
  launch_gemv_q<T, F>(p);
}

void Kernels<Cuda>::set_gemv_q_max_rows(int rows) {
  using namespace cuda::kernels;
  gemv_q_max_rows() = rows < 0 ? kGemvQDefaultRows : std::min(rows, kGemvQMaxRows);
}

void Kernels<Cuda>::set_dequant_tiles(int64_t tile_bytes, int64_t acc_bytes) {
  using namespace cuda::kernels;
  dequant_limits() = DequantLimits{tile_bytes, acc_bytes};
}

}  // namespace ttt
