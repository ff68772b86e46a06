// TTT inside Moshi: the four designs against the independent float64 fixtures, exactness
// at init, streaming == teacher forcing, memory beyond the plain model's receptive field,
// sessions, and the strict "ttt" config.
#include <cstdio>

#include "catch.hpp"
#include "moshi_helpers.hpp"
#include "ttt/io/json.hpp"

using moshi::LmConfig;

namespace {

struct Loaded {
  LmConfig cfg;
  io::WeightSource ws;
  Model model;
};

std::unique_ptr<Loaded> load(const io::Json& cfg, const std::string& weights, uint64_t seed = 0) {
  auto l = std::make_unique<Loaded>();
  l->cfg = LmConfig::from_json(cfg, "config.json");
  if (weights.empty()) l->ws.enable_random_init(seed);
  else l->ws.add_file(weights);
  l->ws.set_seed(seed);
  l->model = Model::load(l->cfg, l->ws);
  return l;
}

Tensor<int64_t, Cpu> codes_of(const std::string& dir) {
  return io::SafeTensors::open(dir + "/codes.safetensors").load<int64_t>("codes").contiguous();
}

const char* kDesigns[] = {"design_replace", "design_after_attention", "design_inplace_ffn", "design_kv_memory"};

double max_abs_diff(const Tensor<float, Cpu>& a, const Tensor<float, Cpu>& b) {
  REQUIRE(a.shape() == b.shape());
  double m = 0;
  auto av = a.to_vector(), bv = b.to_vector();
  for (size_t i = 0; i < av.size(); ++i)
    if (!std::isnan(av[i]) || !std::isnan(bv[i])) m = std::max(m, double(std::abs(av[i] - bv[i])));
  return m;
}

}  // namespace

TEST_CASE("forward reproduces every ttt_moshi fixture", "[ttt_moshi][fixtures]") {
  for (const char* name : kDesigns) {
    INFO("case " << name);
    const std::string dir = fixture(std::string("ttt_moshi/") + name);
    auto l = load(io::read_json_file(dir + "/config.json"), dir + "/model.safetensors");
    auto out = l->model.forward(codes_of(dir));
    auto ref = io::SafeTensors::open(dir + "/out.safetensors");
    // Compared on unmasked positions (the fixture holds NaN where the mask is 0).
    auto cmp = [&](const Tensor<float, Cpu>& got, const std::string& key, const std::string& mkey) {
      auto want = ref.load<float>(key).contiguous();
      auto mask = ref.load<uint8_t>(mkey).contiguous();
      REQUIRE(got.shape() == want.shape());
      const int64_t V = want.size(3);
      double m = 0;
      for (int64_t i = 0; i < mask.numel(); ++i) {
        if (!mask.data()[i]) continue;
        for (int64_t v = 0; v < V; ++v) m = std::max(m, double(std::abs(got.data()[i * V + v] - want.data()[i * V + v])));
      }
      return m;
    };
    const double el = cmp(out.logits, "logits", "mask"), et = cmp(out.text_logits, "text_logits", "text_mask");
    std::printf("[ttt_moshi] %-24s logits max abs err %.2e, text_logits %.2e\n", name, el, et);
    REQUIRE(el <= 1e-4);
    REQUIRE(et <= 1e-4);
    REQUIRE(out.mask.to_vector() == ref.load<uint8_t>("mask").to_vector());
  }
}

TEST_CASE("every design at its init is exactly plain Moshi", "[ttt_moshi][init]") {
  const std::string dir = fixture("moshi/moshi_7b_structure");
  const io::Json base = io::read_json_file(dir + "/config.json");
  auto codes = codes_of(dir);
  auto plain = load(base, dir + "/model.safetensors");
  auto ref = plain->model.forward(codes);
  // alpha = 0 (after_attention), zero ttt_conv (inplace_ffn), virtual bias -30 with
  // recent = context (kv_memory): the new weights are the checkpoint's missing ones.
  const io::Json variants[] = {
      {{{"layers", {0}}, {"design", "after_attention"}, {"kind", "mlp"}, {"gate_alpha_init", 0.0}, {"mini_batch_size", 4}}},
      {{{"layers", {1}}, {"design", "inplace_ffn"}, {"chunk_size", 4}, {"lr", 0.5}}},
      {{{"layers", {0}}, {"design", "kv_memory"}, {"recent", 6}, {"num_virtual", 3}, {"mini_batch_size", 4}}},
      {{{"layers", {0}}, {"design", "after_attention"}, {"gate_alpha_init", 0.0}},
       {{"layers", {1}}, {"design", "inplace_ffn"}, {"chunk_size", 5}}},
  };
  for (const auto& ttt : variants) {
    INFO("ttt " << ttt.dump());
    io::Json cfg = base;
    cfg["ttt"] = ttt;
    auto l = load(cfg, dir + "/model.safetensors", 17);
    REQUIRE(!l->ws.initialised().empty());  // the new weights were made, not read
    auto out = l->model.forward(codes);
    const double d = std::max(max_abs_diff(out.logits, ref.logits), max_abs_diff(out.text_logits, ref.text_logits));
    std::printf("[ttt_moshi] at init, %-16s max abs diff to plain Moshi %.2e\n",
                ttt[0]["design"].get<std::string>().c_str(), d);
    REQUIRE(d <= 1e-6);
  }
}

TEST_CASE("streaming logits equal teacher forcing for every design", "[ttt_moshi][streaming]") {
  for (const char* name : kDesigns) {
    const std::string dir = fixture(std::string("ttt_moshi/") + name);
    auto l = load(io::read_json_file(dir + "/config.json"), dir + "/model.safetensors");
    auto codes = codes_of(dir);
    auto full = l->model.forward(codes);
    for (const std::vector<int64_t>& chunks : {std::vector<int64_t>{1}, {3, 7, 2}, {11}}) {
      INFO("case " << name << " first chunk " << chunks[0]);
      auto st = stream_teacher_forced(l->model, codes, chunks);
      const double d = std::max(max_err_unmasked(st.logits, full.logits), max_err_unmasked(st.text_logits, full.text_logits));
      REQUIRE(d <= 2e-5);
    }
  }
}

TEST_CASE("TTT designs remember input older than the plain model's receptive field", "[ttt_moshi][memory]") {
  // 2 layers x context 3: in teacher forcing frame t sees nothing older than t - 6 through
  // attention alone. Two inputs that differ only in frame 0 must give the same late outputs
  // without TTT, and different ones with replace, after_attention and kv_memory.
  const std::string dir = fixture("moshi/moshi_7b_structure");
  io::Json base = io::read_json_file(dir + "/config.json");
  base["context"] = 3;
  auto a = codes_of(dir).slice(0, 0, 1).contiguous();  // [1, 17, 24]
  auto b = a.clone();
  for (int64_t k = 0; k < b.size(1); ++k) b(0, k, 0) = (b(0, k, 0) + 5) % (k == 0 ? 56 : 48);
  const int64_t late = 20;  // well past 6 frames + the delays
  auto late_diff = [&](const io::Json& cfg) {
    auto l = load(cfg, dir + "/model.safetensors", 3);
    auto oa = l->model.forward(a), ob = l->model.forward(b);
    double m = 0;
    for (int64_t t = late; t < a.size(2) - 1; ++t)
      for (int64_t v = 0; v < oa.text_logits.size(3); ++v)
        m = std::max(m, double(std::abs(oa.text_logits(0, 0, t, v) - ob.text_logits(0, 0, t, v))));
    return m;
  };
  const double plain = late_diff(base);
  std::printf("[ttt_moshi] late-output change from frame 0: plain %.2e\n", plain);
  REQUIRE(plain <= 1e-6);
  const io::Json designs[] = {
      {{"layers", {0}}, {"design", "replace"}, {"mini_batch_size", 4}, {"gate_alpha_init", 1.0}},
      {{"layers", {0}}, {"design", "after_attention"}, {"mini_batch_size", 4}, {"gate_alpha_init", 1.0}},
      {{"layers", {0}}, {"design", "kv_memory"}, {"mini_batch_size", 4}, {"recent", 3}, {"num_virtual", 2},
       {"virtual_bias_init", 0.0}},
  };
  for (const auto& d : designs) {
    io::Json cfg = base;
    cfg["ttt"] = io::Json::array({d});  // not {d}: Clang reads a one-element brace list as a copy of d
    const double diff = late_diff(cfg);
    std::printf("[ttt_moshi] late-output change from frame 0: %-16s %.2e\n", d["design"].get<std::string>().c_str(), diff);
    REQUIRE(diff > 1e-4);
  }
}

TEST_CASE("TTT sessions snapshot, save and load mid-stream and continue bit-identically", "[ttt_moshi][session]") {
  auto l = load(io::read_json_file(test_data("../../examples/configs/small_ttt.json")), "", 11);
  moshi::GenOptions opt;
  opt.seed = 5;
  Gen gen(l->model, opt);
  const int64_t nu = gen.num_user_codebooks();
  auto user = Tensor<int64_t, Cpu>::empty({2, nu, 150});
  uint64_t x = 1;
  for (int64_t i = 0; i < user.numel(); ++i) user.data()[i] = int64_t(io::detail::splitmix64(x) % 2048);
  auto steps = [&](Gen::Session& s, int64_t t0, int64_t t1) {
    std::vector<int64_t> all;
    for (int64_t t = t0; t < t1; ++t)
      if (auto o = gen.step(s, user.select(2, t).contiguous())) {
        auto v = o->to_vector();
        all.insert(all.end(), v.begin(), v.end());
      }
    return all;
  };
  auto s = gen.start(2);
  steps(s, 0, 37);  // mid mini-batch (16) and mid chunk (64)
  auto snap = gen.snapshot(s);
  gen.save(s, "ttt_session.safetensors");
  auto a = steps(s, 37, 150);  // crosses mini-batch and chunk boundaries
  auto b = steps(snap, 37, 150);
  auto loaded = gen.load("ttt_session.safetensors");
  auto c = steps(loaded, 37, 150);
  REQUIRE(a == b);
  REQUIRE(a == c);
  std::remove("ttt_session.safetensors");
}

// `ttt-moshi bench --max-streams` times frames at full context by LmGen::fill_as_after instead
// of stepping 3000 frames. What makes that honest: the filled session has exactly the stepped
// one's positions (every KV ring's slot positions, hence the keys each query attends), counters
// (items, calls, TTT mini-batch phases, In-Place chunk phases) and graph key, before and after
// the next frame; only the contents (keys, values, tokens, fast weights) differ.
TEST_CASE("a session filled as after N frames does the work of a stepped one", "[ttt_moshi][fill]") {
  // tiny_ttt: every design (rings of 40 slots, kv_memory's 20 recent and 4 virtual, TTT
  // mini-batches of 8, In-Place chunks of 16), then the same shapes as plain Moshi.
  const io::Json base = io::read_json_file(test_data("../../examples/configs/tiny_ttt.json"));
  for (bool plain : {false, true}) {
    io::Json cfg = base;
    if (plain) cfg.erase("ttt");
    auto l = load(cfg, "", 21);
    moshi::GenOptions opt;
    Gen gen(l->model, opt);
    const int64_t Bn = 2, F = 57;  // past every ring's capacity, mid mini-batch and mid chunk
    auto user = Tensor<int64_t, Cpu>::empty({Bn, gen.num_user_codebooks()});
    uint64_t x = 3;
    auto step = [&](Gen::Session& s) {
      for (int64_t i = 0; i < user.numel(); ++i) user.data()[i] = int64_t(io::detail::splitmix64(x) % 256);
      gen.step(s, user);
    };
    auto stepped = gen.start(Bn);
    for (int64_t t = 0; t < F; ++t) step(stepped);
    auto filled = gen.start(Bn);
    gen.fill_as_after(filled, F, 9);
    REQUIRE_THROWS_WITH(gen.fill_as_after(stepped, F, 9), TTT_CONTAINS("fresh session"));

    // Every integer tensor of the saved sessions (positions, counters, exec flags, sampling)
    // equal; the same tensors in the same shapes otherwise. Ring positions: counted too.
    auto compare = [&](const char* when, int64_t frames) {
      INFO((plain ? "plain" : "ttt designs") << ", " << when);
      gen.save(stepped, "fill_stepped.safetensors");
      gen.save(filled, "fill_filled.safetensors");
      auto a = io::SafeTensors::open("fill_stepped.safetensors"), b = io::SafeTensors::open("fill_filled.safetensors");
      REQUIRE(a.names() == b.names());
      int rings = 0;
      for (const auto& name : a.names()) {
        INFO("tensor " << name);
        REQUIRE(a.info(name).shape == b.info(name).shape);
        REQUIRE(a.info(name).dtype == b.info(name).dtype);
        if (a.info(name).dtype != DType::i64) continue;
        if (name == "lmgen.cache") {  // tokens: random in the filled one, all generated
          for (int64_t v : b.load<int64_t>(name).to_vector()) REQUIRE(v >= 0);
          continue;
        }
        const auto pa = a.load<int64_t>(name).to_vector();
        REQUIRE(pa == b.load<int64_t>(name).to_vector());
        if (name.size() > 4 && name.compare(name.size() - 4, 4, ".pos") == 0) {
          // A full ring: every slot holds one of the last `capacity` positions.
          ++rings;
          const int64_t C = a.info(name).shape.d[1];
          for (int64_t p : pa) REQUIRE((p >= frames - C && p < frames));
        }
      }
      REQUIRE(rings == 4);  // plain: one per layer; designs: after_attention, inplace_ffn, kv_memory's two
      REQUIRE(Model::TemporalT::graph_key(l->model.transformer, stepped.temporal, stepped.exec) ==
              Model::TemporalT::graph_key(l->model.transformer, filled.temporal, filled.exec));
    };
    compare("after the fill", F);
    step(stepped);
    step(filled);
    compare("after one more frame", F + 1);
    std::remove("fill_stepped.safetensors");
    std::remove("fill_filled.safetensors");
  }
}

TEST_CASE("the 'ttt' config list is strict and names the problem", "[ttt_moshi][config]") {
  const io::Json base = io::read_json_file(fixture("moshi/moshi_7b_structure/config.json"));
  auto error_of = [&](const io::Json& ttt) -> std::string {
    io::Json cfg = base;
    cfg["ttt"] = ttt;
    try {
      moshi::parse_ttt_plan(LmConfig::from_json(cfg, "config.json"), "config.json");
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  struct Case {
    io::Json ttt;
    const char* needle;
  };
  const Case cases[] = {
      {{{{"layers", {0}}, {"design", "replace"}, {"mini_bath_size", 8}}}, "ttt[0]: unknown key 'mini_bath_size'"},
      {{{{"layers", {0}}, {"design", "replace"}, {"chunk_size", 8}}}, "key 'chunk_size' does not apply to design 'replace'"},
      {{{{"layers", {0}}, {"design", "teleport"}}}, "unknown design 'teleport'"},
      {{{{"layers", {5}}, {"design", "replace"}}}, "layer 5 is out of range"},
      {{{{"layers", {1}}, {"design", "replace"}}, {{"layers", {1}}, {"design", "kv_memory"}}}, "ttt[1]: layer 1 is already listed in ttt[0]"},
      {{{{"layers", {0}}, {"design", "replace"}, {"kind", "cubic"}}}, "key 'kind' must be"},
      {{{{"layers", {0}}, {"design", "inplace_ffn"}, {"conv_kernel", 4}}}, "key 'conv_kernel' must be odd"},
      {{{{"layers", {0}}, {"design", "replace"}, {"num_heads", 5}}}, "key 'num_heads'"},
      {{{{"design", "replace"}}}, "missing key 'layers'"},
      {{{{"layers", "0"}, {"design", "replace"}}}, "key 'layers' must be a list of integers"},
      {io::Json{{"layers", {0}}}, "key 'ttt' must be a list"},
  };
  for (const auto& c : cases) {
    const std::string e = error_of(c.ttt);
    INFO("ttt " << c.ttt.dump() << "\nerror: " << e);
    REQUIRE(e.find(c.needle) != std::string::npos);
  }
  REQUIRE(error_of({{{"layers", {0, 1}}, {"design", "replace"}, {"kind", "mlp"}, {"use_gate", true}}}).empty());
}
