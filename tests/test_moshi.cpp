// The Moshi engine on the CPU against the moshi 0.2.13 fixtures, plus the streaming
// contracts the reference does not test: streaming == teacher forcing for any split,
// snapshot/restore, save/load, per-item reset, exec masks, and bad input.
#include <cmath>
#include <cstdio>
#include <fstream>

#include "catch.hpp"
#include "moshi_helpers.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using moshi::LmConfig;

namespace {

struct Case {
  LmConfig cfg;
  io::WeightSource ws;
  Model model;
};

Case load_case(const std::string& name) {
  const std::string dir = fixture("moshi/" + name);
  Case c{LmConfig::load(dir + "/config.json"), io::WeightSource(dir + "/model.safetensors"), {}};
  c.model = Model::load(c.cfg, c.ws);
  return c;
}

// Cross-entropy of the fixture codes under the given logits, over the mask (the
// reference's own test criterion, tests/test_lm.py).
double cross_entropy(const Tensor<float, Cpu>& logits, const Tensor<uint8_t, Cpu>& mask, const Tensor<int64_t, Cpu>& codes,
                     int64_t k0) {
  double total = 0;
  int64_t n = 0;
  const int64_t Bn = logits.size(0), K = logits.size(1), Tn = logits.size(2), V = logits.size(3);
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < Tn; ++t) {
        if (!mask(b, k, t)) continue;
        double m = -1e300, z = 0;
        for (int64_t v = 0; v < V; ++v) m = std::max(m, double(logits(b, k, t, v)));
        for (int64_t v = 0; v < V; ++v) z += std::exp(double(logits(b, k, t, v)) - m);
        total += -(double(logits(b, k, t, codes(b, k0 + k, t))) - m - std::log(z));
        ++n;
      }
  return total / double(n);
}

}  // namespace

TEST_CASE("forward reproduces every moshi fixture", "[moshi][fixtures]") {
  for (const char* name : {"moshi_peer_test", "moshi_small_defaults", "moshi_7b_structure"}) {
    INFO("case " << name);
    auto c = load_case(name);
    auto codes_f = io::SafeTensors::open(fixture(std::string("moshi/") + name + "/codes.safetensors"));
    auto ref = io::SafeTensors::open(fixture(std::string("moshi/") + name + "/out.safetensors"));
    auto codes = codes_f.load<int64_t>("codes").contiguous();
    auto out = c.model.forward(codes);
    const double el = max_err_unmasked(out.logits, ref.load<float>("logits"));
    const double et = max_err_unmasked(out.text_logits, ref.load<float>("text_logits"));
    std::printf("[moshi] %-22s logits max abs err %.2e, text_logits %.2e\n", name, el, et);
    REQUIRE(el <= 1e-4);
    REQUIRE(et <= 1e-4);
    REQUIRE(out.mask.to_vector() == ref.load<uint8_t>("mask").to_vector());
    REQUIRE(out.text_mask.to_vector() == ref.load<uint8_t>("text_mask").to_vector());
    const double ce = cross_entropy(out.logits, out.mask, codes, 1);
    const double ce_ref = cross_entropy(ref.load<float>("logits"), ref.load<uint8_t>("mask"), codes, 1);
    const double ce_t = cross_entropy(out.text_logits, out.text_mask, codes, 0);
    const double ce_t_ref = cross_entropy(ref.load<float>("text_logits"), ref.load<uint8_t>("text_mask"), codes, 0);
    std::printf("[moshi] %-22s CE audio %.9f (ref %.9f), text %.9f (ref %.9f)\n", name, ce, ce_ref, ce_t, ce_t_ref);
    REQUIRE(std::abs(ce - ce_ref) <= 1e-6 * std::abs(ce_ref));
    REQUIRE(std::abs(ce_t - ce_t_ref) <= 1e-6 * std::abs(ce_t_ref));
  }
}

TEST_CASE("greedy streaming generation reproduces the fixtures' tokens", "[moshi][fixtures]") {
  for (const char* name : {"moshi_small_defaults", "moshi_7b_structure"}) {
    INFO("case " << name);
    auto c = load_case(name);
    auto g = io::SafeTensors::open(fixture(std::string("moshi/") + name + "/gen.safetensors"));
    auto user = g.load<int64_t>("user_codes").contiguous();
    auto want = g.load<int64_t>("tokens");
    moshi::GenOptions opt;
    opt.use_sampling = false;
    Gen gen(c.model, opt);
    auto s = gen.start(user.size(0));
    std::vector<int64_t> got;
    const int64_t S = user.size(2);
    auto out_all = Tensor<int64_t, Cpu>::empty(want.shape());
    int64_t n = 0;
    for (int64_t t = 0; t < S; ++t) {
      auto frame = user.select(2, t).contiguous();
      auto out = gen.step(s, frame);
      REQUIRE(bool(out) == (t >= c.cfg.max_delay()));
      if (out) out_all.select(2, n++).copy_from(*out);
    }
    REQUIRE(n == want.size(2));
    REQUIRE(out_all.to_vector() == want.to_vector());
  }
}


TEST_CASE("streaming logits equal the teacher-forced forward for any split", "[moshi][streaming]") {
  for (const char* name : {"moshi_small_defaults", "moshi_7b_structure"}) {
    auto c = load_case(name);
    auto codes = io::SafeTensors::open(fixture(std::string("moshi/") + name + "/codes.safetensors")).load<int64_t>("codes").contiguous();
    auto full = c.model.forward(codes);
    // Step by step (the decode path), and uneven chunks that straddle the ring's capacity.
    for (const std::vector<int64_t>& chunks : {std::vector<int64_t>{1}, {3, 7, 2}, {9}}) {
      INFO("case " << name << " first chunk " << chunks[0]);
      auto st = stream_teacher_forced(c.model, codes, chunks);
      REQUIRE(max_err_unmasked(st.logits, full.logits) <= 1e-5);
      REQUIRE(max_err_unmasked(st.text_logits, full.text_logits) <= 1e-5);
    }
  }
}

namespace {
Tensor<int64_t, Cpu> random_user(int64_t B, int64_t nu, int64_t S, int64_t card, uint64_t seed) {
  auto u = Tensor<int64_t, Cpu>::empty({B, nu, S});
  uint64_t x = seed;
  for (int64_t i = 0; i < u.numel(); ++i) u.data()[i] = int64_t(io::detail::splitmix64(x) % uint64_t(card));
  return u;
}
std::vector<Tensor<int64_t, Cpu>> run_steps(const Gen& g, Gen::Session& s, const Tensor<int64_t, Cpu>& user, int64_t t0,
                                            int64_t t1) {
  std::vector<Tensor<int64_t, Cpu>> outs;
  for (int64_t t = t0; t < t1; ++t) {
    auto o = g.step(s, user.select(2, t).contiguous());
    if (o) outs.push_back(*o);
  }
  return outs;
}
bool same(const std::vector<Tensor<int64_t, Cpu>>& a, const std::vector<Tensor<int64_t, Cpu>>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].to_vector() != b[i].to_vector()) return false;
  return true;
}
}  // namespace

TEST_CASE("sessions snapshot, restore, save and load and continue identically", "[moshi][session]") {
  auto c = load_case("moshi_7b_structure");
  moshi::GenOptions opt;  // sampling on: the RNG counter is part of the session
  opt.seed = 1234;
  Gen gen(c.model, opt);
  auto user = random_user(2, gen.num_user_codebooks(), 40, c.cfg.card, 9);
  auto s = gen.start(2);
  run_steps(gen, s, user, 0, 15);
  auto snap = gen.snapshot(s);
  const std::string path = "test_moshi_session.safetensors";
  gen.save(s, path);
  auto a = run_steps(gen, s, user, 15, 40);  // context 6: the rings wrap many times
  auto b = run_steps(gen, snap, user, 15, 40);
  REQUIRE(!a.empty());
  REQUIRE(same(a, b));
  auto loaded = gen.load(path);
  auto l = run_steps(gen, loaded, user, 15, 40);
  REQUIRE(same(a, l));
  std::remove(path.c_str());
  // A different seed diverges (the test above is not vacuous).
  moshi::GenOptions opt2 = opt;
  opt2.seed = 99;
  Gen gen2(c.model, opt2);
  auto s2 = gen2.start(2);
  run_steps(gen2, s2, user, 0, 15);
  REQUIRE_FALSE(same(run_steps(gen2, s2, user, 15, 40), a));
}

TEST_CASE("per-item reset and exec masks", "[moshi][session]") {
  auto c = load_case("moshi_7b_structure");
  moshi::GenOptions opt;
  opt.use_sampling = false;
  Gen gen(c.model, opt);
  const int64_t nu = gen.num_user_codebooks();
  auto user = random_user(2, nu, 30, c.cfg.card, 5);
  // Reference: item 1 alone from frame 10 on.
  auto solo = gen.start(1);
  auto user1 = user.slice(0, 1, 2).slice(2, 10, 30).contiguous();
  auto want = run_steps(gen, solo, user1, 0, 20);
  // Batch of 2: item 1 reset at frame 10 must match the solo run; item 0 is unaffected.
  auto s = gen.start(2);
  run_steps(gen, s, user, 0, 10);
  auto ref0 = gen.snapshot(s);
  gen.reset(s, {0, 1});
  std::vector<Tensor<int64_t, Cpu>> got1;
  for (int64_t t = 10; t < 30; ++t) {
    auto o = gen.step(s, user.select(2, t).contiguous());
    if (o && (*o)(1, 0) != -2) got1.push_back(o->slice(0, 1, 2).contiguous());
  }
  REQUIRE(same(got1, want));

  // Exec mask: frames where item 0 is paused leave no trace in its stream.
  auto a = gen.start(2), b = gen.start(2);
  run_steps(gen, a, user, 0, 8);
  run_steps(gen, b, user, 0, 8);
  gen.set_exec_mask(b, {0, 1});
  auto noise = random_user(2, nu, 5, c.cfg.card, 77);
  run_steps(gen, b, noise, 0, 5);  // item 0 paused: these frames must not count for it
  gen.set_exec_mask(b, {1, 1});
  auto ra = run_steps(gen, a, user, 8, 20), rb = run_steps(gen, b, user, 8, 20);
  REQUIRE(ra.size() == rb.size());
  for (size_t i = 0; i < ra.size(); ++i)
    REQUIRE(ra[i].slice(0, 0, 1).contiguous().to_vector() == rb[i].slice(0, 0, 1).contiguous().to_vector());
}

TEST_CASE("bad inputs give clear errors", "[moshi][errors]") {
  auto expect_error = [](auto&& fn, const std::string& needle) {
    try {
      fn();
      FAIL("no error; expected one mentioning '" << needle << "'");
    } catch (const ttt::Error& e) {
      INFO("message: " << e.what());
      REQUIRE(std::string(e.what()).find(needle) != std::string::npos);
    }
  };
  const std::string dir = fixture("moshi/moshi_7b_structure");
  auto cfg = LmConfig::load(dir + "/config.json");
  // Missing key: a checkpoint for a different config.
  {
    auto small = LmConfig::load(fixture("moshi/moshi_small_defaults/config.json"));
    io::WeightSource ws(dir + "/model.safetensors");
    expect_error([&] { Model::load(small, ws); }, "has shape");
  }
  {
    io::Json j = io::read_json_file(dir + "/config.json");
    j["num_layers"] = 3;
    auto c3 = LmConfig::from_json(j, "config.json");
    io::WeightSource ws(dir + "/model.safetensors");
    expect_error([&] { Model::load(c3, ws); }, "missing tensor 'transformer.layers.2.");
  }
  // Config errors name the key.
  {
    io::Json j = io::read_json_file(dir + "/config.json");
    j["delays"] = {0, 1};
    expect_error([&] { LmConfig::from_json(j, "config.json"); }, "'delays'");
    j = io::read_json_file(dir + "/config.json");
    j["num_heads"] = "three";
    expect_error([&] { LmConfig::from_json(j, "config.json"); }, "'num_heads'");
    j = io::read_json_file(dir + "/config.json");
    j["norm"] = "batch_norm";
    expect_error([&] { LmConfig::from_json(j, "config.json"); }, "unknown norm 'batch_norm'");
    j = io::read_json_file(dir + "/config.json");
    j["some_future_key"] = 1;  // Kyutai's own keys only warn
    REQUIRE_NOTHROW(LmConfig::from_json(j, "config.json"));
  }
  // Tokens out of range.
  {
    io::WeightSource ws(dir + "/model.safetensors");
    auto m = Model::load(cfg, ws);
    auto codes = Tensor<int64_t, Cpu>::zeros({1, cfg.num_codebooks(), 4});
    codes(0, 3, 2) = cfg.card + 1;
    expect_error([&] { m.forward(codes); }, "out of range");
    auto bad_k = Tensor<int64_t, Cpu>::zeros({1, 5, 4});
    expect_error([&] { m.forward(bad_k); }, "codebooks");
    Gen g(m, {});
    auto s = g.start(1);
    auto frame = Tensor<int64_t, Cpu>::zeros({1, g.num_user_codebooks()});
    frame(0, 1) = 5000;
    expect_error([&] { g.step(s, frame); }, "out of range");
    auto wrong_b = Tensor<int64_t, Cpu>::zeros({2, g.num_user_codebooks()});
    expect_error([&] { g.step(s, wrong_b); }, "batch");
  }
}

TEST_CASE("LoRA adapters merge with the configured scaling", "[moshi][weights]") {
  // W' = W + s * B @ A, against a hand computation.
  const std::string path = "test_lora.safetensors";
  io::SafeTensorsWriter w;
  auto W = Tensor<float, Cpu>::from_vector({2, 3}, {1, 2, 3, 4, 5, 6});
  auto A = Tensor<float, Cpu>::from_vector({1, 3}, {1, 0, -1});
  auto Bm = Tensor<float, Cpu>::from_vector({2, 1}, {2, 3});
  w.add("lin.frozen_W.weight", W);
  w.add("lin.lora_A.weight", A);
  w.add("lin.lora_B.weight", Bm);
  w.write(path);
  io::WeightSource ws(path);
  ws.set_lora_scaling(0.5f);
  auto m = ws.get<float>("lin.weight", {2, 3});
  std::vector<float> want{1 + 1.f, 2, 3 - 1.f, 4 + 1.5f, 5, 6 - 1.5f};
  REQUIRE(m.to_vector() == want);
  REQUIRE(ws.unused().empty());
  std::remove(path.c_str());
}
