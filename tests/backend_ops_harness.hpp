#pragma once
// The harness of the cross-backend op tests (test_backend_ops*.cpp, one binary): inputs made
// the same on both backends, the error measure and the per-op summary. Named namespace and
// inline functions: the summary is one map for every file of the binary.
//
// Cross-backend op tests in the spirit of ggml's test-backend-ops: every op of
// ttt/backend/ops.hpp runs on random inputs (odd sizes, strided and offset views,
// broadcasts, special values) on the CPU backend, which defines the semantics, and on
// CUDA, and the two results are compared. Without a CUDA device the binary prints
// "SKIPPED: no CUDA device" and exits 77 (CTest: skipped).
//
// Error of a case: err = max_i |cuda_i - cpu_i| / max(1, max_i |cpu_i|), i.e. absolute
// for outputs below 1 and relative above; NaN and inf must match exactly.
//
// Tolerances, with u = 1e-5 (f32), 1e-2 (bf16), 2e-3 (f16): a few fp32 roundings, or one
// ulp of the storage type where the fp32 values differ slightly and round apart.
//   copy, cast, fill, embedding, kv_write ....... 0  (identical values; kv_write_q: the same
//                                                     codes and scales)
//   reduce_max, argmax, sample, vq_nearest ...... 0  (identical; sample picks the same token,
//                                                     vq_nearest the same code)
//   unary, binary, glu, softmax ................. u
//   reduce_sum/mean, layer_norm, rms_norm ....... 2u (fp32 statistics vs the CPU's double)
//   unary_backward u, layer_norm_backward ....... 2u (likewise; dweight / dbias: fp32 chunk sums)
//   matmul, linear, attention, attention_q ...... 2u (fp32 accumulation in another order)
//   conv1d, conv_transpose1d .................... 2u (likewise)
//   quantize_rows, dequantize ................... 0  (same codes, scales and values)
//   linear_q (int8 / fp8 weights) ............... 4u (as fused_linear: fp32 sums in another order)
//   linear_q_paths (dequantise + cuBLAS vs the    4u f32 (fp32 sums in another order); bf16:
//     int8 / fp8 GEMV, on the GPU) ............... 3 * 2^-8 (an output rounded apart: 1 ulp; glu
//                                                  rounds gate and value before their product)
//   random_normal ............................... u  (device logf/cosf within an ulp or two)
//   rope, add_sin_embedding ..................... u + 2^-22 * max|position| (host and device
//       exp/pow disagree by an ulp for ~0.06% of frequencies; the angle scales that ulp by
//       the position)
// A summary line per op and dtype (cases, max error, tolerance) is printed at the end.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "reference.hpp"
#include "ttt/cuda.hpp"

namespace backend_ops_test {

using namespace ttt;


// ---- bookkeeping ------------------------------------------------------------------------

struct Record {
  int cases = 0;
  double max_err = 0;
  double tol = 0;
};
inline std::map<std::pair<std::string, std::string>, Record>& summary() {
  static std::map<std::pair<std::string, std::string>, Record> s;
  return s;
}

template <class T>
std::string dname() {
  if constexpr (std::is_same_v<T, float>) return "f32";
  else if constexpr (std::is_same_v<T, bf16>) return "bf16";
  else if constexpr (std::is_same_v<T, f16>) return "f16";
  else if constexpr (std::is_same_v<T, int64_t>) return "i64";
  else if constexpr (std::is_same_v<T, int32_t>) return "i32";
  else return "u8";
}

template <class T>
double unit() {
  if constexpr (std::is_same_v<T, float>) return 1e-5;
  else if constexpr (std::is_same_v<T, bf16>) return 1e-2;
  else return 2e-3;
}
template <class T>
double pos_tol(double max_pos) {
  return unit<T>() + std::ldexp(1.0, -22) * max_pos;
}

inline void record(const std::string& op, const std::string& dtype, double err, double tol, const std::string& what) {
  Record& r = summary()[{op, dtype}];
  ++r.cases;
  r.max_err = std::max(r.max_err, std::isnan(err) ? std::numeric_limits<double>::infinity() : err);
  r.tol = std::max(r.tol, tol);
  INFO(op << " [" << dtype << "] " << what << ": error " << err << ", tolerance " << tol);
  CHECK(err <= tol);
}

inline void print_summary() {
  std::printf("\n%-20s %-10s %7s %12s %12s\n", "op", "dtype", "cases", "max error", "tolerance");
  for (const auto& [key, r] : summary())
    std::printf("%-20s %-10s %7d %12.3g %12.3g%s\n", key.first.c_str(), key.second.c_str(), r.cases, r.max_err, r.tol,
                r.max_err <= r.tol ? "" : "  FAILED");
}

// ---- inputs -----------------------------------------------------------------------------

template <class T>
struct Both {
  Tensor<T, Cpu> cpu;
  Tensor<T, Cuda> gpu;
};

template <class T>
Both<T> upload(const Tensor<T, Cpu>& h) {
  return {h, h.template to<Cuda>()};
}

// The same fused-linear options on both backends: a norm (RMS with its weight, LayerNorm with
// weight and bias, eps 1e-5), GLU or not, SiLU.
template <class T>
std::pair<FusedLinear<T, Cpu>, FusedLinear<T, Cuda>> fused_options(FusedNorm norm, bool glu, const Both<T>& nw,
                                                                     const Both<T>& nb) {
  FusedLinear<T, Cpu> fc;
  FusedLinear<T, Cuda> fg;
  fc.norm = fg.norm = norm;
  if (norm != FusedNorm::none) {
    fc.norm_weight = nw.cpu;
    fg.norm_weight = nw.gpu;
    fc.eps = fg.eps = 1e-5f;
  }
  if (norm == FusedNorm::layer) {
    fc.norm_bias = nb.cpu;
    fg.norm_bias = nb.gpu;
  }
  fc.glu = fg.glu = glu;
  fc.act = fg.act = Unary::silu;
  return {fc, fg};
}
template <class T>
Both<T> from_vector(const Shape& s, const std::vector<T>& v) {
  return upload(Tensor<T, Cpu>::from_vector(s, v));
}

template <class T>
Tensor<T, Cpu> random_tensor(const Shape& s, std::mt19937& g, double lo, double hi) {
  auto t = Tensor<T, Cpu>::empty(s);
  if constexpr (is_floating_v<T>) {
    std::uniform_real_distribution<float> d{float(lo), float(hi)};
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = from_f32<T>(d(g));
  } else {
    if constexpr (std::is_same_v<T, uint8_t>) lo = std::max(lo, 0.0), hi = std::min(hi, 255.0);
    std::uniform_int_distribution<int64_t> d{int64_t(lo), int64_t(hi)};
    for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = T(d(g));
  }
  return t;
}

// How a tensor of a given logical shape sits in its storage.
enum class Layout {
  contiguous,
  sliced,      // rows padded and offset: unit inner stride, not contiguous, unaligned start
  transposed,  // first and last dimensions swapped in storage: non-unit inner stride
};
inline const char* name(Layout l) {
  return l == Layout::contiguous ? "contiguous" : l == Layout::sliced ? "sliced" : "transposed";
}

// The same view of the same random storage on both backends.
template <class T>
Both<T> make(const Shape& s, Layout layout, std::mt19937& g, double lo = -1, double hi = 1) {
  Shape base = s;
  const int last = s.rank - 1;
  if (layout == Layout::sliced && s.rank > 0) {
    base.d[last] += 3;
    if (s.rank > 1) base.d[0] += 1;
  }
  if (layout == Layout::transposed && s.rank > 1) std::swap(base.d[0], base.d[last]);
  auto host = random_tensor<T>(base, g, lo, hi);
  auto view = [&](auto t) {
    if (layout == Layout::sliced && s.rank > 0) {
      t = t.slice(last, 2, 2 + s.d[last]);
      if (s.rank > 1) t = t.slice(0, 1, 1 + s.d[0]);
    }
    if (layout == Layout::transposed && s.rank > 1) t = t.transpose(0, last);
    return t;
  };
  return {view(host), view(host.template to<Cuda>())};
}

// Overwrites a few entries of a host-side vector-backed tensor with special values, then
// returns both copies (contiguous).
template <class T>
Both<T> with_specials(Tensor<T, Cpu> h, std::mt19937& g, const std::vector<float>& specials, double fraction) {
  std::uniform_real_distribution<double> u(0, 1);
  std::uniform_int_distribution<size_t> pick(0, specials.size() - 1);
  for (int64_t i = 0; i < h.numel(); ++i)
    if (u(g) < fraction) h.data()[i] = from_f32<T>(specials[pick(g)]);
  return upload(h);
}

// ---- comparison -------------------------------------------------------------------------

inline double error_of(const std::vector<double>& want, const std::vector<double>& got) {
  if (want.size() != got.size()) return std::numeric_limits<double>::infinity();
  double d = 0, scale = 1;
  for (size_t i = 0; i < want.size(); ++i) {
    const double a = want[i], b = got[i];
    if (std::isnan(a) || std::isnan(b)) {
      if (std::isnan(a) != std::isnan(b)) return std::numeric_limits<double>::infinity();
      continue;
    }
    if (a == b) continue;
    if (std::isinf(a) || std::isinf(b)) return std::numeric_limits<double>::infinity();
    d = std::max(d, std::abs(a - b));
    scale = std::max(scale, std::abs(a));
  }
  for (double a : want)
    if (std::isfinite(a)) scale = std::max(scale, std::abs(a));
  return d / scale;
}

template <class T>
double error(const Tensor<T, Cpu>& want, const Tensor<T, Cuda>& got) {
  auto host = got.template to<Cpu>();
  if (host.shape() != want.shape()) return std::numeric_limits<double>::infinity();
  return error_of(ref::values(want), ref::values(host));
}
template <class T>
double error(const Both<T>& b) {
  return error(b.cpu, b.gpu);
}

inline std::string shape_str(const Shape& s) { return s.str(); }

inline constexpr Layout kLayouts[] = {Layout::contiguous, Layout::sliced, Layout::transposed};


}  // namespace backend_ops_test
