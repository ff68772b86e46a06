// The Moshi engine on the CUDA backend against the fixtures: fp32 forward within 1e-4,
// greedy tokens identical; bf16 forward error and greedy agreement measured (bf16 noise);
// the TTT designs' fixtures too. Exits 77 ("skipped") without a GPU.
#include <cmath>
#include <cstdio>

#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file provides main (v3 ignores it)
#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_session.hpp>
#endif
#include "ttt/cuda.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"

using namespace ttt;
using moshi::LmConfig;

namespace {

template <class T>
using ModelT = moshi::LmModel<T, Cuda, moshi::DefaultPolicies>;

struct Err {
  double max_abs = 0;
  bool nan_ok = true;
};

// Max |a - ref| over positions where the fixture's mask is set.
Err compare(const Tensor<float, Cpu>& a, const Tensor<float, Cpu>& ref, const Tensor<uint8_t, Cpu>& mask) {
  Err e;
  REQUIRE(a.shape() == ref.shape());
  const int64_t V = ref.size(3);
  auto av = a.contiguous(), rv = ref.contiguous();
  auto mv = mask.contiguous();
  for (int64_t i = 0; i < mv.numel(); ++i) {
    if (!mv.data()[i]) continue;
    for (int64_t v = 0; v < V; ++v) {
      const float x = av.data()[i * V + v], y = rv.data()[i * V + v];
      if (std::isnan(x) != std::isnan(y)) e.nan_ok = false;
      else if (!std::isnan(y)) e.max_abs = std::max(e.max_abs, double(std::abs(x - y)));
    }
  }
  return e;
}

template <class T>
void check_case(const std::string& dir, bool has_gen, double tol) {
  auto cfg = LmConfig::load(dir + "/config.json");
  io::WeightSource ws(dir + "/model.safetensors");
  auto model = ModelT<T>::load(cfg, ws);
  auto codes = io::SafeTensors::open(dir + "/codes.safetensors").load<int64_t>("codes").contiguous();
  auto ref = io::SafeTensors::open(dir + "/out.safetensors");
  auto out = model.forward(codes);
  auto el = compare(out.logits, ref.load<float>("logits"), ref.load<uint8_t>("mask"));
  auto et = compare(out.text_logits, ref.load<float>("text_logits"), ref.load<uint8_t>("text_mask"));
  std::printf("[cuda %s] %-60s logits max abs err %.2e, text %.2e\n", std::is_same_v<T, float> ? "f32 " : "bf16",
              dir.c_str(), el.max_abs, et.max_abs);
  REQUIRE(el.nan_ok);
  REQUIRE(et.nan_ok);
  REQUIRE(el.max_abs <= tol);
  REQUIRE(et.max_abs <= tol);
  if (!has_gen) return;
  auto g = io::SafeTensors::open(dir + "/gen.safetensors");
  auto user = g.load<int64_t>("user_codes").contiguous();
  auto want = g.load<int64_t>("tokens").contiguous();
  moshi::GenOptions opt;
  opt.use_sampling = false;
  moshi::LmGen<T, Cuda, moshi::DefaultPolicies> gen(model, opt);
  auto s = gen.start(user.size(0));
  std::vector<int64_t> got;
  for (int64_t t = 0; t < user.size(2); ++t)
    if (auto o = gen.step(s, user.select(2, t).contiguous())) {
      auto v = o->to_vector();
      got.insert(got.end(), v.begin(), v.end());
    }
  // got is [frame][B][K]; want is [B][K][frame].
  const int64_t Bn = want.size(0), K = want.size(1), S = want.size(2);
  REQUIRE(int64_t(got.size()) == Bn * K * S);
  int64_t same = 0;
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < S; ++t) same += got[size_t((t * Bn + b) * K + k)] == want(b, k, t);
  std::printf("[cuda %s] %-60s greedy tokens equal: %lld / %lld\n", std::is_same_v<T, float> ? "f32 " : "bf16",
              dir.c_str(), (long long)same, (long long)(Bn * K * S));
  if (std::is_same_v<T, float>) REQUIRE(same == Bn * K * S);
  // bf16: once one token differs the streams diverge (teacher forcing ends), so only most
  // tokens agree; the reference package in bf16 behaves the same.
  else REQUIRE(double(same) >= 0.75 * double(Bn * K * S));
}

}  // namespace

TEST_CASE("CUDA fp32 forward and greedy generation reproduce the moshi fixtures", "[cuda]") {
  check_case<float>(fixture("moshi/moshi_peer_test"), false, 1e-4);
  check_case<float>(fixture("moshi/moshi_small_defaults"), true, 1e-4);
  check_case<float>(fixture("moshi/moshi_7b_structure"), true, 1e-4);
}

TEST_CASE("CUDA fp32 reproduces the TTT design fixtures", "[cuda]") {
  for (const char* c : {"design_replace", "design_after_attention", "design_inplace_ffn", "design_kv_memory"})
    check_case<float>(fixture(std::string("ttt_moshi/") + c), false, 1e-4);
}

TEST_CASE("CUDA bf16 stays within bf16 noise of the fixtures", "[cuda][bf16]") {
  // bf16 noise = how far the reference package itself moves in bf16 on the same case
  // (tools/bf16_reference_error.py, moshi 0.2.13 on the CPU): max abs logit error 0.105
  // (moshi_small_defaults) and 0.172 (moshi_7b_structure). We allow 1.5x that.
  check_case<bf16>(fixture("moshi/moshi_small_defaults"), true, 1.5 * 0.105);
  check_case<bf16>(fixture("moshi/moshi_7b_structure"), true, 1.5 * 0.172);
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
