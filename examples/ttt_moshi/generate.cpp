// ttt-moshi generate: streaming generation (LMGen), printing progress (and text with
// --tokenizer).
#include <algorithm>
#include <memory>

#include "commands.hpp"
#include "common.hpp"
#include "text.hpp"

namespace ttt_moshi {
namespace {

template <class T, class B>
struct Generate {
  static int run(const Common& c, const cxxopts::ParseResult& r) {
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

    const int64_t every =
        r.count("progress-every") ? r["progress-every"].as<int64_t>() : (steps <= 200 ? 1 : steps / 100);
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
          for (int64_t k = 0; k <= cfg.dep_q; ++k)
            tokens.set((b * (1 + cfg.dep_q) + k) * n_out + produced, (*out)(b, k));
        text.print((*out)(0, 0));
        ++produced;
      }
      if (every > 0 && ((s + 1) % every == 0 || s + 1 == steps)) {
        auto now = std::chrono::steady_clock::now();
        const double total = std::chrono::duration<double>(now - t_start).count();
        const double win = std::chrono::duration<double>(now - t_window).count();
        t_window = now;
        std::fprintf(stderr,
                     "%sframe %lld/%lld  %.1f frames/s (window %.1f)  step %.2f ms (mean %.2f)  rss %.0f MiB%s\n",
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
                   "long run: peak RSS %.1f MiB after 1000 frames, %.1f MiB after %lld (%+.2f%%); mean step %.3f ms "
                   "over frames 1000-2000, %.3f ms over the last 1000 (%+.1f%%)\n",
                   peak_at_1000, peak_end, (long long)steps, 100.0 * (peak_end - peak_at_1000) / peak_at_1000, a, b,
                   100.0 * (b - a) / a);
    }
    std::fprintf(stderr, "generated %lld frames x %lld items in %.2f s (%.1f frames/s, real time needs 12.5) -> %s\n",
                 (long long)steps, (long long)batch, total, double(steps) / total, r["out"].as<std::string>().c_str());
    return 0;
  }
};

}  // namespace

int cmd_generate(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi generate", "");
  add_common(o);
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
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<Generate>(read_common(*r), *r);
}

}  // namespace ttt_moshi
