// Cross-backend op tests in the spirit of ggml's test-backend-ops: every op of
// ttt/backend/ops.hpp on random inputs on the CPU backend (which defines the semantics) and on
// CUDA, compared. The harness, the error measure and the tolerances: backend_ops_harness.hpp.
// This file: copies, element-wise ops, products (dense and quantised) and main; the row-wise,
// attention, sampling and convolution ops: test_backend_ops_nn.cpp (same binary). Without a
// CUDA device the binary prints "SKIPPED: no CUDA device" and exits 77 (CTest: skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file provides main (v3 ignores it)
#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_session.hpp>
#include <catch2/catch_template_test_macros.hpp>
#endif

#include "reference.hpp"
#include "ttt/cuda.hpp"

using namespace ttt;

#include "backend_ops_harness.hpp"

using namespace backend_ops_test;

// ======================================================================================
// copies and conversions
// ======================================================================================

TEMPLATE_TEST_CASE("copy between strided views", "[backend]", float, bf16, f16, int64_t, int32_t, uint8_t) {
  using T = TestType;
  std::mt19937 g(11);
  for (Shape s : {Shape{7}, Shape{3, 33}, Shape{2, 5, 7}, Shape{2, 3, 4, 9}, Shape{1000}, Shape{1, 1, 1, 1}})
    for (Layout li : kLayouts)
      for (Layout lo : kLayouts) {
        auto in = make<T>(s, li, g, -100, 100);
        auto out = make<T>(s, lo, g);
        out.cpu.copy_from(in.cpu);
        out.gpu.copy_from(in.gpu);
        record("copy", dname<T>(), error(out), 0, shape_str(s) + " " + name(li) + " -> " + name(lo));
      }
  // Broadcast source (stride 0).
  auto row = make<T>({1, 33}, Layout::contiguous, g, -100, 100);
  Both<T> out{Tensor<T, Cpu>::empty({5, 33}), Tensor<T, Cuda>::empty({5, 33})};
  out.cpu.copy_from(row.cpu.expand({5, 33}));
  out.gpu.copy_from(row.gpu.expand({5, 33}));
  record("copy", dname<T>(), error(out), 0, "broadcast row");
}

namespace {

// Floats across the exponent range (f16 overflow and subnormals, bf16 rounding) plus
// signed zeros, infinities and NaN.
std::vector<float> wide_floats(size_t n, std::mt19937& g) {
  std::uniform_real_distribution<float> mant(1.f, 2.f);
  std::uniform_int_distribution<int> ex(-30, 18), sign(0, 1);
  const float specials[] = {0.f, -0.f, INFINITY, -INFINITY, NAN, 65504.f, 65520.f, -65519.f, 5.9604645e-8f,
                            2.9802322e-8f, 1e-10f, 3.4e38f};
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (i % 17 == 0) v[i] = specials[(i / 17) % std::size(specials)];
    else v[i] = (sign(g) ? -1.f : 1.f) * std::ldexp(mant(g), ex(g));
  }
  return v;
}

template <class To, class From>
void cast_case(std::mt19937& g) {
  for (Shape s : {Shape{7}, Shape{3, 33}, Shape{2, 3, 4, 9}, Shape{1000}})
    for (Layout li : kLayouts) {
      auto host = Tensor<From, Cpu>::empty(s);
      if constexpr (is_floating_v<From>) {
        auto v = wide_floats(size_t(s.numel()), g);
        for (int64_t i = 0; i < s.numel(); ++i) host.data()[i] = from_f32<From>(v[size_t(i)]);
      } else {
        host = random_tensor<From>(s, g, -2e9, 2e9);
      }
      // Same values, chosen layout.
      auto in = make<From>(s, li, g);
      in.cpu.copy_from(host);
      in.gpu.copy_from(host.template to<Cuda>());
      auto out = make<To>(s, Layout::sliced, g);
      ops::cast(out.cpu, in.cpu);
      ops::cast(out.gpu, in.gpu);
      record("cast", dname<To>() + "<-" + dname<From>(), error(out), 0, shape_str(s) + " " + name(li));
    }
}

}  // namespace

TEST_CASE("cast between element types", "[backend]") {
  std::mt19937 g(12);
  cast_case<float, float>(g);
  cast_case<float, bf16>(g);
  cast_case<float, f16>(g);
  cast_case<bf16, float>(g);
  cast_case<bf16, bf16>(g);
  cast_case<bf16, f16>(g);
  cast_case<f16, float>(g);
  cast_case<f16, bf16>(g);
  cast_case<f16, f16>(g);
  cast_case<int64_t, int32_t>(g);
  cast_case<int32_t, int64_t>(g);
}

TEMPLATE_TEST_CASE("fill strided views", "[backend]", float, bf16, f16, int64_t, int32_t, uint8_t) {
  using T = TestType;
  std::mt19937 g(13);
  std::vector<double> values = {0.0, 7.0, 200.0};
  if constexpr (is_floating_v<T>) values.insert(values.end(), {1.5, -3.25, 1e30, 65504.5, 1e-9});
  else if constexpr (!std::is_same_v<T, uint8_t>) values.push_back(-3.0);
  for (Shape s : {Shape{7}, Shape{3, 33}, Shape{2, 3, 4, 9}})
    for (Layout l : kLayouts)
      for (double v : values) {
        auto out = make<T>(s, l, g);
        ops::fill(out.cpu, v);
        ops::fill(out.gpu, v);
        record("fill", dname<T>(), error(out), 0, shape_str(s) + " " + name(l) + " value " + std::to_string(v));
      }
}

// ======================================================================================
// elementwise
// ======================================================================================

TEMPLATE_TEST_CASE("unary ops", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(21);
  const Unary all[] = {Unary::scale,   Unary::silu, Unary::gelu, Unary::gelu_tanh, Unary::tanh,
                       Unary::sigmoid, Unary::exp,  Unary::relu, Unary::identity,  Unary::elu};
  for (Shape s : {Shape{1}, Shape{7}, Shape{3, 33}, Shape{2, 5, 7}, Shape{2, 3, 4, 9}, Shape{1000}})
    for (Layout l : kLayouts)
      for (Unary op : all) {
        auto x = make<T>(s, l, g, -4, 4);
        Both<T> y{ops::unary(x.cpu, op, 0.7f), ops::unary(x.gpu, op, 0.7f)};
        record("unary", dname<T>(), error(y), unit<T>(), shape_str(s) + " " + name(l) + " op " + std::to_string(int(op)));
      }
  // Into a strided output, and in place.
  auto x = make<T>({5, 33}, Layout::sliced, g, -4, 4);
  auto y = make<T>({5, 33}, Layout::transposed, g);
  ops::unary(y.cpu, x.cpu, Unary::gelu);
  ops::unary(y.gpu, x.gpu, Unary::gelu);
  record("unary", dname<T>(), error(y), unit<T>(), "strided output");
  ops::unary(x.cpu, x.cpu, Unary::silu);
  ops::unary(x.gpu, x.gpu, Unary::silu);
  record("unary", dname<T>(), error(x), unit<T>(), "in place");
}

TEMPLATE_TEST_CASE("binary ops with broadcasting", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(22);
  struct Case {
    Shape a, b;
  };
  const Case cases[] = {{{7}, {7}},           {{7}, {1}},         {{1000}, {1000}},       {{2, 3, 33}, {3, 1}},
                        {{2, 3, 33}, {33}},   {{3, 1}, {1, 33}},  {{2, 1, 5, 7}, {3, 1, 7}}, {{1, 1, 1, 1}, {1}}};
  for (const Case& c : cases)
    for (Layout la : kLayouts)
      for (Binary op : {Binary::add, Binary::sub, Binary::mul, Binary::div}) {
        auto a = make<T>(c.a, la, g, -3, 3);
        // Denominators away from zero: |b| in [0.5, 2].
        auto b = make<T>(c.b, Layout::contiguous, g, 0.5, 2);
        if (op != Binary::div) b = make<T>(c.b, Layout::sliced, g, -3, 3);
        Both<T> y{ops::binary(a.cpu, b.cpu, op), ops::binary(a.gpu, b.gpu, op)};
        record("binary", dname<T>(), error(y), unit<T>(),
               shape_str(c.a) + " " + name(la) + " (op) " + shape_str(c.b) + " op " + std::to_string(int(op)));
      }
  // In place (out aliases a).
  auto a = make<T>({4, 33}, Layout::sliced, g, -3, 3);
  auto b = make<T>({33}, Layout::contiguous, g, -3, 3);
  ops::add_(a.cpu, b.cpu);
  ops::add_(a.gpu, b.gpu);
  record("binary", dname<T>(), error(a), unit<T>(), "add_ in place");
}

TEMPLATE_TEST_CASE("glu", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(23);
  for (int64_t H : {1, 7, 33, 500})
    for (Layout l : {Layout::contiguous, Layout::sliced})
      for (Unary act : {Unary::silu, Unary::gelu, Unary::gelu_tanh, Unary::sigmoid, Unary::relu, Unary::identity}) {
        auto x = make<T>({3, 2, 2 * H}, l, g, -4, 4);
        Both<T> y{ops::glu(x.cpu, act), ops::glu(x.gpu, act)};
        record("glu", dname<T>(), error(y), unit<T>(), "H " + std::to_string(H) + " " + name(l));
      }
}

// ======================================================================================
// matrix products
// ======================================================================================

TEMPLATE_TEST_CASE("matmul", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(31);
  const double tol = 2 * unit<T>();
  struct Dims {
    int64_t M, K, N;
  };
  const Dims dims[] = {{1, 7, 5}, {13, 33, 9}, {4, 64, 130}, {1, 1000, 1}, {33, 1000, 7}, {64, 96, 64}, {7, 1, 3}};
  for (auto [M, K, N] : dims) {
    const std::string tag = std::to_string(M) + "x" + std::to_string(K) + "x" + std::to_string(N);
    // Plain, transposed views of either operand, and both.
    for (int variant = 0; variant < 4; ++variant) {
      auto a = make<T>({M, K}, variant & 1 ? Layout::transposed : Layout::sliced, g);
      auto b = make<T>({K, N}, variant & 2 ? Layout::transposed : Layout::contiguous, g);
      Both<T> c{ops::matmul(a.cpu, b.cpu), ops::matmul(a.gpu, b.gpu)};
      record("matmul", dname<T>(), error(c), tol, tag + " variant " + std::to_string(variant));
    }
    // Strides cuBLAS cannot take (inner stride 2 on both axes): the contiguous fallback.
    {
      auto base = make<T>({M, K, 2}, Layout::contiguous, g);
      Both<T> a{base.cpu.select(2, 0), base.gpu.select(2, 0)};
      auto b = make<T>({K, N}, Layout::contiguous, g);
      Both<T> c{ops::matmul(a.cpu, b.cpu), ops::matmul(a.gpu, b.gpu)};
      record("matmul", dname<T>(), error(c), tol, tag + " non-GEMM strides");
    }
    // alpha, beta into a strided (row-padded) output.
    for (float beta : {0.f, 1.f, 0.25f}) {
      auto a = make<T>({M, K}, Layout::contiguous, g);
      auto b = make<T>({K, N}, Layout::transposed, g);
      auto c = make<T>({M, N}, Layout::sliced, g);
      ops::matmul(c.cpu, a.cpu, b.cpu, 0.5f, beta);
      ops::matmul(c.gpu, a.gpu, b.gpu, 0.5f, beta);
      record("matmul", dname<T>(), error(c), tol, tag + " alpha 0.5 beta " + std::to_string(beta));
    }
  }
  // Batches: broadcast weight, both batch dims broadcast crosswise (a loop of batched
  // calls), a transposed batched operand, and collapsible batch dims.
  {
    auto a = make<T>({2, 3, 5, 6}, Layout::contiguous, g);
    auto b = make<T>({6, 4}, Layout::contiguous, g);
    Both<T> c{ops::matmul(a.cpu, b.cpu), ops::matmul(a.gpu, b.gpu)};
    record("matmul", dname<T>(), error(c), tol, "batched, broadcast b");
  }
  {
    auto a = make<T>({2, 1, 5, 6}, Layout::contiguous, g);
    auto b = make<T>({3, 6, 4}, Layout::contiguous, g);
    Both<T> c{ops::matmul(a.cpu, b.cpu), ops::matmul(a.gpu, b.gpu)};
    record("matmul", dname<T>(), error(c), tol, "batch dims broadcast crosswise");
  }
  {
    auto a = make<T>({3, 9, 17}, Layout::contiguous, g);
    auto bt = make<T>({3, 11, 17}, Layout::contiguous, g);  // b = bt^T per batch: attention-style q @ k^T
    Both<T> b{bt.cpu.transpose(1, 2), bt.gpu.transpose(1, 2)};
    Both<T> c{ops::matmul(a.cpu, b.cpu), ops::matmul(a.gpu, b.gpu)};
    record("matmul", dname<T>(), error(c), tol, "batched transposed b");
  }
  {
    auto a = make<T>({2, 3, 8, 16}, Layout::contiguous, g);
    auto b = make<T>({2, 3, 16, 8}, Layout::contiguous, g);
    auto c = make<T>({2, 3, 8, 8}, Layout::contiguous, g);
    ops::matmul(c.cpu, a.cpu, b.cpu, 1.f, 1.f);
    ops::matmul(c.gpu, a.gpu, b.gpu, 1.f, 1.f);
    record("matmul", dname<T>(), error(c), tol, "collapsible batch, beta 1");
  }
  {  // K == 0: the op scales or clears the output without a product.
    auto a = make<T>({3, 0}, Layout::contiguous, g);
    auto b = make<T>({0, 5}, Layout::contiguous, g);
    auto c = make<T>({3, 5}, Layout::contiguous, g);
    ops::matmul(c.cpu, a.cpu, b.cpu, 1.f, 0.5f);
    ops::matmul(c.gpu, a.gpu, b.gpu, 1.f, 0.5f);
    record("matmul", dname<T>(), error(c), tol, "K = 0");
  }
}

TEMPLATE_TEST_CASE("linear (GEMV and GEMM paths)", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(32);
  const double tol = 2 * unit<T>();
  Kernels<Cuda>::set_gemv_max_rows(8);  // the GEMV kernel up to 8 rows, cuBLAS above
  // Rows 1-2 run the streaming GEMV where it fits (mode 1), and again the tiled one (mode 0);
  // mode 2 with no GEMV rows: the streaming GEMV in place of cuBLAS.
  for (int mode : {1, 0, 2})
  for (int64_t R : {1, 2, 3, 5, 8, 9, 33})
    for (int64_t K : {7, 64, 1000, 4104})
      for (int64_t N : {1, 5, 130, 513}) {
        if (R * K * N > int64_t(40) << 20 || (mode != 1 && R > 2)) continue;
        Kernels<Cuda>::set_gemv_stream(mode);
        Kernels<Cuda>::set_gemv_max_rows(mode == 2 ? 0 : 8);
        const std::string tag = "R " + std::to_string(R) + " K " + std::to_string(K) + " N " + std::to_string(N) +
                                " stream " + std::to_string(mode);
        auto x = make<T>({R, K}, Layout::contiguous, g);
        auto w = make<T>({N, K}, Layout::contiguous, g);
        Both<T> y{ops::linear(x.cpu, w.cpu), ops::linear(x.gpu, w.gpu)};
        record("linear", dname<T>(), error(y), tol, tag);
        // beta = 1 accumulates (residual add).
        auto y1 = make<T>({R, N}, Layout::contiguous, g);
        ops::linear(y1.cpu, x.cpu, w.cpu, 1.f);
        ops::linear(y1.gpu, x.gpu, w.gpu, 1.f);
        record("linear", dname<T>(), error(y1), tol, tag + " beta 1");
      }
  Kernels<Cuda>::set_gemv_stream(-1);
  Kernels<Cuda>::set_gemv_max_rows(8);
  // A weight starting one element past a 16-byte boundary (scalar loads), and a batched
  // input [2, 3, K].
  for (int64_t K : {64, 1000}) {
    auto flat = make<T>({17 * K + 1}, Layout::contiguous, g);
    Both<T> w{flat.cpu.slice(0, 1, 1 + 17 * K).reshape({17, K}), flat.gpu.slice(0, 1, 1 + 17 * K).reshape({17, K})};
    auto x = make<T>({2, 3, K}, Layout::contiguous, g);
    Both<T> y{ops::linear(x.cpu, w.cpu), ops::linear(x.gpu, w.gpu)};
    record("linear", dname<T>(), error(y), tol, "unaligned weight K " + std::to_string(K));
  }
}

TEMPLATE_TEST_CASE("fused_linear (norm prologue, glu epilogue, split GEMV)", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(33);
  const double tol = 4 * unit<T>();
  Kernels<Cuda>::set_gemv_max_rows(8);  // the fused GEMV kernel up to 8 rows, composition above
  for (int mode : {1, 0})  // rows 1-2: the streaming GEMV where it fits, then the tiled one
  for (int64_t R : {1, 2, 5, 8, 9})
    for (int64_t K : {64, 1000, 1024, 4104})
      for (int64_t N : {2, 130, 1024, 4096}) {
        if (R * K * N > int64_t(40) << 20 || (mode == 0 && R > 2)) continue;
        Kernels<Cuda>::set_gemv_stream(mode);
        auto x = make<T>({R, K}, Layout::contiguous, g, -3, 3);
        auto w = make<T>({N, K}, Layout::contiguous, g);
        auto nw = make<T>({K}, Layout::contiguous, g, 0.5f, 1.5f), nb = make<T>({K}, Layout::contiguous, g);
        for (FusedNorm norm : {FusedNorm::none, FusedNorm::rms, FusedNorm::layer})
          for (bool glu : {false, true}) {
            auto [fc, fg] = fused_options(norm, glu, nw, nb);
            const std::string tag = "R " + std::to_string(R) + " K " + std::to_string(K) + " N " + std::to_string(N) +
                                    " norm " + std::to_string(int(norm)) + (glu ? " glu" : "") + " stream " +
                                    std::to_string(mode);
            Both<T> y{ops::fused_linear(x.cpu, w.cpu, fc), ops::fused_linear(x.gpu, w.gpu, fg)};
            record("fused_linear", dname<T>(), error(y), tol, tag);
            if (!glu) {
              auto y1 = make<T>({R, N}, Layout::contiguous, g);
              fc.beta = fg.beta = 1.f;
              ops::fused_linear(y1.cpu, x.cpu, w.cpu, fc);
              ops::fused_linear(y1.gpu, x.gpu, w.gpu, fg);
              record("fused_linear", dname<T>(), error(y1), tol, tag + " beta 1");
            }
          }
      }
  Kernels<Cuda>::set_gemv_stream(-1);
}

// Quantised weights (core/quant.hpp): both backends quantise a weight to the same bytes and
// scales; linear / fused_linear on them (here the int8 / fp8 GEMV up to 8 rows, the
// dequantising cuBLAS path above) agree like the dense ops do.
template <class F, class T>
void quant_cases(std::mt19937& g) {
  const double tol = 4 * unit<T>();
  const std::string dt = dname<T>() + (std::is_same_v<F, Int8> ? " int8" : " fp8");
  Kernels<Cuda>::set_gemv_q_max_rows(8);
  for (int mode : {1, 0})  // rows 1-2: the streaming GEMV where it fits, then the tiled one
  for (int64_t R : {1, 2, 5, 8, 9, 33})
    for (int64_t K : {16, 64, 1000, 4096, 4104})
      for (int64_t N : {2, 130, 4096}) {
        if (R * K * N > int64_t(40) << 20 || (mode == 0 && R > 2)) continue;
        Kernels<Cuda>::set_gemv_stream(mode);
        auto x = make<T>({R, K}, Layout::contiguous, g, -3, 3);
        auto w = make<T>({N, K}, Layout::contiguous, g, -0.2, 0.2);
        auto qc = ops::quantize_rows<F>(w.cpu);
        auto qg = ops::quantize_rows<F>(w.gpu);
        Both<uint8_t> codes{qc.data, qg.data};
        Both<float> scales{qc.scale, qg.scale};
        const std::string tag = "R " + std::to_string(R) + " K " + std::to_string(K) + " N " + std::to_string(N) +
                                " stream " + std::to_string(mode);
        record("quantize_rows", dt, std::max(error(codes), error(scales)), 0, tag);
        Both<T> dq{Tensor<T, Cpu>::empty({N, K}), Tensor<T, Cuda>::empty({N, K})};
        ops::dequantize(dq.cpu, qc);
        ops::dequantize(dq.gpu, qg);
        record("dequantize", dt, error(dq), 0, tag);
        auto nw = make<T>({K}, Layout::contiguous, g, 0.5f, 1.5f), nb = make<T>({K}, Layout::contiguous, g);
        for (FusedNorm norm : {FusedNorm::none, FusedNorm::rms, FusedNorm::layer})
          for (bool glu : {false, true}) {
            auto [fc, fg] = fused_options(norm, glu, nw, nb);
            const std::string t2 = tag + " norm " + std::to_string(int(norm)) + (glu ? " glu" : "");
            Both<T> y{ops::fused_linear(x.cpu, qc, fc), ops::fused_linear(x.gpu, qg, fg)};
            record("linear_q", dt, error(y), tol, t2);
            if (!glu && norm == FusedNorm::none) {
              auto y1 = make<T>({R, N}, Layout::contiguous, g);
              ops::linear(y1.cpu, x.cpu, qc, 1.f);
              ops::linear(y1.gpu, x.gpu, qg, 1.f);
              record("linear_q", dt, error(y1), tol, t2 + " beta 1");
            }
          }
      }
  Kernels<Cuda>::set_gemv_stream(-1);
}

TEMPLATE_TEST_CASE("quantised weights: quantize_rows, dequantize, linear / fused_linear (int8, fp8 e4m3)", "[backend]",
                   float, bf16) {
  std::mt19937 g(91);
  quant_cases<Int8, TestType>(g);
  quant_cases<Fp8E4M3, TestType>(g);
  Kernels<Cuda>::set_gemv_q_max_rows(-1);  // the default again
}

// The two CUDA paths of a quantised linear on the same rows: the GEMV (decoding in registers)
// and the dequantising path (codes decoded to T tile by tile, cuBLAS with fp32 results, the
// scale / residual / GLU epilogue). They do the same arithmetic in another summation order,
// so they agree to one rounding of the output. Tiles are made small (7 to 960 weight rows) so
// that every product spans several tiles with a partial last one, and for odd R the fp32
// results go through the temporary that large batches use (a 0-byte limit for the scratch).
// Each path is also held to the CPU like linear_q above.
template <class F, class T>
void quant_path_cases(std::mt19937& g) {
  const double tol_paths = std::is_same_v<T, float> ? 4 * unit<T>() : 3 * std::ldexp(1.0, -8);
  const double tol_cpu = 4 * unit<T>();
  const std::string dt = dname<T>() + (std::is_same_v<F, Int8> ? " int8" : " fp8");
  for (int64_t R : {1, 2, 3, 8})
    for (auto [K, N] : {std::pair<int64_t, int64_t>{64, 130}, {64, 4096}, {1000, 130}, {1000, 4096}, {4096, 130}}) {
      auto x = make<T>({R, K}, Layout::contiguous, g, -3, 3);
      auto w = make<T>({N, K}, Layout::contiguous, g, -0.2, 0.2);
      const auto qc = ops::quantize_rows<F>(w.cpu);
      const auto qg = ops::quantize_rows<F>(w.gpu);
      auto nw = make<T>({K}, Layout::contiguous, g, 0.5f, 1.5f), nb = make<T>({K}, Layout::contiguous, g);
      auto y0 = make<T>({R, N}, Layout::contiguous, g);  // the residual that beta = 1 adds to
      // 7 or 37 rows a tile (a partial last tile), or 1000 (rounded down to 960, cuBLAS's multiple of 64).
      const int64_t tile_rows = N == 4096 ? 1000 : K == 4096 ? 7 : 37;
      const int64_t tile_bytes = tile_rows * K * int64_t(sizeof(T)), acc_bytes = (R + N) % 2 ? 0 : -1;
      for (FusedNorm norm : {FusedNorm::none, FusedNorm::rms, FusedNorm::layer})
        for (int mode = 0; mode < 3; ++mode) {  // plain, glu, beta 1
          const bool glu = mode == 1;
          auto [fc, fg] = fused_options(norm, glu, nw, nb);
          fc.beta = fg.beta = mode == 2 ? 1.f : 0.f;
          const int64_t No = glu ? N / 2 : N;
          auto start = [&](const auto& y) {  // the output's prior contents (read with beta 1)
            using Y = std::decay_t<decltype(y)>;
            return mode == 2 ? Y(y.slice(1, 0, No).clone()) : Y::zeros({R, No});
          };
          auto ycpu = start(y0.cpu);
          ops::fused_linear(ycpu, x.cpu, qc, fc);
          auto ygemv = start(y0.gpu), ydq = start(y0.gpu);
          Kernels<Cuda>::set_gemv_q_max_rows(8);
          ops::fused_linear(ygemv, x.gpu, qg, fg);
          Kernels<Cuda>::set_gemv_q_max_rows(0);
          Kernels<Cuda>::set_dequant_tiles(tile_bytes, acc_bytes);
          ops::fused_linear(ydq, x.gpu, qg, fg);
          Kernels<Cuda>::set_dequant_tiles(-1, -1);
          Kernels<Cuda>::set_gemv_q_max_rows(-1);
          const std::string tag = "R " + std::to_string(R) + " K " + std::to_string(K) + " N " + std::to_string(N) +
                                  " norm " + std::to_string(int(norm)) + (glu ? " glu" : "") +
                                  (mode == 2 ? " beta 1" : "") + (acc_bytes == 0 ? " (results in a temporary)" : "");
          record("linear_q_paths", dt, error(ygemv.template to<Cpu>(), ydq), tol_paths, tag);
          record("linear_q", dt, error(ycpu, ydq), tol_cpu, tag + " (dequantising path)");
          record("linear_q", dt, error(ycpu, ygemv), tol_cpu, tag + " (GEMV)");
        }
      // linear_q itself (no fusion) through both paths.
      Both<T> y{Tensor<T, Cpu>::empty({R, N}), Tensor<T, Cuda>::empty({R, N})};
      auto yg = Tensor<T, Cuda>::empty({R, N});
      ops::linear(y.cpu, x.cpu, qc);
      Kernels<Cuda>::set_gemv_q_max_rows(8);
      ops::linear(yg, x.gpu, qg);
      Kernels<Cuda>::set_gemv_q_max_rows(0);
      Kernels<Cuda>::set_dequant_tiles(tile_bytes, acc_bytes);
      ops::linear(y.gpu, x.gpu, qg);
      Kernels<Cuda>::set_dequant_tiles(-1, -1);
      Kernels<Cuda>::set_gemv_q_max_rows(-1);
      const std::string tag = "R " + std::to_string(R) + " K " + std::to_string(K) + " N " + std::to_string(N);
      record("linear_q_paths", dt, error(yg.template to<Cpu>(), y.gpu), tol_paths, tag + " linear");
      record("linear_q", dt, error(y), tol_cpu, tag + " linear (dequantising path)");
    }
}

TEMPLATE_TEST_CASE("quantised weights: the dequantising cuBLAS path matches the GEMV (rows 1, 2, 3, 8)", "[backend]",
                   float, bf16) {
  std::mt19937 g(92);
  quant_path_cases<Int8, TestType>(g);
  quant_path_cases<Fp8E4M3, TestType>(g);
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  std::printf("CUDA device: %s\n", cuda::device_name().c_str());
  const int rc = Catch::Session().run(argc, argv);
  print_summary();
  return rc;
}
