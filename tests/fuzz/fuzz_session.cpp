// libFuzzer target: the streaming-session loader on arbitrary bytes, against a small real
// model (the moshi_7b_structure fixture); a loaded session then runs one frame.
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
struct World {
  moshi::LmConfig cfg = moshi::LmConfig::load(TTT_FIXTURES "/moshi/moshi_7b_structure/config.json");
  io::WeightSource ws{TTT_FIXTURES "/moshi/moshi_7b_structure/model.safetensors"};
  Model model = Model::load(cfg, ws);
  Gen gen{model, {}};
};
World& world() {
  static World* w = new World();
  return *w;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  World& w = world();
  try {
    auto st = io::SafeTensors::from_bytes(data, size, "fuzz-session.safetensors");
    auto s = w.gen.load(st);
    auto user = Tensor<int64_t, Cpu>::zeros({s.batch(), w.gen.num_user_codebooks()});
    w.gen.step(s, user);
  } catch (const ttt::Error&) {
  }
  return 0;
}
