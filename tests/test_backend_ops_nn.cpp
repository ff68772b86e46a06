// Cross-backend op tests, second part (same binary as test_backend_ops.cpp): reductions and
// row-wise normalisation, positions and embeddings, attention and the KV cache, sampling and
// random numbers, and Mimi's convolutions and vector quantiser. Harness and tolerances:
// backend_ops_harness.hpp.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_template_test_macros.hpp>
#endif

#include "backend_ops_harness.hpp"

using namespace ttt;
using namespace backend_ops_test;

// ======================================================================================
// reductions and row-wise normalisation
// ======================================================================================

namespace {
const Shape kRowShapes[] = {Shape{7}, Shape{3, 17}, Shape{2, 3, 64}, Shape{1, 1, 2, 1000}, Shape{5, 1}, Shape{4, 4097}};
}

TEMPLATE_TEST_CASE("reduce sum, mean, max", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(41);
  for (Shape s : kRowShapes)
    for (Layout l : kLayouts)
      for (Reduce op : {Reduce::sum, Reduce::mean, Reduce::max}) {
        auto x = make<T>(s, l, g, -4, 4);
        Both<T> y{ops::reduce(x.cpu, op), ops::reduce(x.gpu, op)};
        const bool mx = op == Reduce::max;
        record(mx ? "reduce_max" : op == Reduce::sum ? "reduce_sum" : "reduce_mean", dname<T>(), error(y),
               mx ? 0 : 2 * unit<T>(), shape_str(s) + " " + name(l));
      }
  // max propagates NaN; -inf and -0 entries; a strided output.
  auto h = random_tensor<T>({6, 33}, g, -4, 4);
  auto x = with_specials(h, g, {NAN, -INFINITY, -0.f, 0.f}, 0.05);
  auto out = make<T>({6}, Layout::sliced, g);
  ops::reduce(out.cpu, x.cpu, Reduce::max);
  ops::reduce(out.gpu, x.gpu, Reduce::max);
  record("reduce_max", dname<T>(), error(out), 0, "specials, strided output");
}

TEMPLATE_TEST_CASE("argmax", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(42);
  for (Shape s : kRowShapes)
    for (Layout l : kLayouts) {
      // Few distinct values: many ties, so "first index of the maximum" is exercised.
      auto h = random_tensor<T>(s, g, -4, 4);
      for (int64_t i = 0; i < h.numel(); ++i) h.data()[i] = from_f32<T>(std::round(to_f32(h.data()[i]) * 2) / 2);
      auto x = make<T>(s, l, g);
      x.cpu.copy_from(h);
      x.gpu.copy_from(h.template to<Cuda>());
      Both<int64_t> y{ops::argmax(x.cpu), ops::argmax(x.gpu)};
      record("argmax", dname<T>(), error(y), 0, shape_str(s) + " " + name(l));
    }
  // NaN never wins; all-NaN and all -inf rows give 0.
  auto h = random_tensor<T>({8, 50}, g, -4, 4);
  for (int64_t j = 0; j < 50; ++j) {
    h(5, j) = from_f32<T>(NAN);
    h(6, j) = from_f32<T>(-INFINITY);
    h(7, j) = from_f32<T>(j % 3 ? NAN : -INFINITY);
  }
  auto x = with_specials(h, g, {NAN, INFINITY, -INFINITY, -0.f, 0.f}, 0.1);
  Both<int64_t> y{ops::argmax(x.cpu), ops::argmax(x.gpu)};
  record("argmax", dname<T>(), error(y), 0, "specials");
}

TEMPLATE_TEST_CASE("softmax", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(43);
  for (Shape s : kRowShapes)
    for (Layout l : kLayouts) {
      auto x = make<T>(s, l, g, -8, 8);
      Both<T> y{ops::softmax(x.cpu), ops::softmax(x.gpu)};
      record("softmax", dname<T>(), error(y), unit<T>(), shape_str(s) + " " + name(l));
    }
  // Masked entries (-inf), into a strided output.
  auto x = with_specials(random_tensor<T>({6, 33}, g, -8, 8), g, {-INFINITY}, 0.3);
  auto y = make<T>({6, 33}, Layout::sliced, g);
  ops::softmax(y.cpu, x.cpu);
  ops::softmax(y.gpu, x.gpu);
  record("softmax", dname<T>(), error(y), unit<T>(), "masked entries");
}

TEMPLATE_TEST_CASE("layer_norm and rms_norm", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(44);
  for (Shape s : kRowShapes)
    for (Layout l : kLayouts) {
      const int64_t n = s.back();
      // An offset mean: the variance must not come from E[x^2] - mu^2.
      auto x = make<T>(s, l, g, 2, 6);
      auto w = make<T>({n}, Layout::contiguous, g, 0.5, 1.5);
      auto b = make<T>({n}, Layout::contiguous, g);
      Both<T> y{ops::layer_norm(x.cpu, w.cpu, b.cpu, 1e-5f), ops::layer_norm(x.gpu, w.gpu, b.gpu, 1e-5f)};
      record("layer_norm", dname<T>(), error(y), 2 * unit<T>(), shape_str(s) + " " + name(l));
      Both<T> y0{ops::layer_norm(x.cpu, Tensor<T, Cpu>(), Tensor<T, Cpu>(), 1e-6f),
                 ops::layer_norm(x.gpu, Tensor<T, Cuda>(), Tensor<T, Cuda>(), 1e-6f)};
      record("layer_norm", dname<T>(), error(y0), 2 * unit<T>(), shape_str(s) + " " + name(l) + " no affine");
      auto xr = make<T>(s, l, g, -3, 3);
      Both<T> r{ops::rms_norm(xr.cpu, w.cpu, 1e-8f), ops::rms_norm(xr.gpu, w.gpu, 1e-8f)};
      record("rms_norm", dname<T>(), error(r), 2 * unit<T>(), shape_str(s) + " " + name(l));
    }
  // Moshi's widths (temporal 4096, depformer 1024) and the register kernel's limit in bf16 / f16
  // (8192; f32 takes the general kernel there): aligned contiguous rows take rms_norm_row_kernel.
  for (Shape s : {Shape{1, 4096}, Shape{3, 1024}, Shape{2, 8192}, Shape{2, 8200}})
    for (Layout l : kLayouts) {
      const int64_t n = s.back();
      auto w = make<T>({n}, Layout::contiguous, g, 0.5, 1.5);
      auto xr = make<T>(s, l, g, -3, 3);
      Both<T> r{ops::rms_norm(xr.cpu, w.cpu, 1e-5f), ops::rms_norm(xr.gpu, w.gpu, 1e-5f)};
      record("rms_norm", dname<T>(), error(r), 2 * unit<T>(), shape_str(s) + " " + name(l));
    }
}

// The backward of unary and layer_norm (training): dx, and layer_norm's dweight / dbias (sums
// over rows: fp32 chunk sums on CUDA, double on the CPU).
TEMPLATE_TEST_CASE("unary_backward and layer_norm_backward", "[backend][grad]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(46);
  const Unary all[] = {Unary::scale,   Unary::silu, Unary::gelu, Unary::gelu_tanh, Unary::tanh,
                       Unary::sigmoid, Unary::exp,  Unary::relu, Unary::identity,  Unary::elu};
  for (Shape s : {Shape{7}, Shape{3, 33}, Shape{2, 3, 4, 9}})
    for (Layout l : kLayouts)
      for (Unary op : all) {
        auto x = make<T>(s, l, g, -4, 4);
        auto dy = make<T>(s, Layout::contiguous, g);
        Both<T> dx{ops::unary_backward(x.cpu, dy.cpu, op, 0.7f), ops::unary_backward(x.gpu, dy.gpu, op, 0.7f)};
        record("unary_backward", dname<T>(), error(dx), unit<T>(),
               shape_str(s) + " " + name(l) + " op " + std::to_string(int(op)));
      }
  for (Shape s : kRowShapes)
    for (Layout l : kLayouts) {
      const int64_t n = s.back();
      auto x = make<T>(s, l, g, 2, 6);
      auto dy = make<T>(s, l == Layout::sliced ? Layout::transposed : Layout::sliced, g);
      auto w = make<T>({n}, Layout::contiguous, g, 0.5, 1.5);
      for (const bool affine : {true, false}) {
        Both<T> dx{Tensor<T, Cpu>::empty(s), Tensor<T, Cuda>::empty(s)};
        Both<T> dw{Tensor<T, Cpu>::empty({n}), Tensor<T, Cuda>::empty({n})};
        Both<T> db{Tensor<T, Cpu>::empty({n}), Tensor<T, Cuda>::empty({n})};
        ops::layer_norm_backward(dx.cpu, dw.cpu, db.cpu, x.cpu, affine ? w.cpu : Tensor<T, Cpu>(), dy.cpu, 1e-5f);
        ops::layer_norm_backward(dx.gpu, dw.gpu, db.gpu, x.gpu, affine ? w.gpu : Tensor<T, Cuda>(), dy.gpu, 1e-5f);
        const std::string what = shape_str(s) + " " + name(l) + (affine ? "" : " no weight");
        record("layer_norm_backward", dname<T>(), error(dx), 2 * unit<T>(), what + " dx");
        record("layer_norm_backward", dname<T>(), error(dw), 2 * unit<T>(), what + " dweight");
        record("layer_norm_backward", dname<T>(), error(db), 2 * unit<T>(), what + " dbias");
      }
    }
}

// ======================================================================================
// positions
// ======================================================================================

TEMPLATE_TEST_CASE("rope", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(51);
  for (int64_t D : {2, 8, 64, 128})
    for (auto [B, Tn, H] : {std::tuple<int64_t, int64_t, int64_t>{1, 1, 4}, {2, 3, 2}, {1, 17, 8}})
      for (float max_period : {10000.f, 500000.f}) {
        const std::string tag = "D " + std::to_string(D) + " B " + std::to_string(B) + " T " + std::to_string(Tn);
        std::vector<int64_t> pv(size_t(B * Tn));
        std::uniform_int_distribution<int64_t> pd(0, 4000);
        for (auto& p : pv) p = pd(g);
        pv[0] = 0;
        const double tol = pos_tol<T>(double(*std::max_element(pv.begin(), pv.end())));
        auto pos = from_vector<int64_t>({B, Tn}, pv);
        // q as a slice of a fused [B, T, 3H, D] projection (strided), written out of place.
        auto qkv = make<T>({B, Tn, 3 * H, D}, Layout::contiguous, g);
        Both<T> q{qkv.cpu.slice(2, H, 2 * H), qkv.gpu.slice(2, H, 2 * H)};
        Both<T> y{Tensor<T, Cpu>::empty(q.cpu.shape()), Tensor<T, Cuda>::empty(q.cpu.shape())};
        ops::rope(y.cpu, q.cpu, pos.cpu, max_period);
        ops::rope(y.gpu, q.gpu, pos.gpu, max_period);
        record("rope", dname<T>(), error(y), tol, tag + " strided input");
        // In place.
        ops::rope(q.cpu, q.cpu, pos.cpu, max_period);
        ops::rope(q.gpu, q.gpu, pos.gpu, max_period);
        record("rope", dname<T>(), error(q), tol, tag + " in place");
      }
}

TEMPLATE_TEST_CASE("add_sin_embedding", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(52);
  for (int64_t C : {4, 6, 64, 1024})
    for (auto [B, Tn] : {std::pair<int64_t, int64_t>{1, 1}, {2, 5}, {3, 33}})
      for (float scale : {1.f, 0.5f}) {
        std::vector<int64_t> pv(size_t(B * Tn));
        std::uniform_int_distribution<int64_t> pd(0, 4000);
        for (auto& p : pv) p = pd(g);
        // Positions as a transposed view of [T, B] storage.
        auto pt = from_vector<int64_t>({Tn, B}, pv);
        Both<int64_t> pos{pt.cpu.transpose(0, 1), pt.gpu.transpose(0, 1)};
        auto x = make<T>({B, Tn, C}, Layout::contiguous, g);
        ops::add_sin_embedding(x.cpu, pos.cpu, 10000.f, scale);
        ops::add_sin_embedding(x.gpu, pos.gpu, 10000.f, scale);
        record("add_sin_embedding", dname<T>(), error(x),
               pos_tol<T>(double(*std::max_element(pv.begin(), pv.end()))),
               "C " + std::to_string(C) + " B " + std::to_string(B) + " T " + std::to_string(Tn));
      }
}

// ======================================================================================
// lookup, attention, KV ring, sampling
// ======================================================================================

TEMPLATE_TEST_CASE("embedding", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(61);
  for (int64_t V : {1, 11, 2049})
    for (int64_t D : {1, 6, 128, 1000})
      for (Shape s : {Shape{7}, Shape{2, 3}, Shape{1, 1, 33}}) {
        auto table = make<T>({V, D}, Layout::contiguous, g, -3, 3);
        std::uniform_int_distribution<int64_t> id(-2, V + 1);  // -1 and out-of-range ids give zeros
        std::vector<int64_t> iv(size_t(s.numel()));
        for (auto& i : iv) i = id(g);
        auto ids = from_vector<int64_t>(s, iv);
        Both<T> y{ops::embedding(table.cpu, ids.cpu), ops::embedding(table.gpu, ids.gpu)};
        record("embedding", dname<T>(), error(y), 0, "V " + std::to_string(V) + " D " + std::to_string(D));
      }
}

TEMPLATE_TEST_CASE("attention", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(62);
  struct Case {
    int64_t B, T, H, Hk, S, D, context;
  };
  const Case cases[] = {
      {1, 1, 4, 4, 1, 16, 0},      {2, 3, 4, 2, 7, 16, 3},     {1, 1, 8, 8, 300, 64, 0},  {1, 4, 4, 2, 2500, 128, 250},
      {2, 2, 2, 1, 33, 80, 0},     {1, 1, 2, 2, 5000, 64, 0},  {1, 2, 3, 3, 19, 7, 0},    {2, 64, 8, 8, 300, 64, 100},
      {1, 70, 8, 4, 2100, 16, 0},  {1, 3, 2, 2, 40, 300, 0},
      // Enough rows for one split per row (the vector kernel's large-batch decode), and a
      // decode batch over a 3000-key ring (several splits per row).
      {3, 24, 16, 16, 1000, 128, 500}, {4, 1, 32, 32, 3000, 128, 0},
  };
  for (const Case& c : cases)
    for (bool strided : {false, true}) {
      const std::string tag = "B " + std::to_string(c.B) + " T " + std::to_string(c.T) + " H " + std::to_string(c.H) +
                              "/" + std::to_string(c.Hk) + " S " + std::to_string(c.S) + " D " + std::to_string(c.D) +
                              " ctx " + std::to_string(c.context) + (strided ? " strided" : "");
      // Keys hold positions off..off+S-1 with ~10% empty slots (-1); queries sit after
      // the keys, except query (0, 0) which precedes every key and must get zeros.
      const int64_t off = 37;
      std::uniform_real_distribution<double> u(0, 1);
      std::vector<int64_t> kp(size_t(c.B * c.S)), qp(size_t(c.B * c.T));
      for (int64_t b = 0; b < c.B; ++b) {
        for (int64_t s = 0; s < c.S; ++s) kp[size_t(b * c.S + s)] = u(g) < 0.1 ? -1 : off + s;
        for (int64_t t = 0; t < c.T; ++t) qp[size_t(b * c.T + t)] = off + c.S - c.T + t + b;
      }
      if (c.T > 1) qp[0] = off - 1;
      if (c.T > 2) qp[1] = std::numeric_limits<int64_t>::min() + 3;  // no overflow in the mask
      if (c.S > 2) kp[1] = std::numeric_limits<int64_t>::max() - 3;  // a key from the far future
      auto q_pos = from_vector<int64_t>({c.B, c.T}, qp);
      auto k_pos = from_vector<int64_t>({c.B, c.S}, kp);
      Both<T> q, k, v;
      if (strided) {
        // q a slice of a fused projection; k, v stored [B, S, Hk, D] and viewed [B, Hk, S, D].
        auto qkv = make<T>({c.B, c.T, 3 * c.H, c.D}, Layout::contiguous, g);
        q = {qkv.cpu.slice(2, c.H, 2 * c.H), qkv.gpu.slice(2, c.H, 2 * c.H)};
        auto ks = make<T>({c.B, c.S, c.Hk, c.D}, Layout::contiguous, g);
        auto vs = make<T>({c.B, c.S, c.Hk, c.D}, Layout::contiguous, g);
        k = {ks.cpu.transpose(1, 2), ks.gpu.transpose(1, 2)};
        v = {vs.cpu.transpose(1, 2), vs.gpu.transpose(1, 2)};
      } else {
        q = make<T>({c.B, c.T, c.H, c.D}, Layout::contiguous, g);
        k = make<T>({c.B, c.Hk, c.S, c.D}, Layout::contiguous, g);
        v = make<T>({c.B, c.Hk, c.S, c.D}, Layout::contiguous, g);
      }
      AttentionParams p;
      p.context = c.context;
      p.scale = float(1.0 / std::sqrt(double(c.D)));
      Both<T> o{Tensor<T, Cpu>::empty(q.cpu.shape()), Tensor<T, Cuda>::empty(q.cpu.shape())};
      ops::attention(o.cpu, q.cpu, k.cpu, v.cpu, q_pos.cpu, k_pos.cpu, p);
      ops::attention(o.gpu, q.gpu, k.gpu, v.gpu, q_pos.gpu, k_pos.gpu, p);
      record("attention", dname<T>(), error(o), 2 * unit<T>(), tag);

      // A key prefix (a TTT memory's virtual keys): its own context and a per-head bias
      // that lives in each backend's memory.
      if (c.S < 4) continue;
      const int64_t prefix = std::min<int64_t>(c.S, 6);
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t s = 0; s < prefix; ++s) kp[size_t(b * c.S + s)] = qp[size_t(b * c.T + c.T - 1)] - s;
      auto k_pos2 = from_vector<int64_t>({c.B, c.S}, kp);
      auto bias = make<float>({c.H}, Layout::contiguous, g, -2, 2);
      for (bool with_bias : {false, true}) {
        AttentionParams pc = p;
        pc.prefix = prefix;
        pc.prefix_context = 4;
        AttentionParams pg = pc;
        pc.prefix_bias = with_bias ? bias.cpu.data() : nullptr;
        pg.prefix_bias = with_bias ? bias.gpu.data() : nullptr;
        ops::attention(o.cpu, q.cpu, k.cpu, v.cpu, q_pos.cpu, k_pos2.cpu, pc);
        ops::attention(o.gpu, q.gpu, k.gpu, v.gpu, q_pos.gpu, k_pos2.gpu, pg);
        record("attention", dname<T>(), error(o), 2 * unit<T>(), tag + " prefix" + (with_bias ? " bias" : ""));
      }
    }
}

TEMPLATE_TEST_CASE("kv_write", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(63);
  for (int64_t C : {4, 16})
    for (int64_t D : {5, 64})
      for (int64_t Tn : {1, 3, 6, 20})
        for (int mode = 0; mode < 3; ++mode) {  // 0: no mask; 1: mask {1, 0}; 2: repeated positions
          const int64_t B = 2, H = 3;
          const std::string tag = "C " + std::to_string(C) + " D " + std::to_string(D) + " T " + std::to_string(Tn) +
                                  " mode " + std::to_string(mode);
          auto rk = make<T>({B, H, C, D}, Layout::contiguous, g);
          auto rv = make<T>({B, H, C, D}, Layout::contiguous, g);
          auto rp = make<int64_t>({B, C}, Layout::contiguous, g, -1, 50);
          // k, v as slices of a fused [B, T, 3H, D] projection.
          auto kv = make<T>({B, Tn, 3 * H, D}, Layout::contiguous, g);
          Both<T> k{kv.cpu.slice(2, H, 2 * H), kv.gpu.slice(2, H, 2 * H)};
          Both<T> v{kv.cpu.slice(2, 2 * H, 3 * H), kv.gpu.slice(2, 2 * H, 3 * H)};
          std::vector<int64_t> pv(size_t(B * Tn));
          for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < Tn; ++t)
              pv[size_t(b * Tn + t)] = mode == 2 ? (t / 2) * (b ? -1 : 1) : 10 * b + t - 3;  // negatives wrap too
          auto pos = from_vector<int64_t>({B, Tn}, pv);
          Both<uint8_t> mask;
          if (mode == 1) mask = from_vector<uint8_t>({B}, {1, 0});
          ops::kv_write(rk.cpu, rv.cpu, rp.cpu, k.cpu, v.cpu, pos.cpu, mask.cpu);
          ops::kv_write(rk.gpu, rv.gpu, rp.gpu, k.gpu, v.gpu, pos.gpu, mask.gpu);
          record("kv_write", dname<T>(), std::max({error(rk), error(rv), error(rp)}), 0, tag);
        }
}

// The quantised KV cache (--kv-dtype): kv_write quantises each written row to the same codes
// and scales on both backends (error 0), and attention over the codes agrees like the dense
// op. D 128 and 64 take the kernel's 16-byte code loads, D 80 and 5 the one-code path.
template <class F, class T>
void quant_kv_cases(std::mt19937& g) {
  const std::string dt = dname<T>() + (std::is_same_v<F, Int8> ? " int8" : " fp8");
  for (int64_t C : {16, 3000})
    for (int64_t D : {128, 64, 80, 5})
      for (int mode = 0; mode < 3; ++mode) {  // 0: no mask; 1: mask {1, 0}; 2: repeated positions
        const int64_t B = 2, Hk = 2, H = 4, Tn = std::min<int64_t>(C, 40);
        const std::string tag = "C " + std::to_string(C) + " D " + std::to_string(D) + " mode " + std::to_string(mode);
        auto rk_c = QuantKv<F, Cpu>::zeros(B, Hk, C, D), rv_c = QuantKv<F, Cpu>::zeros(B, Hk, C, D);
        auto rk_g = QuantKv<F, Cuda>::zeros(B, Hk, C, D), rv_g = QuantKv<F, Cuda>::zeros(B, Hk, C, D);
        auto rp = from_vector<int64_t>({B, C}, std::vector<int64_t>(size_t(B * C), -1));  // empty
        // Fill: C tokens of the whole ring (positions 0..C-1), then Tn more under the mode.
        for (int pass = 0; pass < 2; ++pass) {
          const int64_t n = pass == 0 ? C : Tn;
          auto kv = make<T>({B, n, 3 * Hk, D}, Layout::contiguous, g, -4, 4);  // k, v slices of a fused projection
          Both<T> k{kv.cpu.slice(2, Hk, 2 * Hk), kv.gpu.slice(2, Hk, 2 * Hk)};
          Both<T> v{kv.cpu.slice(2, 2 * Hk, 3 * Hk), kv.gpu.slice(2, 2 * Hk, 3 * Hk)};
          std::vector<int64_t> pv(size_t(B * n));
          for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < n; ++t)
              pv[size_t(b * n + t)] = pass == 0 ? t : mode == 2 ? C + t / 2 : C + t;
          auto pos = from_vector<int64_t>({B, n}, pv);
          Both<uint8_t> mask;
          if (pass == 1 && mode == 1) mask = from_vector<uint8_t>({B}, {1, 0});
          ops::kv_write(rk_c, rv_c, rp.cpu, k.cpu, v.cpu, pos.cpu, mask.cpu);
          ops::kv_write(rk_g, rv_g, rp.gpu, k.gpu, v.gpu, pos.gpu, mask.gpu);
        }
        record("kv_write_q", dt,
               std::max({error(rk_c.codes, rk_g.codes), error(rv_c.codes, rv_g.codes), error(rk_c.scale, rk_g.scale),
                         error(rv_c.scale, rv_g.scale), error(rp)}),
               0, tag);
        for (int64_t context : {int64_t(0), C / 3}) {
          const int64_t Tq = mode == 0 ? 1 : 3;
          auto q = make<T>({B, Tq, H, D}, Layout::contiguous, g);
          std::vector<int64_t> qp(size_t(B * Tq));
          for (int64_t b = 0; b < B; ++b)
            for (int64_t t = 0; t < Tq; ++t) qp[size_t(b * Tq + t)] = C + Tn - Tq + t;
          auto q_pos = from_vector<int64_t>({B, Tq}, qp);
          AttentionParams p{context, float(1.0 / std::sqrt(double(D)))};
          Both<T> o{Tensor<T, Cpu>::empty(q.cpu.shape()), Tensor<T, Cuda>::empty(q.cpu.shape())};
          ops::attention(o.cpu, q.cpu, rk_c, rv_c, q_pos.cpu, rp.cpu, p);
          ops::attention(o.gpu, q.gpu, rk_g, rv_g, q_pos.gpu, rp.gpu, p);
          record("attention_q", dt, error(o), 2 * unit<T>(), tag + " ctx " + std::to_string(context));
        }
      }
}

TEMPLATE_TEST_CASE("quantised KV cache: kv_write and attention (int8, fp8 e4m3)", "[backend]", float, bf16) {
  std::mt19937 g(64);
  quant_kv_cases<Int8, TestType>(g);
  quant_kv_cases<Fp8E4M3, TestType>(g);
}

TEMPLATE_TEST_CASE("sample", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(64);
  for (int64_t V : {1, 7, 50, 1000, 2049, 32000}) {
    // Rows: plain; quantised (ties, also across the top-k boundary); non-positive with
    // +0/-0 at the top; all -inf or NaN (degenerate race); NaNs and a +inf; NaNs.
    const int64_t N = 6;
    auto host = Tensor<T, Cpu>::empty({N, V + 3});  // padded rows: a row stride != V
    std::uniform_real_distribution<float> d(-5.f, 5.f), u(0.f, 1.f);
    for (int64_t r = 0; r < N; ++r)
      for (int64_t i = 0; i < V + 3; ++i) {
        float x = d(g);
        if (r == 1) x = std::round(x * 2) / 2;
        if (r == 2) {
          x = -std::abs(std::round(x));
          if (x == 0.f) x = i % 2 ? 0.f : -0.f;
        }
        if (r == 3) x = u(g) < 0.5f ? -INFINITY : NAN;
        if (r == 4) x = u(g) < 0.05f ? NAN : (i == V / 2 ? INFINITY : x);
        if (r == 5 && u(g) < 0.2f) x = NAN;
        host(r, i) = from_f32<T>(x);
      }
    auto dev = host.template to<Cuda>();
    Both<T> logits{host.slice(1, 1, 1 + V), dev.slice(1, 1, 1 + V)};
    struct P {
      float temperature;
      int top_k;
    };
    const int kV = int(V);
    const P params[] = {{0.f, 0},  {1.f, 1},   {0.7f, 0},      {1.3f, 2},  {0.7f, 5},      {1.f, 50},
                        {0.9f, 250}, {1.f, kV - 1}, {1.1f, kV}, {0.8f, kV + 5}, {-1.f, 7}};
    for (const P& pr : params)
      for (int64_t ctr : {int64_t(0), int64_t(17), int64_t(123456789012)}) {
        auto counter = from_vector<int64_t>({1}, {ctr});
        const SampleParams sp{pr.temperature, pr.top_k, 0x1234abcdull + uint64_t(V), uint32_t(ctr % 5)};
        Both<int64_t> out{Tensor<int64_t, Cpu>::empty({N}), Tensor<int64_t, Cuda>::empty({N})};
        ops::sample(out.cpu, logits.cpu, sp, counter.cpu);
        ops::sample(out.gpu, logits.gpu, sp, counter.gpu);
        record("sample", dname<T>(), error(out), 0,
               "V " + std::to_string(V) + " temperature " + std::to_string(pr.temperature) + " top_k " +
                   std::to_string(pr.top_k) + " counter " + std::to_string(ctr));
      }
    // Per-row parameters (sample_rows): row r takes params[(r + shift) % n], its own seed and
    // counter; the same on both backends, and a row's token is the one it gets sampled alone
    // (the draw is keyed on the row's seed and counter, never on its index).
    const int64_t np = int64_t(sizeof(params) / sizeof(params[0]));
    for (int64_t shift = 0; shift < np; shift += 3) {
      const size_t n_rows = static_cast<size_t>(N);
      std::vector<float> temp(n_rows);
      std::vector<int64_t> topk(n_rows), seed(n_rows), ctr(n_rows);
      for (int64_t r = 0; r < N; ++r) {
        const P& pr = params[(r + shift) % np];
        temp[size_t(r)] = pr.temperature, topk[size_t(r)] = pr.top_k;
        seed[size_t(r)] = int64_t(0x9e3779b97f4a7c15ull * uint64_t(r + 1 + shift));
        ctr[size_t(r)] = r % 2 ? int64_t(123456789012) : r + shift;
      }
      auto rows_of = [&](auto&& up, int64_t r0, int64_t n, uint32_t salt) {
        auto sub = [&](const auto& v) { return std::vector<std::decay_t<decltype(v[0])>>(v.begin() + r0, v.begin() + r0 + n); };
        using Bk = typename std::decay_t<decltype(up(Tensor<float, Cpu>()))>::backend_type;
        SampleRows<Bk> rows;
        rows.temperature = up(Tensor<float, Cpu>::from_vector({n}, sub(temp)));
        rows.top_k = up(Tensor<int64_t, Cpu>::from_vector({n}, sub(topk)));
        rows.seed = up(Tensor<int64_t, Cpu>::from_vector({n}, sub(seed)));
        rows.counter = up(Tensor<int64_t, Cpu>::from_vector({n}, sub(ctr)));
        rows.salt = salt;
        return rows;
      };
      auto on_cpu = [](const auto& t) { return t; };
      auto on_gpu = [](const auto& t) { return t.template to<Cuda>(); };
      const uint32_t salt = uint32_t(shift % 5);
      Both<int64_t> out{Tensor<int64_t, Cpu>::empty({N}), Tensor<int64_t, Cuda>::empty({N})};
      ops::sample_rows(out.cpu, logits.cpu, rows_of(on_cpu, 0, N, salt));
      ops::sample_rows(out.gpu, logits.gpu, rows_of(on_gpu, 0, N, salt));
      record("sample_rows", dname<T>(), error(out), 0, "V " + std::to_string(V) + " shift " + std::to_string(shift));
      for (int64_t r = 0; r < N; ++r) {
        Both<int64_t> one{Tensor<int64_t, Cpu>::empty({1}), Tensor<int64_t, Cuda>::empty({1})};
        ops::sample_rows(one.cpu, logits.cpu.slice(0, r, r + 1), rows_of(on_cpu, r, 1, salt));
        ops::sample_rows(one.gpu, logits.gpu.slice(0, r, r + 1), rows_of(on_gpu, r, 1, salt));
        const int64_t alone_cpu = one.cpu.data()[0], alone_gpu = one.gpu.template to<Cpu>().data()[0];
        INFO("V " << V << " row " << r << " shift " << shift);
        CHECK(alone_cpu == out.cpu.data()[r]);
        CHECK(alone_gpu == out.cpu.data()[r]);
      }
    }
  }
}

TEMPLATE_TEST_CASE("random_normal", "[backend]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(65);
  for (int64_t n : {1, 7, 1000, 100003})
    for (float std : {1.f, 0.02f})
      for (uint64_t key : {uint64_t(0), uint64_t(0x9e3779b97f4a7c15ull)}) {
        auto out = make<T>({n}, Layout::contiguous, g);
        ops::random_normal(out.cpu, std, 1234, key);
        ops::random_normal(out.gpu, std, 1234, key);
        record("random_normal", dname<T>(), error(out), unit<T>(), "n " + std::to_string(n));
      }
}

// ======================================================================================
// convolutions and vector quantisation (Mimi)
// ======================================================================================

namespace {

// Mimi's SEANet layers at one streaming 80 ms frame (bench/mimi_ops.cpp): Cin, Cout, K,
// stride, groups, t (Tout of conv1d, Tin of conv_transpose1d).
struct MimiLayer {
  bool transpose;
  int64_t cin, cout, k, stride, groups, t;
};
const MimiLayer kMimiLayers[] = {
    {false, 1, 64, 7, 1, 1, 1920},    {false, 64, 32, 3, 1, 1, 1920},   {false, 32, 64, 1, 1, 1, 1920},
    {false, 64, 128, 8, 4, 1, 480},   {false, 128, 64, 3, 1, 1, 480},   {false, 64, 128, 1, 1, 1, 480},
    {false, 128, 256, 10, 5, 1, 96},  {false, 256, 128, 3, 1, 1, 96},   {false, 128, 256, 1, 1, 1, 96},
    {false, 256, 512, 12, 6, 1, 16},  {false, 512, 256, 3, 1, 1, 16},   {false, 256, 512, 1, 1, 1, 16},
    {false, 512, 1024, 16, 8, 1, 2},  {false, 1024, 512, 3, 1, 1, 2},   {false, 512, 512, 4, 2, 1, 1},
    {true, 512, 512, 4, 2, 512, 1},   {false, 512, 1024, 7, 1, 1, 2},   {true, 1024, 512, 16, 8, 1, 2},
    {true, 512, 256, 12, 6, 1, 16},   {true, 256, 128, 10, 5, 1, 96},   {true, 128, 64, 8, 4, 1, 480},
    {false, 64, 1, 7, 1, 1, 1920},
};

// Weights scaled by 1/sqrt(fan-in) (outputs of order one, as in a trained network).
template <class T>
Both<T> conv_weight(const Shape& s, int64_t fan_in, std::mt19937& g) {
  const double a = 1.0 / std::sqrt(double(std::max<int64_t>(1, fan_in)));
  return make<T>(s, Layout::contiguous, g, -a, a);
}

template <class T>
void conv1d_case(std::mt19937& g, int64_t B, int64_t Cin, int64_t Cout, int64_t K, int64_t stride, int64_t dil,
                 int64_t groups, int64_t Tout, bool with_bias, Layout lx, const std::string& what) {
  const int64_t Tin = (Tout - 1) * stride + dil * (K - 1) + 1 + (Tout % 3 == 0 ? stride - 1 : 0);
  auto x = make<T>({B, Cin, Tin}, lx, g);
  auto w = conv_weight<T>({Cout, Cin / groups, K}, Cin / groups * K, g);
  Both<T> b;
  if (with_bias) b = make<T>({Cout}, Layout::contiguous, g);
  Both<T> y{ops::conv1d(x.cpu, w.cpu, b.cpu, stride, dil, groups),
            ops::conv1d(x.gpu, w.gpu, b.gpu, stride, dil, groups)};
  const std::string tag = "B " + std::to_string(B) + " " + std::to_string(Cin) + "->" + std::to_string(Cout) + " K " +
                          std::to_string(K) + " s " + std::to_string(stride) + " d " + std::to_string(dil) + " g " +
                          std::to_string(groups) + " Tout " + std::to_string(Tout) + (with_bias ? " bias " : " ") +
                          name(lx) + what;
  record("conv1d", dname<T>(), error(y), 2 * unit<T>(), tag);
}

template <class T>
void conv_transpose1d_case(std::mt19937& g, int64_t B, int64_t Cin, int64_t Cout, int64_t K, int64_t stride,
                           int64_t groups, int64_t Tin, bool with_bias, Layout lx, const std::string& what) {
  auto x = make<T>({B, Cin, Tin}, lx, g);
  auto w = conv_weight<T>({Cin, Cout / groups, K}, Cin / groups * ((K + stride - 1) / stride), g);
  Both<T> b;
  if (with_bias) b = make<T>({Cout}, Layout::contiguous, g);
  Both<T> y{ops::conv_transpose1d(x.cpu, w.cpu, b.cpu, stride, groups),
            ops::conv_transpose1d(x.gpu, w.gpu, b.gpu, stride, groups)};
  const std::string tag = "B " + std::to_string(B) + " " + std::to_string(Cin) + "->" + std::to_string(Cout) + " K " +
                          std::to_string(K) + " s " + std::to_string(stride) + " g " + std::to_string(groups) +
                          " Tin " + std::to_string(Tin) + (with_bias ? " bias " : " ") + name(lx) + what;
  record("conv_transpose1d", dname<T>(), error(y), 2 * unit<T>(), tag);
}

// Random shapes: a third depthwise or grouped, K = 1, strides, dilations, short and long outputs
// (the direct, dot and GEMM kernels), bias or not, the three input layouts.
struct ConvShape {
  int64_t B, Cin, Cout, K, stride, dil, groups, T;
  bool bias;
  Layout layout;
};
ConvShape random_conv_shape(std::mt19937& g, bool transpose) {
  auto U = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(g); };
  ConvShape c{};
  c.B = U(1, 3);
  const int64_t kind = U(0, 5);
  if (kind == 0) {  // depthwise
    c.groups = U(1, 40), c.Cin = c.groups, c.Cout = c.groups * U(1, 2);
  } else {
    c.groups = kind == 1 ? U(2, 4) : 1;
    c.Cin = c.groups * U(1, 40);
    c.Cout = c.groups * (U(0, 3) == 0 ? U(1, 4) : U(5, 70));
  }
  c.K = U(0, 4) == 0 ? 1 : U(2, 12);
  c.stride = U(1, 5);
  if (transpose && U(0, 1)) c.K = 2 * c.stride;  // Mimi's
  c.dil = transpose ? 1 : U(0, 2) == 0 ? U(2, 3) : 1;
  c.T = U(0, 2) == 0 ? U(1, 6) : U(7, 90);
  c.bias = U(0, 1);
  c.layout = kLayouts[U(0, 2)];
  return c;
}

}  // namespace

TEMPLATE_TEST_CASE("conv1d", "[backend][conv]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(71);
  for (int it = 0; it < 80; ++it) {
    const ConvShape c = random_conv_shape(g, false);
    conv1d_case<T>(g, c.B, c.Cin, c.Cout, c.K, c.stride, c.dil, c.groups, c.T, c.bias, c.layout, "");
  }
  // Every GEMM tile, with and without split reductions, on shapes the automatic choice would
  // send elsewhere too.
  for (int tile = 0; tile < 4; ++tile)
    for (int splits : {1, 3}) {
      Kernels<Cuda>::set_conv_gemm(tile, splits);
      const std::string what = " tile " + std::to_string(tile) + " splits " + std::to_string(splits);
      conv1d_case<T>(g, 2, 24, 70, 5, 2, 2, 1, 77, true, Layout::sliced, what);
      conv1d_case<T>(g, 3, 16, 36, 3, 1, 1, 2, 150, false, Layout::transposed, what);
      conv1d_case<T>(g, 1, 300, 130, 1, 1, 1, 1, 40, true, Layout::contiguous, what);
      conv1d_case<T>(g, 2, 7, 7, 4, 3, 1, 7, 5, true, Layout::contiguous, what);  // depthwise
      conv1d_case<T>(g, 1, 64, 1, 7, 1, 1, 1, 300, true, Layout::sliced, what);
    }
  Kernels<Cuda>::set_conv_gemm(-1, 0);
  // The cuBLAS lowering (im2col / col2im + one GEMM) forced on every shape it takes.
  Kernels<Cuda>::set_conv_lowered_min_macs(0);
  for (int it = 0; it < 40; ++it) {
    const ConvShape c = random_conv_shape(g, false);
    conv1d_case<T>(g, c.B, c.Cin, c.Cout, c.K, c.stride, c.dil, c.groups, c.T, c.bias, c.layout, " lowered");
  }
  Kernels<Cuda>::set_conv_lowered_min_macs(-1);
  // Mimi's layers at batch 1 and 3 (contiguous input; the last layers also sliced, as the
  // streaming convolution's [history | x] views can be), and at batch 8, where the FLOP-heavy
  // layers take the lowered path by the default threshold.
  for (int64_t B : {1, 3, 8})
    for (const MimiLayer& L : kMimiLayers) {
      if (L.transpose) continue;
      conv1d_case<T>(g, B, L.cin, L.cout, L.k, L.stride, 1, L.groups, L.t, true,
                     L.t <= 16 ? Layout::sliced : Layout::contiguous, " (Mimi)");
    }
}

TEMPLATE_TEST_CASE("conv_transpose1d", "[backend][conv]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(72);
  for (int it = 0; it < 80; ++it) {
    const ConvShape c = random_conv_shape(g, true);
    conv_transpose1d_case<T>(g, c.B, c.Cin, c.Cout, c.K, c.stride, c.groups, c.T, c.bias, c.layout, "");
  }
  // K < stride (outputs no window covers are the bias), and every GEMM tile with splits.
  conv_transpose1d_case<T>(g, 2, 6, 10, 2, 5, 1, 9, true, Layout::contiguous, " K < stride");
  conv_transpose1d_case<T>(g, 2, 6, 10, 2, 5, 2, 3, true, Layout::sliced, " K < stride");
  for (int tile = 0; tile < 4; ++tile)
    for (int splits : {1, 3}) {
      Kernels<Cuda>::set_conv_gemm(tile, splits);
      const std::string what = " tile " + std::to_string(tile) + " splits " + std::to_string(splits);
      conv_transpose1d_case<T>(g, 2, 40, 70, 10, 5, 1, 30, true, Layout::sliced, what);
      conv_transpose1d_case<T>(g, 1, 24, 12, 7, 3, 2, 45, false, Layout::transposed, what);
      conv_transpose1d_case<T>(g, 3, 9, 9, 4, 2, 9, 11, true, Layout::contiguous, what);  // depthwise
      conv_transpose1d_case<T>(g, 1, 8, 6, 2, 4, 1, 13, true, Layout::contiguous, what);  // K < stride
    }
  Kernels<Cuda>::set_conv_gemm(-1, 0);
  Kernels<Cuda>::set_conv_lowered_min_macs(0);
  for (int it = 0; it < 40; ++it) {
    const ConvShape c = random_conv_shape(g, true);
    conv_transpose1d_case<T>(g, c.B, c.Cin, c.Cout, c.K, c.stride, c.groups, c.T, c.bias, c.layout, " lowered");
  }
  Kernels<Cuda>::set_conv_lowered_min_macs(-1);
  for (int64_t B : {1, 3, 8})
    for (const MimiLayer& L : kMimiLayers) {
      if (!L.transpose) continue;
      conv_transpose1d_case<T>(g, B, L.cin, L.cout, L.k, L.stride, L.groups, L.t, L.groups == 1,
                               L.t <= 16 ? Layout::sliced : Layout::contiguous, " (Mimi)");
    }
}

namespace {

// codes must equal the CPU's. x rows are a padded view (row stride != d), codes a strided
// column of an [N, 2] tensor.
template <class T>
void vq_case(const Tensor<T, Cpu>& xh, const Tensor<T, Cpu>& cbh, const std::string& tag) {
  const int64_t N = xh.size(0), d = xh.size(1);
  auto pad = Tensor<T, Cpu>::zeros({N, d + 5});
  auto xv = pad.slice(1, 2, 2 + d);
  xv.copy_from(xh);
  Both<T> x{xv, pad.template to<Cuda>().slice(1, 2, 2 + d)};
  auto cb = upload(cbh);
  auto cc = Tensor<int64_t, Cpu>::zeros({N, 2});
  auto cg = Tensor<int64_t, Cuda>::zeros({N, 2});
  Both<int64_t> codes{cc.select(1, 1), cg.select(1, 1)};
  ops::vq_nearest(codes.cpu, x.cpu, cb.cpu);
  ops::vq_nearest(codes.gpu, x.gpu, cb.gpu);
  record("vq_nearest", dname<T>(), error(codes), 0, tag);
}

}  // namespace

TEMPLATE_TEST_CASE("vq_nearest", "[backend][conv]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(73);
  // Random rows against random codebooks, Mimi's V = 2048, d = 256 with N = 1..64 among them
  // (d > 256 takes the kernel without register-resident rows).
  struct Dims {
    int64_t N, V, d;
  };
  const Dims dims[] = {{1, 1, 1},     {3, 7, 5},      {9, 100, 32},   {5, 33, 33},    {17, 300, 300},
                       {1, 2048, 256}, {2, 2048, 256}, {8, 2048, 256}, {13, 2048, 256}, {64, 2048, 256},
                       {40, 513, 64},  {3, 50, 1000}};
  for (auto [N, V, d] : dims) {
    const std::string tag = "N " + std::to_string(N) + " V " + std::to_string(V) + " d " + std::to_string(d);
    auto cb = random_tensor<T>({V, d}, g, -1, 1);
    auto x = random_tensor<T>({N, d}, g, -1, 1);
    vq_case(x, cb, tag);
    // Rows near codebook entries (the typical RVQ residual).
    std::uniform_int_distribution<int64_t> pick(0, V - 1);
    std::normal_distribution<float> noise(0.f, 0.05f);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t v = pick(g);
      for (int64_t j = 0; j < d; ++j) x(n, j) = from_f32<T>(to_f32(cb(v, j)) + noise(g));
    }
    vq_case(x, cb, tag + " near entries");
  }
  // Near ties: duplicated entries (equal distances: the lower index), entries one ulp apart
  // in one coordinate, rows equal to an entry (distance 0) and half-way between two entries,
  // and a quantised codebook (many exactly equal distances).
  {
    const int64_t V = 2048, d = 256, N = 64;
    auto cb = random_tensor<T>({V, d}, g, -1, 1);
    for (int64_t v = 1; v < V; v += 7)  // v duplicates v - 1
      for (int64_t j = 0; j < d; ++j) cb(v, j) = cb(v - 1, j);
    for (int64_t v = 3; v < V; v += 11) {  // v differs from v - 1 in one coordinate by one ulp
      for (int64_t j = 0; j < d; ++j) cb(v, j) = cb(v - 1, j);
      if constexpr (std::is_same_v<T, float>) cb(v, d / 2) = std::nextafter(cb(v, d / 2), 2.f);
      if constexpr (!std::is_same_v<T, float>) {  // 16-bit T: step the storage's own ulp
        T t = cb(v, d / 2);
        t.bits = uint16_t(t.bits + 1);
        cb(v, d / 2) = t;
      }
    }
    auto x = Tensor<T, Cpu>::empty({N, d});
    std::uniform_int_distribution<int64_t> pick(1, V - 1);
    for (int64_t n = 0; n < N; ++n) {
      const int64_t v = pick(g);
      for (int64_t j = 0; j < d; ++j) {
        const float a = to_f32(cb(v, j)), b = to_f32(cb(v - 1, j)), c = to_f32(cb((v * 5) % V, j));
        x(n, j) = from_f32<T>(n % 3 == 0 ? a : n % 3 == 1 ? 0.5f * (a + b) : 0.5f * (a + c));
      }
    }
    vq_case(x, cb, "near ties");
    auto q = random_tensor<T>({V, d}, g, -2, 2);
    for (int64_t i = 0; i < q.numel(); ++i) q.data()[i] = from_f32<T>(std::round(to_f32(q.data()[i])));
    auto xq = random_tensor<T>({N, d}, g, -2, 2);
    for (int64_t i = 0; i < xq.numel(); ++i) xq.data()[i] = from_f32<T>(std::round(to_f32(xq.data()[i])));
    vq_case(xq, q, "quantised (exact ties)");
  }
  // NaN: a NaN entry never wins; a row of NaN gets code 0; inf coordinates give inf or NaN
  // distances.
  {
    const int64_t V = 300, d = 40, N = 9;
    auto cb = random_tensor<T>({V, d}, g, -1, 1);
    auto x = random_tensor<T>({N, d}, g, -1, 1);
    for (int64_t v = 0; v < V; v += 3) cb(v, v % d) = from_f32<T>(NAN);
    for (int64_t j = 0; j < d; ++j) x(2, j) = from_f32<T>(NAN);
    x(4, 3) = from_f32<T>(INFINITY);
    cb(7, 3) = from_f32<T>(INFINITY);
    x(5, 0) = from_f32<T>(NAN);
    vq_case(x, cb, "NaN and inf");
  }
}
