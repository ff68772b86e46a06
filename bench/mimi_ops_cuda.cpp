// bench_mimi_ops_cuda: Mimi's convolutions on the CUDA backend, layer by layer, at the shapes one
// streaming 80 ms frame (1920 samples at 24 kHz) gives SEANet (bench/mimi_ops.cpp's list): the
// median time per call from CUDA events after a warm-up, eager (15 samples of 20 back-to-back calls:
// bounded by the host's launch overhead for small layers) and as a CUDA graph of 20 calls (device
// time), the achieved GB/s (weights, input and output once) and GFLOP/s (2 per multiply-add) from
// the graph time; then the encoder / decoder layer sequences replayed as one CUDA graph each, the
// codebook search (8 levels, V = 2048, d = 256) and ELU.
//   bench_mimi_ops_cuda [batch = 1] [f32 | bf16 | f16] [tile=N] [splits=N] [once]
// tile=0..3 forces the implicit-GEMM kernel with that tile (128x128, 64x128, 32x128, 64x64),
// splits=N its reduction splits (Kernels<Cuda>::set_conv_gemm), to compare with the automatic plan;
// once: every layer called twice and nothing timed (for a profiler: ncu -k regex:conv ...).
#include <cuda_runtime.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "mimi_layers.hpp"
#include "ttt/cuda.hpp"

using namespace ttt;

namespace {

using mimi_bench::kDecoder;
using mimi_bench::kEncoder;
using mimi_bench::Layer;


void check(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
    std::exit(1);
  }
}

// Median seconds per call of f (device time between CUDA events on the thread's stream).
double median_seconds(const std::function<void()>& f, int reps = 20, int samples = 15) {
  cudaStream_t st = cuda::Context::get().stream();
  for (int i = 0; i < 5; ++i) f();
  cudaEvent_t a, b;
  check(cudaEventCreate(&a));
  check(cudaEventCreate(&b));
  std::vector<double> ts;
  for (int s = 0; s < samples; ++s) {
    check(cudaEventRecord(a, st));
    for (int i = 0; i < reps; ++i) f();
    check(cudaEventRecord(b, st));
    check(cudaEventSynchronize(b));
    float ms = 0;
    check(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(double(ms) * 1e-3 / reps);
  }
  check(cudaEventDestroy(a));
  check(cudaEventDestroy(b));
  std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
  return ts[ts.size() / 2];
}

// Median seconds per call of f replayed as a CUDA graph of `reps` calls (scratch from an arena,
// as a streaming frame allocates it): device time without the host's launch overhead.
double graph_seconds(const std::function<void()>& f, int reps = 20, bool* captured = nullptr) {
  Arena<Cuda> arena;
  FrameGraph<Cuda> graph;
  auto frame = [&] {
    ArenaScope<Cuda> scope(arena);
    graph.run([&] {
      for (int i = 0; i < reps; ++i) f();
    });
  };
  const double sec = median_seconds(frame, 1, 15) / reps;
  if (captured) *captured = graph.captured();
  return sec;
}

// Keeps the GPU busy for ~0.3 s so that its clocks have ramped up before anything is timed.
void warm_up() {
  auto a = Tensor<float, Cuda>::zeros({2048, 2048});
  auto c = Tensor<float, Cuda>::empty({2048, 2048});
  cudaEvent_t e;
  check(cudaEventCreate(&e));
  for (int i = 0; i < 300; ++i) ops::matmul(c, a, a);
  check(cudaEventRecord(e, cuda::Context::get().stream()));
  check(cudaEventSynchronize(e));
  check(cudaEventDestroy(e));
}

template <class T>
Tensor<T, Cuda> random(const Shape& s, std::mt19937& g, float scale = 1.f) {
  auto t = Tensor<T, Cpu>::empty(s);
  std::uniform_real_distribution<float> d(-scale, scale);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = from_f32<T>(d(g));
  return t.template to<Cuda>();
}

// One layer's operands on the device and its call.
template <class T>
struct LayerRun {
  Layer L;
  Tensor<T, Cuda> x, w, bias, y;
  double macs = 0, bytes = 0;
  void operator()() const {
    if (!L.transpose) ops::conv1d(y, x, w, bias, L.stride, 1, L.groups);
    else ops::conv_transpose1d(y, x, w, bias, L.stride, L.groups);
  }
};

template <class T>
LayerRun<T> make_layer(const Layer& L, int64_t B, std::mt19937& g) {
  LayerRun<T> r{L, {}, {}, {}, {}};
  const int64_t cg = L.cin / L.groups;
  if (L.bias) r.bias = random<T>({L.cout}, g);
  if (!L.transpose) {
    const int64_t tin = (L.t - 1) * L.stride + L.k;  // the padded input a streaming call sees
    r.x = random<T>({B, L.cin, tin}, g);
    r.w = random<T>({L.cout, cg, L.k}, g, 1.f / std::sqrt(float(cg * L.k)));
    r.y = Tensor<T, Cuda>::empty({B, L.cout, L.t});
    r.macs = double(B) * double(L.cout) * double(cg * L.k) * double(L.t);
  } else {
    r.x = random<T>({B, L.cin, L.t}, g);
    r.w = random<T>({L.cin, L.cout / L.groups, L.k}, g, 1.f / std::sqrt(float(cg)));
    r.y = Tensor<T, Cuda>::empty({B, L.cout, (L.t - 1) * L.stride + L.k});
    r.macs = double(B) * double(L.cin) * double(L.cout / L.groups * L.k) * double(L.t);
  }
  r.bytes = double(r.x.numel() + r.w.numel() + r.y.numel() + (L.bias ? L.cout : 0)) * sizeof(T);
  return r;
}

// `once`: every layer called twice and nothing timed (for a profiler: ncu -k regex:conv ...).
bool g_once = false;

template <class T>
void run(int64_t B) {
  std::mt19937 g(1);
  if (g_once) {
    auto each = [&](const auto& list) {
      for (const Layer& L : list) {
        const auto l = make_layer<T>(L, B, g);
        l();
        l();
      }
    };
    each(kEncoder);
    each(kDecoder);
    auto cb = random<T>({2048, 256}, g);
    auto x = random<T>({B, 256}, g);
    auto codes = ops::vq_nearest(x, cb);
    cuda::Context::get().synchronize();
    return;
  }
  for (int part = 0; part < 2; ++part) {
    const Layer* ls = part == 0 ? kEncoder : kDecoder;
    const size_t n = part == 0 ? std::size(kEncoder) : std::size(kDecoder);
    const std::string dt(dtype_name(dtype_v<T>));
    std::printf("%s, batch %ld, %s:\n", part == 0 ? "encoder" : "decoder", long(B), dt.c_str());
    std::vector<LayerRun<T>> layers;
    for (size_t i = 0; i < n; ++i) layers.push_back(make_layer<T>(ls[i], B, g));
    std::printf("  %-32s %9s %9s %10s %10s %11s\n", "layer (us per call)", "eager", "graph", "MMAC", "GB/s",
                "GFLOP/s");
    double total = 0, gtotal = 0, macs = 0;
    for (const auto& l : layers) {
      const double sec = median_seconds([&] { l(); });
      const double gsec = graph_seconds([&] { l(); });
      std::printf("  %-32s %9.1f %9.1f %10.2f %10.1f %11.1f\n", l.L.name, sec * 1e6, gsec * 1e6, l.macs / 1e6,
                  l.bytes / gsec / 1e9, 2 * l.macs / gsec / 1e9);
      total += sec;
      gtotal += gsec;
      macs += l.macs;
    }
    std::printf("  %-32s %9.1f %9.1f %10.2f %10s %11.1f\n", "sum", total * 1e6, gtotal * 1e6, macs / 1e6, "",
                2 * macs / gtotal / 1e9);
    // All layers as one CUDA graph.
    bool captured = false;
    const double fsec = graph_seconds(
        [&] {
          for (const auto& l : layers) l();
        },
        1, &captured);
    std::printf("  %-32s %9s %9.1f us  (%s graph replay: %.2f%% of an 80 ms frame)\n", "all layers, one graph", "",
                fsec * 1e6, captured ? "CUDA" : "no", fsec / 0.08 * 100);
  }
  // Codebook search: one row per item per 12.5 Hz frame, 8 levels.
  auto cb = random<T>({2048, 256}, g);
  auto x = random<T>({B, 256}, g);
  auto codes = Tensor<int64_t, Cuda>::empty({B});
  const double sec = graph_seconds([&] { ops::vq_nearest(codes, x, cb); });
  std::printf("vq_nearest N=%ld V=2048 d=256: %.1f us per level, %.1f us per frame (8 levels), %.1f GFLOP/s (graph)\n",
              long(B), sec * 1e6, 8 * sec * 1e6, 3.0 * double(B) * 2048 * 256 / sec / 1e9);
  auto e = random<T>({B, 64, 1920}, g);
  const double se = graph_seconds([&] { ops::unary(e, e, Unary::elu); });
  std::printf("elu [%ld, 64, 1920] in place: %.1f us, %.1f GB/s\n", long(B), se * 1e6,
              2.0 * double(e.numel()) * sizeof(T) / se / 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  int64_t B = 1;
  int tile = -1, splits = 0;
  std::string dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    if (std::isdigit(static_cast<unsigned char>(argv[i][0]))) B = std::atol(argv[i]);
    else if (std::strncmp(argv[i], "tile=", 5) == 0) tile = std::atoi(argv[i] + 5);
    else if (std::strncmp(argv[i], "splits=", 7) == 0) splits = std::atoi(argv[i] + 7);
    else if (std::strcmp(argv[i], "once") == 0) g_once = true;
    else dtype = argv[i];
  }
  std::printf("CUDA device: %s\n", cuda::device_name().c_str());
  if (tile >= 0 || splits > 0) {
    Kernels<Cuda>::set_conv_gemm(tile, splits);
    std::printf("forced: GEMM tile %d, splits %d\n", tile, splits);
  }
  if (!g_once) warm_up();
  if (dtype == "bf16") run<bf16>(B);
  else if (dtype == "f16") run<f16>(B);
  else run<float>(B);
  return 0;
}
