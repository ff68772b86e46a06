// ttt-moshi: the streaming Moshi engine from the command line.
//   forward   teacher-forced LMModel.forward over a codes file
//   generate  streaming generation (LMGen), printing progress (and text with --tokenizer)
//   info      the model's structure, parameter count, bytes and a checkpoint key check
//   bench     (CUDA) frame time on random weights made on the device
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <fstream>
#include <memory>
#include <string>

#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"
#if TTT_WITH_CUDA
#include "ttt/cuda.hpp"
#endif
#if TTT_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif

namespace {

using namespace ttt;
using moshi::LmConfig;

struct Common {
  std::string config, weights, backend = "cpu", dtype = "f32";
  uint64_t init_seed = 0;
};

void add_common(cxxopts::Options& o) {
  o.add_options()("config", "Kyutai config.json (default: the Moshi 7B settings)", cxxopts::value<std::string>())(
      "weights", "model.safetensors (default: seeded random weights)", cxxopts::value<std::string>())(
      "backend", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "dtype", "f32 or bf16 (engine dtype; checkpoints are converted at load)",
      cxxopts::value<std::string>()->default_value("f32"))(
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
  if (c.dtype != "f32" && c.dtype != "bf16") fail("--dtype must be f32 or bf16, got '", c.dtype, "'");
  return c;
}

LmConfig load_config(const Common& c) {
  if (c.config.empty()) {
    std::fprintf(stderr, "note: no --config, using the Moshi 7B settings\n");
    return LmConfig::moshi_7b();
  }
  return LmConfig::load(c.config);
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
  return ws;
}

void report_unused(const io::WeightSource& ws) {
  auto unused = ws.unused();
  if (unused.empty()) return;
  std::fprintf(stderr, "warning: %zu checkpoint tensors were not used, e.g. '%s'\n", unused.size(), unused[0].c_str());
}

// Peak resident set (VmHWM) in MiB.
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

template <class B>
double backend_mib() {
  return double(Memory<B>::bytes_in_use()) / (1024.0 * 1024.0);
}

template <class T, class B>
using Model = moshi::LmModel<T, B, moshi::DefaultPolicies>;

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
  report_unused(ws);
  if (!ws.random_init() && !ws.initialised().empty()) {
    std::fprintf(stderr, "warning: %zu weights are not in the checkpoint and were initialised (seed %llu):",
                 ws.initialised().size(), (unsigned long long)ws.seed());
    for (const auto& n : ws.initialised()) std::fprintf(stderr, " %s", n.c_str());
    std::fprintf(stderr, "\n");
  }
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "loaded %s model (%s, %s) in %.2f s\n", ws.random_init() ? "random-weight" : "checkpoint",
               B::name, c.dtype.c_str(), s);
  return m;
}

// ---- forward ---------------------------------------------------------------------------

template <class T, class B>
int run_forward(const Common& c, const cxxopts::ParseResult& r) {
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

// ---- generate --------------------------------------------------------------------------

struct TextPrinter {
#if TTT_HAVE_SENTENCEPIECE
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
#endif
  int64_t pad = 3, epad = 0;
  bool enabled = false;

  void open(const std::string& path, const LmConfig& cfg) {
#if TTT_HAVE_SENTENCEPIECE
    sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    auto st = sp->Load(path);
    if (!st.ok()) fail(path, ": cannot load SentencePiece model (", st.ToString(), ")");
    pad = cfg.existing_text_padding_id;
    epad = cfg.existing_text_end_padding_id;
    enabled = true;
#else
    (void)cfg;
    fail("--tokenizer: this build has no SentencePiece support (install libsentencepiece-dev and rebuild)");
#endif
  }
  // Prints the piece of `tok` (PAD and EPAD are silence, as in Kyutai's server).
  void print(int64_t tok) {
#if TTT_HAVE_SENTENCEPIECE
    if (!enabled || tok == pad || tok == epad || tok < 0 || tok >= sp->GetPieceSize()) return;
    std::string piece = sp->IdToPiece(int(tok));
    // U+2581 marks a word start.
    for (size_t p; (p = piece.find("\xe2\x96\x81")) != std::string::npos;) piece.replace(p, 3, " ");
    std::fputs(piece.c_str(), stdout);
    std::fflush(stdout);
#else
    (void)tok;
#endif
  }
};

template <class T, class B>
int run_generate(const Common& c, const cxxopts::ParseResult& r) {
  if (!r.count("out")) fail("generate needs --out OUT");
  const LmConfig cfg = load_config(c);
  auto ws = load_weights(c, cfg);
  auto model = build_model<T, B>(c, cfg, ws);
  moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
  if (r.count("greedy")) opt.use_sampling = false;
  if (r.count("temp")) opt.temp = r["temp"].as<float>();
  if (r.count("temp-text")) opt.temp_text = r["temp-text"].as<float>();
  if (r.count("top-k")) opt.top_k = r["top-k"].as<int>();
  if (r.count("top-k-text")) opt.top_k_text = r["top-k-text"].as<int>();
  opt.seed = r["seed"].as<uint64_t>();
  if (opt.top_k < 0 || opt.top_k_text < 0) fail("--top-k and --top-k-text must be >= 0");
  moshi::LmGen<T, B, moshi::DefaultPolicies> gen(model, opt);
  const int64_t nu = gen.num_user_codebooks();

  Tensor<int64_t, Cpu> user;
  int64_t batch = r["batch"].as<int64_t>(), steps = -1;
  if (r.count("steps")) {
    steps = r["steps"].as<int64_t>();
    if (steps <= 0) fail("--steps must be positive, got ", steps);
  }
  if (r.count("user-codes")) {
    const std::string in = r["user-codes"].as<std::string>();
    auto f = io::SafeTensors::open(in);
    if (!f.contains("user_codes")) fail(in, ": missing tensor 'user_codes'");
    user = f.load<int64_t>("user_codes").contiguous();
    if (user.rank() != 3 || user.size(1) < nu)
      fail(in, ": 'user_codes' must be [B, ", nu, ", S], got ", user.shape().str());
    if (r.count("batch") && batch != user.size(0))
      fail("--batch ", batch, " does not match the ", user.size(0), " items of ", in);
    batch = user.size(0);
    if (steps < 0) steps = user.size(2);
    if (steps > user.size(2)) fail("--steps ", steps, " exceeds the ", user.size(2), " frames of ", in);
  }
  if (steps < 0) steps = 100;
  if (batch <= 0) fail("--batch must be positive, got ", batch);

  TextPrinter text;
  if (r.count("tokenizer")) text.open(r["tokenizer"].as<std::string>(), cfg);

  const int64_t every = r.count("progress-every") ? r["progress-every"].as<int64_t>() : (steps <= 200 ? 1 : steps / 100);
  // --resume continues a conversation saved by --save-session (same model; the batch is the
  // saved one unless --batch or --user-codes say otherwise, which must then agree).
  typename moshi::LmGen<T, B, moshi::DefaultPolicies>::Session session;
  if (r.count("resume")) {
    session = gen.load(r["resume"].as<std::string>());
    if (!r.count("batch") && !user.defined()) batch = session.batch();
    if (session.batch() != batch)
      fail("--resume: ", r["resume"].as<std::string>(), " holds ", session.batch(), " streams, this run has ", batch);
  } else {
    session = gen.start(batch);
  }
  // Steps return tokens once the delays are filled (a resumed session may be past that).
  const int64_t n_out = std::max<int64_t>(0, steps - std::max<int64_t>(0, cfg.max_delay() - session.offset_cpu));
  // Tokens go to disk as they come: an hour of frames never accumulates in memory.
  io::SafeTensorsStreamWriter<int64_t> tokens(r["out"].as<std::string>(), "tokens", {batch, 1 + cfg.dep_q, n_out});
  auto frame = Tensor<int64_t, Cpu>::empty({batch, nu});
  int64_t produced = 0;
  auto t_start = std::chrono::steady_clock::now();
  auto t_window = t_start;
  double sum_ms = 0;
  // Long-run health: peak RSS after 1000 frames vs at the end, and the mean step time of
  // frames 1000-2000 vs the last 1000 (constant memory and time is TTT's promise).
  double peak_at_1000 = 0, ms_1000_2000 = 0, ms_last_1000 = 0;
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t b = 0; b < batch; ++b)
      for (int64_t i = 0; i < nu; ++i) frame(b, i) = user.defined() ? user(b, i, s) : -1;
    auto t0 = std::chrono::steady_clock::now();
    auto out = gen.step(session, frame);
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    sum_ms += ms;
    if (s + 1 == 1000) peak_at_1000 = peak_rss_mib();
    if (s >= 1000 && s < 2000) ms_1000_2000 += ms;
    if (s >= steps - 1000) ms_last_1000 += ms;
    if (out) {
      for (int64_t b = 0; b < batch; ++b)
        for (int64_t k = 0; k <= cfg.dep_q; ++k) tokens.set((b * (1 + cfg.dep_q) + k) * n_out + produced, (*out)(b, k));
      text.print((*out)(0, 0));
      ++produced;
    }
    if (every > 0 && ((s + 1) % every == 0 || s + 1 == steps)) {
      auto now = std::chrono::steady_clock::now();
      const double total = std::chrono::duration<double>(now - t_start).count();
      const double win = std::chrono::duration<double>(now - t_window).count();
      t_window = now;
      std::fprintf(stderr, "%sframe %lld/%lld  %.1f frames/s (window %.1f)  step %.2f ms (mean %.2f)  rss %.0f MiB%s\n",
                   text.enabled ? "\n" : "", (long long)(s + 1), (long long)steps, double(s + 1) / total,
                   double(std::min<int64_t>(every, s + 1)) / win, ms, sum_ms / double(s + 1), rss_mib(),
                   B::is_host ? "" : str("  device ", backend_mib<B>(), " MiB").c_str());
    }
  }
  if (text.enabled) std::fputc('\n', stdout);
  tokens.finish();
  if (r.count("save-session")) gen.save(session, r["save-session"].as<std::string>());
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  if (steps >= 3000) {
    const double peak_end = peak_rss_mib(), a = ms_1000_2000 / 1000, b = ms_last_1000 / 1000;
    std::fprintf(stderr,
                 "long run: peak RSS %.1f MiB after 1000 frames, %.1f MiB after %lld (%+.2f%%); mean step %.3f ms over "
                 "frames 1000-2000, %.3f ms over the last 1000 (%+.1f%%)\n",
                 peak_at_1000, peak_end, (long long)steps, 100.0 * (peak_end - peak_at_1000) / peak_at_1000, a, b,
                 100.0 * (b - a) / a);
  }
  std::fprintf(stderr, "generated %lld frames x %lld items in %.2f s (%.1f frames/s, real time needs 12.5) -> %s\n",
               (long long)steps, (long long)batch, total, double(steps) / total, r["out"].as<std::string>().c_str());
  return 0;
}

// ---- bench ---------------------------------------------------------------------------

// Wall time of a frame on the host backend; CUDA events on the stream for CUDA.
template <class B>
struct FrameTimer {
  std::chrono::steady_clock::time_point t0;
  void start() { t0 = std::chrono::steady_clock::now(); }
  double stop_ms() { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); }
};
#if TTT_WITH_CUDA
template <>
struct FrameTimer<Cuda> {
  cudaEvent_t a = nullptr, b = nullptr;
  FrameTimer() {
    TTT_CUDA_CHECK(cudaEventCreate(&a));
    TTT_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~FrameTimer() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  void start() { TTT_CUDA_CHECK(cudaEventRecord(a, cuda::Context::get().stream())); }
  double stop_ms() {
    TTT_CUDA_CHECK(cudaEventRecord(b, cuda::Context::get().stream()));
    TTT_CUDA_CHECK(cudaEventSynchronize(b));
    float ms = 0;
    TTT_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return ms;
  }
};
// Device-to-device copy bandwidth (bytes read + written), the floor's denominator.
double measured_bandwidth_gbs(Cuda) {
  const size_t n = size_t(1) << 30;
  auto a = Memory<Cuda>::allocate(n), b = Memory<Cuda>::allocate(n);
  Memory<Cuda>::zero(a.get(), n);
  FrameTimer<Cuda> t;
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    t.start();
    Memory<Cuda>::copy(b.get(), a.get(), n);
    best = std::min(best, t.stop_ms());
  }
  return 2.0 * double(n) / (best * 1e-3) / 1e9;
}
#endif
double measured_bandwidth_gbs(Cpu) {
  const size_t n = size_t(256) << 20;
  std::vector<float> buf(n, 1.f);
  double best = 0;
  for (int rep = 0; rep < 3; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static)
    for (size_t i = 0; i < n; i += 16) {
      float a = 0;
      for (size_t j = 0; j < 16; ++j) a += buf[i + j];
      s += a;
    }
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s < 0) std::printf("impossible\n");
    best = std::max(best, double(n * sizeof(float)) / dt / 1e9);
  }
  return best;
}

// Bytes of every weight a frame reads: the layers (norms included, negligible) and the
// heads; embedding tables only give one row per token.
template <class M>
double frame_weight_bytes(const M& m, size_t elem) {
  double n = double(m.text_linear.numel()) + double(M::TemporalT::num_params(m.transformer)) +
             double(M::DepformerT::num_params(m.depformer));
  for (auto& w : m.depformer_in) n += double(w.numel());
  for (auto& w : m.linears) n += double(w.numel());
  return n * double(elem);
}

template <class T, class B>
int run_bench(const Common& c0, const cxxopts::ParseResult& r) {
  Common c = c0;
  const std::string preset = r["preset"].as<std::string>();
  LmConfig cfg;
  if (!c.config.empty()) cfg = LmConfig::load(c.config);
  else if (preset == "7b") cfg = LmConfig::moshi_7b();
  else fail("--preset must be 7b (or pass --config), got '", preset, "'");
  io::WeightSource ws = load_weights(c, cfg);
  auto model = build_model<T, B>(c, cfg, ws);
  const int64_t batch = r["batch"].as<int64_t>();
  const int frames = r["frames"].as<int>(), warmup = r["warmup"].as<int>();
  if (batch <= 0 || frames <= 0 || warmup < 0) fail("--batch and --frames must be positive");
  moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
  moshi::LmGen<T, B, moshi::DefaultPolicies> gen(model, opt);
  if (r.count("no-graph")) gen.set_graphs(false);
  auto s = gen.start(batch);
  auto user = Tensor<int64_t, Cpu>::zeros({batch, gen.num_user_codebooks()});
  uint64_t x = 7;
  FrameTimer<B> timer;
  std::vector<double> ms;
  for (int i = 0; i < warmup + frames; ++i) {
    for (int64_t k = 0; k < user.numel(); ++k) user.data()[k] = int64_t(io::detail::splitmix64(x) % uint64_t(cfg.card));
    timer.start();
    gen.step(s, user);
    const double t = timer.stop_ms();
    if (i >= warmup) ms.push_back(t);
  }
  std::sort(ms.begin(), ms.end());
  const double med = ms[ms.size() / 2], p90 = ms[std::min(ms.size() - 1, size_t(0.9 * double(ms.size())))];
  const int64_t filled = std::min<int64_t>(warmup + frames, cfg.transformer.context);
  const double kv = double(batch) * double(cfg.transformer.num_layers) * 2 * double(filled) *
                    double(cfg.dim / cfg.transformer.kv_repeat) * double(sizeof(T));
  const double wbytes = frame_weight_bytes(model, sizeof(T));
  // Memory first: the bandwidth test below allocates its own buffers.
  double gib = 0;
#if TTT_WITH_CUDA
  if constexpr (!B::is_host) {
    size_t free_b = 0, total_b = 0;
    TTT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    gib = double(total_b - free_b) / double(1ull << 30);
    const auto& al = cuda::CachingAllocator::get();
    std::printf("device memory: %.2f GiB in use (ours: %.2f GiB live, %.2f GiB reserved)\n", gib,
                double(al.in_use()) / double(1ull << 30), double(al.reserved()) / double(1ull << 30));
  }
#endif
  if (B::is_host) gib = rss_mib() / 1024.0;
  const double bw = measured_bandwidth_gbs(B{});
  const double floor_ms = (wbytes + kv) / (bw * 1e9) * 1e3;
  const std::string label = c.config.empty() ? preset : c.config;
  std::printf("bench %s %s %s batch %lld: median %.3f ms/frame (p90 %.3f) over %d frames after %d warm-up, "
              "%.1f frames/s per stream\n",
              label.c_str(), B::name, c.dtype.c_str(), (long long)batch, med, p90, frames, warmup, 1e3 / med);
  std::printf("memory: %.2f GiB used; bytes per frame: weights %.2f GB + KV %.3f GB (%lld frames of context)\n", gib,
              wbytes / 1e9, kv / 1e9, (long long)filled);
  std::printf("floor: %.2f GB / %.0f GB/s measured = %.3f ms/frame; ttt at %.2fx the floor\n", (wbytes + kv) / 1e9, bw,
              floor_ms, med / floor_ms);
  if (r.count("anchor-ms"))
    std::printf("anchor: %.2f ms/frame; ttt is %.2fx faster\n", r["anchor-ms"].as<double>(),
                r["anchor-ms"].as<double>() / med);
  return 0;
}

// ---- info ------------------------------------------------------------------------------

int run_info(const Common& c) {
  const LmConfig cfg = load_config(c);
  io::WeightSource ws = load_weights(c, cfg);
  auto model = Model<float, Cpu>::load(cfg, ws);
  auto count = [](const auto& t) { return t.defined() ? t.numel() : int64_t(0); };
  using M = Model<float, Cpu>;
  int64_t n_temporal = M::TemporalT::num_params(model.transformer), n_dep = M::DepformerT::num_params(model.depformer);
  int64_t n_emb = 0, n_heads = 0;
  auto count_emb = [&](const auto& e) { return count(e.table) + count(e.low_rank) + count(e.norm_w) + count(e.norm_b); };
  for (auto& e : model.emb) n_emb += count_emb(e);
  n_emb += count_emb(model.text_emb) + count_emb(model.depformer_text_emb);
  for (auto& e : model.depformer_emb) n_emb += count_emb(e);
  n_heads += count(model.text_linear) + count(model.out_norm.weight) + count(model.out_norm.bias);
  for (auto& w : model.depformer_in) n_heads += w.numel();
  for (auto& w : model.linears) n_heads += w.numel();
  const int64_t total = n_temporal + n_dep + n_emb + n_heads;
  std::printf("model: %s  (%s)\n", cfg.model_type.c_str(), c.weights.empty() ? "random weights" : c.weights.c_str());
  std::printf("streams: text + %lld audio codebooks (%lld generated by the depformer), delays [", (long long)cfg.n_q,
              (long long)cfg.dep_q);
  for (size_t i = 0; i < cfg.delays.size(); ++i) std::printf("%s%lld", i ? ", " : "", (long long)cfg.delays[i]);
  std::printf("]\n");
  auto show = [](const char* name, const nn::TransformerConfig& t) {
    static const char* norms[] = {"layer_norm", "layer_norm_f32", "rms_norm", "rms_norm_f32"};
    static const char* pos[] = {"none", "sin", "rope", "sin_rope"};
    std::printf("%s: %lld layers, dim %lld, %lld heads (head_dim %lld, kv_repeat %lld), ffn %s %lld, norm %s, pos %s, "
                "context %lld%s\n",
                name, (long long)t.num_layers, (long long)t.d_model, (long long)t.num_heads, (long long)t.head_dim(),
                (long long)t.kv_repeat, t.gated ? "gated" : "plain", (long long)t.dim_feedforward[0],
                norms[int(t.norm)], pos[int(t.pos_emb)], (long long)t.context,
                t.weights_per_step ? str(", weights per step ", t.weights_per_step).c_str() : "");
  };
  show("temporal", cfg.transformer);
  show("depformer", cfg.depformer);
  std::printf("layers:");
  for (auto& l : model.transformer.layers) std::printf(" %s", Model<float, Cpu>::TemporalT::design_of(l));
  std::printf("\n");
  std::printf("parameters: %lld (%.3f B): temporal %lld, depformer %lld, embeddings %lld, heads %lld\n",
              (long long)total, double(total) / 1e9, (long long)n_temporal, (long long)n_dep, (long long)n_emb,
              (long long)n_heads);
  std::printf("bytes: %.2f GB in bf16, %.2f GB in f32; KV cache per item %.2f GB (bf16)\n", double(total) * 2 / 1e9,
              double(total) * 4 / 1e9,
              double(cfg.transformer.num_layers * 2 * cfg.transformer.context * cfg.dim / cfg.transformer.kv_repeat) * 2 / 1e9);
  if (!c.weights.empty()) {
    auto unused = ws.unused();
    std::printf("checkpoint: %zu tensors, %zu unused%s\n", ws.names().size(), unused.size(), unused.empty() ? " (all keys match)" : ":");
    for (auto& u : unused) std::printf("  unused: %s\n", u.c_str());
  }
  return 0;
}

template <template <class, class> class Fn>
int dispatch(const Common& c, const cxxopts::ParseResult& r) {
  if (c.backend == "cpu") {
    if (c.dtype == "bf16") return Fn<bf16, Cpu>::run(c, r);
    return Fn<float, Cpu>::run(c, r);
  }
#if TTT_WITH_CUDA
  if (!cuda::device_available()) fail("--backend cuda: no CUDA device available");
  if (c.dtype == "bf16") return Fn<bf16, Cuda>::run(c, r);
  return Fn<float, Cuda>::run(c, r);
#else
  fail("--backend cuda: this build has no CUDA backend");
#endif
}
template <class T, class B>
struct Forward {
  static int run(const Common& c, const cxxopts::ParseResult& r) { return run_forward<T, B>(c, r); }
};
template <class T, class B>
struct Generate {
  static int run(const Common& c, const cxxopts::ParseResult& r) { return run_generate<T, B>(c, r); }
};
template <class T, class B>
struct Bench {
  static int run(const Common& c, const cxxopts::ParseResult& r) { return run_bench<T, B>(c, r); }
};

int usage() {
  std::fprintf(stderr,
               "usage: ttt-moshi <command> [options]\n"
               "  forward   --config C --weights W --codes IN --out OUT [--backend cpu|cuda] [--dtype f32|bf16]\n"
               "  generate  [--config C] [--weights W] [--user-codes IN] [--steps N] [--batch B] [--greedy] [--seed S]\n"
               "            [--temp X] [--temp-text X] [--top-k K] [--top-k-text K] [--tokenizer SPM]\n"
               "            [--save-session F] [--resume F] --out OUT\n"
               "  info      [--config C] [--weights W]\n"
               "  bench     [--preset 7b | --config C] [--batch N] [--frames N] [--dtype bf16] [--backend cuda]\n"
               "Run `ttt-moshi <command> --help` for the options of a command.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  try {
    cxxopts::Options o("ttt-moshi " + cmd, "");
    add_common(o);
    if (cmd == "forward") {
      o.add_options()("codes", "safetensors with codes int64 [B, K, T]", cxxopts::value<std::string>())(
          "out", "output safetensors", cxxopts::value<std::string>());
    } else if (cmd == "generate") {
      o.add_options()("user-codes", "safetensors with user_codes int64 [B, n_q - dep_q, S]", cxxopts::value<std::string>())(
          "steps", "frames to run (default: S, or 100)", cxxopts::value<int64_t>())(
          "batch", "batch size without --user-codes", cxxopts::value<int64_t>()->default_value("1"))(
          "greedy", "argmax instead of sampling")("seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("0"))(
          "temp", "audio temperature", cxxopts::value<float>())("temp-text", "text temperature", cxxopts::value<float>())(
          "top-k", "audio top-k", cxxopts::value<int>())("top-k-text", "text top-k", cxxopts::value<int>())(
          "tokenizer", "SentencePiece model: print the text stream live", cxxopts::value<std::string>())(
          "progress-every", "progress line every N frames", cxxopts::value<int64_t>())(
          "save-session", "save the streaming session here at the end", cxxopts::value<std::string>())(
          "resume", "continue the session saved in this file (--save-session)", cxxopts::value<std::string>())(
          "out", "output safetensors (tokens)", cxxopts::value<std::string>());
    } else if (cmd == "bench") {
      o.add_options()("preset", "model preset: 7b", cxxopts::value<std::string>()->default_value("7b"))(
          "batch", "streams", cxxopts::value<int64_t>()->default_value("1"))(
          "frames", "timed frames", cxxopts::value<int>()->default_value("100"))(
          "warmup", "untimed frames first (graph capture happens here)", cxxopts::value<int>()->default_value("10"))(
          "no-graph", "run frames eagerly (no CUDA graph)")(
          "anchor-ms", "reference ms/frame to compare with", cxxopts::value<double>());
    } else if (cmd == "info") {
    } else if (cmd == "-h" || cmd == "--help" || cmd == "help") {
      usage();
      return 0;
    } else {
      std::fprintf(stderr, "ttt-moshi: unknown command '%s'\n", cmd.c_str());
      return usage();
    }
    auto r = o.parse(argc - 1, argv + 1);
    if (r.count("help")) {
      std::printf("%s\n", o.help().c_str());
      return 0;
    }
    if (!r.unmatched().empty()) fail("unexpected argument '", r.unmatched()[0], "'");
    Common c = read_common(r);
    if (cmd == "forward") return dispatch<Forward>(c, r);
    if (cmd == "generate") return dispatch<Generate>(c, r);
    if (cmd == "bench") return dispatch<Bench>(c, r);
    return run_info(c);
  } catch (const ttt::Error& e) {
    std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  } catch (const cxxopts::exceptions::exception& e) {
    std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
    return 1;
  }
}
