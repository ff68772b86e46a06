#include "common.hpp"

#include <unistd.h>

#include "bundled_configs.hpp"

#include <fstream>

namespace ttt_moshi {

void add_common(cxxopts::Options& o) {
  o.add_options()("config", "Kyutai config.json (default: the Moshi 7B settings)", cxxopts::value<std::string>())(
      "weights", "model.safetensors (default: seeded random weights)", cxxopts::value<std::string>())(
      "backend", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "dtype", "f32, bf16, fp8 or int8 (engine dtype; checkpoints are converted at load; fp8 / int8: bf16 with the "
      "transformer and head linear weights quantised per output row, fp8 e4m3 or int8)",
      cxxopts::value<std::string>()->default_value("f32"))(
      "kv-dtype", "storage of the temporal transformer's KV cache: same (the engine dtype), fp8 (e4m3) or int8, "
      "with one fp32 scale per key / value row (half the bytes of bf16: more conversations per GPU)",
      cxxopts::value<std::string>()->default_value("same"))(
      "init-seed", "seed of the random weights used when --weights is absent",
      cxxopts::value<uint64_t>()->default_value("0"))("h,help", "this help");
}

Common read_common(const cxxopts::ParseResult& r) {
  Common c;
  if (r.count("config")) c.config = r["config"].as<std::string>();
  if (r.count("weights")) c.weights = r["weights"].as<std::string>();
  c.backend = r["backend"].as<std::string>();
  c.dtype = r["dtype"].as<std::string>();
  c.init_seed = r["init-seed"].as<uint64_t>();
  if (c.backend != "cpu" && c.backend != "cuda") fail("--backend must be cpu or cuda, got '", c.backend, "'");
  if (c.dtype == "fp8") c.weight_format = WeightFormat::fp8_e4m3;
  else if (c.dtype == "int8") c.weight_format = WeightFormat::int8;
  else if (c.dtype != "f32" && c.dtype != "bf16") fail("--dtype must be f32, bf16, fp8 or int8, got '", c.dtype, "'");
  // `mimi` reads these common options without the LM's --kv-dtype.
  const std::string kv = r.count("kv-dtype") ? r["kv-dtype"].as<std::string>() : "same";
  if (kv == "fp8") c.kv_format = WeightFormat::fp8_e4m3;
  else if (kv == "int8") c.kv_format = WeightFormat::int8;
  else if (kv != "same") fail("--kv-dtype must be same, fp8 or int8, got '", kv, "'");
  return c;
}

std::optional<cxxopts::ParseResult> parse_options(cxxopts::Options& o, int argc, char** argv) {
  auto r = o.parse(argc, argv);
  if (r.count("help")) {
    std::printf("%s\n", o.help().c_str());
    return std::nullopt;
  }
  if (!r.unmatched().empty()) fail("unexpected argument '", r.unmatched()[0], "'");
  return r;
}

void apply_engine_options(LmConfig& cfg, const Common& c) { cfg.transformer.kv_format = c.kv_format; }

double kv_cache_bytes(const LmConfig& cfg, int64_t frames, WeightFormat kv, double dense_bytes) {
  const auto& t = cfg.transformer;
  const double elem = kv == WeightFormat::dense ? dense_bytes : 1.0 + 4.0 / double(t.head_dim());
  return double(t.num_layers) * 2 * double(frames) * double(cfg.dim / t.kv_repeat) * elem;
}

LmConfig load_config(const Common& c) {
  LmConfig cfg;
  if (c.config.empty()) {
    std::fprintf(stderr, "note: no --config, using the Moshi 7B settings\n");
    cfg = LmConfig::moshi_7b();
  } else {
    cfg = LmConfig::load(c.config);
  }
  apply_engine_options(cfg, c);
  return cfg;
}

LmConfig load_conversation_config(const Common& c, const char* verb) {
  if (!c.config.empty() || !c.weights.empty()) return load_config(c);
  std::fprintf(stderr, "note: no --config or --weights, %s the bundled small config with random weights\n", verb);
  LmConfig cfg = LmConfig::from_json(io::Json::parse(bundled::kSmallLm), "bundled small.json");
  apply_engine_options(cfg, c);
  return cfg;
}

io::WeightSource load_weights(const Common& c, const LmConfig& cfg) {
  io::WeightSource ws;
  if (c.weights.empty()) {
    ws.enable_random_init(c.init_seed);
  } else {
    ws.add_file(c.weights);
    ws.set_seed(c.init_seed);  // for new TTT weights the checkpoint lacks
  }
  ws.set_lora_scaling(cfg.lora_scaling);
  ws.set_weight_format(c.weight_format);
  return ws;
}

void report_unused(const io::WeightSource& ws) {
  auto unused = ws.unused();
  if (unused.empty()) return;
  std::fprintf(stderr, "warning: %zu checkpoint tensors were not used, e.g. '%s'\n", unused.size(), unused[0].c_str());
}

void report_loaded(const Common& c, const io::WeightSource& ws, const char* backend,
                   std::chrono::steady_clock::time_point t0) {
  report_unused(ws);
  if (!ws.random_init() && !ws.initialised().empty()) {
    std::fprintf(stderr, "warning: %zu weights are not in the checkpoint and were initialised (seed %llu):",
                 ws.initialised().size(), (unsigned long long)ws.seed());
    for (const auto& n : ws.initialised()) std::fprintf(stderr, " %s", n.c_str());
    std::fprintf(stderr, "\n");
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "loaded %s model (%s, %s) in %.2f s\n", ws.random_init() ? "random-weight" : "checkpoint",
               backend, c.dtype.c_str(), s);
}

mimi::MimiConfig load_mimi_config(const std::string& config, bool have_weights) {
  if (!config.empty()) return mimi::MimiConfig::load(config);
  if (have_weights) return mimi::MimiConfig::kyutai();
  std::fprintf(stderr, "note: no Mimi weights or config, using the bundled small Mimi with random weights\n");
  return mimi::MimiConfig::from_json(io::Json::parse(bundled::kSmallMimi), "bundled mimi_small.json");
}

io::WeightSource load_mimi_weights(const std::string& weights, uint64_t seed) {
  io::WeightSource ws;
  if (weights.empty()) ws.enable_random_init(seed);
  else ws.add_file(weights);
  return ws;
}

double peak_rss_mib() {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::stod(line.substr(6)) / 1024.0;
  return 0;
}

double rss_mib() {
  long pages = 0, resident = 0;
  std::ifstream f("/proc/self/statm");
  f >> pages >> resident;
  return double(resident) * double(sysconf(_SC_PAGESIZE)) / (1024.0 * 1024.0);
}

}  // namespace ttt_moshi
