// ttt-moshi quantize: a Moshi checkpoint with its linear weights stored as int8 or fp8 e4m3,
// one scale per output row (docs/weights.md, "Quantised checkpoints"). The result loads with
// any --dtype (bf16 engine arithmetic around the quantised weights; --dtype fp8 / int8 then
// only confirms it) and skips the quantisation at load.
#include <chrono>

#include "commands.hpp"
#include "common.hpp"
#include "ttt/moshi/quantize.hpp"

namespace ttt_moshi {

int cmd_quantize(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi quantize", "");
  o.add_options()("weights", "model.safetensors (float: f32, bf16 or f16)", cxxopts::value<std::string>())(
      "dtype", "int8 or fp8", cxxopts::value<std::string>())("out", "output safetensors",
                                                             cxxopts::value<std::string>())("h,help", "this help");
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  if (!r->count("weights") || !r->count("out") || !r->count("dtype"))
    fail("quantize needs --weights W --dtype int8|fp8 --out OUT");
  const std::string d = (*r)["dtype"].as<std::string>();
  WeightFormat f;
  if (d == "int8") f = WeightFormat::int8;
  else if (d == "fp8") f = WeightFormat::fp8_e4m3;
  else fail("--dtype must be int8 or fp8, got '", d, "'");
  const auto t0 = std::chrono::steady_clock::now();
  const auto rep = moshi::write_quantized((*r)["weights"].as<std::string>(), (*r)["out"].as<std::string>(), f);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "quantize: %lld linear weights to %s, %lld tensors copied; %.2f GB -> %.2f GB in %.1f s -> %s\n",
               (long long)rep.quantized, std::string(weight_format_name(f)).c_str(), (long long)rep.copied,
               rep.bytes_in / 1e9, rep.bytes_out / 1e9, s, (*r)["out"].as<std::string>().c_str());
  if (rep.quantized == 0) fail((*r)["weights"].as<std::string>(), ": no Moshi linear weight found to quantise");
  return 0;
}

}  // namespace ttt_moshi
