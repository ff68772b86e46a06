// bench_ttt_train: training speed of one TTT-Linear and one TTT-MLP layer on CUDA: the
// training forward (ttt_forward_train, keeping a tape) plus the backward (ttt_backward, every
// parameter's gradient and grad.x), tokens per second.
//
//   bench_ttt_train [--kind linear|mlp|both] [--seq L] [--batch N] [--runs N] [--warmup N]
//                   [--group G] [--dtype bf16|f32] [--threads 256|512|1024] [--carry-smem 0|1]
//                   [--state-smem 0|1] [--split 0|1] [--split-chunk N] [--split-overlap 0|1] [--inner-sweep]
//                   [--anchor-linear TOK_S] [--anchor-mlp TOK_S]
//
// Default: issue 15's shape, C 4096, 32 heads of 128, K 16, L 8192, batch 1, bf16 storage
// (the inner loop, its state and the gradients in fp32), checkpoint group 1 (TTT-Linear) and 4
// (TTT-MLP). CUDA events around each forward and backward after the warm-up; the median over
// runs. Each row prints:
//   floor   the projections' FLOPs (forward: x [Wq|Wk|Wv|w_lr]ᵀ and y' Woᵀ; backward: dx and dW
//           of both, four more products of the same size) at the H200's dense bf16 tensor-core
//           peak (989 TFLOP/s, the spec sheet's number, not measured), and the bytes the
//           step must move at least (x, dy, y, grad.x, the tape, the weights and their
//           gradients once) over the copy bandwidth measured in the same run; the larger.
//   anchor  ttt-lm-pytorch's forward+backward measured in the same run when --anchor-linear /
//           --anchor-mlp pass it (tools/gpu_check.sh bench-train runs bench/ttt_train_pytorch.py
//           first and passes its numbers), else the H200 figures issue 15 records (6.0k tokens/s
//           TTT-Linear, 2.9k TTT-MLP); and the goals (>= 300k, >= 145k).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cxxopts.hpp>
#include <random>
#include <string>
#include <vector>

#include "ttt/cuda.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_backward.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using namespace ttt::layers;
using Kind = TttConfig::Kind;

namespace {

struct Options {
  int64_t seq = 8192, batch = 1, group = 0;  // group 0: 1 linear, 4 mlp
  int runs = 10, warmup = 2;
  std::string dtype = "bf16";
  double anchor_linear = 0, anchor_mlp = 0;  // ttt-lm-pytorch tokens/s measured in the same run (0: none)
};

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n == 0 ? 0 : n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

// Milliseconds between two events recorded around f() on the thread's stream.
struct Events {
  cudaEvent_t a{}, b{};
  Events() {
    TTT_CUDA_CHECK(cudaEventCreate(&a));
    TTT_CUDA_CHECK(cudaEventCreate(&b));
  }
  ~Events() {
    cudaEventDestroy(a);
    cudaEventDestroy(b);
  }
  template <class F>
  double ms(F&& f) {
    const cudaStream_t s = cuda::Context::get().stream();
    TTT_CUDA_CHECK(cudaEventRecord(a, s));
    f();
    TTT_CUDA_CHECK(cudaEventRecord(b, s));
    TTT_CUDA_CHECK(cudaEventSynchronize(b));
    float t = 0;
    TTT_CUDA_CHECK(cudaEventElapsedTime(&t, a, b));
    return double(t);
  }
};

// Device-to-device copy bandwidth (bytes read + written), the best of five 1 GiB copies.
double copy_bandwidth_gbs() {
  const int64_t n = int64_t(256) << 20;  // floats
  const auto a = Tensor<float, Cuda>::empty({n}), b = Tensor<float, Cuda>::empty({n});
  ops::fill(a, 1.0);
  Events ev;
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const double ms = ev.ms([&] { b.copy_from(a); });
    best = std::max(best, 2.0 * double(n) * 4.0 / (ms * 1e-3) / 1e9);
  }
  return best;
}

Tensor<float, Cuda> random_normal(Shape s, uint32_t seed) {
  std::mt19937 g{seed};
  std::normal_distribution<float> nd(0.f, 1.f);
  auto t = Tensor<float, Cpu>::empty(s);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = nd(g);
  return t.to<Cuda>();
}

// The inner loop's backward alone (TttBackwardKernels<Cuda>::inner_backward) on random inputs of
// the layer's shapes: the share of the backward the sequential per-head chain takes.
// Random inputs of the inner loop's backward (made once: at L 8192 the checkpoints alone are
// 268M floats drawn on the host, ~10 s).
TttInnerBackwardArgs<Cuda> inner_backward_args(Kind kind, int64_t Bn, int64_t nh, int64_t L, int64_t f, int64_t F,
                                               int64_t K, int64_t group) {
  const bool mlp = kind == Kind::mlp;
  const int64_t Mc = ttt_num_checkpoints(L, K, group);
  auto small = [](Shape s, uint32_t seed, float scale) {
    auto t = random_normal(s, seed);
    ops::unary(t, t, Unary::scale, scale);
    return t;
  };
  TttInnerBackwardArgs<Cuda> a;
  a.kind = kind;
  a.mini_batch_size = K;
  a.group = group;
  a.xq = small({Bn, nh, L, f}, 3, 0.1f), a.xk = small({Bn, nh, L, f}, 4, 0.1f), a.xv = small({Bn, nh, L, f}, 5, 0.1f);
  a.lr = small({Bn, nh, L}, 6, 0.f);
  ops::fill(a.lr, 1.0 / double(f));
  a.tau = Tensor<float, Cuda>::empty({K});
  ops::fill(a.tau, 0.5);
  a.ln_weight = Tensor<float, Cuda>::empty({nh, f});
  ops::fill(a.ln_weight, 1.0);
  a.ln_bias = small({nh, f}, 7, 0.f);
  a.W1c = small({Mc * Bn, nh, f, F}, 8, 0.02f), a.b1c = small({Mc * Bn, nh, 1, F}, 9, 0.f);
  if (mlp) a.W2c = small({Mc * Bn, nh, F, f}, 10, 0.02f), a.b2c = small({Mc * Bn, nh, 1, f}, 11, 0.f);
  a.dout = small({Bn, nh, L, f}, 12, 1.f);
  a.dxq = Tensor<float, Cuda>::empty({Bn, nh, L, f}), a.dxk = Tensor<float, Cuda>::empty({Bn, nh, L, f});
  a.dxv = Tensor<float, Cuda>::empty({Bn, nh, L, f}), a.dlr = Tensor<float, Cuda>::empty({Bn, nh, L});
  a.dtau = Tensor<float, Cuda>::empty({Bn, nh, K});
  a.dln_weight = Tensor<float, Cuda>::empty({Bn, nh, f}), a.dln_bias = Tensor<float, Cuda>::empty({Bn, nh, f});
  a.dW1 = Tensor<float, Cuda>::empty({Bn, nh, f, F}), a.db1 = Tensor<float, Cuda>::empty({Bn, nh, 1, F});
  if (mlp) a.dW2 = Tensor<float, Cuda>::empty({Bn, nh, F, f}), a.db2 = Tensor<float, Cuda>::empty({Bn, nh, 1, f});
  return a;
}

// The inner loop's backward alone under the current tuning: median of runs after one warm-up.
double inner_backward_ms(const TttInnerBackwardArgs<Cuda>& a, int runs) {
  Events ev;
  std::vector<double> t;
  for (int r = 0; r < runs + 1; ++r) {
    const double ms = ev.ms([&] { TttBackwardKernels<Cuda>::inner_backward(a); });
    if (r > 0) t.push_back(ms);
  }
  return median(t);
}

template <class T>
void bench(Kind kind, const Options& o, double bw_gbs) {
  const int64_t C = 4096, nh = 32, K = 16, Bn = o.batch, L = o.seq;
  const auto cfg = TttConfig::make(kind, C, nh, K);
  io::WeightSource ws;  // every tensor initialised as ttt-lm-pytorch does
  const auto p = TttParams<T, Cuda>::load(ws, "", cfg, true);
  const auto x = ops::cast<T>(random_normal({Bn, L, C}, 1)), dy = ops::cast<T>(random_normal({Bn, L, C}, 2));
  TttTrainOptions opt;
  opt.checkpoint_group = o.group > 0 ? o.group : (kind == Kind::mlp ? 4 : 1);
  Events ev;
  std::vector<double> fwd, bwd;
  int64_t tape_bytes = 0;
  for (int r = 0; r < o.warmup + o.runs; ++r) {
    TttTape<T, Cuda> tape;
    TttGrads<Cuda> g;
    const double f_ms = ev.ms([&] { (void)ttt_forward_train(p, x, &tape, opt); });
    const double b_ms = ev.ms([&] { g = ttt_backward(p, tape, dy); });
    tape_bytes = tape.saved_bytes();
    if (r >= o.warmup) fwd.push_back(f_ms), bwd.push_back(b_ms);
  }
  const double f_ms = median(fwd), b_ms = median(bwd), t_ms = median([&] {
    std::vector<double> t;
    for (size_t i = 0; i < fwd.size(); ++i) t.push_back(fwd[i] + bwd[i]);
    return t;
  }());
  const double inner_ms = inner_backward_ms(
      inner_backward_args(kind, Bn, nh, L, cfg.head_dim, cfg.inner_dim(), K, opt.checkpoint_group), std::min(o.runs, 3));
  const double tokens = double(Bn * L), tok_s = tokens / (t_ms * 1e-3);
  // The floor: projections' FLOPs at the tensor-core peak; bytes at the measured bandwidth.
  const double P = double(3 * C + nh), gemm_flops = 3.0 * 2.0 * tokens * double(C) * (P + double(C));
  const double peak = 989e12;
  const double es = double(sizeof(T));
  const double params = (P + double(C)) * double(C) * es + (P + double(C)) * double(C) * 4.0;  // weights, grads
  const double bytes = tokens * double(C) * es * 4.0 + double(tape_bytes) + params;
  const double floor_ms = std::max(gemm_flops / peak, bytes / (bw_gbs * 1e9)) * 1e3;
  const double measured = kind == Kind::mlp ? o.anchor_mlp : o.anchor_linear;
  const double anchor = measured > 0 ? measured : kind == Kind::mlp ? 2.9e3 : 6.0e3;
  const double goal = kind == Kind::mlp ? 145e3 : 300e3;
  std::printf("%-6s %s C %lld nh %lld K %lld B %lld L %lld group %lld: forward %.2f ms + backward %.2f ms = %.2f ms "
              "(median of %d) -> %.1fk tokens/s | inner loop's backward alone %.2f ms | tape %.1f MiB\n",
              cfg.kind_name(), std::is_same_v<T, float> ? "f32" : "bf16", (long long)C, (long long)nh, (long long)K,
              (long long)Bn, (long long)L, (long long)opt.checkpoint_group, f_ms, b_ms, t_ms, o.runs, tok_s / 1e3,
              inner_ms, double(tape_bytes) / (1 << 20));
  std::printf("       floor %.2f ms (%.0fk tokens/s): projections %.2f TFLOP at %.0f TFLOP/s = %.2f ms, %.2f GB at "
              "%.0f GB/s = %.2f ms; we are at %.1fx the floor\n",
              floor_ms, tokens / (floor_ms * 1e-3) / 1e3, gemm_flops / 1e12, peak / 1e12, gemm_flops / peak * 1e3,
              bytes / 1e9, bw_gbs, bytes / (bw_gbs * 1e9) * 1e3, t_ms / floor_ms);
  if (measured > 0)
    std::printf("       anchor ttt-lm-pytorch forward+backward measured in this run (bench/ttt_train_pytorch.py): "
                "%.2fk tokens/s -> we are %.1fx; issue 15's goal >= %.0fk tokens/s (50x its H200 figure): %s\n",
                anchor / 1e3, tok_s / anchor, goal / 1e3, tok_s >= goal ? "met" : "MISSED");
  else
    std::printf("       anchor (issue 15, not measured here) ttt-lm-pytorch forward+backward on the H200: %.1fk tokens/s "
                "-> we are %.1fx; goal >= %.0fk tokens/s (50x): %s\n",
                anchor / 1e3, tok_s / anchor, goal / 1e3, tok_s >= goal ? "met" : "MISSED");
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options opts("bench_ttt_train", "forward + backward tokens/s of one TTT layer on CUDA");
  opts.add_options()
      ("kind", "linear | mlp | both", cxxopts::value<std::string>()->default_value("both"))
      ("seq", "tokens per sequence", cxxopts::value<int64_t>()->default_value("8192"))
      ("batch", "sequences", cxxopts::value<int64_t>()->default_value("1"))
      ("runs", "timed runs (median)", cxxopts::value<int>()->default_value("10"))
      ("warmup", "untimed runs first", cxxopts::value<int>()->default_value("2"))
      ("group", "checkpoint group (0: 1 for linear, 4 for mlp)", cxxopts::value<int64_t>()->default_value("0"))
      ("dtype", "bf16 | f32 (storage; the inner loop is f32)", cxxopts::value<std::string>()->default_value("bf16"))
      ("threads", "the inner backward's block size: 256 | 512 | 1024 (0: the library's per-kind default)",
       cxxopts::value<int>()->default_value("0"))
      ("carry-smem", "the inner backward's carry in shared memory where it fits: 0 | 1",
       cxxopts::value<int>()->default_value("0"))
      ("state-smem", "the inner backward's start state staged in shared memory where it fits: 0 | 1",
       cxxopts::value<int>()->default_value("0"))
      ("split", "TTT-Linear at group 1: the split inner backward (free + chain kernels): 0 | 1",
       cxxopts::value<int>()->default_value("1"))
      ("split-chunk", "mini-batches per chunk of the split path (0: by its memory budget)",
       cxxopts::value<int>()->default_value("0"))
      ("split-overlap", "the split path's free kernels on a side stream beside the chain: 0 | 1",
       cxxopts::value<int>()->default_value("1"))
      ("anchor-linear", "ttt-lm-pytorch TTT-Linear tokens/s measured in the same run (printed beside ours)",
       cxxopts::value<double>()->default_value("0"))
      ("anchor-mlp", "ttt-lm-pytorch TTT-MLP tokens/s measured in the same run",
       cxxopts::value<double>()->default_value("0"))
      ("inner-sweep", "first time the inner loop's backward alone for every block size and placement")
      ("h,help", "this help");
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each line out as it is made (runs under `timeout`)
  try {
    const auto r = opts.parse(argc, argv);
    if (r.count("help")) {
      std::printf("%s\n", opts.help().c_str());
      return 0;
    }
    Options o;
    o.seq = r["seq"].as<int64_t>();
    o.batch = r["batch"].as<int64_t>();
    o.runs = r["runs"].as<int>();
    o.warmup = r["warmup"].as<int>();
    o.group = r["group"].as<int64_t>();
    o.dtype = r["dtype"].as<std::string>();
    o.anchor_linear = r["anchor-linear"].as<double>();
    o.anchor_mlp = r["anchor-mlp"].as<double>();
    if (o.anchor_linear < 0 || o.anchor_mlp < 0) fail("--anchor-linear and --anchor-mlp must be >= 0");
    const std::string kind = r["kind"].as<std::string>();
    if (kind != "linear" && kind != "mlp" && kind != "both") fail("--kind must be linear, mlp or both, got '", kind, "'");
    if (o.dtype != "bf16" && o.dtype != "f32") fail("--dtype must be bf16 or f32, got '", o.dtype, "'");
    if (o.seq < 1 || o.batch < 1 || o.runs < 1 || o.warmup < 0 || o.group < 0)
      fail("--seq, --batch and --runs must be >= 1, --warmup and --group >= 0");
    const int threads = r["threads"].as<int>();
    if (threads != 0 && threads != 256 && threads != 512 && threads != 1024)
      fail("--threads must be 256, 512 or 1024, got ", threads);
    auto& tune = TttBackwardKernels<Cuda>::tuning();
    if (threads != 0) tune.threads = threads;
    tune.carry_in_smem = r["carry-smem"].as<int>() != 0;
    tune.state_in_smem = r["state-smem"].as<int>() != 0;
    tune.split = r["split"].as<int>() != 0;
    tune.split_chunk = r["split-chunk"].as<int>();
    tune.split_overlap = r["split-overlap"].as<int>() != 0;
    if (tune.split_chunk < 0) fail("--split-chunk must be >= 0, got ", tune.split_chunk);
    if (!cuda::device_available()) {
      std::printf("SKIPPED: no CUDA device\n");
      return 77;
    }
    const double bw = copy_bandwidth_gbs();
    std::printf("bench_ttt_train on %s: copy bandwidth %.0f GB/s\n", cuda::device_name().c_str(), bw);
    const auto wanted = [&](Kind k) { return kind == "both" || kind == (k == Kind::mlp ? "mlp" : "linear"); };
    if (r.count("inner-sweep")) {
      const TttBackwardCudaTuning keep = tune;
      for (const Kind k : {Kind::linear, Kind::mlp}) {
        if (!wanted(k)) continue;
        const auto cfg = TttConfig::make(k, 4096, 32, 16);
        const int64_t group = o.group > 0 ? o.group : (k == Kind::mlp ? 4 : 1);
        const auto args = inner_backward_args(k, o.batch, 32, o.seq, cfg.head_dim, cfg.inner_dim(), 16, group);
        // Placements: 0 all in global memory, 1 the carry in shared memory, 2 the staged start
        // state in shared memory (each only where it fits: TTT-Linear at f 128, not TTT-MLP).
        // Placements 0-2 on the one-kernel path; the split path (TTT-Linear, group 1, 256 / 512
        // threads): 3 its free kernels beside the chain on a side stream, 4 in order.
        for (const int place : {0, 1, 2, 3, 4})
          for (const int nt : {256, 512, 1024}) {
            if (place > 0 && k == Kind::mlp) continue;
            if (place >= 3 && (group != 1 || nt == 1024)) continue;
            tune.threads = nt, tune.carry_in_smem = place == 1, tune.state_in_smem = place == 2;
            tune.split = place >= 3, tune.split_overlap = place == 3;
            const double ms = inner_backward_ms(args, std::max(o.runs, 3));
            std::printf("inner backward %-6s L %lld group %lld: threads %4d, shared memory holds %s: %.2f ms\n",
                        cfg.kind_name(), (long long)o.seq, (long long)group, nt,
                        place == 0   ? "no state    "
                        : place == 1 ? "the carry   "
                        : place == 2 ? "start state"
                        : place == 3 ? "split: free kernels beside the chain"
                                     : "split: free and chain kernels in order",
                        ms);
          }
      }
      tune = keep;
    }
    std::printf("inner backward tuning: threads %s; in shared memory where they fit: carry %s, start state %s; "
                "TTT-Linear group 1 split into free + chain kernels: %s%s\n",
                tune.threads == 0 ? "per path (512 split, 256 linear, 1024 mlp)" : std::to_string(tune.threads).c_str(),
                tune.carry_in_smem ? "yes" : "no", tune.state_in_smem ? "yes" : "no", tune.split ? "yes" : "no",
                tune.split ? (tune.split_overlap ? " (overlapped)" : " (in order)") : "");
    for (const Kind k : {Kind::linear, Kind::mlp}) {
      if (!wanted(k)) continue;
      if (o.dtype == "bf16") bench<bf16>(k, o, bw);
      else bench<float>(k, o, bw);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_ttt_train: %s\n", e.what());
    return 1;
  }
}
