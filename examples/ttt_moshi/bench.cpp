// ttt-moshi bench: frame time (CUDA events on CUDA) against the memory-bandwidth floor, on
// random weights made on the device; with --max-streams, the most conversations that stay real
// time at full context (bench_streams.hpp).
#include <algorithm>
#include <chrono>
#include <optional>
#include <type_traits>
#include <vector>

#include "bench_streams.hpp"
#include "commands.hpp"
#include "common.hpp"
#include "ttt/core/worker.hpp"

namespace ttt_moshi {
namespace {

template <class T, class B>
struct Bench {
  static int run(const Common& c0, const cxxopts::ParseResult& r) {
    Common c = c0;
    const std::string preset = r["preset"].as<std::string>();
    LmConfig cfg;
    if (!c.config.empty()) cfg = LmConfig::load(c.config);
    else if (preset == "7b") cfg = LmConfig::moshi_7b();
    else fail("--preset must be 7b (or pass --config), got '", preset, "'");
    apply_engine_options(cfg, c);  // --kv-dtype
    io::WeightSource ws = load_weights(c, cfg);
    auto model = build_model<T, B>(c, cfg, ws);
    if (r.count("max-streams")) return max_streams<T, B>(c, r, cfg, model, c.config.empty() ? preset : c.config);
    const int64_t batch = r["batch"].as<int64_t>();
    const int frames = r["frames"].as<int>(), warmup = r["warmup"].as<int>();
    if (batch <= 0 || frames <= 0 || warmup < 0) fail("--batch and --frames must be positive");
    moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
    moshi::LmGen<T, B, moshi::DefaultPolicies> gen(model, opt);
    if (r.count("no-graph")) gen.set_graphs(false);
    auto s = gen.start(batch);
    // --context-frames N: start as after N frames (every KV ring holding N positions of random
    // keys and values, as --max-streams fills them), so a short run times full-context frames.
    const int64_t ctx0 = r.count("context-frames") ? r["context-frames"].as<int64_t>() : 0;
    if (ctx0 < 0) fail("--context-frames must be >= 0, got ", ctx0);
    if (ctx0 > 0) gen.fill_as_after(s, ctx0, 1234 + uint64_t(batch));
    const std::vector<double> ms = time_frames<B>(gen, s, batch, cfg.card, warmup, frames);
    const double med = ms[ms.size() / 2], p90 = ms[std::min(ms.size() - 1, size_t(0.9 * double(ms.size())))];
    const int64_t filled = std::min<int64_t>(ctx0 + warmup + frames, cfg.transformer.context);
    const double kv = double(batch) * kv_cache_bytes(cfg, filled, cfg.transformer.kv_format, double(sizeof(T)));
    const double wbytes = frame_weight_bytes(model, sizeof(T), c.weight_format);
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
    const double bw = memory_bandwidth_gbs<B>();
    const double floor_ms = (wbytes + kv) / (bw * 1e9) * 1e3;
    const std::string label = c.config.empty() ? preset : c.config;
    std::printf("bench %s %s %s batch %lld: median %.3f ms/frame (p90 %.3f) over %d frames after %d warm-up, "
                "%.1f frames/s per stream\n",
                label.c_str(), B::name, c.dtype.c_str(), (long long)batch, med, p90, frames, warmup, 1e3 / med);
    std::printf("memory: %.2f GiB used; bytes per frame: weights %.2f GB + KV %.3f GB (%lld frames of context, KV %s)\n",
                gib, wbytes / 1e9, kv / 1e9, (long long)filled,
                cfg.transformer.kv_format == WeightFormat::dense
                    ? c.dtype == "f32" ? "f32" : "bf16"
                    : std::string(weight_format_name(cfg.transformer.kv_format)).c_str());
    std::printf("floor: %.2f GB / %.0f GB/s measured = %.3f ms/frame; ttt at %.2fx the floor\n", (wbytes + kv) / 1e9,
                bw, floor_ms, med / floor_ms);
    if (r.count("anchor-ms"))
      std::printf("anchor: %.2f ms/frame; ttt is %.2fx faster\n", r["anchor-ms"].as<double>(),
                  r["anchor-ms"].as<double>() / med);
    if (r.count("mimi")) {
      // A whole conversation frame: Mimi encodes the user's 80 ms, the LM steps, Mimi decodes
      // Moshi's audio tokens (Kyutai's Mimi config, random weights), against the LM alone.
      auto user = Tensor<int64_t, Cpu>::zeros({batch, gen.num_user_codebooks()});
      uint64_t x = 7;
      Timer<B> timer;
      const auto mcfg = load_mimi_config(r.count("mimi-config") ? r["mimi-config"].as<std::string>() : "", true);
      auto mws = load_mimi_weights("", c.init_seed + 1);
      const auto mimi = build_mimi<T, B>(c, mcfg, mws);
      if (mimi.num_codebooks() != gen.num_user_codebooks() || mimi.num_codebooks() != cfg.dep_q)
        fail("--mimi: Mimi gives ", mimi.num_codebooks(), " codebooks, the LM takes ", gen.num_user_codebooks());
      auto enc = mimi.start(batch), dec = mimi.start(batch);
      auto pcm = Tensor<float, Cpu>::empty({batch, mimi.frame_size()});
      auto audio = Tensor<int64_t, Cpu>::zeros({batch, mimi.num_codebooks(), 1});
      std::vector<double> conv;
      for (int i = 0; i < warmup + frames; ++i) {
        for (int64_t k = 0; k < pcm.numel(); ++k)
          pcm.data()[k] = 0.1f * (float(io::detail::splitmix64(x) % 2001) / 1000.f - 1.f);
        timer.start();
        const auto codes = mimi.encode_step(enc, pcm);
        for (int64_t b = 0; b < batch; ++b)
          for (int64_t k = 0; k < user.size(1); ++k) user(b, k) = codes(b, k, 0);
        const auto out = gen.step(s, user);
        if (out)
          for (int64_t b = 0; b < batch; ++b)
            for (int64_t k = 0; k < mimi.num_codebooks(); ++k) audio(b, k, 0) = (*out)(b, 1 + k);
        (void)mimi.decode_step(dec, audio);
        const double t = timer.stop_ms();
        if (i >= warmup) conv.push_back(t);
      }
      std::sort(conv.begin(), conv.end());
      const double cm = conv[conv.size() / 2];
      std::printf("conversation frame (Mimi encode + LM + Mimi decode): median %.3f ms, %.3fx the LM's %.3f ms\n", cm,
                  cm / med, med);
      if constexpr (!B::is_host) {
        // Pipelined, as a server runs it: the reply of frame t-1 decodes on a second host
        // thread (its own stream; its Mimi session and graphs made there) while this thread
        // encodes frame t and steps the LM. Host wall time per frame, both finished.
        Worker worker;
        std::optional<typename std::decay_t<decltype(mimi)>::Session> pdec;
        worker.run([&] { pdec = mimi.start(batch); });
        auto penc = mimi.start(batch);
        auto reply = Tensor<int64_t, Cpu>::zeros({batch, mimi.num_codebooks(), 1});
        std::vector<double> pipe;
        for (int i = 0; i < warmup + frames; ++i) {
          for (int64_t k = 0; k < pcm.numel(); ++k)
            pcm.data()[k] = 0.1f * (float(io::detail::splitmix64(x) % 2001) / 1000.f - 1.f);
          const auto t0 = std::chrono::steady_clock::now();
          worker.post([&] { (void)mimi.decode_step(*pdec, reply); });
          const auto codes = mimi.encode_step(penc, pcm);
          for (int64_t b = 0; b < batch; ++b)
            for (int64_t k = 0; k < user.size(1); ++k) user(b, k) = codes(b, k, 0);
          const auto out = gen.step(s, user);
          worker.wait();
          if (out)
            for (int64_t b = 0; b < batch; ++b)
              for (int64_t k = 0; k < mimi.num_codebooks(); ++k) reply(b, k, 0) = (*out)(b, 1 + k);
          const double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
          if (i >= warmup) pipe.push_back(t);
        }
        worker.run([&] { pdec.reset(); });
        std::sort(pipe.begin(), pipe.end());
        const double pm = pipe[pipe.size() / 2];
        std::printf("pipelined conversation frame (decode of frame t-1 on a second stream): median %.3f ms, %.3fx the "
                    "LM's\n",
                    pm, pm / med);
      }
    }
    return 0;
  }
};

}  // namespace

int cmd_bench(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi bench", "");
  add_common(o);
  o.add_options()("preset", "model preset: 7b", cxxopts::value<std::string>()->default_value("7b"))(
      "batch", "streams", cxxopts::value<int64_t>()->default_value("1"))(
      "frames", "timed frames", cxxopts::value<int>()->default_value("100"))(
      "warmup", "untimed frames first (graph capture happens here)", cxxopts::value<int>()->default_value("10"))(
      "no-graph", "run frames eagerly (no CUDA graph)")(
      "anchor-ms", "reference ms/frame to compare with", cxxopts::value<double>())(
      "mimi", "also time whole conversation frames: Mimi encode + LM + Mimi decode")(
      "mimi-config", "Mimi config for --mimi (default: Kyutai's Mimi)", cxxopts::value<std::string>())(
      "max-streams", "find the largest batch whose frame stays <= --stream-limit-ms with every KV ring full (the "
      "config's context) and that fits in memory: batches double, then bisect (20 timed frames and 3 warm-up each "
      "unless --frames / --warmup)")(
      "stream-limit-ms", "--max-streams: the real-time budget per frame (median)",
      cxxopts::value<double>()->default_value("80"))(
      "max-batch-cap", "--max-streams: the largest batch tried", cxxopts::value<int64_t>()->default_value("4096"))(
      "context-frames", "frames of context to fill before timing (--max-streams: default the config's context; "
      "otherwise 0)",
      cxxopts::value<int64_t>());
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<Bench>(read_common(*r), *r);
}

}  // namespace ttt_moshi
