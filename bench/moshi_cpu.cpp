// bench_moshi_cpu: streaming Moshi frames per second on the CPU backend.
// Prints the median frame time, the PyTorch anchor (measured by bench/moshi_cpu.sh in the
// same run, passed in with --anchor-ms) and the hardware floor: the bytes a frame must read
// (every weight matrix once, the KV cache in use) over the measured read bandwidth.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <vector>

#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using Model = moshi::LmModel<float, Cpu, moshi::DefaultPolicies>;

namespace {

int64_t matrix_elements(const Model& m) {
  int64_t n = m.text_linear.numel() + Model::TemporalT::num_params(m.transformer) +
              Model::DepformerT::num_params(m.depformer);
  for (auto& w : m.depformer_in) n += w.numel();
  for (auto& w : m.linears) n += w.numel();
  return n;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options o("bench_moshi_cpu", "Moshi streaming frames/s on the CPU");
  o.add_options()("config", "config.json", cxxopts::value<std::string>())(
      "weights", "weights (default: seeded random)", cxxopts::value<std::string>())(
      "frames", "timed frames", cxxopts::value<int>()->default_value("200"))(
      "warmup", "untimed frames first", cxxopts::value<int>()->default_value("20"))(
      "anchor-ms", "PyTorch median ms/frame measured in the same run", cxxopts::value<double>())("h,help", "help");
  try {
    auto r = o.parse(argc, argv);
    if (r.count("help") || !r.count("config")) {
      std::printf("%s\n", o.help().c_str());
      return r.count("help") ? 0 : 2;
    }
    auto cfg = moshi::LmConfig::load(r["config"].as<std::string>());
    io::WeightSource ws;
    if (r.count("weights")) ws.add_file(r["weights"].as<std::string>());
    else ws.enable_random_init(0);
    auto model = Model::load(cfg, ws);
    moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
    moshi::LmGen<float, Cpu, moshi::DefaultPolicies> gen(model, opt);
    auto s = gen.start(1);
    const int warmup = r["warmup"].as<int>(), frames = r["frames"].as<int>();
    std::vector<double> ms;
    auto user = Tensor<int64_t, Cpu>::zeros({1, gen.num_user_codebooks()});
    uint64_t x = 1;
    for (int i = 0; i < warmup + frames; ++i) {
      for (int64_t k = 0; k < user.numel(); ++k) user.data()[k] = int64_t(io::detail::splitmix64(x) % uint64_t(cfg.card));
      auto t0 = std::chrono::steady_clock::now();
      gen.step(s, user);
      if (i >= warmup) ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double med = ms[ms.size() / 2], p90 = ms[size_t(0.9 * double(ms.size()))];
    const int64_t filled = std::min<int64_t>(warmup + frames, cfg.transformer.context);
    const double kv_bytes = double(cfg.transformer.num_layers) * 2 * double(filled) * double(cfg.dim / cfg.transformer.kv_repeat) * 4;
    const double bytes = double(matrix_elements(model)) * 4 + kv_bytes;
    const double bw = memory_bandwidth_gbs<Cpu>();
    const double floor_ms = bytes / (bw * 1e9) * 1e3;
    std::printf("ttt cpu f32 (%d threads): median %.2f ms/frame = %.1f frames/s (p90 %.2f ms) over %d frames\n",
#ifdef _OPENMP
                omp_get_max_threads(),
#else
                1,
#endif
                med, 1e3 / med, p90, frames);
    std::printf("floor: %.1f MB read per frame (weights %.1f MB + KV %.1f MB) / %.1f GB/s measured read bandwidth = "
                "%.2f ms/frame; ttt is at %.2fx the floor\n",
                bytes / 1e6, (bytes - kv_bytes) / 1e6, kv_bytes / 1e6, bw, floor_ms, med / floor_ms);
    if (r.count("anchor-ms")) {
      const double a = r["anchor-ms"].as<double>();
      std::printf("anchor: PyTorch moshi %.2f ms/frame (%.1f frames/s); ttt is %.2fx faster; real time needs 80 ms/frame\n",
                  a, 1e3 / a, a / med);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_moshi_cpu: error: %s\n", e.what());
    return 1;
  }
}
