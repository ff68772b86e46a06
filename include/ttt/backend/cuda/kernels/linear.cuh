#pragma once
// Kernels<Cuda> matrix products (nvcc only): matmul on cuBLAS; linear on cuBLAS or, for a few
// rows, the GEMV kernel, which fused_linear extends with a norm prologue and a GLU epilogue.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <type_traits>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/backend/cuda/device.cuh"
#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/backend/cuda/kernels/gemv_stream.cuh"
#include "ttt/backend/math.hpp"
#include "ttt/backend/ops.hpp"

namespace ttt {
namespace cuda::kernels {

using namespace device;

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

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::matmul(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b,
                           float alpha, float beta) {
  using namespace cuda::kernels;
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

namespace cuda::kernels {

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

// Matrices of at most this many MiB take our GEMV (up to kGemvMaxRows rows) whatever
// gemv_max_rows() says (TTT_GEMV_DENSE_SMALL_MIB, default 0: none). An experiment: the
// depformer's 2-12 MB matrices run on cuBLAS at 0.4-1.5 TB/s with a split-K reduce after 120 of
// them per frame, yet at 16 MiB our GEMV made the 7B bf16 frame slower (8.19 against 8.14 ms,
// H100, docs/perf.md), so it stays off.
inline double gemv_dense_small_mib() {
  static const double v = [] {
    const char* e = std::getenv("TTT_GEMV_DENSE_SMALL_MIB");
    return e ? std::max(0.0, std::atof(e)) : 0.0;
  }();
  return v;
}

// Rows up to which a dense product of R rows (an [N, K] weight) takes a GEMV: gemv_max_rows(),
// with TTT_GEMV_STREAM=2 also wherever the streaming GEMV fits (gemv_stream.cuh), and up to
// kGemvMaxRows for matrices within gemv_dense_small_mib().
template <class T>
int64_t gemv_dense_rows(const T* w, int64_t R, int64_t K, int64_t N) {
  if (gemv_stream_mode() >= 2 && gemv_stream_fits<T>(DenseRows<T>{w}, R, K)) return std::max<int64_t>(R, gemv_max_rows());
  if (double(N) * double(K) * sizeof(T) <= gemv_dense_small_mib() * double(1 << 20)) return kGemvMaxRows;
  return gemv_max_rows();
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
  ::ttt::cuda::device::pdl_begin();  // first: see device.cuh
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

  gemv_norm_prologue<T>(p, warp, lane, stat_mu, stat_scale);

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
      if (r < p.R) v = gemv_norm_value<T>(p, r, k0 + j, stat_mu[r], stat_scale[r]);
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
  gemv_reduce(acc, partial, warp, lane, S, group, slice);
  if (slice != 0 || lane != 0) return;
  if (p.glu) {
    if (o0 >= H) return;
#pragma unroll
    for (int r = 0; r < kR; ++r) {
      if (r >= p.R) break;
      gemv_store_glu(p.y + r * H + o0, p.act, acc[0][r], acc[1][r]);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < kGemvRowsPerWarp; ++i)
#pragma unroll
    for (int r = 0; r < kR; ++r)
      if (wok[i] && r < p.R) gemv_store(p.y + r * p.N + wrow[i], acc[i][r], p.beta);
}

template <class T>
void launch_gemv(GemvParams<T> p) {
  if (p.vec && gemv_stream_fits<T>(DenseRows<T>{p.w}, p.R, p.K)) {
    launch_gemv_stream(GemvStreamParams<T, DenseRows<T>>{DenseRows<T>{p.w}, p.x, p.y, p.N, p.K, p.R, p.beta, p.norm,
                                                         p.norm_w, p.norm_b, p.eps, p.glu, p.act});
    return;
  }
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
  // Rows padded up to a power of two (zeros in shared memory): 4 kernels per T, not 8.
  if (p.R <= 1) launch(gemv_kernel<T, 1>, grid, kGemvThreads, 0, 1, p);
  else if (p.R <= 2) launch(gemv_kernel<T, 2>, grid, kGemvThreads, 0, 1, p);
  else if (p.R <= 4) launch(gemv_kernel<T, 4>, grid, kGemvThreads, 0, 1, p);
  else launch(gemv_kernel<T, 8>, grid, kGemvThreads, 0, 1, p);
}

}  // namespace cuda::kernels

template <class T>
void Kernels<Cuda>::linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w, float beta) {
  using namespace cuda::kernels;
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  if (R <= gemv_dense_rows<T>(w.data(), R, K, N)) {
    const bool vec = aligned16(w.data()) && K % kVec<T> == 0;
    launch_gemv(GemvParams<T>{w.data(), x.data(), y.data(), N, K, int(R), beta, vec});
    return;
  }
  // y^T [N, R] = W [N, K] x^T: W row-major is W^T column-major, hence op T.
  const int64_t ld = std::max<int64_t>(1, K);
  run_gemm(GemmCall<T>{x.data(), {CUBLAS_OP_N, ld, true}, 0, w.data(), {CUBLAS_OP_T, ld, true}, 0, y.data(), N, 0, R,
                       N, K, 1, 1.f, beta});
}

void Kernels<Cuda>::set_gemv_stream(int mode) {
  using namespace cuda::kernels;
  gemv_stream_mode() = gemv_stream_mode_or_env(mode);
}

void Kernels<Cuda>::set_gemv_max_rows(int rows) {
  using namespace cuda::kernels;
  gemv_max_rows() = std::max(0, std::min(rows, kGemvMaxRows));
}

template <class T>
void Kernels<Cuda>::fused_linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                                 const FusedLinear<T, Cuda>& f) {
  using namespace cuda::kernels;
  const int64_t R = x.size(0), K = x.size(1), N = w.size(0);
  if (R > gemv_dense_rows<T>(w.data(), R, K, N)) {
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

}  // namespace ttt
