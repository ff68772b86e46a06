// bench_mimi: Mimi streaming one 80 ms frame per call, encode and decode, on the CPU or CUDA
// (CUDA: each direction a captured graph per frame, as a conversation runs it). Prints the
// median encode and decode times, the anchors measured in the same run by bench/mimi.sh
// (Kyutai's PyTorch Mimi, --anchor-encode-ms / --anchor-decode-ms), and the floor: the bytes a
// frame must read (every weight once) over the measured bandwidth, and its multiply-adds over
// the measured matrix-product rate.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <optional>
#include <string>
#include <vector>

#include "ttt/core/worker.hpp"
#include "ttt/mimi/mimi.hpp"
#include "ttt/ttt.hpp"
#if TTT_WITH_CUDA
#include "ttt/cuda.hpp"
#endif

using namespace ttt;

namespace {


// The matrix-product rate (GFLOP/s) in T: the best of a few large products.
template <class T, class B>
double gemm_gflops() {
  const int64_t n = B::is_host ? 1024 : 8192;
  auto a = Tensor<T, B>::empty({n, n}), b = Tensor<T, B>::empty({n, n}), c = Tensor<T, B>::empty({n, n});
  ops::random_normal(a, 1.f, 1, 1);
  ops::random_normal(b, 1.f, 1, 2);
  Timer<B> clk;
  double best = 1e30;
  for (int i = 0; i < 4; ++i) best = std::min(best, clk.ms([&] { ops::matmul(c, a, b); }));
  return 2.0 * double(n) * double(n) * double(n) / (best * 1e-3) / 1e9;
}

// Multiply-adds of one frame through the encoder and the decoder (streaming).
template <class T, class B>
std::pair<double, double> macs_per_frame(const mimi::Mimi<T, B>& m) {
  using Stage = typename mimi::Seanet<T, B>::Stage;
  auto seanet = [](const mimi::Seanet<T, B>& s, int64_t t) {
    double n = 0;
    for (const Stage& st : s.stages) {
      auto conv = [&](const auto& c) {
        t /= c.stride;
        n += double(c.out_channels) * double(c.in_channels / c.groups) * double(c.kernel) * double(t);
      };
      if (st.kind == Stage::Kind::conv) conv(st.conv);
      if (st.kind == Stage::Kind::residual) conv(st.conv), conv(st.conv2);
      if (st.kind == Stage::Kind::conv_transpose) {
        const auto& c = st.convtr;
        n += double(c.in_channels) * double(c.out_channels / c.groups) * double(c.kernel) * double(t);
        t *= c.stride;
      }
    }
    return n;
  };
  const auto& c = m.cfg;
  const double steps = double(c.downsample_stride()), D = double(c.transformer.d_model),
               Ff = double(c.transformer.dim_feedforward[0]), L = double(c.transformer.num_layers),
               ctx = double(c.transformer.context);
  const double tr = steps * L * (4 * D * D + 2 * D * Ff + 2 * ctx * D);
  const double d = double(c.quantizer.dimension), V = double(c.quantizer.bins), K = double(c.num_codebooks),
               Dl = double(c.latent_dim());
  const double enc = seanet(m.encoder, m.frame_size()) + tr + Dl * Dl * 2 * steps + 2 * d * Dl + K * V * d;
  const double dec = seanet(m.decoder, int64_t(steps)) + tr + Dl * 2 * steps + 2 * d * Dl + K * d;
  return {enc, dec};
}

template <class T, class B>
int run(const cxxopts::ParseResult& r) {
  const auto cfg = r.count("config") ? mimi::MimiConfig::load(r["config"].as<std::string>()) : mimi::MimiConfig::kyutai();
  io::WeightSource ws;
  if (r.count("weights")) ws.add_file(r["weights"].as<std::string>());
  else ws.enable_random_init(0);
  auto m = mimi::Mimi<T, B>::load(cfg, ws);
#if TTT_WITH_CUDA
  if constexpr (!B::is_host) {
    Memory<B>::synchronize();
    cuda::CachingAllocator::get().release_cached();
  }
#endif
  m.set_graphs(r["graphs"].as<int>() != 0);
  const int64_t batch = r["batch"].as<int64_t>(), fs = m.frame_size();
  const int warmup = r["warmup"].as<int>(), frames = r["frames"].as<int>();
  auto s = m.start(batch), d = m.start(batch);
  Timer<B> clk;
  std::vector<double> te, td;
  auto pcm = Tensor<float, Cpu>::empty({batch, fs});
  uint64_t x = 1;
  Tensor<int64_t, Cpu> codes;
  for (int i = 0; i < warmup + frames; ++i) {
    for (int64_t j = 0; j < pcm.numel(); ++j) pcm.data()[j] = 0.1f * (float(io::detail::splitmix64(x) % 2001) / 1000.f - 1.f);
    const double e = clk.ms([&] { codes = m.encode_step(s, pcm); });
    const double dd = clk.ms([&] { (void)m.decode_step(d, codes); });
    if (i >= warmup) te.push_back(e), td.push_back(dd);
  }
  const double me = median(te), md = median(td);
  // A conversation encodes the user's frame t while it decodes the reply of frame t-1: on CUDA
  // the decode session lives on a second host thread (its own stream and cuBLAS handle, graphs
  // captured there), so the two overlap. Host wall time per frame, both finished.
  double mo = 0;
  if constexpr (!B::is_host) {
    Worker worker;
    auto s2 = m.start(batch);
    std::optional<typename mimi::Mimi<T, B>::Session> d2;
    worker.run([&] { d2 = m.start(batch); });
    Tensor<int64_t, Cpu> prev = codes;
    std::vector<double> to;
    for (int i = 0; i < warmup + frames; ++i) {
      for (int64_t j = 0; j < pcm.numel(); ++j)
        pcm.data()[j] = 0.1f * (float(io::detail::splitmix64(x) % 2001) / 1000.f - 1.f);
      const auto t0 = std::chrono::steady_clock::now();
      worker.post([&] { (void)m.decode_step(*d2, prev); });
      auto c = m.encode_step(s2, pcm);
      worker.wait();
      const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      prev = c;
      if (i >= warmup) to.push_back(ms);
    }
    worker.run([&] { d2.reset(); });
    mo = median(to);
  }
  const auto [enc_macs, dec_macs] = macs_per_frame(m);
  const double elem = double(sizeof(T));
  // Bytes a frame reads at least: every weight once (codebooks: the K searched, in float).
  const double cb_total = double(cfg.quantizer.n_q) * double(cfg.quantizer.bins) * double(cfg.quantizer.dimension);
  const double cb_used = double(cfg.num_codebooks) * double(cfg.quantizer.bins) * double(cfg.quantizer.dimension);
  const double bytes = (double(m.num_params()) - cb_total) * elem + cb_used * (elem + 4.0);
  const double bw = memory_bandwidth_gbs<B>(), peak = gemm_gflops<T, B>();
  const double floor_bytes_ms = bytes / (bw * 1e9) * 1e3, floor_flops_ms = 2 * (enc_macs + dec_macs) / (peak * 1e9) * 1e3;
  std::printf("bench_mimi: %s %s batch %lld, frame %lld samples (%.0f ms), %lld codebooks, %lld parameters, graphs %s\n",
              B::name, std::is_same_v<T, bf16> ? "bf16" : "f32", (long long)batch, (long long)fs,
              1e3 * double(fs) / double(cfg.sample_rate), (long long)cfg.num_codebooks, (long long)m.num_params(),
              r["graphs"].as<int>() ? "on" : "off");
  std::printf("  ours:    encode %.3f ms  decode %.3f ms  total %.3f ms per frame (median of %d)  = %.1fx real time\n",
              me, md, me + md, frames, 1e3 * double(fs) / double(cfg.sample_rate) / (me + md));
  if (mo > 0)
    std::printf("  overlapped: encode of frame t || decode of frame t-1 (two streams): %.3f ms per frame (host wall "
                "time), %.2fx the sequential total\n",
                mo, mo / (me + md));
  if (r.count("anchor-encode-ms") && r.count("anchor-decode-ms")) {
    const double ae = r["anchor-encode-ms"].as<double>(), ad = r["anchor-decode-ms"].as<double>();
    std::printf("  anchor:  encode %.3f ms  decode %.3f ms  total %.3f ms (Kyutai's PyTorch Mimi, same run)  -> ours %.2fx faster\n",
                ae, ad, ae + ad, (ae + ad) / (me + md));
  }
  if (s.rt->enc_graph.captured())
    std::printf("  graphs:  one replay per frame: encode %zu kernels, decode %zu kernels\n",
                s.rt->enc_graph.num_kernels(), d.rt->dec_graph.num_kernels());
  std::printf("  floor:   %.1f MB of weights per frame / %.0f GB/s = %.3f ms;  %.2f GFLOP per frame / %.0f GFLOP/s = %.3f ms"
              "  (encode %.0f M, decode %.0f M multiply-adds per item)\n",
              bytes / 1e6, bw, floor_bytes_ms, 2 * (enc_macs + dec_macs) * double(batch) / 1e9, peak,
              floor_flops_ms * double(batch), enc_macs / 1e6, dec_macs / 1e6);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  cxxopts::Options o("bench_mimi", "Mimi streaming encode + decode of one frame per call");
  o.add_options()("config", "Mimi config (default: Kyutai's Mimi)", cxxopts::value<std::string>())(
      "weights", "Mimi checkpoint (default: seeded random)", cxxopts::value<std::string>())(
      "backend", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "dtype", "f32 or bf16", cxxopts::value<std::string>()->default_value("f32"))(
      "batch", "streams", cxxopts::value<int64_t>()->default_value("1"))(
      "frames", "timed frames", cxxopts::value<int>()->default_value("50"))(
      "warmup", "untimed frames first", cxxopts::value<int>()->default_value("10"))(
      "graphs", "CUDA graphs per frame (1) or eager (0)", cxxopts::value<int>()->default_value("1"))(
      "anchor-encode-ms", "PyTorch encode ms/frame measured in the same run", cxxopts::value<double>())(
      "anchor-decode-ms", "PyTorch decode ms/frame measured in the same run", cxxopts::value<double>())("h,help", "help");
  try {
    auto r = o.parse(argc, argv);
    if (r.count("help")) {
      std::printf("%s\n", o.help().c_str());
      return 0;
    }
    const std::string backend = r["backend"].as<std::string>(), dtype = r["dtype"].as<std::string>();
    if (dtype != "f32" && dtype != "bf16") fail("--dtype must be f32 or bf16");
    if (backend == "cpu") return dtype == "bf16" ? run<bf16, Cpu>(r) : run<float, Cpu>(r);
#if TTT_WITH_CUDA
    if (backend == "cuda") {
      if (!cuda::device_available()) fail("--backend cuda: no CUDA device available");
      return dtype == "bf16" ? run<bf16, Cuda>(r) : run<float, Cuda>(r);
    }
#endif
    fail("--backend must be cpu", TTT_WITH_CUDA ? " or cuda" : " (this build has no CUDA)");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_mimi: error: %s\n", e.what());
    return 1;
  }
}
