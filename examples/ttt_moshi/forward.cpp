// ttt-moshi forward: teacher-forced LMModel.forward over a codes file.
#include "commands.hpp"
#include "common.hpp"

namespace ttt_moshi {
namespace {

template <class T, class B>
struct Forward {
  static int run(const Common& c, const cxxopts::ParseResult& r) {
    if (!r.count("codes") || !r.count("out")) fail("forward needs --codes IN and --out OUT");
    if (c.weights.empty()) fail("forward needs --weights");
    const LmConfig cfg = load_config(c);
    auto ws = load_weights(c, cfg);
    auto model = build_model<T, B>(c, cfg, ws);
    const std::string in = r["codes"].as<std::string>();
    auto codes_file = io::SafeTensors::open(in);
    if (!codes_file.contains("codes")) fail(in, ": missing tensor 'codes'");
    auto codes = codes_file.load<int64_t>("codes");
    if (codes.rank() != 3) fail(in, ": 'codes' must be [B, K, T], got ", codes.shape().str());
    if (codes.size(1) != cfg.num_codebooks())
      fail(in, ": 'codes' has ", codes.size(1), " codebooks, the model needs ", cfg.num_codebooks(), " (text + n_q)");
    auto t0 = std::chrono::steady_clock::now();
    auto out = model.forward(codes.contiguous());
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    io::SafeTensorsWriter w;
    w.add("logits", out.logits);
    w.add("text_logits", out.text_logits);
    w.add("mask", out.mask);
    w.add("text_mask", out.text_mask);
    w.write(r["out"].as<std::string>());
    std::fprintf(stderr, "forward: %lld x %lld frames in %.3f s -> %s\n", (long long)codes.size(0),
                 (long long)codes.size(2), s, r["out"].as<std::string>().c_str());
    return 0;
  }
};

}  // namespace

int cmd_forward(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi forward", "");
  add_common(o);
  o.add_options()("codes", "safetensors with codes int64 [B, K, T]", cxxopts::value<std::string>())(
      "out", "output safetensors", cxxopts::value<std::string>());
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<Forward>(read_common(*r), *r);
}

}  // namespace ttt_moshi
