// bench_ttt_layer: one TTT-Linear / TTT-MLP layer (ttt_forward: projections, RoPE, inner loop,
// post-norm, o_proj): prefill tokens/s and decode microseconds per token.
//
//   bench_ttt_layer [--backend cpu|cuda] [--kind linear|mlp] [--batch N] [--seq L]
//                   [--decode-steps N] [--runs N] [--cluster N]
//
// CUDA: Moshi's shape (C 4096, 32 heads of 128, K 16, bf16 projections), batch 1 and 8,
// timed with CUDA events after a warm-up; the median over runs (prefill) or over steps
// (decode). CPU: C 1024 (8 heads of 128), f32. Each row also times the inner loop alone
// (TttKernels<B>::inner on the same shapes) and prints:
//   anchor  ttt-lm-pytorch on an H100, bf16, batch 1, C 4096, 32 heads: TTT-Linear prefill
//           15.7k tokens/s at L 8192 and decode 2.65 ms/token; TTT-MLP 8.6k tokens/s and
//           3.50 ms/token (the same numbers on every row, for scale);
//   floor   decode: the bytes a step must move (the projection weights once, the fast
//           weights read and the running sums read and written) over the measured copy
//           bandwidth; prefill: the projections' FLOPs at the measured GEMM rate of the
//           backend (one [B L, C] x [C, C] product of this dtype).
// Decode inputs rotate among 16 buffers; the projection weights alone (134 MB in bf16 at C
// 4096) are larger than the H100's 50 MB L2, so every step reads them from memory.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cxxopts.hpp>
#include <string>
#include <type_traits>
#include <vector>

#include "ttt/core/arena.hpp"
#include "ttt/core/graph.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/ttt.hpp"
#if TTT_WITH_CUDA
#include "ttt/cuda.hpp"
#endif

using namespace ttt;
using namespace ttt::layers;
using Kind = TttConfig::Kind;

namespace {

struct Options {
  std::vector<int64_t> batches;
  int64_t seq = 8192;
  int decode_steps = 256;
  int runs = 0;  // 0: 10 on CUDA, 3 on the CPU
};

// Memory bandwidth in bytes per second (backend/timing.hpp measures it).
template <class B>
double memory_bandwidth() {
  return memory_bandwidth_gbs<B>() * 1e9;
}

// FLOP/s of one [rows, C] x [C, C]ᵀ linear in T (the projections' product).
template <class T, class B>
double gemm_rate(int64_t rows, int64_t C, int runs) {
  auto x = Tensor<T, B>::empty({rows, C}), w = Tensor<T, B>::empty({C, C}), y = Tensor<T, B>::empty({rows, C});
  ops::random_normal(x, 1.f, 1, 1);
  ops::random_normal(w, 0.02f, 1, 2);
  Timer<B> clock;
  ops::linear(y, x, w);
  std::vector<double> t;
  for (int r = 0; r < runs; ++r) t.push_back(clock.ms([&] { ops::linear(y, x, w); }));
  return 2.0 * double(rows) * double(C) * double(C) / (median(t) * 1e-3);
}

struct Anchor {
  double prefill_tok_s, decode_ms;
};
Anchor anchor(Kind k) { return k == Kind::mlp ? Anchor{8.6e3, 3.50} : Anchor{15.7e3, 2.65}; }

std::string rate(double tok_s) {
  char buf[32];
  if (tok_s >= 1e6) std::snprintf(buf, sizeof buf, "%.2fM tok/s", tok_s / 1e6);
  else if (tok_s >= 1e3) std::snprintf(buf, sizeof buf, "%.1fk tok/s", tok_s / 1e3);
  else std::snprintf(buf, sizeof buf, "%.1f tok/s", tok_s);
  return buf;
}
std::string flop_rate(double flops) {
  char buf[32];
  if (flops >= 1e12) std::snprintf(buf, sizeof buf, "%.0f TFLOP/s", flops / 1e12);
  else std::snprintf(buf, sizeof buf, "%.0f GFLOP/s", flops / 1e9);
  return buf;
}
std::string micros(double us) {
  char buf[32];
  if (us >= 1e3) std::snprintf(buf, sizeof buf, "%.2f ms/tok", us / 1e3);
  else std::snprintf(buf, sizeof buf, "%.1f us/tok", us);
  return buf;
}

// Inner-loop arguments of the layer's shape with random inputs (q, k, v ~ N(0, 1)).
template <class T, class B>
TttInnerArgs<B> inner_args(const TttParams<T, B>& p, int64_t batch, int64_t L) {
  const TttConfig& c = p.config;
  TttInnerArgs<B> a;
  a.kind = c.kind;
  a.mini_batch_size = c.mini_batch_size;
  a.eps = c.ttt_norm_eps;
  a.operands = std::is_same_v<T, float> ? TttOperands::fp32 : TttOperands::bf16;  // as the layer sets them
  const Shape s{batch, c.num_heads, L, c.head_dim};
  a.xq = Tensor<float, B>::empty(s), a.xk = Tensor<float, B>::empty(s), a.xv = Tensor<float, B>::empty(s);
  ops::random_normal(a.xq, 1.f, 3, 1);
  ops::random_normal(a.xk, 1.f, 3, 2);
  ops::random_normal(a.xv, 1.f, 3, 3);
  a.lr = Tensor<float, B>::empty({batch, c.num_heads, L});
  ops::fill(a.lr, 0.5 * c.base_lr / double(c.head_dim));
  a.tau = p.tau;
  a.ln_weight = p.ttt_norm_weight;
  a.ln_bias = p.ttt_norm_bias;
  a.out = Tensor<float, B>::empty(s);
  a.phase = Tensor<int32_t, B>::zeros({batch});
  return a;
}

template <class T, class B>
void bench(const Options& o, Kind kind, int64_t batch, int64_t C, int64_t heads, double bandwidth) {
  auto cfg = TttConfig::make(kind, C, heads, 16);
  io::WeightSource ws;
  ws.enable_random_init(1);
  const auto p = TttParams<T, B>::load(ws, "", cfg);
  const int runs = o.runs > 0 ? o.runs : (B::is_host ? 3 : 10);
  const int64_t L = o.seq, f = cfg.head_dim, F = cfg.inner_dim(), K = cfg.mini_batch_size;
  const char* dt = std::is_same_v<T, bf16> ? "bf16" : "f32";
  const Anchor an = anchor(kind);
  Timer<B> clock;
  auto state = TttState<B>::init(p, batch);

  // Prefill: one call of L tokens from the initial state.
  double prefill_ms = 0, prefill_inner_ms = 0, gemm = 0;
  if (L > 0) {
    auto x = Tensor<T, B>::empty({batch, L, C});
    ops::random_normal(x, 1.f, 2, 1);
    std::vector<double> t;
    for (int r = 0; r < runs + 1; ++r) {
      state.reset();
      Memory<B>::synchronize();
      const double ms = clock.ms([&] { ttt_forward(p, state, x); });
      if (r > 0) t.push_back(ms);  // the first run warms up
    }
    prefill_ms = median(t);
    t.clear();
    auto a = inner_args(p, batch, L);
    for (int r = 0; r < runs + 1; ++r) {
      state.reset();
      Memory<B>::synchronize();
      const double ms = clock.ms([&] { TttKernels<B>::inner(a, state.fast_weights()); });
      if (r > 0) t.push_back(ms);
    }
    prefill_inner_ms = median(t);
    gemm = gemm_rate<T, B>(batch * L, C, std::max(3, runs / 2));
  }

  // Decode: one call per token, inputs rotated among 16 buffers, the median step.
  double decode_us = 0, decode_mean_us = 0, decode_inner_us = 0, decode_graph_us = 0, proj_graph_us = 0;
  if (o.decode_steps > 0) {
    std::vector<Tensor<T, B>> xs;
    for (int i = 0; i < 16; ++i) {
      xs.push_back(Tensor<T, B>::empty({batch, 1, C}));
      ops::random_normal(xs.back(), 1.f, 4, uint64_t(i));
    }
    state.reset();
    const int warm = std::max(8, o.decode_steps / 8);
    std::vector<double> t;
    for (int s = 0; s < warm + o.decode_steps; ++s) {
      const double ms = clock.ms([&] { ttt_forward(p, state, xs[size_t(s % 16)]); });
      if (s >= warm) t.push_back(ms * 1e3);
    }
    decode_us = median(t);
    double sum = 0;
    for (double v : t) sum += v;
    decode_mean_us = sum / double(t.size());
    t.clear();
    auto a = inner_args(p, batch, 1);
    state.reset();
    for (int s = 0; s < warm + o.decode_steps; ++s) {
      ops::fill(a.phase, double(s % K));
      const double ms = clock.ms([&] { TttKernels<B>::inner(a, state.fast_weights()); });
      if (s >= warm) t.push_back(ms * 1e3);
    }
    decode_inner_us = median(t);
#if TTT_WITH_CUDA
    if constexpr (std::is_same_v<B, Cuda>) {
      // As the engine runs it: one step (ttt_forward_at, positions on the device) captured as a
      // CUDA graph and replayed. The engine makes a frame's positions once for all its layers,
      // so they are staged here like the input, into fixed buffers before each replay
      // (outside the timed region).
      state.reset();
      auto positions = Tensor<int64_t, Cuda>::zeros({batch, 1});
      auto xin = Tensor<T, Cuda>::empty({batch, 1, C}), yout = Tensor<T, Cuda>::empty({batch, 1, C});
      Arena<Cuda> arena(size_t(16) << 20);
      Workspace<Cuda> workspace;  // the session's persistent scratch, as the engine keeps it
      FrameGraph<Cuda> graph;
      auto work = [&] {
        ArenaScope<Cuda> scope(arena);
        (void)ttt_forward_at(p, state, xin, positions, {}, &workspace);  // the output lives in the arena
      };
      t.clear();
      for (int s = 0; s < warm + o.decode_steps; ++s) {
        xin.copy_from(xs[size_t(s % 16)]);
        ops::fill(positions, double(s));
        const double ms = clock.ms([&] { graph.run(work); });
        ttt_advance(state, 1, {});
        if (s >= warm) t.push_back(ms * 1e3);
      }
      decode_graph_us = median(t);
      // The step's two projections alone, as a graph: what the layer costs before any TTT work.
      FrameGraph<Cuda> pgraph;
      auto proj = Tensor<T, Cuda>::empty({batch, 1, p.qkvl_proj.size(0)});
      auto pwork = [&] {
        ops::linear(proj, xin, p.qkvl_proj);
        ops::linear(yout, xin, p.o_proj);
      };
      t.clear();
      for (int s = 0; s < warm + o.decode_steps; ++s) {
        xin.copy_from(xs[size_t(s % 16)]);
        const double ms = clock.ms([&] { pgraph.run(pwork); });
        if (s >= warm) t.push_back(ms * 1e3);
      }
      proj_graph_us = median(t);
    }
#endif
  }

  const char* be = B::name;
  std::string plan = "";
#if TTT_WITH_CUDA
  if constexpr (std::is_same_v<B, Cuda>) {
    const TttOperands op = std::is_same_v<T, float> ? TttOperands::fp32 : TttOperands::bf16;
    const auto pp = TttKernels<Cuda>::plan(kind, batch, heads, L, f, F, K, op);
    const auto pd = TttKernels<Cuda>::plan(kind, batch, heads, 1, f, F, K, op);
    auto what = [](const TttCudaPlan& x) {
      return x.decode ? "decode kernel" : x.tensor_cores ? "tensor cores" : x.device ? "fp32" : x.why_host;
    };
    char buf[240];
    std::snprintf(buf, sizeof buf,
                  "  [inner: prefill %s, cluster %d, %lld B smem, %d clusters resident; decode %s, cluster %d]",
                  what(pp), pp.cluster, (long long)pp.smem_bytes, pp.resident, what(pd), pd.cluster);
    plan = buf;
  }
#endif
  std::printf("\n%s %s %s batch %lld, C %lld, %lld heads of %lld, K %lld%s\n", be, cfg.kind_name(), dt,
              (long long)batch, (long long)C, (long long)heads, (long long)f, (long long)K, plan.c_str());
  if (L > 0) {
    const double tok_s = double(batch * L) / (prefill_ms * 1e-3);
    const double flops = 2.0 * double(batch * L) * double(C) * double(C) * 4.0;  // q, k, v, o
    const double floor_tok_s = double(batch * L) / (flops / gemm);
    std::printf("  prefill L %-6lld %14s  (%.2f ms; inner loop %.2f ms = %.0f%%)  anchor %s (%.3gx)  floor %s "
                "(4 projections, %.1f GFLOP at %s)\n",
                (long long)L, rate(tok_s).c_str(), prefill_ms, prefill_inner_ms, 100.0 * prefill_inner_ms / prefill_ms,
                rate(an.prefill_tok_s).c_str(), tok_s / an.prefill_tok_s, rate(floor_tok_s).c_str(), flops / 1e9,
                flop_rate(gemm).c_str());
  }
  if (o.decode_steps > 0) {
    const double proj = 4.0 * double(C) * double(C) * double(sizeof(T)) + double(heads * C) * 4.0;
    const double fast = double(batch * heads * f * F) * 4.0 * (kind == Kind::mlp ? 6.0 : 3.0);
    const double floor_us = (proj + fast) / bandwidth * 1e6;
    std::printf("  decode  %6d steps %11s  (mean %.1f us; inner loop %.1f us = %.0f%%)  anchor %s (%.3gx)  floor "
                "%.1f us (%.1f MB: projections %.1f MB + fast weights %.1f MB, at %.3f TB/s)\n",
                o.decode_steps, micros(decode_us).c_str(), decode_mean_us, decode_inner_us,
                100.0 * decode_inner_us / decode_us, micros(an.decode_ms * 1e3).c_str(),
                an.decode_ms * 1e3 / decode_us, floor_us, (proj + fast) / 1e6, proj / 1e6, fast / 1e6,
                bandwidth / 1e12);
    if (decode_graph_us > 0)
      std::printf("  decode  %6d steps %11s  as a replayed CUDA graph (the engine's frames)  anchor %s (%.3gx)  "
                  "floor %.1f us\n",
                  o.decode_steps, micros(decode_graph_us).c_str(), micros(an.decode_ms * 1e3).c_str(),
                  an.decode_ms * 1e3 / decode_graph_us, floor_us);
    if (proj_graph_us > 0)
      std::printf("  decode  %6d steps %11s  the two projections alone (q|k|v|lr and o), as a graph: TTT adds %.1f us\n",
                  o.decode_steps, micros(proj_graph_us).c_str(), decode_graph_us - proj_graph_us);
  }
}

template <class T, class B>
void run_backend(const Options& o, const std::vector<Kind>& kinds, const std::vector<int64_t>& batches, int64_t C,
                 int64_t heads) {
  const double bw = memory_bandwidth<B>();
  std::printf("%s: memory bandwidth %.3f TB/s (%s)\n", B::name, bw / 1e12,
              B::is_host ? "reads, all threads; C 1024 weights may sit in the last-level cache"
                         : "copies, read + write");
  for (Kind k : kinds)
    for (int64_t b : batches) bench<T, B>(o, k, b, C, heads, bw);
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options opts("bench_ttt_layer", "TTT-Linear / TTT-MLP layer: prefill tokens/s, decode us/token");
  opts.add_options()
    ("backend", "cpu | cuda (default: cuda when available, else cpu)", cxxopts::value<std::string>())
    ("kind", "linear | mlp (default: both)", cxxopts::value<std::string>())
    ("batch", "batch size (default: 1 and 8 on CUDA, 1 on the CPU)", cxxopts::value<int64_t>())
    ("seq", "prefill length (0: skip)", cxxopts::value<int64_t>()->default_value("8192"))
    ("decode-steps", "timed decode steps (0: skip)", cxxopts::value<int>()->default_value("256"))
    ("runs", "timed prefill runs (default 10 on CUDA, 3 on the CPU)", cxxopts::value<int>()->default_value("0"))
    ("cluster", "CUDA: CTAs per (batch, head) of the fp32 inner loop, 1/2/4/8 (default: by shape)",
     cxxopts::value<int>()->default_value("0"))
    ("tensor-cores", "CUDA: 1 = bf16-operand tensor-core inner loops where the shape allows, 0 = fp32 kernels",
     cxxopts::value<int>()->default_value("1"))
    ("decode-kernels", "CUDA: 1 = one-token calls on the decode kernels, 0 = the general kernels",
     cxxopts::value<int>()->default_value("1"))
    ("fused-step", "CUDA: 1 = a one-token TTT-Linear step as one kernel, 0 = prologue, inner, post_norm",
     cxxopts::value<int>()->default_value("1"))
    ("h,help", "print this help");
  try {
    const auto r = opts.parse(argc, argv);
    if (r.count("help")) {
      std::printf("%s\n", opts.help().c_str());
      return 0;
    }
    Options o;
    o.seq = r["seq"].as<int64_t>();
    o.decode_steps = r["decode-steps"].as<int>();
    o.runs = r["runs"].as<int>();
    TTT_CHECK(o.seq >= 0 && o.decode_steps >= 0, "--seq and --decode-steps must be >= 0");
    std::vector<Kind> kinds = {Kind::linear, Kind::mlp};
    if (r.count("kind")) {
      const auto k = r["kind"].as<std::string>();
      TTT_CHECK(k == "linear" || k == "mlp", "--kind must be linear or mlp, got '", k, "'");
      kinds = {k == "mlp" ? Kind::mlp : Kind::linear};
    }
    std::string backend = TTT_WITH_CUDA ? "cuda" : "cpu";
#if TTT_WITH_CUDA
    if (!cuda::device_available()) backend = "cpu";
#endif
    if (r.count("backend")) backend = r["backend"].as<std::string>();
    TTT_CHECK(backend == "cpu" || backend == "cuda", "--backend must be cpu or cuda, got '", backend, "'");
    std::vector<int64_t> batches;
    if (r.count("batch")) batches = {r["batch"].as<int64_t>()};
    TTT_CHECK(batches.empty() || batches[0] > 0, "--batch must be > 0");
    if (backend == "cuda") {
#if TTT_WITH_CUDA
      TTT_CHECK(cuda::device_available(), "--backend cuda: no CUDA device available");
      std::printf("bench_ttt_layer on %s\n", cuda::device_name().c_str());
      TttKernels<Cuda>::tuning().cluster = r["cluster"].as<int>();
      TttKernels<Cuda>::tuning().tensor_cores = r["tensor-cores"].as<int>() != 0;
      TttKernels<Cuda>::tuning().decode_kernel = r["decode-kernels"].as<int>() != 0;
      TttKernels<Cuda>::tuning().fused_step = r["fused-step"].as<int>() != 0;
      run_backend<bf16, Cuda>(o, kinds, batches.empty() ? std::vector<int64_t>{1, 8} : batches, 4096, 32);
#else
      fail("--backend cuda: this build has no CUDA backend");
#endif
    } else {
      std::printf("bench_ttt_layer on the CPU (%d threads)\n", cpu::num_threads());
      run_backend<float, Cpu>(o, kinds, batches.empty() ? std::vector<int64_t>{1} : batches, 1024, 8);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_ttt_layer: %s\n", e.what());
    return 1;
  }
}
