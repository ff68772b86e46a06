// Tensor core and the CPU op set against independent float64 references.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
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

// ---- Mimi's ops: ELU, convolutions, nearest-codebook search ---------------------------------

namespace {

// Relative error of the one rounding of a float result to T.
template <class T>
double rounding() {
  return std::is_same_v<T, float> ? 0.0 : std::is_same_v<T, bf16> ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
}

// Worst |y - r| over its allowance: T's final rounding of |r| plus 1e-6 of the sum of
// |terms| (float accumulation). <= 1 passes. Also records the worst |y - r| / sum |terms|.
template <class T>
double conv_err(const Tensor<T, Cpu>& y, const ref::Conv& r, double* rel = nullptr) {
  const auto yv = ref::values(y);
  if (yv.size() != r.y.size()) return INFINITY;
  double worst = 0;
  for (size_t i = 0; i < yv.size(); ++i) {
    const double e = std::abs(yv[i] - r.y[i]);
    if (std::isnan(e)) return INFINITY;
    worst = std::max(worst, e / (rounding<T>() * std::abs(r.y[i]) + 1e-6 * r.mag[i] + 1e-30));
    if (rel) *rel = std::max(*rel, e / (r.mag[i] + 1e-30));
  }
  return worst;
}

// The same values in a [B, C, T] view with a unit time stride but padded rows.
template <class T>
Tensor<T, Cpu> padded_rows(const Tensor<T, Cpu>& t) {
  auto big = Tensor<T, Cpu>::zeros({t.size(0), t.size(1), t.size(2) + 5});
  auto view = big.slice(2, 2, 2 + t.size(2));
  view.copy_from(t);
  return view;
}

template <class T>
Tensor<T, Cpu> garbage(const Shape& s) {
  auto t = Tensor<T, Cpu>::empty(s);
  ops::fill(t, std::nan(""));
  return t;
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

void report(const char* what, double v) {
  if (std::getenv("TTT_PRINT_ERRORS")) std::printf("%s: %.3g\n", what, v);
}

}  // namespace

TEMPLATE_TEST_CASE("elu matches expm1 in float64", "[ops][mimi]", float, bf16, f16) {
  using T = TestType;
  std::vector<float> v = {0.f,   -0.f,   1e-8f,  -1e-8f, 1e-4f, -1e-4f, 0.1f,  -0.1f,  -0.5f,   -1.f, -3.f,
                          -10.f, -20.f,  -50.f,  -100.f, -1e4f, 1.f,    5.f,   100.f,  1e4f,    -3e-3f, 2e-6f};
  std::mt19937 g(11);
  std::uniform_real_distribution<float> d(-8.f, 8.f);
  for (int i = 0; i < 200; ++i) v.push_back(d(g));
  std::vector<T> tv;
  for (float f : v) tv.push_back(from_f32<T>(f));
  auto x = Tensor<T, Cpu>::from_vector({2, int64_t(v.size()) / 2}, tv);
  const auto xv = ref::values(x);
  std::vector<double> r(xv.size());
  for (size_t i = 0; i < r.size(); ++i) r[i] = ref::elu(xv[i]);
  // float: expm1f is within an ulp or two; bf16/f16 add one rounding of the result.
  const double rel = std::is_same_v<T, float> ? 1e-6 : 2 * rounding<T>();
  double worst = 0;
  for (const auto& xs : {x, strided_copy(x)}) {
    const auto y = ref::values(ops::unary(xs, Unary::elu));
    for (size_t i = 0; i < r.size(); ++i) {
      INFO("x = " << xv[i] << " elu = " << y[i] << " expected " << r[i]);
      REQUIRE(std::abs(y[i] - r[i]) <= rel * std::abs(r[i]));
      if (r[i] != 0) worst = std::max(worst, std::abs(y[i] - r[i]) / std::abs(r[i]));
    }
  }
  report("elu max relative error", worst);
  if constexpr (std::is_same_v<T, float>) {
    // The shared formula over a sweep of every 101st negative float down to -100 (plus the
    // special values): within 1e-6 relative of double expm1 (it measures under 1 ulp).
    double sweep = 0;
    for (uint32_t u = 0x80000001u; u < 0xC2C80000u; u += 101) {
      float f;
      std::memcpy(&f, &u, 4);
      const double want = std::expm1(double(f));
      sweep = std::max(sweep, std::abs(double(math::elu(f)) - want) / std::abs(want));
    }
    report("elu sweep max relative error", sweep);
    REQUIRE(sweep <= 1e-6);
    REQUIRE(math::elu(-1e-8f) == -1e-8f);  // exp(x) - 1 in float would give 0
    REQUIRE(math::elu(-1e-45f) == -1e-45f);
    REQUIRE(math::elu(-88.f) == -1.f);
    REQUIRE(math::elu(-1e30f) == -1.f);
    REQUIRE(math::elu(-INFINITY) == -1.f);
    REQUIRE(math::elu(INFINITY) == INFINITY);
    REQUIRE(std::isnan(math::elu(NAN)));
    REQUIRE(std::signbit(math::elu(-0.f)));
  }
}

TEMPLATE_TEST_CASE("conv1d matches float64", "[ops][mimi]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(12);
  struct Case {
    int64_t Cin, Cout, K, stride, dil, groups, Tin, B;
    bool bias;
  };
  const Case cases[] = {
      {6, 4, 3, 1, 1, 1, 30, 1, false},    // plain
      {6, 10, 1, 1, 1, 1, 25, 3, true},    // K = 1
      {6, 10, 1, 2, 1, 1, 25, 2, true},    // K = 1, strided
      {32, 48, 1, 1, 1, 1, 700, 1, true},  // K = 1, long: the input rows are the GEMM operand
      {32, 48, 1, 1, 1, 1, 300, 3, false}, // K = 1, chunks spanning batch items
      {1, 8, 7, 1, 1, 1, 40, 2, true},     // one input channel (SEANet's first layer)
      {1, 64, 7, 1, 1, 1, 1926, 1, true},  // ... at its real size
      {8, 8, 3, 1, 1, 8, 20, 2, true},     // depthwise
      {8, 16, 3, 2, 2, 8, 33, 1, false},   // depthwise, channel multiplier 2, stride, dilation
      {12, 6, 4, 2, 1, 3, 50, 2, true},    // 3 groups
      {20, 24, 5, 3, 2, 2, 200, 3, true},  // groups, stride and dilation
      {5, 7, 3, 1, 3, 1, 19, 2, true},     // dilation 3
      {4, 3, 5, 1, 2, 1, 9, 2, true},      // Tin = the kernel's span: one step
      {16, 32, 8, 4, 1, 1, 70, 1, true},   // SEANet's downsampling shape (K = 2 stride)
      {48, 40, 3, 1, 1, 1, 700, 1, true},  // several column chunks
      {8, 40, 3, 1, 1, 1, 9, 31, true},    // a chunk boundary inside a batch item
      {16, 12, 4, 2, 1, 1, 9, 5, true},    // one chunk over five items
      {32, 64, 16, 8, 1, 1, 24, 1, true},  // two output steps: the dot path
      {64, 8, 3, 1, 1, 1, 3, 4, false},    // one step, batch 4: the dot path
      {6, 4, 2, 2, 1, 2, 4, 2, true},      // dot path with groups
      {64, 1, 7, 1, 1, 1, 1926, 1, true},  // one output channel (SEANet's last layer): direct loop
      {12, 6, 3, 2, 3, 3, 2200, 2, false}, // two outputs per group, strided and dilated: direct, chunked
  };
  double rel = 0;
  for (const Case& c : cases) {
    INFO("Cin " << c.Cin << " Cout " << c.Cout << " K " << c.K << " stride " << c.stride << " dilation " << c.dil
                << " groups " << c.groups << " Tin " << c.Tin << " B " << c.B << " bias " << c.bias);
    auto x = ref::random<T>({c.B, c.Cin, c.Tin}, g);
    auto w = ref::random<T>({c.Cout, c.Cin / c.groups, c.K}, g);
    auto bias = c.bias ? ref::random<T>({c.Cout}, g) : Tensor<T, Cpu>();
    const auto r = ref::conv1d(ref::values(x), ref::values(w), c.bias ? ref::values(bias) : std::vector<double>{}, c.B,
                               c.Cin, c.Tin, c.Cout, c.K, c.stride, c.dil, c.groups);
    const int64_t Tout = (c.Tin - c.dil * (c.K - 1) - 1) / c.stride + 1;
    for (const auto& xs : {x, strided_copy(x), padded_rows(x)}) {
      auto y = ops::conv1d(xs, w, bias, c.stride, c.dil, c.groups);
      REQUIRE(y.shape() == Shape{c.B, c.Cout, Tout});
      REQUIRE(conv_err(y, r, &rel) <= 1.0);
      auto out = garbage<T>({c.B, c.Cout, Tout});
      ops::conv1d(out, xs, w, bias, c.stride, c.dil, c.groups);
      REQUIRE(conv_err(out, r) <= 1.0);
    }
  }
  if constexpr (std::is_same_v<T, float>) report("conv1d max |error| / sum |terms|", rel);

  // Bad shapes: ttt::Error naming the op and the problem.
  auto x = ref::random<T>({2, 4, 10}, g), w = ref::random<T>({6, 2, 3}, g);
  const Tensor<T, Cpu> none;
  REQUIRE(ops::conv1d(x, w, none, 1, 1, 2).shape() == Shape{2, 6, 8});
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, w, none); }),
               TTT_CONTAINS("conv1d: weight [6, 2, 3] with 1 groups expects 2 input channels"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, ref::random<T>({6, 1, 3}, g), none, 1, 1, 3); }),
               TTT_CONTAINS("conv1d: 3 groups do not divide 4 input and 6 output channels"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, ref::random<T>({5, 2, 3}, g), none, 1, 1, 2); }),
               TTT_CONTAINS("groups do not divide"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, w, none, 0, 1, 2); }), TTT_CONTAINS("must be >= 1"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, w, none, 1, 0, 2); }), TTT_CONTAINS("must be >= 1"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, w, none, 1, 5, 2); }),
               TTT_CONTAINS("conv1d: input length 10 is shorter than the kernel's span 11"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, w, ref::random<T>({5}, g), 1, 1, 2); }), TTT_CONTAINS("conv1d: bias"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(Tensor<T, Cpu>::empty({2, 6, 9}), x, w, none, 1, 1, 2); }),
               TTT_CONTAINS("conv1d: output shape [2, 6, 9], expected [2, 6, 8]"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(Tensor<T, Cpu>::empty({8, 6, 2}).transpose(0, 2), x, w, none, 1, 1, 2); }),
               TTT_CONTAINS("conv1d: output must be contiguous"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x, ref::random<T>({3, 2, 6}, g).transpose(0, 2), none, 1, 1, 2); }),
               TTT_CONTAINS("conv1d: weight must be contiguous"));
  REQUIRE_THAT(error_of([&] { ops::conv1d(x.select(0, 0), w, none); }),
               TTT_CONTAINS("conv1d: input must be [B, Cin, T]"));
}

TEMPLATE_TEST_CASE("conv_transpose1d matches float64", "[ops][mimi]", float, bf16, f16) {
  using T = TestType;
  std::mt19937 g(13);
  struct Case {
    int64_t Cin, Cout, K, stride, groups, Tin, B;
    bool bias;
  };
  const Case cases[] = {
      {8, 4, 4, 2, 1, 5, 2, true},       // K = 2 stride (SEANet's upsampling)
      {16, 8, 16, 8, 1, 2, 1, true},     // two input steps: rank-1 updates
      {16, 8, 16, 8, 1, 2, 2, false},    // ... over two items
      {6, 4, 6, 3, 2, 2, 1, true},       // ... with groups
      {12, 6, 10, 5, 1, 20, 2, false},   // GEMM + overlap-add
      {32, 64, 8, 4, 1, 600, 1, true},   // several input chunks
      {64, 32, 12, 6, 1, 16, 3, true},   // several items in one product
      {32, 24, 16, 8, 1, 2, 9, true},    // a batch of two-step inputs: one wide product
      {16, 128, 8, 4, 2, 50, 5, false},  // chunks of 2 items over a batch of 5
      {8, 8, 4, 2, 8, 3, 2, true},       // depthwise (Mimi's upsampler)
      {6, 6, 4, 2, 6, 1, 1, false},      // depthwise, one step
      {64, 64, 4, 2, 64, 40, 1, true},   // depthwise, enough work for threads
      {6, 9, 3, 1, 3, 7, 2, true},       // 3 groups, K = 3, stride 1
      {5, 3, 2, 3, 1, 6, 1, true},       // K < stride: gaps hold the bias
      {4, 8, 1, 1, 2, 10, 2, true},      // K = 1, groups
  };
  double rel = 0;
  for (const Case& c : cases) {
    INFO("Cin " << c.Cin << " Cout " << c.Cout << " K " << c.K << " stride " << c.stride << " groups " << c.groups
                << " Tin " << c.Tin << " B " << c.B << " bias " << c.bias);
    const int64_t Cg = c.Cin / c.groups, Og = c.Cout / c.groups, Tout = (c.Tin - 1) * c.stride + c.K;
    auto x = ref::random<T>({c.B, c.Cin, c.Tin}, g);
    auto w = ref::random<T>({c.Cin, Og, c.K}, g);
    auto bias = c.bias ? ref::random<T>({c.Cout}, g) : Tensor<T, Cpu>();
    const auto xv = ref::values(x), wv = ref::values(w);
    const auto bv = c.bias ? ref::values(bias) : std::vector<double>{};
    const auto r = ref::conv_transpose1d(xv, wv, bv, c.B, c.Cin, c.Tin, c.Cout, c.K, c.stride, c.groups);
    // An independent formulation: conv1d of the zero-stuffed input (stride - 1 zeros between
    // steps, K - 1 on each side) with the kernel flipped in time and its channel axes swapped.
    {
      const int64_t Ts = (c.Tin - 1) * c.stride + 1 + 2 * (c.K - 1);
      std::vector<double> xs(size_t(c.B * c.Cin * Ts), 0.0), wf(size_t(c.Cout * Cg * c.K));
      for (int64_t b = 0; b < c.B; ++b)
        for (int64_t ci = 0; ci < c.Cin; ++ci)
          for (int64_t t = 0; t < c.Tin; ++t)
            xs[size_t((b * c.Cin + ci) * Ts + c.K - 1 + t * c.stride)] = xv[size_t((b * c.Cin + ci) * c.Tin + t)];
      for (int64_t o = 0; o < c.Cout; ++o)
        for (int64_t ci = 0; ci < Cg; ++ci)
          for (int64_t k = 0; k < c.K; ++k)
            wf[size_t((o * Cg + ci) * c.K + k)] = wv[size_t((((o / Og) * Cg + ci) * Og + o % Og) * c.K + c.K - 1 - k)];
      const auto r2 = ref::conv1d(xs, wf, bv, c.B, c.Cin, Ts, c.Cout, c.K, 1, 1, c.groups);
      REQUIRE(ref::max_abs_diff(r2.y, r.y) <= 1e-12 * (1 + ref::max_abs(r.mag)));
    }
    for (const auto& xs : {x, strided_copy(x), padded_rows(x)}) {
      auto y = ops::conv_transpose1d(xs, w, bias, c.stride, c.groups);
      REQUIRE(y.shape() == Shape{c.B, c.Cout, Tout});
      REQUIRE(conv_err(y, r, &rel) <= 1.0);
      auto out = garbage<T>({c.B, c.Cout, Tout});
      ops::conv_transpose1d(out, xs, w, bias, c.stride, c.groups);
      REQUIRE(conv_err(out, r) <= 1.0);
    }
  }
  if constexpr (std::is_same_v<T, float>) report("conv_transpose1d max |error| / sum |terms|", rel);

  auto x = ref::random<T>({2, 4, 5}, g), w = ref::random<T>({4, 3, 4}, g);
  const Tensor<T, Cpu> none;
  REQUIRE(ops::conv_transpose1d(x, w, none, 2, 2).shape() == Shape{2, 6, 12});
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(x, ref::random<T>({3, 3, 4}, g), none, 2); }),
               TTT_CONTAINS("conv_transpose1d: weight [3, 3, 4] expects 3 input channels, input [2, 4, 5] has 4"));
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(x, w, none, 2, 3); }),
               TTT_CONTAINS("conv_transpose1d: 3 groups do not divide 4 input channels"));
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(x, w, none, 0); }), TTT_CONTAINS("must be >= 1"));
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(x, w, ref::random<T>({3}, g), 2, 2); }),
               TTT_CONTAINS("conv_transpose1d: bias [3] must be contiguous [6]"));
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(Tensor<T, Cpu>::empty({2, 6, 11}), x, w, none, 2, 2); }),
               TTT_CONTAINS("conv_transpose1d: output shape [2, 6, 11], expected [2, 6, 12]"));
  REQUIRE_THAT(error_of([&] { ops::conv_transpose1d(x.slice(2, 0, 0), w, none, 2); }),
               TTT_CONTAINS("at least one input step"));
}

TEMPLATE_TEST_CASE("vq_nearest matches a float64 argmin, ties to the smallest index", "[ops][mimi]", float, bf16,
                   f16) {
  using T = TestType;
  std::mt19937 g(14);
  auto argmin_ref = [](const std::vector<double>& x, const std::vector<double>& c, int64_t N, int64_t V, int64_t d) {
    std::vector<int64_t> codes(size_t(N), 0);
    for (int64_t n = 0; n < N; ++n) {
      double best = INFINITY;
      for (int64_t v = 0; v < V; ++v) {
        double s = 0;
        for (int64_t j = 0; j < d; ++j) {
          const double e = x[size_t(n * d + j)] - c[size_t(v * d + j)];
          s += e * e;
        }
        if (s < best) best = s, codes[size_t(n)] = v;
      }
    }
    return codes;
  };
  using Nvd = std::tuple<int64_t, int64_t, int64_t>;
  for (auto [N, V, d] : {Nvd{37, 300, 24}, Nvd{9, 2048, 256}, Nvd{1, 5, 1}, Nvd{130, 64, 40}}) {
    INFO("N " << N << " V " << V << " d " << d);
    auto cb = ref::random<T>({V, d}, g);
    auto x = ref::random<T>({N, d}, g);
    // Half the rows near a codebook entry, as encoder outputs are.
    std::uniform_int_distribution<int64_t> pick(0, V - 1);
    std::uniform_real_distribution<float> noise(-0.2f, 0.2f);
    for (int64_t n = 0; n < N; n += 2) {
      const int64_t v = pick(g);
      for (int64_t j = 0; j < d; ++j) x(n, j) = from_f32<T>(to_f32(cb(v, j)) + noise(g));
    }
    const auto want = argmin_ref(ref::values(x), ref::values(cb), N, V, d);
    REQUIRE(ops::vq_nearest(x, cb).to_vector() == want);
    // Padded rows, and codes written through a strided view.
    auto big = Tensor<T, Cpu>::zeros({N, d + 7});
    auto xs = big.slice(1, 3, 3 + d);
    xs.copy_from(x);
    auto codes2 = Tensor<int64_t, Cpu>::zeros({N, 2});
    ops::vq_nearest(codes2.select(1, 1), xs, cb);
    REQUIRE(codes2.select(1, 1).to_vector() == want);
  }
  {
    // Ties. V = 1000 spreads the codebook over the threads (ranges merged in index order).
    const int64_t V = 1000, d = 32;
    auto cb = ref::random<T>({V, d}, g);
    auto x = ref::random<T>({5, d}, g);
    std::uniform_int_distribution<int> q(-48, 48);
    for (int64_t j = 0; j < d; ++j) {
      // Row 0 equals entries 3, 700 and 900: distance 0 three times -> 3.
      for (int64_t v : {700, 900}) cb(v, j) = cb(3, j);
      x(0, j) = cb(3, j);
      // Rows 1 and 2 are equidistant from two entries (x -/+ e, exact in every T): the
      // smaller index wins, whichever thread's range it is in.
      const float e = (j % 2 ? 1.f : -1.f) / 64.f;
      for (int r : {1, 2}) x(r, j) = from_f32<T>(float(q(g)) / 64.f);
      cb(480, j) = from_f32<T>(to_f32(x(1, j)) - e), cb(650, j) = from_f32<T>(to_f32(x(1, j)) + e);
      cb(300, j) = from_f32<T>(to_f32(x(2, j)) + e), cb(310, j) = from_f32<T>(to_f32(x(2, j)) - e);
      // Row 3 is NaN: every distance is NaN -> code 0.
      x(3, j) = from_f32<T>(std::nanf(""));
      // Row 4 equals entries 401 and 402, neighbours searched in one pass -> 401.
      cb(401, j) = cb(402, j);
      x(4, j) = cb(402, j);
    }
    REQUIRE(ops::vq_nearest(x, cb).to_vector() == std::vector<int64_t>{3, 480, 300, 0, 401});
  }

  REQUIRE_THAT(error_of([&] { ops::vq_nearest(ref::random<T>({3, 5}, g), ref::random<T>({7, 4}, g)); }),
               TTT_CONTAINS("vq_nearest: input [3, 5] and codebook [7, 4] differ in dimension"));
  REQUIRE_THAT(error_of([&] {
                 auto codes = Tensor<int64_t, Cpu>::empty({2});
                 ops::vq_nearest(codes, ref::random<T>({3, 4}, g), ref::random<T>({7, 4}, g));
               }),
               TTT_CONTAINS("vq_nearest: codes [2] for input [3, 4], expected [3]"));
  REQUIRE_THAT(error_of([&] { ops::vq_nearest(ref::random<T>({4, 3}, g).transpose(0, 1), ref::random<T>({7, 4}, g)); }),
               TTT_CONTAINS("vq_nearest: needs a unit stride on the last dimension"));
  REQUIRE_THAT(error_of([&] { ops::vq_nearest(ref::random<T>({3, 4}, g), ref::random<T>({4, 7}, g).transpose(0, 1)); }),
               TTT_CONTAINS("vq_nearest: codebook must be contiguous"));
}

TEST_CASE("vq_nearest takes differences, not the expanded |x|^2 - 2 x.c + |c|^2", "[ops][mimi]") {
  // x near 1000 in every coordinate, two entries c0 = x + a0, c1 = x + a1 a few 1/1024 away,
  // c1 truly closer (a0 = a1 but one coordinate 1/1024 further). All values are exact floats.
  // The expansion rounds |x|^2 ~ 2.6e8 at about 15 (2^-24 relative, summed over d = 256),
  // far above the distances themselves (~0.01) and their gap (~1e-4), so in float it picks
  // by rounding noise: it chooses c0 (index 0, wrong) in some trial below, which the test
  // demands so that it is known to discriminate. The differences x - c are exact (Sterbenz),
  // so the op's float distances are accurate to ~1e-7 relative and it always picks c1.
  const int64_t d = 256;
  std::mt19937 g(15);
  std::uniform_int_distribution<int> frac(0, 1023), off(-6, 6);
  int naive_wrong = 0;
  for (int trial = 0; trial < 20; ++trial) {
    auto x = Tensor<float, Cpu>::empty({1, d});
    auto cb = Tensor<float, Cpu>::empty({2, d});
    for (int64_t j = 0; j < d; ++j) {
      x(0, j) = 1000.f + float(frac(g)) / 1024.f;
      int a = off(g);
      if (a == 0) a = 1;
      cb(1, j) = x(0, j) + float(a) / 1024.f;
      cb(0, j) = x(0, j) + float(j == 0 ? a + (a > 0 ? 1 : -1) : a) / 1024.f;
    }
    double d64[2];
    float naive[2];
    for (int v = 0; v < 2; ++v) {
      double s = 0;
      float xx = 0.f, xc = 0.f, cc = 0.f;
      for (int64_t j = 0; j < d; ++j) {
        s += (double(x(0, j)) - double(cb(v, j))) * (double(x(0, j)) - double(cb(v, j)));
        xx += x(0, j) * x(0, j);
        xc += x(0, j) * cb(v, j);
        cc += cb(v, j) * cb(v, j);
      }
      d64[v] = s;
      naive[v] = xx - 2.f * xc + cc;
    }
    REQUIRE(d64[1] < d64[0]);
    if (!(naive[1] < naive[0])) ++naive_wrong;
    REQUIRE(ops::vq_nearest(x, cb).to_vector() == std::vector<int64_t>{1});
  }
  report("vq near-tie trials the expanded formula gets wrong (of 20)", naive_wrong);
  REQUIRE(naive_wrong > 0);
}
