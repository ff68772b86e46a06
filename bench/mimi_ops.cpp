// bench_mimi_ops: Mimi's convolutions on the CPU backend, layer by layer, at the shapes one
// streaming 80 ms frame (1920 samples at 24 kHz) gives SEANet: the median time per call and
// the achieved GFLOP/s (2 flops per multiply-add), then the encoder / decoder totals per
// frame and the codebook search (8 levels, V = 2048, d = 256).
//   bench_mimi_ops [batch = 1] [f32 | bf16 | f16]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "mimi_layers.hpp"
#include "ttt/core.hpp"

using namespace ttt;

namespace {

using mimi_bench::kDecoder;
using mimi_bench::kEncoder;
using mimi_bench::Layer;


template <class F>
double median_seconds(F&& f) {
  for (int i = 0; i < 3; ++i) f();
  std::vector<double> ts;
  const auto start = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); };
  while (ts.size() < 15 || (ts.size() < 400 && elapsed() < 0.3)) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    ts.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::nth_element(ts.begin(), ts.begin() + ts.size() / 2, ts.end());
  return ts[ts.size() / 2];
}

template <class T>
Tensor<T, Cpu> random(const Shape& s, std::mt19937& g) {
  auto t = Tensor<T, Cpu>::empty(s);
  std::uniform_real_distribution<float> d(-1.f, 1.f);
  for (int64_t i = 0; i < t.numel(); ++i) t.data()[i] = from_f32<T>(d(g));
  return t;
}

// Times one layer at batch B: the median seconds; adds its multiply-adds to `total_macs`.
template <class T>
double run_layer(const Layer& L, int64_t B, std::mt19937& g, double& total_macs) {
  const int64_t cg = L.cin / L.groups;
  double macs;
  double sec;
  auto bias = L.bias ? random<T>({L.cout}, g) : Tensor<T, Cpu>();
  if (!L.transpose) {
    const int64_t tin = (L.t - 1) * L.stride + L.k;  // the padded input a streaming call sees
    auto x = random<T>({B, L.cin, tin}, g);
    auto w = random<T>({L.cout, cg, L.k}, g);
    auto y = Tensor<T, Cpu>::empty({B, L.cout, L.t});
    macs = double(B) * double(L.cout) * double(cg * L.k) * double(L.t);
    sec = median_seconds([&] { ops::conv1d(y, x, w, bias, L.stride, 1, L.groups); });
  } else {
    auto x = random<T>({B, L.cin, L.t}, g);
    auto w = random<T>({L.cin, L.cout / L.groups, L.k}, g);
    auto y = Tensor<T, Cpu>::empty({B, L.cout, (L.t - 1) * L.stride + L.k});
    macs = double(B) * double(L.cin) * double(L.cout / L.groups * L.k) * double(L.t);
    sec = median_seconds([&] { ops::conv_transpose1d(y, x, w, bias, L.stride, L.groups); });
  }
  std::printf("  %-32s %8.1f us %9.2f MMAC %8.1f GFLOP/s\n", L.name, sec * 1e6, macs / 1e6, 2 * macs / sec / 1e9);
  total_macs += macs;
  return sec;
}

template <class T>
void run(int64_t B) {
  std::mt19937 g(1);
  double total[2] = {0, 0};
  for (int part = 0; part < 2; ++part) {
    std::printf("%s, batch %ld:\n", part == 0 ? "encoder" : "decoder", long(B));
    double macs = 0;
    const Layer* ls = part == 0 ? kEncoder : kDecoder;
    const size_t n = part == 0 ? std::size(kEncoder) : std::size(kDecoder);
    for (size_t i = 0; i < n; ++i) {
      total[part] += run_layer<T>(ls[i], B, g, macs);
    }
    std::printf("  %-32s %8.1f us %9.2f MMAC %8.1f GFLOP/s  (%.1f%% of an 80 ms frame)\n", "total", total[part] * 1e6,
                macs / 1e6, 2 * macs / total[part] / 1e9, total[part] / 0.08 * 100);
  }
  // Codebook search: one row per item per 12.5 Hz frame, 8 levels.
  auto cb = random<T>({2048, 256}, g);
  auto x = random<T>({B, 256}, g);
  auto codes = Tensor<int64_t, Cpu>::empty({B});
  const double sec = median_seconds([&] { ops::vq_nearest(codes, x, cb); });
  std::printf("vq_nearest N=%ld V=2048 d=256: %.1f us per level, %.1f us per frame (8 levels), %.1f GFLOP/s\n",
              long(B), sec * 1e6, 8 * sec * 1e6, 3.0 * double(B) * 2048 * 256 / sec / 1e9);
  auto e = random<T>({B, 64, 1920}, g);
  const double se = median_seconds([&] { ops::unary(e, e, Unary::elu); });
  std::printf("elu [%ld, 64, 1920] in place: %.1f us\n", long(B), se * 1e6);
}

}  // namespace

int main(int argc, char** argv) {
  int64_t B = 1;
  std::string dtype = "f32";
  for (int i = 1; i < argc; ++i) {
    if (std::isdigit(static_cast<unsigned char>(argv[i][0]))) B = std::atol(argv[i]);
    else dtype = argv[i];
  }
  if (dtype == "bf16") run<bf16>(B);
  else if (dtype == "f16") run<f16>(B);
  else run<float>(B);
  return 0;
}
