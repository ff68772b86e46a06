#pragma once
// Kernels<Cuda> definitions (nvcc only). Every op runs on the calling thread's stream and
// computes the CPU backend's function: same scalar formulas (ttt/backend/math.hpp), float
// arithmetic for every T, same tie and NaN rules. ttt/cuda.cuh instantiates them.
//
// Layout of this file: shared device helpers, then one section per op family, each a
// params struct, its kernel(s) and the host entry point.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <type_traits>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/math.hpp"
#include "ttt/core/rng.hpp"

namespace ttt {
namespace cuda::detail {

// ---- shared helpers ---------------------------------------------------------------

inline cudaStream_t stream() { return Context::get().stream(); }
inline void check_launch() { TTT_CUDA_CHECK(cudaGetLastError()); }

// Blocks for a grid-stride loop over n items: enough to fill the GPU, no more.
inline unsigned grid_for(int64_t n, int threads) {
  const int64_t want = (n + threads - 1) / threads;
  const int64_t cap = int64_t(Context::get().sm_count()) * 32;
  return unsigned(std::max<int64_t>(1, std::min(want, cap)));
}
// One block per row, rows beyond the cap handled by a block-stride loop.
inline unsigned grid_rows(int64_t rows) { return unsigned(std::max<int64_t>(1, std::min<int64_t>(rows, 1 << 20))); }

__host__ __device__ inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }
__host__ __device__ inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

template <class To, class From>
__device__ inline To convert(From v) {
  if constexpr (std::is_same_v<To, From>) return v;
  else if constexpr (is_floating_v<To> && is_floating_v<From>) return from_f32<To>(to_f32(v));
  else if constexpr (is_floating_v<From>) return To(to_f32(v));
  else if constexpr (is_floating_v<To>) return from_f32<To>(float(v));
  else return To(v);
}

// 16 bytes of T widened to floats (the caller guarantees 16-byte alignment).
template <class T>
inline constexpr int kVec = 16 / int(sizeof(T));

template <class T>
__device__ inline void unpack16(const uint4& u, float (&out)[kVec<T>]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (sizeof(T) == 4) {
      out[j] = __uint_as_float(w[j]);
    } else {
      T lo, hi;
      lo.bits = uint16_t(w[j]);
      hi.bits = uint16_t(w[j] >> 16);
      out[2 * j] = to_f32(lo);
      out[2 * j + 1] = to_f32(hi);
    }
  }
}
template <class T>
__device__ inline void load16(const T* p, float (&out)[kVec<T>]) {
  unpack16<T>(*reinterpret_cast<const uint4*>(p), out);
}

__device__ inline float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide reduction whose result every thread receives. Callable repeatedly in one
// kernel: the trailing barrier frees the shared storage for the next call.
template <int kThreads, class V, class Op>
__device__ inline V block_all_reduce(V v, Op op) {
  using BlockReduce = cub::BlockReduce<V, kThreads>;
  __shared__ typename BlockReduce::TempStorage tmp;
  __shared__ V result;
  V r = BlockReduce(tmp).Reduce(v, op);
  if (threadIdx.x == 0) result = r;
  __syncthreads();
  r = result;
  __syncthreads();
  return r;
}

struct SumOp {
  __device__ float operator()(float a, float b) const { return a + b; }
};
// fmaxf ignores NaN, as std::max(m, x) does in the CPU softmax and attention.
struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
// Reduce::max on the CPU keeps the first NaN it meets: NaN wins.
struct NanMaxOp {
  __device__ float operator()(float a, float b) const { return isnan(a) ? a : isnan(b) ? b : fmaxf(a, b); }
};

// A candidate of an argmax: larger value wins, ties go to the smaller index. `valid`
// false is the identity (NaN never wins).
struct ArgBest {
  float v;
  int64_t i;
  bool valid;
};
struct ArgBestOp {
  __device__ ArgBest operator()(const ArgBest& a, const ArgBest& b) const {
    if (!a.valid) return b;
    if (!b.valid) return a;
    return (a.v > b.v || (a.v == b.v && a.i < b.i)) ? a : b;
  }
};
__device__ inline void offer(ArgBest& best, float v, int64_t i) {
  if (isnan(v)) return;
  if (!best.valid || v > best.v || (v == best.v && i < best.i)) best = {v, i, true};
}

// ---- strided elementwise (copy, cast, fill, unary, binary) --------------------------

// Shapes and strides of N operands with size-1 dimensions dropped and dimensions merged
// where every operand is contiguous across them (most calls end up rank 1: no division).
template <int N>
struct Strided {
  int rank;
  int64_t size[kMaxRank];
  int64_t stride[N][kMaxRank];
};

template <int N>
Strided<N> make_strided(const Shape& shape, const std::array<Shape, N>& strides) {
  Strided<N> s{};
  for (int i = 0; i < shape.rank; ++i) {
    if (shape.d[i] == 1) continue;
    const int j = s.rank - 1;
    bool merge = j >= 0;
    for (int k = 0; k < N && merge; ++k) merge = s.stride[k][j] == strides[k].d[i] * shape.d[i];
    if (merge) {
      s.size[j] *= shape.d[i];
      for (int k = 0; k < N; ++k) s.stride[k][j] = strides[k].d[i];
    } else {
      s.size[s.rank] = shape.d[i];
      for (int k = 0; k < N; ++k) s.stride[k][s.rank] = strides[k].d[i];
      ++s.rank;
    }
  }
  if (s.rank == 0) {
    s.rank = 1;
    s.size[0] = 1;
  }
  return s;
}

template <int N>
__device__ inline void strided_offsets(const Strided<N>& s, int64_t i, int64_t (&off)[N]) {
#pragma unroll
  for (int k = 0; k < N; ++k) off[k] = 0;
#pragma unroll
  for (int d = kMaxRank - 1; d >= 0; --d) {
    if (d >= s.rank) continue;
    const int64_t c = d == 0 ? i : i % s.size[d];
    if (d) i /= s.size[d];
#pragma unroll
    for (int k = 0; k < N; ++k) off[k] += c * s.stride[k][d];
  }
}

template <int N, class F>
struct ElementwiseParams {
  Strided<N> layout;
  int64_t n;
  F f;  // f(off): the element operation, given each operand's offset
};

template <int N, class F>
__global__ void __launch_bounds__(256) elementwise_kernel(const ElementwiseParams<N, F> p) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < p.n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t off[N];
    strided_offsets(p.layout, i, off);
    p.f(off);
  }
}

template <int N, class F>
void launch_elementwise(const Shape& shape, const std::array<Shape, N>& strides, const F& f) {
  const ElementwiseParams<N, F> p{make_strided<N>(shape, strides), shape.numel(), f};
  if (p.n == 0) return;
  constexpr int kThreads = 256;
  elementwise_kernel<N, F><<<grid_for(p.n, kThreads), kThreads, 0, stream()>>>(p);
  check_launch();
}

template <class To, class From>
struct CastFn {
  To* o;
  const From* a;
  __device__ void operator()(const int64_t (&off)[2]) const { o[off[0]] = convert<To>(a[off[1]]); }
};
template <class T>
struct FillFn {
  T* o;
  T v;
  __device__ void operator()(const int64_t (&off)[1]) const { o[off[0]] = v; }
};
template <class T>
struct UnaryFn {
  T* o;
  const T* a;
  Unary op;
  float alpha;
  __device__ void operator()(const int64_t (&off)[2]) const {
    o[off[0]] = from_f32<T>(math::apply(op, to_f32(a[off[1]]), alpha));
  }
};
template <class T>
struct BinaryFn {
  T* o;
  const T* a;
  const T* b;
  Binary op;
  __device__ void operator()(const int64_t (&off)[3]) const {
    o[off[0]] = from_f32<T>(math::apply(op, to_f32(a[off[1]]), to_f32(b[off[2]])));
  }
};

// ---- row ops (reduce, argmax, softmax, norms, glu) --------------------------------------

// Rows of the last dimension: up to three outer dimensions (padded with 1 in front) and
// the element offsets of a row in the input and in the output.
struct RowLayout {
  int64_t rows, n;
  int64_t outer[3];
  int64_t in_stride[3], out_stride[3];
  int64_t in_inner;  // input stride along the row (the output's is 1)
};

// out_strides holds at least the outer dimensions' strides of the output.
inline RowLayout make_rows(const Shape& shape, const Shape& in_strides, const Shape& out_strides) {
  RowLayout L{};
  const int outer = shape.rank - 1;
  L.n = shape.d[outer];
  L.in_inner = in_strides.d[outer];
  L.rows = 1;
  for (int j = 0; j < 3; ++j) L.outer[j] = 1;
  for (int i = 0; i < outer; ++i) {
    const int j = 3 - outer + i;
    L.outer[j] = shape.d[i];
    L.in_stride[j] = in_strides.d[i];
    L.out_stride[j] = out_strides.d[i];
    L.rows *= shape.d[i];
  }
  return L;
}

__device__ inline void row_offsets(const RowLayout& L, int64_t r, int64_t& in_off, int64_t& out_off) {
  in_off = out_off = 0;
#pragma unroll
  for (int j = 2; j >= 0; --j) {
    const int64_t c = r % L.outer[j];
    r /= L.outer[j];
    in_off += c * L.in_stride[j];
    out_off += c * L.out_stride[j];
  }
}

constexpr int kRowThreads = 256;

template <class T>
struct RowParams {
  RowLayout L;
  const T* in;
  T* out;
  int64_t* index_out;  // argmax
  const T* weight;     // layer_norm (may be null), rms_norm alpha
  const T* bias;       // layer_norm (may be null)
  float eps;
  Reduce reduce;
  Unary act;  // glu
};

template <class T>
__global__ void __launch_bounds__(kRowThreads) reduce_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    float v;
    if (p.reduce == Reduce::max) {
      float acc = -INFINITY;
      for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) acc = NanMaxOp{}(acc, to_f32(x[j * L.in_inner]));
      v = block_all_reduce<kRowThreads>(acc, NanMaxOp{});
    } else {
      float acc = 0.f;
      for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) acc += to_f32(x[j * L.in_inner]);
      v = block_all_reduce<kRowThreads>(acc, SumOp{});
      if (p.reduce == Reduce::mean) v /= float(L.n);
    }
    if (threadIdx.x == 0) p.out[oo] = from_f32<T>(v);
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) argmax_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    ArgBest best{0.f, 0, false};
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) offer(best, to_f32(x[j * L.in_inner]), j);
    best = block_all_reduce<kRowThreads>(best, ArgBestOp{});
    // A row of NaNs gives index 0, as on the CPU.
    if (threadIdx.x == 0) p.index_out[oo] = best.valid ? best.i : 0;
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) softmax_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) m = fmaxf(m, to_f32(x[j * L.in_inner]));
    m = block_all_reduce<kRowThreads>(m, MaxOp{});
    float z = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) z += expf(to_f32(x[j * L.in_inner]) - m);
    z = block_all_reduce<kRowThreads>(z, SumOp{});
    const float inv = 1.f / z;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) o[j] = from_f32<T>(expf(to_f32(x[j * L.in_inner]) - m) * inv);
  }
}

// Two passes (mean, then squared deviations) like the CPU: no cancellation in E[x^2]-mu^2.
template <class T>
__global__ void __launch_bounds__(kRowThreads) layer_norm_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) s += to_f32(x[j * L.in_inner]);
    const float mu = block_all_reduce<kRowThreads>(s, SumOp{}) / float(L.n);
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      const float d = to_f32(x[j * L.in_inner]) - mu;
      ss += d * d;
    }
    const float var = block_all_reduce<kRowThreads>(ss, SumOp{}) / float(L.n);
    const float rstd = 1.f / sqrtf(var + p.eps);
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      float v = (to_f32(x[j * L.in_inner]) - mu) * rstd;
      if (p.weight) v *= to_f32(p.weight[j]);
      if (p.bias) v += to_f32(p.bias[j]);
      o[j] = from_f32<T>(v);
    }
  }
}

template <class T>
__global__ void __launch_bounds__(kRowThreads) rms_norm_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* x = p.in + io;
    T* o = p.out + oo;
    float ss = 0.f;
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads) {
      const float v = to_f32(x[j * L.in_inner]);
      ss += v * v;
    }
    ss = block_all_reduce<kRowThreads>(ss, SumOp{});
    const float rs = 1.f / sqrtf(p.eps + ss / float(L.n));
    for (int64_t j = threadIdx.x; j < L.n; j += kRowThreads)
      o[j] = from_f32<T>(to_f32(x[j * L.in_inner]) * (to_f32(p.weight[j]) * rs));
  }
}

// L describes the output rows (width H); the input row (width 2H, unit stride) shares
// the output's outer coordinates through in_stride. blockIdx.y spreads a row's columns.
template <class T>
__global__ void __launch_bounds__(kRowThreads) glu_kernel(const RowParams<T> p) {
  const RowLayout& L = p.L;
  for (int64_t r = blockIdx.x; r < L.rows; r += gridDim.x) {
    int64_t io, oo;
    row_offsets(L, r, io, oo);
    const T* g = p.in + io;
    T* o = p.out + oo;
    for (int64_t j = int64_t(blockIdx.y) * kRowThreads + threadIdx.x; j < L.n; j += int64_t(gridDim.y) * kRowThreads)
      o[j] = from_f32<T>(math::apply(p.act, to_f32(g[j]), 1.f) * to_f32(g[L.n + j]));
  }
}

template <class T, class Kernel>
void launch_rows(Kernel kernel, const RowParams<T>& p) {
  if (p.L.rows == 0) return;
  kernel<<<grid_rows(p.L.rows), kRowThreads, 0, stream()>>>(p);
  check_launch();
}

// ---- matrix products (cuBLAS) ------------------------------------------------------

template <class T>
constexpr cudaDataType_t cuda_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, bf16>) return CUDA_R_16BF;
  else if constexpr (std::is_same_v<T, f16>) return CUDA_R_16F;
  else static_assert(always_false_v<T>, "cuBLAS products support float, bf16 and f16");
}

// A row-major view X [rows, cols] (element (r, c) at r * sr + c * sc) as the column-major
// operand op(P) = X^T [cols, rows] that cuBLAS multiplies. A dimension of extent 1 may
// have any stride; anything else must be unit-stride on one side (no copy then).
struct GemmOperand {
  cublasOperation_t op;
  int64_t ld;
  bool ok;
};
inline GemmOperand as_transposed(int64_t rows, int64_t cols, int64_t sr, int64_t sc) {
  const int64_t min_cols = std::max<int64_t>(1, cols), min_rows = std::max<int64_t>(1, rows);
  // X's rows are contiguous: P = X^T column-major with leading dimension sr.
  if ((sc == 1 || cols == 1) && (rows == 1 || sr >= min_cols)) return {CUBLAS_OP_N, rows == 1 ? min_cols : sr, true};
  // X's columns are contiguous: X itself column-major with leading dimension sc, transposed.
  if ((sr == 1 || rows == 1) && (cols == 1 || sc >= min_rows)) return {CUBLAS_OP_T, cols == 1 ? min_rows : sc, true};
  return {CUBLAS_OP_N, 0, false};
}

inline int checked_int(int64_t v, const char* what) {
  TTT_CHECK(v >= 0 && v <= INT_MAX, "cuBLAS: ", what, " = ", v, " does not fit in an int");
  return int(v);
}

// C [M, N] row-major (leading dimension ldc) = alpha * op(A-desc) op(B-desc) + beta * C,
// `batch` times with the given element strides. In cuBLAS's column-major terms this is
// C^T = B^T A^T, so the right operand comes first.
template <class T>
struct GemmCall {
  const T* a;  // left operand X [M, K]
  GemmOperand da;
  int64_t stride_a;
  const T* b;  // right operand X [K, N]
  GemmOperand db;
  int64_t stride_b;
  T* c;
  int64_t ldc, stride_c;
  int64_t M, N, K, batch;
  float alpha, beta;
};

template <class T>
void run_gemm(const GemmCall<T>& g) {
  auto& ctx = Context::get();
  const cudaDataType_t t = cuda_type<T>();
  // fp32 accumulation for every T (ops.hpp): no TF32, and no 16-bit split-K reductions,
  // which cuBLAS otherwise allows for bf16/f16 GEMMs. Host-side state: cheap, capturable.
  TTT_CUBLAS_CHECK(cublasSetMathMode(ctx.cublas(), cublasMath_t(CUBLAS_DEFAULT_MATH |
                                                                CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
  TTT_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      ctx.cublas(), g.db.op, g.da.op, checked_int(g.N, "N"), checked_int(g.M, "M"), checked_int(g.K, "K"), &g.alpha,
      g.b, t, checked_int(g.db.ld, "ld"), g.stride_b, g.a, t, checked_int(g.da.ld, "ld"), g.stride_a, &g.beta, g.c, t,
      checked_int(g.ldc, "ldc"), g.stride_c, checked_int(g.batch, "batch"), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

// ---- GEMV for small batches (linear and fused_linear with R <= 8) --------------------

// Each warp streams kGemvRowsPerWarp rows of W with 16-byte loads, up to kGemvLoads of them
// per row in flight per lane, against x staged in shared memory in tiles of
// kGemvTileBytes per row (stored as T so that a lane's x chunk lines up with its W chunk:
// conflict-free 16-byte shared loads).
//  - split > 1: that many warps share a row group, each taking every split-th chunk, and
//    combine in shared memory: small matrices (the depformer's) then still fill the GPU.
//  - norm prologue: x is normalised (RMS or Layer norm, statistics exactly as the
//    standalone norm kernels compute them) and rounded to T while staged.
//  - glu epilogue: a row group is (gate row n, value row n + N/2) and the output is
//    act(gate) * value, each rounded to T first, as linear + glu would store them.
constexpr int kGemvThreads = 256, kGemvWarps = kGemvThreads / 32, kGemvRowsPerWarp = 2;
constexpr int kGemvTileBytes = 4096, kGemvLoads = kGemvTileBytes / 16 / 32;
constexpr int kGemvMaxRows = 8;
// Rows up to which our GEMV is used by default. Measured on the H100 with the 7B (bf16,
// ttt-moshi bench): cuBLAS is faster at every batch size for now -- batch 1: 8.85 ms/frame
// with cuBLAS vs 10.85 with this kernel (its fused norm/GLU variants stream at 1.9-2.2 TB/s,
// the plain one at 2.6-2.8); batch 8: 10.7 vs 37.3 (register pressure at 8 rows). The kernel
// stays, tested, behind TTT_GEMV_MAX_ROWS for that work to continue (docs/perf.md).
constexpr int kGemvDefaultRows = 0;

enum class GemvNorm : uint8_t { none, rms, layer };

// Rows up to which linear uses the GEMV kernel instead of cuBLAS (TTT_GEMV_MAX_ROWS or
// Kernels<Cuda>::set_gemv_max_rows override the default).
inline int64_t& gemv_max_rows() {
  static int64_t v = [] {
    const char* e = std::getenv("TTT_GEMV_MAX_ROWS");
    const int64_t n = e ? std::atoll(e) : kGemvDefaultRows;
    return std::max<int64_t>(0, std::min<int64_t>(n, kGemvMaxRows));
  }();
  return v;
}

template <class T>
struct GemvParams {
  const T* w;  // [N, K]
  const T* x;  // [R, K]
  T* y;        // [R, N] ([R, N / 2] with glu)
  int64_t N, K;
  int R;
  float beta;
  bool vec;  // W rows 16-byte aligned: vector loads
  GemvNorm norm = GemvNorm::none;
  const T* norm_w = nullptr;  // alpha (rms) or weight (layer), may be null for layer
  const T* norm_b = nullptr;
  float eps = 0.f;
  bool glu = false;
  Unary act = Unary::identity;
  int split = 1;
};

template <class T, int kR>
__global__ void __launch_bounds__(kGemvThreads) gemv_kernel(const GemvParams<T> p) {
  constexpr int kTile = kGemvTileBytes / int(sizeof(T));
  constexpr int kV = kVec<T>;
  __shared__ __align__(16) unsigned char xs_raw[kR * kGemvTileBytes];
  __shared__ float stat_mu[kR], stat_scale[kR];
  __shared__ float partial[kGemvWarps][kGemvRowsPerWarp][kR];
  T* xs = reinterpret_cast<T*>(xs_raw);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int S = p.split, groups = kGemvWarps / S, group = warp / S, slice = warp % S;
  const int64_t H = p.N / 2;
  const int64_t per_group = p.glu ? 1 : kGemvRowsPerWarp;
  const int64_t o0 = (int64_t(blockIdx.x) * groups + group) * per_group;
  int64_t wrow[kGemvRowsPerWarp];
  bool wok[kGemvRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; ++i) {
    wrow[i] = p.glu ? (i == 0 ? o0 : o0 + H) : o0 + i;
    wok[i] = p.glu ? o0 < H : wrow[i] < p.N;
  }

  // The weight chunks of a tile are requested before x is staged (and, for the first tile,
  // before the norm statistics): the HBM latency overlaps the shared-memory work.
  uint4 wv[kGemvRowsPerWarp][kGemvLoads];
  auto load_w = [&](int64_t k0, int len) {
    const int chunks = len / kV;
#pragma unroll
    for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
      for (int c = 0; c < kGemvLoads; ++c) {
        const int ch = c * 32 + lane;
        wv[i][c] = (c % S == slice && wok[i] && ch < chunks)
                       ? __ldg(reinterpret_cast<const uint4*>(p.w + wrow[i] * p.K + k0) + ch)
                       : make_uint4(0, 0, 0, 0);
      }
  };
  if (p.vec) load_w(0, int(min64(kTile, p.K)));

  if (p.norm != GemvNorm::none) {
    // Warp r reduces row r (rows are at most 8, warps 8): no block-wide reductions in front
    // of the weight stream. Statistics in fp32, mean first then squared deviations.
    if (warp < p.R) {
      const T* xr = p.x + warp * p.K;
      const bool vx = aligned16(xr) && p.K % kV == 0;
      auto each = [&](auto&& f) {  // f(value) over the row, 16-byte loads when aligned
        if (vx) {
          for (int64_t c = lane; c < p.K / kV; c += 32) {
            float v[kV];
            load16(xr + c * kV, v);
#pragma unroll
            for (int j = 0; j < kV; ++j) f(v[j]);
          }
        } else {
          for (int64_t j = lane; j < p.K; j += 32) f(to_f32(xr[j]));
        }
      };
      float s = 0.f, ss = 0.f;
      if (p.norm == GemvNorm::layer) {
        each([&](float v) { s += v; });
        s = warp_sum(s);
      }
      const float mu = p.norm == GemvNorm::layer ? s / float(p.K) : 0.f;
      each([&](float v) { ss += (v - mu) * (v - mu); });
      ss = warp_sum(ss);
      if (lane == 0) {
        stat_mu[warp] = mu;
        stat_scale[warp] = p.norm == GemvNorm::layer ? 1.f / sqrtf(ss / float(p.K) + p.eps)
                                                      : 1.f / sqrtf(p.eps + ss / float(p.K));
      }
    }
    __syncthreads();
  }

  float acc[kGemvRowsPerWarp][kR];
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) acc[i][r] = 0.f;

  for (int64_t k0 = 0; k0 < p.K; k0 += kTile) {
    const int len = int(min64(kTile, p.K - k0));
    if (p.vec && k0 > 0) load_w(k0, len);
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < kR * len; i += kGemvThreads) {
      const int r = i / len, j = i - r * len;
      T v{};
      if (r < p.R) {
        v = p.x[r * p.K + k0 + j];
        if (p.norm == GemvNorm::rms) {
          v = from_f32<T>(to_f32(v) * (to_f32(p.norm_w[k0 + j]) * stat_scale[r]));
        } else if (p.norm == GemvNorm::layer) {
          float f = (to_f32(v) - stat_mu[r]) * stat_scale[r];
          if (p.norm_w) f *= to_f32(p.norm_w[k0 + j]);
          if (p.norm_b) f += to_f32(p.norm_b[k0 + j]);
          v = from_f32<T>(f);
        }
      }
      xs[r * kTile + j] = v;
    }
    __syncthreads();
    if (p.vec) {
      const int chunks = len / kV;
#pragma unroll
      for (int c = 0; c < kGemvLoads; ++c) {
        const int ch = c * 32 + lane;
        if (c % S == slice && ch < chunks) {
          float wf[kGemvRowsPerWarp][kV];
#pragma unroll
          for (int i = 0; i < kGemvRowsPerWarp; ++i) unpack16<T>(wv[i][c], wf[i]);
#pragma unroll
          for (int r = 0; r < kR; ++r) {
            float xf[kV];
            load16(xs + r * kTile + ch * kV, xf);
#pragma unroll
            for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
              for (int j = 0; j < kV; ++j) acc[i][r] += wf[i][j] * xf[j];
          }
        }
      }
    } else {
      for (int j = lane + 32 * slice; j < len; j += 32 * S) {
#pragma unroll
        for (int i = 0; i < kGemvRowsPerWarp; ++i) {
          if (!wok[i]) continue;
          const float wf = to_f32(p.w[wrow[i] * p.K + k0 + j]);
#pragma unroll
          for (int r = 0; r < kR; ++r) acc[i][r] += wf * to_f32(xs[r * kTile + j]);
        }
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      acc[i][r] = warp_sum(acc[i][r]);
      if (S > 1 && lane == 0) partial[warp][i][r] = acc[i][r];
    }
  if (S > 1) {
    __syncthreads();
    if (slice == 0 && lane == 0)
#pragma unroll
      for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
        for (int r = 0; r < kR; ++r) {
          float v = 0.f;
          for (int s2 = 0; s2 < S; ++s2) v += partial[group * S + s2][i][r];  // fixed order: deterministic
          acc[i][r] = v;
        }
  }
  if (slice != 0 || lane != 0) return;
  if (p.glu) {
    if (o0 >= H) return;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= p.R) break;
      const float g = to_f32(from_f32<T>(acc[0][r])), u = to_f32(from_f32<T>(acc[1][r]));
      p.y[r * H + o0] = from_f32<T>(math::apply(p.act, g, 1.f) * u);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      const int64_t n = wrow[i];
      if (wok[i] && r < p.R) {
        T* y = p.y + r * p.N + n;
        const float v = acc[i][r];
        *y = from_f32<T>(p.beta != 0.f ? v + p.beta * to_f32(*y) : v);
      }
    }
}

template <class T>
void launch_gemv(GemvParams<T> p) {
  // Enough blocks to fill the GPU: split a row group over more warps for small matrices
  // (as long as a tile has chunks for every warp of the group).
  const int64_t outs = p.glu ? p.N / 2 : p.N;
  const int64_t per_group = p.glu ? 1 : kGemvRowsPerWarp;
  const int64_t chunk_groups = std::max<int64_t>(1, (std::min<int64_t>(p.K, kGemvTileBytes / int64_t(sizeof(T))) /
                                                     kVec<T> + 31) / 32);
  const int64_t want = 2 * int64_t(Context::get().sm_count());
  int S = 1;
  auto blocks_for = [&](int s) { return (outs + (kGemvWarps / s) * per_group - 1) / ((kGemvWarps / s) * per_group); };
  while (S < kGemvWarps && blocks_for(S) < want && chunk_groups >= 2 * S) S *= 2;
  p.split = S;
  const unsigned grid = unsigned(blocks_for(S));
  if (grid == 0) return;
  auto s = stream();
  // Rows padded up to a power of two (zeros in shared memory): 4 kernels per T, not 8.
  if (p.R <= 1) gemv_kernel<T, 1><<<grid, kGemvThreads, 0, s>>>(p);
  else if (p.R <= 2) gemv_kernel<T, 2><<<grid, kGemvThreads, 0, s>>>(p);
  else if (p.R <= 4) gemv_kernel<T, 4><<<grid, kGemvThreads, 0, s>>>(p);
  else gemv_kernel<T, 8><<<grid, kGemvThreads, 0, s>>>(p);
  check_launch();
}

// ---- positions: rope, sinusoidal embedding --------------------------------------------

// math::rope_freq with the exponential taken in double and rounded once: CUDA's expf is
// off by up to 2 ulp, and the angle multiplies that error by the position (thousands).
// Rounded this way the frequency matches the host's (nearly correctly rounded) expf.
__device__ inline float rope_freq_rn(int i, int D, float max_period) {
  const float c = float(-log(double(max_period)) * 2.0 / double(D));
  return float(exp(double(float(i) * c)));
}

template <class T>
struct RopeParams {
  const T* x;
  T* out;
  const int64_t* pos;
  int64_t xs[3], os[3], ps[2];  // strides of dims b, t, h (x, out) and b, t (positions)
  int64_t B, T_, H, D;
  float max_period;
};

template <class T>
__global__ void __launch_bounds__(256) rope_kernel(const RopeParams<T> p) {
  const int64_t half = p.D / 2, n = p.B * p.T_ * p.H * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half;
    int64_t rest = idx / half;
    const int64_t h = rest % p.H;
    rest /= p.H;
    const int64_t t = rest % p.T_, b = rest / p.T_;
    const float ang = rope_freq_rn(int(i), int(p.D), p.max_period) * float(p.pos[b * p.ps[0] + t * p.ps[1]]);
    float sn, c;
    sincosf(ang, &sn, &c);
    const T* pi = p.x + b * p.xs[0] + t * p.xs[1] + h * p.xs[2];
    T* po = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
    const float re = to_f32(pi[2 * i]), im = to_f32(pi[2 * i + 1]);
    po[2 * i] = from_f32<T>(re * c - im * sn);
    po[2 * i + 1] = from_f32<T>(re * sn + im * c);
  }
}

template <class T>
struct SinEmbeddingParams {
  T* x;  // [B, T, C] contiguous
  const int64_t* pos;
  int64_t ps[2];
  int64_t B, T_, C;
  float max_period, scale;
};

template <class T>
__global__ void __launch_bounds__(256) sin_embedding_kernel(const SinEmbeddingParams<T> p) {
  const int64_t half = p.C / 2, n = p.B * p.T_ * half;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % half, bt = idx / half, b = bt / p.T_, t = bt % p.T_;
    const float pos = float(p.pos[b * p.ps[0] + t * p.ps[1]]);
    // The host's powf, rounded once from double (CUDA's powf is off by up to 4 ulp and the
    // phase scales the error by the position).
    const float denom = float(pow(double(p.max_period), double(float(i) / float(half - 1))));
    const float phase = pos / denom;
    float sn, c;
    sincosf(phase, &sn, &c);
    T* row = p.x + bt * p.C;
    row[i] = from_f32<T>(to_f32(row[i]) + p.scale * c);
    row[half + i] = from_f32<T>(to_f32(row[half + i]) + p.scale * sn);
  }
}

// ---- embedding ------------------------------------------------------------------------

template <class T>
struct EmbeddingParams {
  T* out;
  const T* table;
  const int64_t* ids;
  int64_t n, V, D;
};

template <class T>
__global__ void __launch_bounds__(256) embedding_kernel(const EmbeddingParams<T> p) {
  const int64_t total = p.n * p.D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx / p.D, d = idx % p.D, id = p.ids[i];
    p.out[idx] = (id < 0 || id >= p.V) ? from_f32<T>(0.f) : p.table[id * p.D + d];
  }
}

// ---- attention ------------------------------------------------------------------------

// One block per (query row, split of the keys). Per split: each thread scores whole keys
// (scores in shared memory), then the block forms softmax weights and threads over D
// accumulate the weighted values (coalesced rows of V, masked keys skipped). With more
// than one split, partial (max, sum, acc[D]) rows are merged by attention_combine_kernel
// (flash-decoding), so a single decoding query still spreads over the GPU.
constexpr int kAttnThreads = 256, kAttnMaxChunk = 2048, kAttnMinChunk = 128;

template <class T>
struct AttentionKernelParams {
  const T* q;
  const T* k;
  const T* v;
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

template <class T>
__device__ inline float dot_key(const T* k, const float* q, int64_t D, bool vec) {
  float dot = 0.f;
  if (vec) {
    constexpr int kV = kVec<T>;
#pragma unroll 4
    for (int64_t d = 0; d < D; d += kV) {
      float kf[kV];
      load16(k + d, kf);
#pragma unroll
      for (int j = 0; j < kV; ++j) dot += q[d + j] * kf[j];
    }
  } else {
    for (int64_t d = 0; d < D; ++d) dot += q[d] * to_f32(k[d]);
  }
  return dot;
}

template <class T>
__global__ void __launch_bounds__(kAttnThreads) attention_kernel(const AttentionKernelParams<T> p) {
  extern __shared__ float smem[];
  const int64_t D = p.D;
  float* qf = smem;                // [D]
  float* w = smem + D;             // [chunk]: scores, then softmax weights
  float* red = w + p.chunk;        // [kAttnThreads]: per-group partial sums of phase 3
  const int64_t row = blockIdx.x;  // (b * T + t) * H + h
  const int64_t h = row % p.H, t = (row / p.H) % p.T_, b = row / (p.H * p.T_);
  const int64_t hk = h / (p.H / p.Hk);
  const int64_t s0 = int64_t(blockIdx.y) * p.chunk, s1 = min64(p.S, s0 + p.chunk);
  const T* kb = p.k + b * p.ks[0] + hk * p.ks[1];
  const T* vb = p.v + b * p.vs[0] + hk * p.vs[1];

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
      sc = dot_key(kb + s * p.ks[2], qf, D, p.vec_k) * p.scale + (in_prefix && p.prefix_bias ? p.prefix_bias[h] : 0.f);
      m = fmaxf(m, sc);
    }
    w[s - s0] = sc;
  }
  m = block_all_reduce<kAttnThreads>(m, MaxOp{});

  // Phase 2: weights (a masked key, or a split that sees none, weighs 0).
  float z = 0.f;
  for (int64_t s = s0 + threadIdx.x; s < s1; s += kAttnThreads) {
    const float sc = w[s - s0];
    const float e = sc == -INFINITY ? 0.f : expf(sc - m);
    w[s - s0] = e;
    z += e;
  }
  z = block_all_reduce<kAttnThreads>(z, SumOp{});  // its barrier publishes w

  // Phase 3: acc[d] = sum_s w_s v[s, d]; G groups of `span` threads split the keys.
  const int span = int(min64(D, kAttnThreads)), G = kAttnThreads / span;
  const int g = threadIdx.x / span, dl = threadIdx.x % span;
  const bool single = p.splits == 1;
  float* part = single ? nullptr : p.partial + (row * p.splits + blockIdx.y) * (D + 2);
  auto finish = [&](int64_t d, float a) {
    if (single) {
      T* o = p.out + b * p.os[0] + t * p.os[1] + h * p.os[2];
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
        for (int u = 0; u < 4; ++u) xs[u] = ws[u] != 0.f ? to_f32(vb[(s + u * G) * p.vs[2] + d]) : 0.f;
#pragma unroll
        for (int u = 0; u < 4; ++u) a += ws[u] * xs[u];
      }
      for (; s < s1; s += G) {
        const float ws = w[s - s0];
        if (ws != 0.f) a += ws * to_f32(vb[s * p.vs[2] + d]);
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

template <class T>
__global__ void __launch_bounds__(kAttnThreads) attention_combine_kernel(const AttentionKernelParams<T> p) {
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

// ---- kv_write -------------------------------------------------------------------------

template <class T>
struct KvWriteParams {
  T* ring_k;
  T* ring_v;
  int64_t* ring_pos;
  const T* k;
  const T* v;
  const int64_t* pos;
  const uint8_t* mask;  // null: every batch item executes
  int64_t ks[3], vs[3], ps[2];
  int64_t T_, H, C, D;
};

// One block per (b, t, h), threads over d. A token whose slot a later token of the same
// call also writes is skipped, so the ring ends as after the CPU's sequential writes
// (last writer wins).
template <class T>
__global__ void __launch_bounds__(128) kv_write_kernel(const KvWriteParams<T> p) {
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
  const int64_t dst = ((b * p.H + h) * p.C + slot) * p.D;
  const T* ks = p.k + b * p.ks[0] + t * p.ks[1] + h * p.ks[2];
  const T* vs = p.v + b * p.vs[0] + t * p.vs[1] + h * p.vs[2];
  for (int64_t d = threadIdx.x; d < p.D; d += blockDim.x) {
    p.ring_k[dst + d] = ks[d];
    p.ring_v[dst + d] = vs[d];
  }
}

// ---- sampling ---------------------------------------------------------------------------

// One block per row:
//  1. top = first index of the maximum (NaN read as -inf); greedy stops here.
//  2. for top-k < V, the k-th largest key by radix select (4 passes of 8 bits over an
//     order-preserving uint32 of the logit), then, among logits equal to that key, the
//     index cutoff by a block scan in index order: the set ordered by (logit desc, index
//     asc) exactly as the CPU's nth_element defines it.
//  3. the exponential race over the set: argmax of (l - m) / temperature - log(E_i), ties
//     to the smaller index, NaN never winning; when the top's own score is NaN (m
//     infinite) the CPU keeps the top, and so does this.
constexpr int kSampleThreads = 512;

template <class T>
struct SampleKernelParams {
  const T* logits;
  int64_t ld, V, k;
  int64_t* out;
  const int64_t* counter;
  float temperature;
  uint64_t seed;
  uint32_t salt;
  bool greedy;
};

__device__ inline uint32_t order_key(float x) {
  if (x == 0.f) x = 0.f;  // -0 ties with +0 on the CPU
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

template <class T>
__global__ void __launch_bounds__(kSampleThreads) sample_kernel(const SampleKernelParams<T> p) {
  const int64_t r = blockIdx.x, V = p.V;
  const T* l = p.logits + r * p.ld;
  auto lv = [&](int64_t i) {
    const float x = to_f32(l[i]);
    return isnan(x) ? -INFINITY : x;
  };

  // 1. top (every value is a candidate: -inf ties resolve to the smaller index).
  ArgBest top{0.f, 0, false};
  for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) offer(top, lv(i), i);
  top = block_all_reduce<kSampleThreads>(top, ArgBestOp{});
  if (p.greedy) {
    if (threadIdx.x == 0) p.out[r] = top.i;
    return;
  }
  const float m = top.v;

  // 2. the top-k set: key > tau, or key == tau and index <= cut.
  uint32_t tau = 0;
  int64_t cut = V;
  if (p.k < V) {
    __shared__ unsigned hist[256];
    __shared__ uint32_t s_prefix;
    __shared__ int64_t s_need;
    uint32_t prefix = 0, mask = 0;
    int64_t need = p.k;
    for (int shift = 24; shift >= 0; shift -= 8) {
      for (int j = threadIdx.x; j < 256; j += kSampleThreads) hist[j] = 0;
      __syncthreads();
      for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) {
        const uint32_t key = order_key(lv(i));
        if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255u], 1u);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        int64_t above = 0;
        for (int bin = 255; bin >= 0; --bin) {
          if (above + hist[bin] >= need) {
            s_prefix = prefix | (uint32_t(bin) << shift);
            s_need = need - above;
            break;
          }
          above += hist[bin];
        }
      }
      __syncthreads();
      prefix = s_prefix;
      need = s_need;
      mask |= 0xffu << shift;
      __syncthreads();  // hist and s_* are rewritten next pass
    }
    tau = prefix;
    // The need-th index (in index order) among the keys equal to tau.
    using BlockScan = cub::BlockScan<int, kSampleThreads>;
    __shared__ typename BlockScan::TempStorage scan_tmp;
    __shared__ int64_t s_cut;
    int64_t seen = 0;
    for (int64_t base = 0; base < V; base += kSampleThreads) {
      const int64_t i = base + threadIdx.x;
      const int hit = (i < V && order_key(lv(i)) == tau) ? 1 : 0;
      int before, total;
      BlockScan(scan_tmp).ExclusiveSum(hit, before, total);
      if (hit && seen + before == need - 1) s_cut = i;
      seen += total;
      __syncthreads();
      if (seen >= need) break;
    }
    cut = s_cut;
  }

  // 3. the race.
  const uint64_t ctr = uint64_t(p.counter[0]) * 64u + p.salt;
  auto score = [&](int64_t i) {
    const float e = Philox::exponential(p.seed, ctr, uint64_t(r * V + i));
    return (lv(i) - m) / p.temperature - logf(e);
  };
  ArgBest best{0.f, 0, false};
  for (int64_t i = threadIdx.x; i < V; i += kSampleThreads) {
    if (i != top.i && p.k < V) {
      const uint32_t key = order_key(lv(i));
      if (key < tau || (key == tau && i > cut)) continue;
    }
    offer(best, score(i), i);
  }
  best = block_all_reduce<kSampleThreads>(best, ArgBestOp{});
  if (threadIdx.x == 0) p.out[r] = isnan(score(top.i)) || !best.valid ? top.i : best.i;
}

}  // namespace cuda::detail

// ======================================================================================
// Kernels<Cuda>
// ======================================================================================

template <class T>
void Kernels<Cuda>::copy(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in) {
  cuda::detail::launch_elementwise<2>(out.shape(), {out.strides(), in.strides()},
                                      cuda::detail::CastFn<T, T>{out.data(), in.data()});
}

template <class To, class From>
void Kernels<Cuda>::cast(const Tensor<To, Cuda>& out, const Tensor<From, Cuda>& in) {
  cuda::detail::launch_elementwise<2>(out.shape(), {out.strides(), in.strides()},
                                      cuda::detail::CastFn<To, From>{out.data(), in.data()});
}

template <class T>
void Kernels<Cuda>::fill(const Tensor<T, Cuda>& out, double value) {
  T v;
  if constexpr (is_floating_v<T> && !std::is_same_v<T, double>) v = from_f32<T>(float(value));
  else v = T(value);
  cuda::detail::launch_elementwise<1>(out.shape(), {out.strides()}, cuda::detail::FillFn<T>{out.data(), v});
}

template <class T>
void Kernels<Cuda>::unary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary op, float alpha) {
  cuda::detail::launch_elementwise<2>(out.shape(), {out.strides(), in.strides()},
                                      cuda::detail::UnaryFn<T>{out.data(), in.data(), op, alpha});
}

template <class T>
void Kernels<Cuda>::binary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b,
                           Binary op) {
  cuda::detail::launch_elementwise<3>(out.shape(), {out.strides(), a.strides(), b.strides()},
                                      cuda::detail::BinaryFn<T>{out.data(), a.data(), b.data(), op});
}

template <class T>
void Kernels<Cuda>::glu(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary act) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(out.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  p.act = act;
  if (p.L.rows == 0) return;
  const unsigned gy = unsigned(std::min<int64_t>((p.L.n + cuda::detail::kRowThreads - 1) / cuda::detail::kRowThreads, 1024));
  cuda::detail::glu_kernel<T><<<dim3(cuda::detail::grid_rows(p.L.rows), gy), cuda::detail::kRowThreads, 0,
                                  cuda::detail::stream()>>>(p);
  cuda::detail::check_launch();
}

template <class T>
void Kernels<Cuda>::matmul(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b,
                           float alpha, float beta) {
  using namespace cuda::detail;
  const int64_t B0 = out.size(0), B1 = out.size(1), M = out.size(2), N = out.size(3), K = a.size(3);
  const GemmOperand da = as_transposed(M, K, a.stride(2), a.stride(3));
  const GemmOperand db = as_transposed(K, N, b.stride(2), b.stride(3));
  if (!da.ok || !db.ok) {  // strides cuBLAS cannot express: copy just that operand
    matmul(out, da.ok ? a : a.contiguous(), db.ok ? b : b.contiguous(), alpha, beta);
    return;
  }
  const int64_t ldc = M == 1 ? N : out.stride(2);
  TTT_CHECK(ldc >= N, "matmul: output rows overlap (strides ", out.strides().str(), ")");
  GemmCall<T> g{a.data(), da, 0, b.data(), db, 0, out.data(), ldc, 0, M, N, K, 1, alpha, beta};
  auto collapsible = [&](const Tensor<T, Cuda>& t) { return t.stride(0) == t.stride(1) * B1; };
  int64_t loops = 1;
  if (B1 == 1) {
    g.batch = B0;
    g.stride_a = a.stride(0), g.stride_b = b.stride(0), g.stride_c = out.stride(0);
  } else {
    g.batch = B1;
    g.stride_a = a.stride(1), g.stride_b = b.stride(1), g.stride_c = out.stride(1);
    if (B0 > 1 && collapsible(a) && collapsible(b) && collapsible(out)) g.batch = B0 * B1;
    else loops = B0;
  }
  for (int64_t i = 0; i < loops; ++i) {
    GemmCall<T> gi = g;
    gi.a += i * a.stride(0);
    gi.b += i * b.stride(0);
    gi.c += i * out.stride(0);
    run_gemm(gi);
  }
}

template <class T>
void Kernels<Cuda>::linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w, float beta) {
  using namespace cuda::detail;
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  if (R <= gemv_max_rows()) {
    const bool vec = aligned16(w.data()) && K % kVec<T> == 0;
    launch_gemv(GemvParams<T>{w.data(), x.data(), y.data(), N, K, int(R), beta, vec});
    return;
  }
  // y^T [N, R] = W [N, K] x^T: W row-major is W^T column-major, hence op T.
  const int64_t ld = std::max<int64_t>(1, K);
  run_gemm(GemmCall<T>{x.data(), {CUBLAS_OP_N, ld, true}, 0, w.data(), {CUBLAS_OP_T, ld, true}, 0, y.data(), N, 0, R,
                       N, K, 1, 1.f, beta});
}

void Kernels<Cuda>::set_gemv_max_rows(int rows) {
  cuda::detail::gemv_max_rows() = std::max(0, std::min(rows, cuda::detail::kGemvMaxRows));
}

template <class T>
void Kernels<Cuda>::fused_linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                                 const FusedLinear<T, Cuda>& f) {
  using namespace cuda::detail;
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  if (R > gemv_max_rows()) {
    ops::fused_linear_unfused(y, x, w, f);
    return;
  }
  GemvParams<T> p{w.data(), x.data(), y.data(), N, K, int(R), f.beta, aligned16(w.data()) && K % kVec<T> == 0};
  p.norm = f.norm == FusedNorm::rms ? GemvNorm::rms : f.norm == FusedNorm::layer ? GemvNorm::layer : GemvNorm::none;
  p.norm_w = f.norm_weight.defined() ? f.norm_weight.data() : nullptr;
  p.norm_b = f.norm_bias.defined() ? f.norm_bias.data() : nullptr;
  p.eps = f.eps;
  p.glu = f.glu;
  p.act = f.act;
  launch_gemv(p);
}

template <class T>
void Kernels<Cuda>::reduce(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Reduce op) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  p.reduce = op;
  cuda::detail::launch_rows(cuda::detail::reduce_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::argmax(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& in) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.index_out = out.data();
  cuda::detail::launch_rows(cuda::detail::argmax_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::softmax(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  cuda::detail::launch_rows(cuda::detail::softmax_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::layer_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& weight,
                               const Tensor<T, Cuda>& bias, float eps) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  p.weight = weight.defined() ? weight.data() : nullptr;
  p.bias = bias.defined() ? bias.data() : nullptr;
  p.eps = eps;
  cuda::detail::launch_rows(cuda::detail::layer_norm_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::rms_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& alpha,
                             float eps) {
  cuda::detail::RowParams<T> p{};
  p.L = cuda::detail::make_rows(in.shape(), in.strides(), out.strides());
  p.in = in.data();
  p.out = out.data();
  p.weight = alpha.data();
  p.eps = eps;
  cuda::detail::launch_rows(cuda::detail::rms_norm_kernel<T>, p);
}

template <class T>
void Kernels<Cuda>::rope(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions,
                         float max_period) {
  using namespace cuda::detail;
  RopeParams<T> p{x.data(), out.data(), positions.data(),
                  {x.stride(0), x.stride(1), x.stride(2)},
                  {out.stride(0), out.stride(1), out.stride(2)},
                  {positions.stride(0), positions.stride(1)},
                  x.size(0), x.size(1), x.size(2), x.size(3), max_period};
  const int64_t n = p.B * p.T_ * p.H * (p.D / 2);
  if (n == 0) return;
  rope_kernel<T><<<grid_for(n, 256), 256, 0, stream()>>>(p);
  check_launch();
}

template <class T>
void Kernels<Cuda>::add_sin_embedding(const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions,
                                      float max_period, float scale) {
  using namespace cuda::detail;
  SinEmbeddingParams<T> p{x.data(), positions.data(), {positions.stride(0), positions.stride(1)},
                          x.size(0), x.size(1), x.size(2), max_period, scale};
  const int64_t n = p.B * p.T_ * (p.C / 2);
  sin_embedding_kernel<T><<<grid_for(n, 256), 256, 0, stream()>>>(p);
  check_launch();
}

template <class T>
void Kernels<Cuda>::embedding(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& table,
                              const Tensor<int64_t, Cuda>& ids) {
  using namespace cuda::detail;
  const EmbeddingParams<T> p{out.data(), table.data(), ids.data(), ids.numel(), table.size(0), table.size(1)};
  embedding_kernel<T><<<grid_for(p.n * p.D, 256), 256, 0, stream()>>>(p);
  check_launch();
}

template <class T>
void Kernels<Cuda>::attention(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q, const Tensor<T, Cuda>& k,
                              const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& q_pos,
                              const Tensor<int64_t, Cuda>& k_pos, const AttentionParams& ap) {
  using namespace cuda::detail;
  const int64_t Bn = q.size(0), Tn = q.size(1), H = q.size(2), D = q.size(3), S = k.size(2);
  const int64_t rows = Bn * Tn * H;
  // Enough splits to give the GPU ~4 blocks per SM, each split at least kAttnMinChunk
  // keys and at most kAttnMaxChunk (the scores live in shared memory).
  const int64_t target = 4 * int64_t(cuda::Context::get().sm_count());
  int64_t splits = rows >= target ? 1 : (target + rows - 1) / rows;
  splits = std::min(splits, (S + kAttnMinChunk - 1) / kAttnMinChunk);
  splits = std::max({splits, (S + kAttnMaxChunk - 1) / kAttnMaxChunk, int64_t(1)});
  TTT_CHECK(splits <= 65535, "attention: ", S, " keys is too many for the CUDA kernel");
  const int64_t chunk = (S + splits - 1) / splits;
  const size_t smem = size_t(D + chunk + kAttnThreads) * sizeof(float);
  TTT_CHECK(smem <= 48 * 1024, "attention: head dimension ", D, " is too large for the CUDA kernel");

  AttentionKernelParams<T> p{};
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.out = out.data();
  p.q_pos = q_pos.data(), p.k_pos = k_pos.data();
  for (int i = 0; i < 3; ++i) {
    p.qs[i] = q.stride(i), p.ks[i] = k.stride(i), p.vs[i] = v.stride(i), p.os[i] = out.stride(i);
  }
  p.qps[0] = q_pos.stride(0), p.qps[1] = q_pos.stride(1);
  p.kps[0] = k_pos.stride(0), p.kps[1] = k_pos.stride(1);
  p.T_ = Tn, p.H = H, p.Hk = k.size(1), p.S = S, p.D = D, p.context = ap.context, p.chunk = chunk;
  p.prefix = ap.prefix, p.prefix_context = ap.prefix_context, p.prefix_bias = ap.prefix_bias;
  p.scale = ap.scale;
  p.splits = int(splits);
  const bool rows_aligned = k.stride(0) % kVec<T> == 0 && k.stride(1) % kVec<T> == 0 &&
                            k.stride(2) % kVec<T> == 0 && D % kVec<T> == 0;
  p.vec_k = rows_aligned && aligned16(k.data());

  Tensor<float, Cuda> partial;
  if (splits > 1) {
    partial = Tensor<float, Cuda>::empty({rows * splits * (D + 2)});
    p.partial = partial.data();
  }
  attention_kernel<T><<<dim3(unsigned(rows), unsigned(splits)), kAttnThreads, smem, stream()>>>(p);
  check_launch();
  if (splits > 1) {
    attention_combine_kernel<T><<<unsigned(rows), kAttnThreads, 0, stream()>>>(p);
    check_launch();
  }
}

template <class T>
void Kernels<Cuda>::kv_write(const Tensor<T, Cuda>& ring_k, const Tensor<T, Cuda>& ring_v,
                             const Tensor<int64_t, Cuda>& ring_pos, const Tensor<T, Cuda>& k,
                             const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& positions,
                             const Tensor<uint8_t, Cuda>& exec_mask) {
  using namespace cuda::detail;
  KvWriteParams<T> p{ring_k.data(), ring_v.data(), ring_pos.data(), k.data(), v.data(), positions.data(),
                     exec_mask.defined() ? exec_mask.data() : nullptr,
                     {k.stride(0), k.stride(1), k.stride(2)},
                     {v.stride(0), v.stride(1), v.stride(2)},
                     {positions.stride(0), positions.stride(1)},
                     k.size(1), ring_k.size(1), ring_k.size(2), ring_k.size(3)};
  const int64_t blocks = ring_k.size(0) * p.T_;
  if (blocks == 0 || p.H == 0) return;
  kv_write_kernel<T><<<dim3(unsigned(blocks), unsigned(p.H)), 128, 0, stream()>>>(p);
  check_launch();
}

template <class T>
void Kernels<Cuda>::sample(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& logits, const SampleParams& sp,
                           const Tensor<int64_t, Cuda>& counter) {
  using namespace cuda::detail;
  const int64_t N = logits.size(0), V = logits.size(1);
  const int64_t k = (sp.top_k <= 0 || sp.top_k > V) ? V : sp.top_k;
  const SampleKernelParams<T> p{logits.data(), logits.stride(0), V, k, out.data(), counter.data(), sp.temperature,
                                sp.seed, sp.salt, sp.temperature <= 0.f || k == 1};
  sample_kernel<T><<<unsigned(N), kSampleThreads, 0, stream()>>>(p);
  check_launch();
}

}  // namespace ttt
