#pragma once
// ttt-moshi bench --max-streams: the largest batch of conversations whose frame stays within a
// real-time budget (80 ms: one frame of Moshi's 12.5 Hz) with the full context, and that fits
// in memory. Included by bench.cpp only (it uses the model-loading helpers of common.hpp).
//
// Each tried batch gets a fresh session filled by LmGen::fill_as_after(context): every KV ring
// full, as at frame >= context of a real conversation (tests/test_ttt_moshi.cpp "[fill]" checks
// that the filled session has a stepped one's positions, counters and graph key), so a
// frame reads all `context` keys of every attention layer without stepping 3000 frames first.
// The batch doubles from 1 until a batch is too slow or does not fit, then bisects between the
// last good and the first bad batch. A batch that does not fit (an allocation fails: CUDA out
// of memory, std::bad_alloc, or on the CPU more state than the host's available memory) is
// reported as such, everything it allocated is released, and the search goes on.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "common.hpp"

namespace ttt_moshi {

// Bytes of every weight a frame reads: the layers (norms included, negligible) and the
// heads; embedding tables only give one row per token. With quantised linear weights
// (--dtype fp8 / int8) a parameter is one byte: exact for the linear weights (their per-row
// scales add 4 bytes per row, < 0.1%), a slight undercount for norms and TTT weights, which
// stay bf16 (< 0.01% of plain Moshi's parameters).
template <class M>
double frame_weight_bytes(const M& m, size_t elem, WeightFormat f) {
  double n = double(m.text_linear.numel()) + double(M::TemporalT::num_params(m.transformer)) +
             double(M::DepformerT::num_params(m.depformer));
  for (auto& w : m.depformer_in) n += double(w.numel());
  for (auto& w : m.linears) n += double(w.numel());
  return n * double(f == WeightFormat::dense ? elem : 1);
}

// Device memory in use in GiB (cudaMemGetInfo: every allocation on the GPU, the CUDA context
// included); on the CPU the resident set.
template <class B>
double memory_used_gib() {
#if TTT_WITH_CUDA
  if constexpr (!B::is_host) {
    size_t free_b = 0, total_b = 0;
    TTT_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    return double(total_b - free_b) / double(1ull << 30);
  }
#endif
  return rss_mib() / 1024.0;
}

// Blocks our allocator caches go back to the driver: each tried batch starts from the model
// alone, and its memory figure is its own.
template <class B>
void release_cached_memory() {
#if TTT_WITH_CUDA
  if constexpr (!B::is_host) {
    Memory<B>::synchronize();
    cuda::CachingAllocator::get().release_cached();
  }
#endif
}

// MemAvailable of /proc/meminfo in bytes (0: unknown).
inline double host_available_bytes() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  double kib = 0;
  std::string unit;
  while (f >> key >> kib >> unit)
    if (key == "MemAvailable:") return kib * 1024.0;
  return 0;
}

inline bool is_out_of_memory(const std::exception& e) {
  const std::string m = e.what();
  return m.find("out of memory") != std::string::npos || m.find("cudaErrorMemoryAllocation") != std::string::npos;
}

struct StreamsTry {
  int64_t batch = 0;
  bool fits = false;
  double p50 = 0, p99 = 0;  // ms per frame
  double used_gib = 0;      // memory in use after the timed frames
  double state_bytes = 0;   // the session's own allocation (KV rings, TTT states)
  std::string why;          // when it does not fit
};

// The frame times (ms, sorted) of `frames` steps after `warmup` untimed ones, on random user
// tokens; the timer is CUDA events on CUDA (backend/timing.hpp). Both bench modes use it.
template <class B, class Gen, class Session>
std::vector<double> time_frames(Gen& gen, Session& s, int64_t batch, int64_t card, int warmup, int frames) {
  auto user = Tensor<int64_t, Cpu>::zeros({batch, gen.num_user_codebooks()});
  uint64_t x = 7;
  Timer<B> timer;
  std::vector<double> ms;
  for (int i = 0; i < warmup + frames; ++i) {
    for (int64_t k = 0; k < user.numel(); ++k) user.data()[k] = int64_t(io::detail::splitmix64(x) % uint64_t(card));
    timer.start();
    gen.step(s, user);
    const double v = timer.stop_ms();
    if (i >= warmup) ms.push_back(v);
  }
  std::sort(ms.begin(), ms.end());
  return ms;
}

template <class T, class B, class M>
int max_streams(const Common& c, const cxxopts::ParseResult& r, const LmConfig& cfg, const M& model,
                const std::string& label) {
  const double limit = r["stream-limit-ms"].as<double>();
  const int64_t cap = r["max-batch-cap"].as<int64_t>();
  const int64_t context = r.count("context-frames") ? r["context-frames"].as<int64_t>() : cfg.transformer.context;
  // Fewer frames than a plain bench by default: a search times a dozen batches.
  const int frames = r.count("frames") ? r["frames"].as<int>() : 20;
  const int warmup = r.count("warmup") ? r["warmup"].as<int>() : 3;
  if (!(limit > 0)) fail("--stream-limit-ms must be positive, got ", limit);
  if (cap <= 0) fail("--max-batch-cap must be positive, got ", cap);
  if (context <= 0)
    fail("--max-streams: the temporal transformer has no finite context (", cfg.transformer.context,
         "); pass --context-frames N");
  if (frames <= 0 || warmup < 0) fail("--frames must be positive and --warmup >= 0");
  if (r.count("mimi")) fail("--max-streams times the LM alone: leave out --mimi");

  const double wbytes = frame_weight_bytes(model, sizeof(T), c.weight_format);
  release_cached_memory<B>();
  const double bw = memory_bandwidth_gbs<B>();
  release_cached_memory<B>();
  const double model_gib = memory_used_gib<B>();
  const moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
  const bool graphs = !r.count("no-graph");
  std::printf("max-streams: %s %s %s (KV %s), frame <= %.1f ms (median of %d frames after %d warm-up) with %lld "
              "frames of context; model %.2f GiB in use, %.0f GB/s measured\n",
              label.c_str(), B::name, c.dtype.c_str(),
              c.kv_format == WeightFormat::dense ? "as the engine" : std::string(weight_format_name(c.kv_format)).c_str(),
              limit, frames, warmup, (long long)context, model_gib, bw);
  std::fflush(stdout);

  double per_stream_state = 0;  // bytes, from the first batch that allocated its session
  auto floor_ms = [&](const StreamsTry& t) { return (wbytes + t.state_bytes) / (bw * 1e9) * 1e3; };
  auto run = [&](int64_t batch) {
    StreamsTry t;
    t.batch = batch;
    release_cached_memory<B>();
    if (B::is_host && per_stream_state > 0) {
      // The host overcommits: a batch beyond its memory would be killed, not refused.
      const double need = per_stream_state * double(batch), avail = host_available_bytes();
      if (avail > 0 && need > 0.9 * avail) {
        t.why = "needs ~" + std::to_string(int64_t(need / double(1ull << 20))) + " MiB of state, " +
                std::to_string(int64_t(avail / double(1ull << 20))) + " MiB available";
        return t;
      }
    }
    try {
      moshi::LmGen<T, B, moshi::DefaultPolicies> gen(model, opt);
      gen.set_graphs(graphs);
      const int64_t before = Memory<B>::bytes_in_use();
      auto s = gen.start(batch);
      gen.fill_as_after(s, context, 1234 + uint64_t(batch));
      Memory<B>::synchronize();
      t.state_bytes = double(Memory<B>::bytes_in_use() - before);
      if (per_stream_state == 0) per_stream_state = t.state_bytes / double(batch);
      const std::vector<double> ms = time_frames<B>(gen, s, batch, cfg.card, warmup, frames);
      t.p50 = median(ms);
      // Nearest rank: with fewer than 100 frames, the slowest one.
      t.p99 = ms[size_t(std::ceil(0.99 * double(ms.size()))) - 1];
      t.used_gib = memory_used_gib<B>();
      t.fits = true;
    } catch (const std::bad_alloc&) {
      t.why = "std::bad_alloc";
    } catch (const Error& e) {
      if (!is_out_of_memory(e)) throw;
      t.why = e.what();
    }
    release_cached_memory<B>();
    if (t.fits)
      std::printf("max-streams try: batch %lld: p50 %.3f ms, p99 %.3f ms per frame; memory %.2f GiB used (state %.2f "
                  "GB); floor %.3f ms; fits, %s\n",
                  (long long)batch, t.p50, t.p99, t.used_gib, t.state_bytes / 1e9, floor_ms(t),
                  t.p50 <= limit ? "real time" : "too slow");
    else
      std::printf("max-streams try: batch %lld: does not fit (%s)\n", (long long)batch, t.why.c_str());
    std::fflush(stdout);
    return t;
  };
  auto good = [&](const StreamsTry& t) { return t.fits && t.p50 <= limit; };

  // Grow (doubling, up to the cap), then bisect between the last good and the first bad batch.
  std::vector<StreamsTry> tried;
  std::optional<StreamsTry> best, first_bad;
  for (int64_t b = 1;; b = std::min(2 * b, cap)) {
    tried.push_back(run(b));
    if (!good(tried.back())) {
      first_bad = tried.back();
      break;
    }
    best = tried.back();
    if (b == cap) break;
  }
  while (first_bad && first_bad->batch - (best ? best->batch : 0) > 1) {
    const int64_t lo = best ? best->batch : 0, mid = lo + (first_bad->batch - lo) / 2;
    tried.push_back(run(mid));
    if (good(tried.back())) best = tried.back();
    else first_bad = tried.back();
  }

  const int64_t streams = best ? best->batch : 0;
  std::string next = "none (the cap, --max-batch-cap " + std::to_string(cap) + ")";
  std::string next_tag = "cap";
  if (first_bad) {
    next = "batch " + std::to_string(first_bad->batch) + " ";
    if (!first_bad->fits) {
      next += "does not fit";
      next_tag = "does-not-fit";
    } else {
      char buf[96];
      std::snprintf(buf, sizeof buf, "too slow (p50 %.3f ms)", first_bad->p50);
      next += buf;
      next_tag = "too-slow";
    }
  }
  if (best) {
    std::printf("max-streams: %lld streams (%s %s %s) stay <= %.1f ms per frame at %lld frames of context: p50 %.3f "
                "ms, p99 %.3f ms, %.2f GiB used; next: %s\n",
                (long long)streams, label.c_str(), B::name, c.dtype.c_str(), limit, (long long)context, best->p50,
                best->p99, best->used_gib, next.c_str());
    const double fl = floor_ms(*best);
    std::printf("floor at batch %lld: %.2f GB of weights + %.2f GB of state = %.2f GB / %.0f GB/s measured = %.3f "
                "ms/frame; ttt at %.2fx the floor\n",
                (long long)streams, wbytes / 1e9, best->state_bytes / 1e9, (wbytes + best->state_bytes) / 1e9, bw, fl,
                best->p50 / fl);
  } else {
    std::printf("max-streams: no batch stays <= %.1f ms per frame (%s %s %s); batch 1: %s\n", limit, label.c_str(),
                B::name, c.dtype.c_str(), tried.front().fits ? "too slow" : "does not fit");
  }
  if (cfg.dim == 4096 && cfg.transformer.num_layers == 32)  // the 7B's shapes: the anchor applies
    std::printf("anchor: PyTorch moshi 0.2.13, Moshi 7B bf16 on the H200 (bench/moshi_pytorch_streams.py, "
                "2026-12-06): 84 streams (batch 64 at 35.3 ms/frame, 109 GiB; batch 84 at 42.8 ms, 138 GiB; 85 does "
                "not fit; issue 13's 64 came from a search that stopped at its first out-of-memory)\n");
  // One line for scripts (tools/gpu_check.sh max-streams).
  const StreamsTry none;
  const StreamsTry& b = best ? *best : none;
  std::printf("max-streams result: label=%s backend=%s dtype=%s streams=%lld p50=%.3f p99=%.3f gib=%.2f limit=%.1f "
              "next=%lld next_state=%s tries=%zu\n",
              label.c_str(), B::name, c.dtype.c_str(), (long long)streams, b.p50, b.p99, b.used_gib, limit,
              (long long)(first_bad ? first_bad->batch : 0), next_tag.c_str(), tried.size());
  return 0;
}

}  // namespace ttt_moshi
