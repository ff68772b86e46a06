// libFuzzer target: the streaming-session loader on arbitrary bytes, against a small real
// model (the moshi_7b_structure fixture) and a model with all four TTT designs (the bundled
// tiny_ttt config, seeded weights: KV rings, TTT fast weights, In-Place chunk buffers); a
// session that loads then runs one frame.
#include <cstddef>
#include <cstdint>
#include <memory>

#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using Model = moshi::LmModel<float, Cpu, moshi::DefaultPolicies>;
using Gen = moshi::LmGen<float, Cpu, moshi::DefaultPolicies>;

namespace {
io::WeightSource seeded() {
  io::WeightSource ws;
  ws.enable_random_init(1);
  return ws;
}
struct World {
  moshi::LmConfig cfg = moshi::LmConfig::load(TTT_FIXTURES "/moshi/moshi_7b_structure/config.json");
  io::WeightSource ws{TTT_FIXTURES "/moshi/moshi_7b_structure/model.safetensors"};
  Model model = Model::load(cfg, ws);
  Gen gen{model, {}};
  moshi::LmConfig ttt_cfg = moshi::LmConfig::load(TTT_FIXTURES "/../../../examples/configs/tiny_ttt.json");
  io::WeightSource ttt_ws = seeded();
  Model ttt_model = Model::load(ttt_cfg, ttt_ws);
  Gen ttt_gen{ttt_model, {}};
};
World& world() {
  static World* w = new World();
  return *w;
}
void load_and_step(const Gen& gen, const io::SafeTensors& st) {
  try {
    auto s = gen.load(st);
    auto user = Tensor<int64_t, Cpu>::zeros({s.batch(), gen.num_user_codebooks()});
    gen.step(s, user);
  } catch (const ttt::Error&) {
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  World& w = world();
  try {
    auto st = io::SafeTensors::from_bytes(data, size, "fuzz-session.safetensors");
    load_and_step(w.gen, st);
    // The TTT world's state per stream is larger: sessions of many streams would only test
    // the machine's memory (the loader accepts up to 4096).
    if (st.contains("lmgen.offsets") && st.info("lmgen.offsets").shape.numel() <= 64) load_and_step(w.ttt_gen, st);
  } catch (const ttt::Error&) {
  }
  return 0;
}
