// A layer policy of your own, selected per layer by the config's "ttt" list, without
// touching the model code (docs/architecture.md, "Adding a layer policy").
//
// FfnOnlyLayer drops a layer's attention and keeps its feed-forward half: x += FFN(N2(x)).
// The program checks it against an independent route to the same function: plain Moshi
// with that layer's attention output projection set to zero (its attention then adds 0).
//
//   custom-policy [--config examples/configs/small.json] [--layer 1]
#include <cmath>
#include <cstdio>
#include <cxxopts.hpp>

#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using namespace ttt::moshi;

// The members a policy must have (nn/layer.hpp); reset, clone, save and load of the state
// come from the transformer, applied to the fields State lists (none here).
template <class T, class B>
struct FfnOnlyLayer {
  static constexpr const char* design = "ffn_only";  // the name a "ttt" entry gives
  using Params = nn::FfnBlock<T, B>;
  struct State {};  // nothing streams: no KV ring

  static Params load(io::WeightSource& ws, const std::string& prefix, const nn::LayerSpec& spec) {
    // Our own options are strict: this design takes none.
    for (auto k = spec.entry.begin(); k != spec.entry.end(); ++k)
      if (k.key() != "layers" && k.key() != "design") fail(spec.where, ": design 'ffn_only' takes no key '", k.key(), "'");
    return Params::load(ws, prefix, spec.cfg);
  }
  static int64_t num_params(const Params& p) { return p.num_params(); }
  static State init_state(const Params&, int64_t, bool) { return {}; }
  static void forward(const Params& p, State&, const Tensor<T, B>& x, const nn::LayerInput<T, B>& in) {
    p.feed_forward(x, in);  // x [B, T, D] updated in place
  }
};

// The engine's list plus ours; DefaultPolicies stays as it is.
using MyPolicies = nn::PolicyList<nn::AttentionLayer, ReplaceLayer, AfterAttentionLayer, InplaceFfnLayer, KvMemoryLayer, FfnOnlyLayer>;

int main(int argc, char** argv) {
  cxxopts::Options o("custom-policy", "a user-defined layer policy selected by the config's \"ttt\" list");
  o.add_options()("config", "Kyutai config.json", cxxopts::value<std::string>()->default_value("examples/configs/small.json"))(
      "layer", "the layer that becomes ffn_only", cxxopts::value<int64_t>()->default_value("1"))("h,help", "help");
  try {
    auto r = o.parse(argc, argv);
    if (r.count("help")) {
      std::printf("%s\n", o.help().c_str());
      return 0;
    }
    const int64_t layer = r["layer"].as<int64_t>();
    io::Json j = io::read_json_file(r["config"].as<std::string>());
    j["ttt"] = io::Json::array({{{"layers", {layer}}, {"design", "ffn_only"}}});
    const LmConfig cfg = LmConfig::from_json(j, r["config"].as<std::string>());

    io::WeightSource ws_mine;
    ws_mine.enable_random_init(7);
    auto mine = LmModel<float, Cpu, MyPolicies>::load(cfg, ws_mine);

    // The reference: plain Moshi, same seeded weights, that layer's attention muted.
    LmConfig plain = cfg;
    plain.ttt = io::Json();
    io::WeightSource ws_ref;
    ws_ref.enable_random_init(7);
    const int64_t D = cfg.dim;
    ws_ref.put("transformer.layers." + std::to_string(layer) + ".self_attn.out_proj.weight",
               Tensor<float, Cpu>::zeros({D, D}));
    auto ref = LmModel<float, Cpu, DefaultPolicies>::load(plain, ws_ref);

    // Teacher-forced forward on seeded codes.
    const int64_t Bn = 1, K = cfg.num_codebooks(), Tn = 12;
    auto codes = Tensor<int64_t, Cpu>::empty({Bn, K, Tn});
    uint64_t st = 12345;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t t = 0; t < Tn; ++t) {
        st = st * 6364136223846793005ull + 1442695040888963407ull;
        codes(0, k, t) = int64_t((st >> 33) % uint64_t(k == 0 ? cfg.text_card : cfg.card));
      }
    auto a = mine.forward(codes);
    auto b = ref.forward(codes);
    double err = 0, scale = 0;
    for (int64_t i = 0; i < a.text_logits.numel(); ++i) {
      err = std::max(err, double(std::fabs(a.text_logits.data()[i] - b.text_logits.data()[i])));
      scale = std::max(scale, double(std::fabs(b.text_logits.data()[i])));
    }
    std::printf("layer %lld is '%s'; forward: max |text logits - plain Moshi with that attention muted| = %.3g (max |logit| %.3g)\n",
                (long long)layer, decltype(mine)::TemporalT::design_of(mine.transformer.layers[size_t(layer)]), err, scale);

    // Streaming works with it too: a few greedy frames of LmGen.
    GenOptions go;
    go.use_sampling = false;
    LmGen<float, Cpu, MyPolicies> gen(mine, go);
    auto session = gen.start(Bn);
    auto user = Tensor<int64_t, Cpu>::empty({Bn, gen.num_user_codebooks()});
    int64_t produced = 0;
    for (int s = 0; s < 8; ++s) {
      for (int64_t i = 0; i < user.numel(); ++i) user.data()[i] = -1;
      if (auto out = gen.step(session, user)) ++produced;
    }
    std::printf("streaming: 8 frames, %lld token frames out\n", (long long)produced);
    if (!(err <= 1e-4 * std::max(1.0, scale))) {
      std::fprintf(stderr, "custom-policy: error: ffn_only does not match the reference\n");
      return 1;
    }
    std::printf("ok\n");
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "custom-policy: error: %s\n", e.what());
    return 1;
  }
}
