// The quantised KV cache (--kv-dtype fp8|int8; issue 13 goal 3) on the CPU:
//  - kv_write into a quantised ring stores, for every surviving token, exactly quantize_rows'
//    bytes of its key and value rows (same ring positions, exec mask and last-writer rules as
//    the dense ring);
//  - attention over the codes equals a float64 attention over the decoded rows
//    (scale * decode(code), decoded here from the format's definition);
//  - on the Moshi fixtures, streamed frame by frame, the bf16 engine with an fp8 / int8 KV
//    cache against the fp32 reference: its error beside the bf16 engine's own (same run), and
//    the argmax wherever the reference's top-2 margin exceeds twice the bound (docs/perf.md);
//  - sessions with a quantised cache save, load and continue identically, and a session saved
//    with another KV storage is refused with an error that names --kv-dtype.
// test_backend_ops compares the CUDA kernels with these on random inputs.
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "moshi_helpers.hpp"
#include "reference.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using moshi::LmConfig;

namespace {

// The rows of a quantised buffer decoded in float64 from the format's definition.
template <class F>
std::vector<double> decoded(const QuantKv<F, Cpu>& x) {
  const int64_t D = x.codes.size(3), rows = x.codes.numel() / D;
  std::vector<double> out(size_t(x.codes.numel()));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d)
      out[size_t(r * D + d)] = double(x.scale.data()[r]) * double(F::decode(x.codes.data()[r * D + d]));
  return out;
}

}  // namespace

TEMPLATE_TEST_CASE("kv_write into a quantised ring stores quantize_rows' bytes; attention over it matches float64",
                   "[kv]", Int8, Fp8E4M3) {
  using F = TestType;
  std::mt19937 g(7);
  const int64_t B = 2, Hk = 2, H = 4, C = 8, D = 32;
  auto ring_d = nn::KvRing<float, Cpu>::make(B, Hk, C, D);  // the dense ring: the reference bookkeeping
  auto ring_q = nn::KvRing<float, Cpu>::make(B, Hk, C, D, weight_format_of<F>());
  REQUIRE(ring_q.quantised());
  // Three calls: 5 tokens, 6 (wrapping the ring, item 1 masked out), then 1.
  int64_t next[2] = {0, 0};
  for (auto [Tn, mask1] : {std::pair<int64_t, uint8_t>{5, 1}, {6, 0}, {1, 1}}) {
    auto k = ref::random<float>({B, Tn, Hk, D}, g, -3.f, 3.f), v = ref::random<float>({B, Tn, Hk, D}, g, -3.f, 3.f);
    // One row of zeros: its scale is 1 and its codes 0, as quantize_rows makes them.
    ops::fill(k.select(0, 0).select(0, 0).select(0, 1), 0.0);
    auto pos = Tensor<int64_t, Cpu>::empty({B, Tn});
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < Tn; ++t) pos(b, t) = next[b] + t;
    auto mask = Tensor<uint8_t, Cpu>::from_vector({B}, {1, mask1});
    ring_d.write(k, v, pos, mask);
    ring_q.write(k, v, pos, mask);
    for (int64_t b = 0; b < B; ++b)
      if (b == 0 || mask1) next[b] += Tn;
  }
  REQUIRE(ring_q.pos.to_vector() == ring_d.pos.to_vector());
  // Every occupied slot holds quantize_rows of the dense ring's row.
  const QuantKv<F, Cpu>*Kp, *Vp;
  if constexpr (std::is_same_v<F, Int8>) Kp = &ring_q.k_int8, Vp = &ring_q.v_int8;
  else Kp = &ring_q.k_fp8, Vp = &ring_q.v_fp8;
  const auto &K = *Kp, &V = *Vp;
  auto want_k = ops::quantize_rows<F>(ring_d.k.reshape({B * Hk * C, D}));
  auto want_v = ops::quantize_rows<F>(ring_d.v.reshape({B * Hk * C, D}));
  int64_t checked = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < Hk; ++h)
      for (int64_t s = 0; s < C; ++s) {
        if (ring_d.pos(b, s) < 0) continue;
        const int64_t r = (b * Hk + h) * C + s;
        for (int64_t d = 0; d < D; ++d) {
          REQUIRE(K.codes.data()[r * D + d] == want_k.data.data()[r * D + d]);
          REQUIRE(V.codes.data()[r * D + d] == want_v.data.data()[r * D + d]);
        }
        REQUIRE(K.scale.data()[r] == want_k.scale.data()[r]);
        REQUIRE(V.scale.data()[r] == want_v.scale.data()[r]);
        ++checked;
      }
  REQUIRE(checked == Hk * (C + 6));  // item 0 wrote 12 positions (all 8 slots), item 1 six
  // Attention over the codes against float64 over the decoded rows, with a window that
  // masks part of the ring and queries at two positions.
  for (int64_t context : {int64_t(0), int64_t(5)}) {
    const int64_t Tq = 2;
    auto q = ref::random<float>({B, Tq, H, D}, g, -1.f, 1.f);
    auto qp = Tensor<int64_t, Cpu>::from_vector({B, Tq}, {next[0] - 2, next[0] - 1, next[1] - 2, next[1] - 1});
    AttentionParams ap{context, 1.f / std::sqrt(float(D))};
    auto out = Tensor<float, Cpu>::empty({B, Tq, H, D});
    ring_q.attend(out, q, qp, ap);
    const auto want = ref::attention(ref::values(q), decoded(K), decoded(V), qp.to_vector(), ring_q.pos.to_vector(), B,
                                     Tq, H, Hk, C, D, context, 1.0 / std::sqrt(double(D)));
    const auto got = ref::values(out);
    const double err = ref::max_abs_diff(got, want), mag = ref::max_abs(want);
    INFO("format " << F::name << " context " << context << ": max abs err " << err << " of max " << mag);
    REQUIRE(mag > 0.1);
    REQUIRE(err <= 1e-5 * mag);
    // And the quantisation is not a no-op: the dense ring's attention differs by more.
    auto out_d = Tensor<float, Cpu>::empty({B, Tq, H, D});
    ring_d.attend(out_d, q, qp, ap);
    REQUIRE(ref::max_abs_diff(ref::values(out_d), want) > 1e-4 * mag);
  }
}

TEST_CASE("quantised attention op rejects mismatched scales", "[kv][errors]") {
  auto q = Tensor<float, Cpu>::zeros({1, 1, 2, 16});
  auto k = QuantKv<Fp8E4M3, Cpu>::zeros(1, 2, 4, 16);
  auto bad = QuantKv<Fp8E4M3, Cpu>{k.codes, Tensor<float, Cpu>::zeros({1, 2, 3})};
  auto pos = Tensor<int64_t, Cpu>::zeros({1, 1}), kpos = Tensor<int64_t, Cpu>::zeros({1, 4});
  auto out = Tensor<float, Cpu>::empty({1, 1, 2, 16});
  REQUIRE_THROWS_WITH(ops::attention(out, q, k, bad, pos, kpos, AttentionParams{}),
                      TTT_CONTAINS("scale") && TTT_CONTAINS("does not match codes"));
}

namespace {

using ModelF = moshi::LmModel<float, Cpu, moshi::DefaultPolicies>;
using ModelB = moshi::LmModel<bf16, Cpu, moshi::DefaultPolicies>;

}  // namespace

// Issue 13 goal 3's accuracy report, on the CPU: the fixtures streamed one frame at a time (so
// every query reads the ring), the bf16 engine with each KV storage against the fp32 reference.
// The bound is goal 2's: at most 3x the bf16 engine's own error, and the argmax kept wherever
// the reference's top-2 margin exceeds twice that. The f32 engine with a quantised cache shows
// what the format alone costs.
TEST_CASE("a quantised KV cache stays within 3x the bf16 engine's error of the fixtures (CPU, streamed)",
          "[kv][moshi]") {
  for (const char* name : {"moshi_small_defaults", "moshi_7b_structure"}) {
    const std::string dir = fixture(std::string("moshi/") + name);
    const FixtureRef ref(dir);
    const double ef = ref.err(stream_fixture<ModelF>(dir, ref.codes, WeightFormat::dense));
    const double eb = ref.err(stream_fixture<ModelB>(dir, ref.codes, WeightFormat::dense));
    std::printf("[kv cpu] %-22s f32 engine, f32 KV  logits max abs err %.3e\n", name, ef);
    std::printf("[kv cpu] %-22s bf16 engine, bf16 KV logits max abs err %.3e (the bound: 3x = %.3e)\n", name, eb, 3 * eb);
    CHECK(ef <= 1e-4);  // the streamed f32 engine is the reference (the test is about the KV storage)
    for (WeightFormat kv : {WeightFormat::fp8_e4m3, WeightFormat::int8}) {
      const auto q = stream_fixture<ModelB>(dir, ref.codes, kv);
      const double e = ref.err(q), e_fmt = ref.err(stream_fixture<ModelF>(dir, ref.codes, kv));
      const double margin = 2 * 3 * eb;
      const auto [confident, agree] = ref.argmax(q, margin);
      std::printf("[kv cpu] %-22s bf16 engine, %-8s KV logits max abs err %.3e (%.2fx bf16; f32 engine with this KV "
                  "%.3e); argmax equal at %lld / %lld positions with margin > %.3g\n",
                  name, std::string(weight_format_name(kv)).c_str(), e, e / eb, e_fmt, (long long)agree,
                  (long long)confident, margin);
      CHECK(e <= 3 * eb);
      CHECK(agree == confident);
      CHECK(e_fmt > ef);  // the cache is really quantised
    }
  }
}

TEST_CASE("sessions with a quantised KV cache save, load and continue identically; another storage is refused",
          "[kv][moshi][session]") {
  const std::string dir = fixture("moshi/moshi_7b_structure");
  auto cfg = LmConfig::load(dir + "/config.json");
  io::WeightSource ws(dir + "/model.safetensors");
  cfg.transformer.kv_format = WeightFormat::fp8_e4m3;
  const auto mq = ModelF::load(cfg, ws);
  cfg.transformer.kv_format = WeightFormat::dense;
  io::WeightSource ws2(dir + "/model.safetensors");
  const auto md = ModelF::load(cfg, ws2);
  moshi::GenOptions opt;
  opt.seed = 5;
  moshi::LmGen<float, Cpu, moshi::DefaultPolicies> gq(mq, opt), gd(md, opt);
  auto user = Tensor<int64_t, Cpu>::empty({2, gq.num_user_codebooks(), 30});
  std::mt19937_64 r(3);
  for (int64_t i = 0; i < user.numel(); ++i) user.data()[i] = int64_t(r() % uint64_t(cfg.card));
  auto run = [&](auto& g, auto& s, int64_t t0, int64_t t1) {
    std::vector<std::vector<int64_t>> out;
    for (int64_t t = t0; t < t1; ++t) {
      auto o = g.step(s, user.select(2, t).contiguous());
      if (o) out.push_back(o->to_vector());
    }
    return out;
  };
  auto s = gq.start(2);
  run(gq, s, 0, 12);
  const std::string path = "test_kv_cache_session.safetensors", dense_path = "test_kv_cache_dense.safetensors";
  gq.save(s, path);
  auto loaded = gq.load(path);
  const auto a = run(gq, s, 12, 30), b = run(gq, loaded, 12, 30);
  REQUIRE(!a.empty());
  REQUIRE(a == b);
  // The session file holds codes and scales (one byte per cached element).
  auto st = io::SafeTensors::open(path);
  bool any_scale = false;
  for (const auto& n : st.names()) any_scale = any_scale || n.find(".k_scale") != std::string::npos;
  REQUIRE(any_scale);
  // Another storage either way: one clear error naming --kv-dtype.
  auto sd = gd.start(2);
  run(gd, sd, 0, 3);
  gd.save(sd, dense_path);
  REQUIRE_THROWS_WITH(gq.load(dense_path), TTT_CONTAINS("--kv-dtype") &&
                                               TTT_CONTAINS(dense_path));
  REQUIRE_THROWS_WITH(gd.load(path), TTT_CONTAINS("--kv-dtype"));
  std::remove(path.c_str());
  std::remove(dense_path.c_str());
}
