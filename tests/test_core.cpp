// Tensor core and the CPU op set against independent float64 references.
#include <cmath>
#include <map>
#include <numeric>
#include <random>

#include "catch.hpp"
#include "reference.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;

TEST_CASE("bf16 rounds to nearest even and round-trips", "[dtype]") {
  std::mt19937 g(1);
  std::uniform_real_distribution<float> d(-1e4f, 1e4f);
  for (int i = 0; i < 100000; ++i) {
    const float x = d(g);
    const float y = float(bf16(x));
    // Naive reference: the two bf16 neighbours of x, pick the nearer (ties to even).
    uint32_t u;
    std::memcpy(&u, &x, 4);
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    float flo, fhi;
    std::memcpy(&flo, &lo, 4);
    std::memcpy(&fhi, &hi, 4);
    const double dlo = std::abs(double(x) - flo), dhi = std::abs(double(x) - fhi);
    float expect = dlo < dhi ? flo : dhi < dlo ? fhi : ((lo >> 16) & 1u ? fhi : flo);
    REQUIRE(y == expect);
  }
  REQUIRE(std::isnan(float(bf16(std::nanf("")))));
  REQUIRE(std::isinf(float(bf16(INFINITY))));
}

TEST_CASE("f16 converts every value exactly and rounds floats to nearest", "[dtype]") {
  for (uint32_t b = 0; b < 65536; ++b) {
    const float f = float(f16::from_bits(uint16_t(b)));
    if (std::isnan(f)) continue;
    REQUIRE(f16(f).bits == b);  // exact round trip of every finite/inf half
    // Naive decode: sign, exponent, mantissa.
    const int e = (b >> 10) & 31, m = b & 1023;
    const double s = (b & 0x8000) ? -1.0 : 1.0;
    double ref = e == 0 ? s * std::ldexp(m, -24) : e == 31 ? s * INFINITY : s * std::ldexp(1024 + m, e - 25);
    REQUIRE(double(f) == ref);
  }
  std::mt19937 g(2);
  std::uniform_real_distribution<float> d(-70000.f, 70000.f);
  for (int i = 0; i < 20000; ++i) {
    const float x = d(g) * (i % 2 ? 1e-4f : 1.f);
    const float y = float(f16(x));
    // y must be the closest half: its neighbours are not closer.
    const uint16_t yb = f16(x).bits;
    if (std::isinf(y)) continue;
    for (int delta : {-1, 1}) {
      const float n = float(f16::from_bits(uint16_t(yb + delta)));
      if (std::isnan(n) || std::isinf(n)) continue;
      REQUIRE(std::abs(double(x) - y) <= std::abs(double(x) - n));
    }
  }
}

TEST_CASE("tensor views share storage and respect strides", "[tensor]") {
  auto t = Tensor<float, Cpu>::empty({2, 3, 4});
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = float(i);
  REQUIRE(t.is_contiguous());
  auto s = t.slice(2, 1, 3);  // [2, 3, 2]
  REQUIRE(s.shape() == Shape{2, 3, 2});
  REQUIRE_FALSE(s.is_contiguous());
  REQUIRE(s(1, 2, 0) == float(1 * 12 + 2 * 4 + 1));
  auto tr = t.transpose(0, 2);  // [4, 3, 2]
  REQUIRE(tr(3, 1, 1) == t(1, 1, 3));
  auto c = tr.contiguous();
  REQUIRE(c.is_contiguous());
  REQUIRE(c(3, 1, 1) == t(1, 1, 3));
  s(0, 0, 0) = -5.f;  // views alias
  REQUIRE(t(0, 0, 1) == -5.f);
  auto sel = t.select(1, 2);
  REQUIRE(sel.shape() == Shape{2, 4});
  REQUIRE(sel(1, 3) == t(1, 2, 3));
  auto r = t.reshape({6, -1});
  REQUIRE(r.shape() == Shape{6, 4});
  REQUIRE_THROWS_AS(tr.reshape({24}), Error);
  REQUIRE_THROWS_AS(t.slice(0, 1, 5), Error);
  auto u = t.unsqueeze(1);
  REQUIRE(u.shape() == Shape{2, 1, 3, 4});
  auto e = Tensor<float, Cpu>::from_vector({1, 3}, {1, 2, 3}).expand({4, 3});
  REQUIRE(e(3, 2) == 3.f);
  REQUIRE(e.stride(0) == 0);
}

TEST_CASE("tensor storage outlives the tensor it was viewed from", "[tensor]") {
  Tensor<float, Cpu> v;
  {
    auto t = Tensor<float, Cpu>::zeros({8, 8});
    t(3, 3) = 7.f;
    v = t.slice(0, 2, 4);
  }
  REQUIRE(v(1, 3) == 7.f);
}

TEST_CASE("arena allocations replay the same addresses after reset", "[tensor]") {
  Arena<Cpu> arena(1 << 16);
  std::vector<void*> first, second;
  for (int pass = 0; pass < 2; ++pass) {
    ArenaScope<Cpu> scope(arena);
    for (int i = 0; i < 20; ++i) {
      auto t = Tensor<float, Cpu>::empty({int64_t(100 + 37 * i)});
      (pass ? second : first).push_back(t.data());
    }
  }
  REQUIRE(first == second);
  auto outside = Tensor<float, Cpu>::empty({4});  // not from the arena
  REQUIRE(std::find(first.begin(), first.end(), outside.data()) == first.end());
}

namespace {

template <class T>
double tol() {
  return std::is_same_v<T, float> ? 2e-5 : 2e-2;
}

// A non-contiguous view with the same values: exercises every op's strided path.
template <class T>
Tensor<T, Cpu> strided_copy(const Tensor<T, Cpu>& t) {
  Shape s = t.shape();
  std::swap(s.d[0], s.d[s.rank - 1]);
  auto big = Tensor<T, Cpu>::empty(s);
  auto view = big.transpose(0, s.rank - 1);
  view.copy_from(t);
  return view;
}

}  // namespace

TEMPLATE_TEST_CASE("elementwise ops match float64", "[ops]", float, bf16) {
  using T = TestType;
  std::mt19937 g(3);
  for (Shape s : {Shape{7}, Shape{3, 5}, Shape{2, 3, 17}, Shape{2, 1, 3, 9}}) {
    auto x = ref::random<T>(s, g, -3, 3);
    auto xv = ref::values(x);
    auto xs = s.rank > 1 ? strided_copy(x) : x;
    struct Case {
      Unary op;
      double (*f)(double);
    };
    for (Case c : {Case{Unary::silu, ref::silu}, Case{Unary::gelu, ref::gelu}, Case{Unary::gelu_tanh, ref::gelu_tanh},
                   Case{Unary::tanh, [](double v) { return std::tanh(v); }}, Case{Unary::sigmoid, ref::sigmoid},
                   Case{Unary::exp, [](double v) { return std::exp(v); }}}) {
      auto y = ops::unary(xs, c.op);
      std::vector<double> r(xv.size());
      for (size_t i = 0; i < r.size(); ++i) r[i] = c.f(xv[i]);
      REQUIRE(ref::max_abs_diff(ref::values(y), r) <= tol<T>() * (1 + ref::max_abs(r)));
    }
    auto y = ops::scale(xs, 0.5f);
    std::vector<double> r(xv.size());
    for (size_t i = 0; i < r.size(); ++i) r[i] = 0.5 * xv[i];
    REQUIRE(ref::max_abs_diff(ref::values(y), r) <= tol<T>());
  }
  // Broadcasting binary ops.
  auto a = ref::random<T>({2, 3, 4}, g), b = ref::random<T>({3, 1}, g, 0.5f, 2.f);
  auto av = ref::values(a), bv = ref::values(b);
  for (Binary op : {Binary::add, Binary::sub, Binary::mul, Binary::div}) {
    auto c = ops::binary(strided_copy(a), b, op);
    REQUIRE(c.shape() == Shape{2, 3, 4});
    std::vector<double> r(av.size());
    for (int64_t i = 0; i < 2; ++i)
      for (int64_t j = 0; j < 3; ++j)
        for (int64_t k = 0; k < 4; ++k) {
          double x = av[size_t((i * 3 + j) * 4 + k)], w = bv[size_t(j)];
          r[size_t((i * 3 + j) * 4 + k)] = op == Binary::add ? x + w : op == Binary::sub ? x - w : op == Binary::mul ? x * w : x / w;
        }
    REQUIRE(ref::max_abs_diff(ref::values(c), r) <= tol<T>() * 4);
  }
  REQUIRE_THROWS_AS(ops::add(a, ref::random<T>({5}, g)), Error);
}

TEMPLATE_TEST_CASE("matmul and linear match float64", "[ops]", float, bf16) {
  using T = TestType;
  std::mt19937 g(4);
  for (auto [M, K, N] : {std::tuple{1, 7, 5}, {13, 33, 9}, {4, 64, 130}}) {
    auto a = ref::random<T>({M, K}, g), b = ref::random<T>({K, N}, g);
    auto r = ref::matmul(ref::values(a), ref::values(b), M, K, N);
    REQUIRE(ref::max_abs_diff(ref::values(ops::matmul(a, b)), r) <= tol<T>() * K);
    // Transposed operands as views.
    auto at = strided_copy(a.transpose(0, 1).contiguous()).transpose(0, 1);
    REQUIRE(ref::max_abs_diff(ref::values(ops::matmul(at, b)), r) <= tol<T>() * K);
    // linear: x @ W^T with W [N, K]
    auto w = b.transpose(0, 1).contiguous();
    REQUIRE(ref::max_abs_diff(ref::values(ops::linear(a, w)), r) <= tol<T>() * K);
    // beta = 1 accumulates
    auto y = Tensor<T, Cpu>::empty({M, N});
    ops::fill(y, 1.0);
    ops::linear(y, a, w, 1.f);
    auto yv = ref::values(y);
    for (auto& v : r) v += 1;
    REQUIRE(ref::max_abs_diff(yv, r) <= tol<T>() * K);
  }
  // Batched with broadcast weight.
  auto a = ref::random<T>({2, 3, 5, 6}, g), b = ref::random<T>({6, 4}, g);
  auto c = ops::matmul(a, b);
  REQUIRE(c.shape() == Shape{2, 3, 5, 4});
  auto av = ref::values(a), bv = ref::values(b), cv = ref::values(c);
  for (int i = 0; i < 6; ++i) {
    std::vector<double> ai(av.begin() + i * 30, av.begin() + (i + 1) * 30);
    auto r = ref::matmul(ai, bv, 5, 6, 4);
    std::vector<double> ci(cv.begin() + i * 20, cv.begin() + (i + 1) * 20);
    REQUIRE(ref::max_abs_diff(ci, r) <= tol<T>() * 6);
  }
  REQUIRE_THROWS_AS(ops::matmul(a, ref::random<T>({5, 4}, g)), Error);
}

TEMPLATE_TEST_CASE("reductions, softmax and norms match float64", "[ops]", float, bf16) {
  using T = TestType;
  std::mt19937 g(5);
  for (Shape s : {Shape{3, 17}, Shape{2, 3, 64}, Shape{1, 1, 2, 1000}}) {
    auto x = ref::random<T>(s, g, -4, 4);
    auto xs = strided_copy(x);
    auto xv = ref::values(x);
    const int64_t n = s.back();
    std::vector<double> rs, rm, rx;
    std::vector<int64_t> ra;
    for (size_t r = 0; r < xv.size() / size_t(n); ++r) {
      double sm = 0, mx = -1e300;
      int64_t am = 0;
      for (int64_t j = 0; j < n; ++j) {
        double v = xv[r * n + j];
        sm += v;
        if (v > mx) mx = v, am = j;
      }
      rs.push_back(sm);
      rm.push_back(sm / double(n));
      rx.push_back(mx);
      ra.push_back(am);
    }
    REQUIRE(ref::max_abs_diff(ref::values(ops::sum(xs)), rs) <= tol<T>() * n);
    REQUIRE(ref::max_abs_diff(ref::values(ops::mean(xs)), rm) <= tol<T>() * 4);
    REQUIRE(ref::max_abs_diff(ref::values(ops::max(xs)), rx) == 0.0);
    REQUIRE(ops::argmax(xs).to_vector() == ra);
    REQUIRE(ref::max_abs_diff(ref::values(ops::softmax(xs)), ref::softmax_rows(xv, n)) <= tol<T>());
    auto w = ref::random<T>({n}, g, 0.5f, 1.5f), b = ref::random<T>({n}, g);
    auto ln = ops::layer_norm(xs, w, b, 1e-5f);
    REQUIRE(ref::max_abs_diff(ref::values(ln), ref::layer_norm_rows(xv, n, ref::values(w), ref::values(b), 1e-5)) <=
            tol<T>() * 8);
    auto ln0 = ops::layer_norm(xs, Tensor<T, Cpu>(), Tensor<T, Cpu>(), 1e-6f);
    REQUIRE(ref::max_abs_diff(ref::values(ln0), ref::layer_norm_rows(xv, n, {}, {}, 1e-6)) <= tol<T>() * 8);
    auto rn = ops::rms_norm(xs, w, 1e-8f);
    REQUIRE(ref::max_abs_diff(ref::values(rn), ref::rms_norm_rows(xv, n, ref::values(w), 1e-8)) <= tol<T>() * 8);
  }
}

TEMPLATE_TEST_CASE("glu, rope, embedding, attention and kv_write match float64", "[ops]", float, bf16) {
  using T = TestType;
  std::mt19937 g(6);
  {
    auto x = ref::random<T>({3, 2, 10}, g, -3, 3);
    auto y = ops::glu(x, Unary::silu);
    auto xv = ref::values(x);
    std::vector<double> r;
    for (int i = 0; i < 6; ++i)
      for (int j = 0; j < 5; ++j) r.push_back(ref::silu(xv[size_t(i * 10 + j)]) * xv[size_t(i * 10 + 5 + j)]);
    REQUIRE(ref::max_abs_diff(ref::values(y), r) <= tol<T>() * 4);
  }
  {
    const int64_t B = 2, Tn = 3, H = 2, D = 8;
    auto x = ref::random<T>({B, Tn, H, D}, g);
    auto pos = Tensor<int64_t, Cpu>::from_vector({B, Tn}, {0, 1, 2, 100, 2999, 3000});
    auto y = Tensor<T, Cpu>::empty(x.shape());
    ops::rope(y, x, pos, 10000.f);
    auto r = ref::rope(ref::values(x), pos.to_vector(), B, Tn, H, D, 10000.0);
    REQUIRE(ref::max_abs_diff(ref::values(y), r) <= (std::is_same_v<T, float> ? 2e-3 : 2e-2));
  }
  {
    auto table = ref::random<T>({11, 6}, g);
    auto ids = Tensor<int64_t, Cpu>::from_vector({2, 3}, {0, 10, -1, 5, 5, 3});
    auto e = ops::embedding(table, ids);
    REQUIRE(e.shape() == Shape{2, 3, 6});
    for (int i = 0; i < 6; ++i)
      for (int d = 0; d < 6; ++d) {
        int64_t id = ids.data()[i];
        float want = id < 0 ? 0.f : to_f32(table(id, d));
        REQUIRE(to_f32(e.data()[i * 6 + d]) == want);
      }
  }
  for (auto [Hk, context] : {std::pair<int64_t, int64_t>{4, 0}, {2, 3}}) {
    const int64_t B = 2, Tn = 3, H = 4, S = 7, D = 16;
    auto q = ref::random<T>({B, Tn, H, D}, g), k = ref::random<T>({B, Hk, S, D}, g), v = ref::random<T>({B, Hk, S, D}, g);
    auto qp = Tensor<int64_t, Cpu>::from_vector({B, Tn}, {4, 5, 6, 0, 1, 2});
    auto kp = Tensor<int64_t, Cpu>::from_vector({B, S}, {0, 1, 2, 3, 4, 5, 6, -1, 0, 1, 2, -1, -1, -1});
    auto o = Tensor<T, Cpu>::empty(q.shape());
    ops::attention(o, q, k, v, qp, kp, AttentionParams{context, 0.25f});
    auto r = ref::attention(ref::values(q), ref::values(k), ref::values(v), qp.to_vector(), kp.to_vector(), B, Tn, H,
                            Hk, S, D, context, 0.25);
    REQUIRE(ref::max_abs_diff(ref::values(o), r) <= tol<T>() * 4);
  }
  {
    const int64_t B = 2, H = 2, C = 4, D = 3;
    auto rk = Tensor<T, Cpu>::zeros({B, H, C, D}), rv = Tensor<T, Cpu>::zeros({B, H, C, D});
    auto rp = Tensor<int64_t, Cpu>::empty({B, C});
    ops::fill(rp, -1.0);
    auto k = ref::random<T>({B, 6, H, D}, g), v = ref::random<T>({B, 6, H, D}, g);
    auto pos = Tensor<int64_t, Cpu>::from_vector({B, 6}, {0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15});
    auto mask = Tensor<uint8_t, Cpu>::from_vector({B}, {1, 0});
    ops::kv_write(rk, rv, rp, k, v, pos, mask);
    REQUIRE(rp.to_vector() == std::vector<int64_t>{4, 5, 2, 3, -1, -1, -1, -1});
    for (int64_t t = 2; t < 6; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) REQUIRE(to_f32(rk(0, h, t % C, d)) == to_f32(k(0, t, h, d)));
    REQUIRE(to_f32(rk(1, 0, 0, 0)) == 0.f);
  }
}

TEST_CASE("sampling: greedy, top-k support, determinism and distribution", "[ops]") {
  const int64_t V = 50;
  std::mt19937 g(7);
  auto logits = ref::random<float>({3, V}, g, -2, 2);
  auto out = Tensor<int64_t, Cpu>::empty({3});
  auto ctr = Tensor<int64_t, Cpu>::from_vector({1}, {0});
  ops::sample(out, logits, SampleParams{0.f, 0, 1, 0}, ctr);
  REQUIRE(out.to_vector() == ops::argmax(logits).to_vector());
  // Top-k: every sample lies among the k largest logits.
  auto lv = logits.to_vector();
  std::map<int64_t, int> counts;
  for (int64_t c = 0; c < 4000; ++c) {
    ctr.data()[0] = c;
    ops::sample(out, logits, SampleParams{0.8f, 5, 42, 3}, ctr);
    for (int r = 0; r < 3; ++r) {
      std::vector<float> row(lv.begin() + r * V, lv.begin() + (r + 1) * V);
      std::vector<float> sorted = row;
      std::sort(sorted.rbegin(), sorted.rend());
      REQUIRE(row[size_t(out.data()[r])] >= sorted[4]);
      if (r == 0) counts[out.data()[r]]++;
    }
  }
  // Distribution of row 0 follows softmax(top5 / 0.8) within sampling error.
  std::vector<float> row(lv.begin(), lv.begin() + V);
  std::vector<int64_t> idx(V);
  std::iota(idx.begin(), idx.end(), 0);
  std::sort(idx.begin(), idx.end(), [&](auto a, auto b) { return row[a] > row[b]; });
  double z = 0;
  for (int j = 0; j < 5; ++j) z += std::exp(row[idx[j]] / 0.8);
  for (int j = 0; j < 5; ++j) {
    double p = std::exp(row[idx[j]] / 0.8) / z;
    REQUIRE(std::abs(counts[idx[j]] / 4000.0 - p) < 0.03);
  }
  // Same seed and counter, same token; different counter, different draws.
  ctr.data()[0] = 17;
  auto o1 = Tensor<int64_t, Cpu>::empty({3}), o2 = Tensor<int64_t, Cpu>::empty({3});
  ops::sample(o1, logits, SampleParams{1.f, 0, 9, 0}, ctr);
  ops::sample(o2, logits, SampleParams{1.f, 0, 9, 0}, ctr);
  REQUIRE(o1.to_vector() == o2.to_vector());
}
