#pragma once
// What the ttt-moshi subcommands share: the common options, weight loading, memory probes,
// model loading and the backend/dtype dispatch. Non-templates live in common.cpp.
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cxxopts.hpp>
#include <optional>
#include <string>

#include "ttt/mimi/mimi.hpp"
#include "ttt/ttt.hpp"
#if TTT_WITH_CUDA
#include "ttt/cuda.hpp"
#endif

namespace ttt_moshi {

using namespace ttt;
using moshi::LmConfig;

// ---- options ---------------------------------------------------------------------------

struct Common {
  std::string config, weights, backend = "cpu", dtype = "f32";
  uint64_t init_seed = 0;
  // --dtype fp8 / int8: the bf16 engine with its big linear weights quantised at load.
  WeightFormat weight_format = WeightFormat::dense;
  // --kv-dtype fp8 / int8: the temporal transformer's KV cache quantised per row (load_config
  // sets it on the config; the depformer's 8-slot cache stays in the engine dtype).
  WeightFormat kv_format = WeightFormat::dense;
};

// --config, --weights, --backend, --dtype, --kv-dtype, --init-seed and -h/--help.
void add_common(cxxopts::Options& o);
// Reads (and checks) the options add_common added.
Common read_common(const cxxopts::ParseResult& r);
// Parses a subcommand's arguments (argv[0] is its name). With --help, prints the help and
// returns nothing; an argument no option takes is an error.
std::optional<cxxopts::ParseResult> parse_options(cxxopts::Options& o, int argc, char** argv);

// ---- model and weights -----------------------------------------------------------------

// --config, else the Moshi 7B settings (with a note); engine options applied.
LmConfig load_config(const Common& c);
// converse and serve: --config, else the Moshi 7B settings when --weights is given, else the
// bundled small config with random weights (a note says "<verb> the bundled small config").
LmConfig load_conversation_config(const Common& c, const char* verb);
// The options that are the engine's rather than the checkpoint's (--kv-dtype) into a config.
void apply_engine_options(LmConfig& cfg, const Common& c);
// Bytes of one conversation's temporal KV cache holding `frames` frames (keys and values of
// every layer) when stored as `kv`: `dense_bytes` per element, or one code per element plus
// an fp32 scale per row of head_dim (--kv-dtype).
double kv_cache_bytes(const LmConfig& cfg, int64_t frames, WeightFormat kv, double dense_bytes);
// --weights, else seeded random weights (--init-seed).
io::WeightSource load_weights(const Common& c, const LmConfig& cfg);
void report_unused(const io::WeightSource& ws);
// After loading: unused and initialised weights, and the "loaded ... in N s" line.
void report_loaded(const Common& c, const io::WeightSource& ws, const char* backend,
                   std::chrono::steady_clock::time_point t0);

template <class T, class B>
using Model = moshi::LmModel<T, B, moshi::DefaultPolicies>;

// ---- Mimi --------------------------------------------------------------------------------

// --mimi-config (moshi's _mimi_config layout) when given; else Kyutai's Mimi when weights are
// given (the release checkpoint), else the bundled small Mimi (examples/configs/mimi_small.json).
mimi::MimiConfig load_mimi_config(const std::string& config, bool have_weights);
// The Mimi checkpoint, else seeded random weights.
io::WeightSource load_mimi_weights(const std::string& weights, uint64_t seed);

template <class T, class B>
mimi::Mimi<T, B> build_mimi(const Common& c, const mimi::MimiConfig& cfg, io::WeightSource& ws) {
  auto t0 = std::chrono::steady_clock::now();
  auto m = mimi::Mimi<T, B>::load(cfg, ws);
  report_unused(ws);
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "loaded %s Mimi (%s, %s, %lld codebooks of %lld) in %.2f s\n",
               ws.random_init() ? "random-weight" : "checkpoint", B::name, c.dtype.c_str(), (long long)cfg.num_codebooks,
               (long long)cfg.quantizer.bins, s);
  return m;
}

template <class T, class B>
Model<T, B> build_model(const Common& c, const LmConfig& cfg, io::WeightSource& ws) {
  auto t0 = std::chrono::steady_clock::now();
  auto m = Model<T, B>::load(cfg, ws);
#if TTT_WITH_CUDA
  // Loading's temporaries (conversions, uploads) go back to the driver, not to our cache.
  if constexpr (!B::is_host) {
    Memory<B>::synchronize();
    cuda::CachingAllocator::get().release_cached();
  }
#endif
  report_loaded(c, ws, B::name, t0);
  return m;
}

// ---- memory probes ---------------------------------------------------------------------

// Peak resident set (VmHWM) in MiB.
double peak_rss_mib();
// Resident set now, in MiB.
double rss_mib();

template <class B>
double backend_mib() {
  return double(Memory<B>::bytes_in_use()) / (1024.0 * 1024.0);
}

// ---- backend / dtype dispatch ----------------------------------------------------------

// Runs Fn<T, B>::run(c, r) for the --backend and --dtype of c. Only the subcommand that
// calls it instantiates its Fn (for Cpu, and for Cuda in CUDA builds).
template <template <class, class> class Fn>
int dispatch(const Common& c, const cxxopts::ParseResult& r) {
  if (c.backend == "cpu") {
    if (c.dtype == "bf16" || c.weight_format != WeightFormat::dense) return Fn<bf16, Cpu>::run(c, r);
    return Fn<float, Cpu>::run(c, r);
  }
#if TTT_WITH_CUDA
  if (!cuda::device_available()) fail("--backend cuda: no CUDA device available");
  if (c.dtype == "bf16" || c.weight_format != WeightFormat::dense) return Fn<bf16, Cuda>::run(c, r);
  return Fn<float, Cuda>::run(c, r);
#else
  fail("--backend cuda: this build has no CUDA backend");
#endif
}

}  // namespace ttt_moshi
