// ttt-layer: one TTT-Linear / TTT-MLP layer (ttt-lm-pytorch's TTTLinear / TTTMLP) over a
// stored input, in the three ways the reference fixtures record it, or its backward.
//
//   ttt-layer --config C --weights W --io IO --mode full|decode|prefill-decode [--prefill N]
//             --out OUT [--backend cpu|cuda] [--dtype f32|bf16]
//   ttt-layer --config C --weights W --io IO --mode grad --out OUT [--backend cpu|cuda]
//             [--dtype f32|bf16] [--checkpoint-group G]
//
// C is the fixtures' config.json, W the layer's state_dict (ttt-lm-pytorch names), IO holds
// `x` [B, L, C]. OUT (written atomically) gets `y` [B, L, C] (F32 whatever --dtype) and the
// final state under `decode_final.` (W1_states, b1_states, W1_grad, b1_grad, [W2_*, b2_*],
// [conv_states], offset). full = one call over the sequence, decode = one call per token,
// prefill-decode = one call of N tokens (default: the config's prefill_len), then one per
// token.
//
// grad: IO holds `x` and the upstream gradient `dy` [B, L, C]; OUT gets `y` (the whole-sequence
// output), `grad.x` and `grad.<name>` = d sum(y * dy) / d(name) for every weight of the layer
// (the weight file's names and shapes), all F32. bf16 stores x, the projections and the tape in
// bf16; the inner loop, its state and every gradient stay fp32.
#include <chrono>
#include <cstdio>
#include <cxxopts.hpp>
#include <iostream>
#include <string>
#include <type_traits>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/ttt.hpp"
#if TTT_WITH_CUDA
#include "ttt/cuda.hpp"
#endif

namespace {

using namespace ttt;
using namespace ttt::layers;

struct Options {
  std::string config, weights, io, mode, out, backend, dtype;
  int64_t prefill = -1;  // -1: from the config
  int64_t checkpoint_group = 1;
};

// --mode grad on backend B with storage T (fp32 inner loop and gradients): y, grad.x, grad.<name>,
// all written as F32.
template <class T, class B>
void run_grad(const Options& o, const TttConfig& cfg) {
  io::WeightSource ws(o.weights);
  const auto params = TttParams<T, B>::load(ws, "", cfg);
  const auto st = io::SafeTensors::open(o.io);
  const auto xh = st.load<float>("x").contiguous();
  if (xh.rank() != 3 || xh.size(2) != cfg.hidden_size || xh.size(0) == 0 || xh.size(1) == 0)
    fail(o.io, ": tensor 'x' has shape ", xh.shape().str(), ", expected a non-empty [B, L, ", cfg.hidden_size, "]");
  if (!st.contains("dy")) fail(o.io, ": --mode grad needs the upstream gradient 'dy' [B, L, C] beside 'x'");
  const auto dyh = st.load<float>("dy").contiguous();
  if (dyh.shape() != xh.shape())
    fail(o.io, ": tensor 'dy' has shape ", dyh.shape().str(), ", expected that of 'x' ", xh.shape().str());
  auto to_backend = [](const Tensor<float, Cpu>& t) {
    if constexpr (std::is_same_v<B, Cpu>) return ops::cast<T>(t);
    else return ops::cast<T>(t.template to<B>());
  };
  auto to_host = [](const auto& t) {
    const auto f = ops::cast<float>(t).contiguous();
    if constexpr (std::is_same_v<B, Cpu>) return f;
    else return f.template to<Cpu>();
  };
  const auto x = to_backend(xh), dy = to_backend(dyh);
  TttTrainOptions opt;
  opt.checkpoint_group = o.checkpoint_group;
  auto sync = [] {
#if TTT_WITH_CUDA
    if constexpr (std::is_same_v<B, Cuda>) cuda::Context::get().synchronize();
#endif
  };
  auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
  const auto t0 = std::chrono::steady_clock::now();
  TttTape<T, B> tape;
  const Tensor<T, B> y = ttt_forward_train(params, x, &tape, opt);
  sync();
  const auto t1 = std::chrono::steady_clock::now();
  const TttGrads<B> g = ttt_backward(params, tape, dy);
  sync();
  const auto t2 = std::chrono::steady_clock::now();
  const double fwd_ms = ms(t0, t1), bwd_ms = ms(t1, t2);

  io::SafeTensorsWriter w;
  w.add("y", to_host(y));
  w.add("grad.x", to_host(g.x));
  for (const auto& [name, t] : g.params) w.add("grad." + name, to_host(t));
  w.add_metadata("mode", o.mode);
  w.add_metadata("kind", cfg.kind_name());
  w.write(o.out);
  std::printf("ttt-layer: %s C=%lld heads=%lld K=%lld %s %s, x [%lld, %lld, %lld], mode grad (checkpoint group "
              "%lld, tape %.1f KiB): forward %.3f ms, backward %.3f ms -> %s\n",
              cfg.kind_name(), (long long)cfg.hidden_size, (long long)cfg.num_heads, (long long)cfg.mini_batch_size,
              std::is_same_v<B, Cpu> ? "cpu" : "cuda", std::is_same_v<T, float> ? "f32" : "bf16",
              (long long)xh.size(0), (long long)xh.size(1), (long long)cfg.hidden_size, (long long)o.checkpoint_group,
              double(tape.saved_bytes()) / 1024.0, fwd_ms, bwd_ms, o.out.c_str());
}

std::vector<int64_t> call_lengths(const std::string& mode, int64_t L, int64_t prefill) {
  std::vector<int64_t> lens;
  if (mode == "full") {
    lens.push_back(L);
    return lens;
  }
  int64_t t = 0;
  if (mode == "prefill-decode" && prefill > 0) {
    lens.push_back(prefill);
    t = prefill;
  }
  for (; t < L; ++t) lens.push_back(1);
  return lens;
}

template <class T, class B>
void run(const Options& o, const TttConfig& cfg, int64_t prefill) {
  io::WeightSource ws(o.weights);
  const auto params = TttParams<T, B>::load(ws, "", cfg);
  const auto st = io::SafeTensors::open(o.io);
  const auto x32 = st.load<float>("x");
  if (x32.rank() != 3 || x32.size(2) != cfg.hidden_size)
    fail(o.io, ": tensor 'x' has shape ", x32.shape().str(), ", expected [B, L, ", cfg.hidden_size, "]");
  const int64_t Bn = x32.size(0), L = x32.size(1);
  if (Bn == 0) fail(o.io, ": tensor 'x' has an empty batch");
  if (o.mode == "prefill-decode" && (prefill < 0 || prefill > L))
    fail("--prefill ", prefill, " is outside [0, ", L, "] (the length of 'x' in ", o.io, ")");
  const Tensor<T, B> x = ops::cast<T>(x32.contiguous()).template to<B>();

  auto state = TttState<B>::init(params, Bn);
  auto y = HostTensor<float>::empty({Bn, L, cfg.hidden_size});
  const auto lens = call_lengths(o.mode, L, prefill);
  const auto t0 = std::chrono::steady_clock::now();
  int64_t t = 0;
  for (int64_t n : lens) {
    const auto yt = ttt_forward(params, state, x.slice(1, t, t + n));
    y.slice(1, t, t + n).copy_from(ops::cast<float>(yt).template to<Cpu>());
    t += n;
  }
  Memory<B>::synchronize();
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();

  io::SafeTensorsWriter w;
  w.add("y", y);
  state.save(w, "decode_final.");
  w.add_metadata("mode", o.mode);
  w.add_metadata("dtype", o.dtype);
  w.add_metadata("kind", cfg.kind_name());
  w.write(o.out);
  std::printf("ttt-layer: %s C=%lld heads=%lld K=%lld %s %s, x [%lld, %lld, %lld], mode %s (%zu calls): "
              "%.3f ms -> %s\n",
              cfg.kind_name(), (long long)cfg.hidden_size, (long long)cfg.num_heads, (long long)cfg.mini_batch_size,
              B::name, o.dtype.c_str(), (long long)Bn, (long long)L, (long long)cfg.hidden_size, o.mode.c_str(),
              lens.size(), ms, o.out.c_str());
}

}  // namespace

int main(int argc, char** argv) {
  try {
    cxxopts::Options opts("ttt-layer", "Run one TTT-Linear / TTT-MLP layer (ttt-lm-pytorch) over a stored input.");
    opts.add_options()
      ("config", "layer config.json (kind, hidden_size, num_heads, mini_batch_size, ...)", cxxopts::value<std::string>())
      ("weights", "layer weights (.safetensors, ttt-lm-pytorch names)", cxxopts::value<std::string>())
      ("io", "input .safetensors holding x [B, L, C]", cxxopts::value<std::string>())
      ("mode", "full | decode | prefill-decode | grad", cxxopts::value<std::string>()->default_value("full"))
      ("prefill", "prefill length for prefill-decode (default: the config's prefill_len)", cxxopts::value<int64_t>())
      ("out", "output .safetensors (y and the final state; grad: y, grad.x, grad.<name>)", cxxopts::value<std::string>())
      ("checkpoint-group", "grad: mini-batches between stored fast-weight states (memory / recompute)",
       cxxopts::value<int64_t>()->default_value("1"))
      ("backend", "cpu | cuda", cxxopts::value<std::string>()->default_value("cpu"))
      ("dtype", "f32 | bf16 (projections; the inner loop is always f32)", cxxopts::value<std::string>()->default_value("f32"))
      ("h,help", "print this help");
    const auto r = opts.parse(argc, argv);
    if (r.count("help")) {
      std::cout << opts.help() << "\n";
      return 0;
    }
    if (!r.unmatched().empty()) fail("unexpected argument '", r.unmatched()[0], "' (see --help)");
    Options o;
    for (auto [key, dst] : {std::pair{"config", &o.config}, {"weights", &o.weights}, {"io", &o.io}, {"out", &o.out}}) {
      if (!r.count(key)) fail("missing --", key, " (see --help)");
      *dst = r[key].as<std::string>();
    }
    o.mode = r["mode"].as<std::string>();
    o.backend = r["backend"].as<std::string>();
    o.dtype = r["dtype"].as<std::string>();
    if (o.mode != "full" && o.mode != "decode" && o.mode != "prefill-decode" && o.mode != "grad")
      fail("--mode must be full, decode, prefill-decode or grad, got '", o.mode, "'");
    o.checkpoint_group = r["checkpoint-group"].as<int64_t>();
    if (o.checkpoint_group < 1) fail("--checkpoint-group must be >= 1, got ", o.checkpoint_group);
    if (o.dtype != "f32" && o.dtype != "bf16") fail("--dtype must be f32 or bf16, got '", o.dtype, "'");
    if (o.backend != "cpu" && o.backend != "cuda") fail("--backend must be cpu or cuda, got '", o.backend, "'");
#if TTT_WITH_CUDA
    if (o.backend == "cuda" && !cuda::device_available()) fail("--backend cuda: no CUDA device available");
#else
    if (o.backend == "cuda") fail("--backend cuda: this build has no CUDA backend (configure with a CUDA compiler)");
#endif

    const auto json = io::read_json_file(o.config);
    const io::JsonView jv(json, o.config);
    const auto cfg = TttConfig::from_json(jv);
    int64_t prefill = 0;
    if (o.mode == "prefill-decode") {
      if (r.count("prefill")) prefill = r["prefill"].as<int64_t>();
      else if (jv.has("prefill_len")) prefill = jv.get<int64_t>("prefill_len");
      else fail("--mode prefill-decode needs --prefill or 'prefill_len' in ", o.config);
    } else if (r.count("prefill")) {
      fail("--prefill only applies to --mode prefill-decode");
    }
    if (o.mode == "grad") {
      if (o.backend == "cuda") {
#if TTT_WITH_CUDA
        if (o.dtype == "bf16") run_grad<bf16, Cuda>(o, cfg);
        else run_grad<float, Cuda>(o, cfg);
#endif
      } else {
        if (o.dtype == "bf16") run_grad<bf16, Cpu>(o, cfg);
        else run_grad<float, Cpu>(o, cfg);
      }
    } else if (o.backend == "cuda") {
#if TTT_WITH_CUDA
      if (o.dtype == "bf16") run<bf16, Cuda>(o, cfg, prefill);
      else run<float, Cuda>(o, cfg, prefill);
#endif
    } else {
      if (o.dtype == "bf16") run<bf16, Cpu>(o, cfg, prefill);
      else run<float, Cpu>(o, cfg, prefill);
    }
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "ttt-layer: %s\n", e.what());
    return 1;
  }
}
