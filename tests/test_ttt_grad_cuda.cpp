// The backward of TTT-Linear / TTT-MLP on the CUDA backend (TttBackwardKernels<Cuda>, the CUDA
// backward ops):
//   (a) the four ttt_grad fixtures (ttt-lm-pytorch autograd in float64) through ttt_grad on CUDA
//       in fp32: every tensor within 1e-5 of its max |reference| (test_ttt_grad's criterion),
//       at checkpoint groups 1, 2 and M;
//   (b) CUDA against the CPU backend on random weights and inputs: both kinds, the gate and the
//       projection biases, remainder tokens, batch 2, checkpoint groups 1 and 3;
//   (c) bf16 storage (fp32 inner state and gradients) against fp32 on CUDA: measured, printed,
//       bounded;
//   (d) the tensor-core TTT-Linear kernel's own checkpoints against the group-by-group loop.
// Without a CUDA device the binary prints "SKIPPED: no CUDA device" and exits 77 (CTest: skipped).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iterator>
#include <map>
#include <random>
#include <string>
#include <vector>

#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file provides main (v3 ignores it)
#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_session.hpp>
#endif

#include "reference.hpp"
#include "ttt_helpers.hpp"
#include "ttt/cuda.hpp"
#include "ttt/io/json.hpp"
#include "ttt/layers/cpu/ttt_backward_kernels.hpp"
#include "ttt/layers/cpu/ttt_kernels.hpp"
#include "ttt/layers/ttt_backward.hpp"

using namespace ttt;
using namespace ttt::layers;

namespace {

using ttt_test::grad_cases;
using ttt_test::rel_error;

using Kind = TttConfig::Kind;

template <class T, class B>
Tensor<float, Cpu> host_f32(const Tensor<T, B>& t) {
  if constexpr (std::is_same_v<B, Cpu>) {
    if constexpr (std::is_same_v<T, float>) return t;
    else return ops::cast<float>(t);
  } else {
    return ops::cast<float>(t).contiguous().template to<Cpu>();
  }
}

// Worst error of every tensor of a CUDA result against a host one (y, grad.x, grad.<name>),
// each relative to the reference tensor's max |.|; INFO names the worst.
struct Worst {
  double all = 0;
  std::string name;
  void add(const std::string& n, double e) {
    if (e >= all) all = e, name = n;
  }
};
template <class T>
Worst compare(const TttGradResult<T, Cuda>& got, const TttGradResult<float, Cpu>& want) {
  Worst w;
  w.add("y", rel_error(host_f32(got.y), want.y));
  w.add("grad.x", rel_error(host_f32(got.grads.x), want.grads.x));
  REQUIRE(got.grads.params.size() == want.grads.params.size());
  for (const auto& [n, t] : want.grads.params) {
    REQUIRE(got.grads.contains(n));
    const auto g = host_f32(got.grads[n]);
    REQUIRE(g.shape() == t.shape());
    w.add(n, rel_error(g, t));
  }
  return w;
}

// tests/ttt_helpers.hpp (no conv: the backward has none).
std::map<std::string, HostTensor<float>> random_tensors(const TttConfig& c, uint64_t seed) {
  return ttt_test::random_ttt_tensors(c, seed, false);
}
using ttt_test::weight_source;

}  // namespace

// ---- (a) ttt-lm-pytorch's autograd -----------------------------------------------------------

TEST_CASE("CUDA TTT backward reproduces ttt-lm-pytorch's autograd gradients", "[ttt_grad_cuda][fixtures]") {
  const auto cases = grad_cases();
  REQUIRE(cases.size() >= 4);
  for (const auto& name : cases) {
    const std::string dir = fixture("ttt_grad/" + name);
    const auto json = io::read_json_file(dir + "/config.json");
    const auto cfg = TttConfig::from_json(io::JsonView(json, dir + "/config.json"));
    io::WeightSource ws(dir + "/weights.safetensors");
    const auto st = io::SafeTensors::open(dir + "/io.safetensors");
    const auto p = TttParams<float, Cuda>::load(ws, "", cfg);
    const auto x = st.load<float>("x").to<Cuda>(), dy = st.load<float>("dy").to<Cuda>();
    const int64_t M = (x.size(1) + cfg.mini_batch_size - 1) / cfg.mini_batch_size;
    for (const int64_t group : {int64_t(1), int64_t(2), M}) {
      TttTrainOptions opt;
      opt.checkpoint_group = group;
      const auto res = ttt_grad(p, x, dy, opt);
      Worst w;
      int checked = 0;
      for (const auto& ti : st.tensors()) {
        if (ti.name == "x" || ti.name == "dy") continue;
        Tensor<float, Cpu> got;
        if (ti.name == "y") got = host_f32(res.y);
        else if (ti.name == "grad.x") got = host_f32(res.grads.x);
        else {
          const std::string pname = ti.name.substr(5);
          INFO(name << ": the CUDA backward has no gradient for " << pname);
          REQUIRE(res.grads.contains(pname));
          got = host_f32(res.grads[pname]);
        }
        const auto want = st.load<float>(ti.name);
        REQUIRE(got.shape() == want.shape());
        const double e = rel_error(got, want);
        INFO(name << " group " << group << " " << ti.name << ": error " << e);
        CHECK(e <= 1e-5);
        w.add(ti.name, e);
        ++checked;
      }
      CHECK(checked == int(res.grads.params.size()) + 2);
      std::printf("[ttt grad cuda] %-34s group %2lld  worst %.2e (%s)\n", name.c_str(), (long long)group, w.all,
                  w.name.c_str());
    }
  }
}

// ---- (b) CUDA against the CPU ----------------------------------------------------------------

// The cases of one kind (two test cases, so that a sanitizer run can take one: racecheck over
// both outlasts its limit).
void check_random_shapes(Kind only) {
  struct Case {
    Kind kind;
    int64_t C, nh, K, B, L, group;
    bool gate, bias;
  };
  const Case cases[] = {
      {Kind::linear, 64, 2, 8, 2, 8 * 5 + 3, 1, true, true},   // remainder, gate, biases
      {Kind::linear, 64, 2, 8, 2, 8 * 5 + 3, 3, false, true},  // groups of 3
      {Kind::linear, 128, 2, 16, 1, 16 * 4, 1, false, false},  // f 64, no remainder
      {Kind::mlp, 64, 2, 8, 2, 8 * 5 + 3, 1, true, true},
      {Kind::mlp, 64, 2, 8, 2, 8 * 5 + 3, 3, true, false},
      {Kind::mlp, 128, 2, 16, 1, 16 * 3 + 5, 2, false, true},  // f 64, F 256
      {Kind::linear, 32, 1, 4, 1, 3, 1, true, true},           // only a remainder
  };
  for (int seed = 0; seed < int(std::size(cases)); ++seed) {
    const Case& c = cases[seed];
    if (c.kind != only) continue;
    auto cfg = TttConfig::make(c.kind, c.C, c.nh, c.K);
    cfg.use_gate = c.gate;
    cfg.proj_bias = c.bias;
    const auto tensors = random_tensors(cfg, uint64_t(11 + seed));
    auto ws_h = weight_source(tensors), ws_d = weight_source(tensors);
    const auto ph = TttParams<float, Cpu>::load(ws_h, "", cfg, true);
    const auto pd = TttParams<float, Cuda>::load(ws_d, "", cfg, true);
    std::mt19937 g{uint32_t(100 + seed)};
    const auto x = ref::random<float>({c.B, c.L, c.C}, g), dy = ref::random<float>({c.B, c.L, c.C}, g);
    TttTrainOptions opt;
    opt.checkpoint_group = c.group;
    const auto want = ttt_grad(ph, x, dy, opt);
    // The per-mini-batch buffers, the carry and the staged start state each in shared memory
    // (where they fit) and in global memory, at every block size (0: the per-kind default);
    // TTT-Linear at group 1 also through the split kernels (split; at 256 and 512 threads), in
    // one chunk and in chunks of 2 mini-batches (the carry and the sums handed between chunks).
    struct Variant {
      bool local, carry, state;
      int threads;
      bool split;
      int chunk;
      bool overlap;
    };
    for (const Variant v : {Variant{true, true, true, 256, false, 0, false}, Variant{true, false, false, 512, true, 0, true},
                            Variant{true, false, true, 1024, true, 0, true}, Variant{false, false, true, 0, true, 0, true},
                            Variant{true, false, false, 0, true, 0, false}, Variant{true, false, false, 256, true, 2, true},
                            Variant{false, true, false, 512, false, 0, false}, Variant{true, false, false, 0, true, 2, false}}) {
      auto& tune = TttBackwardKernels<Cuda>::tuning();
      const TttBackwardCudaTuning keep = tune;
      tune.local_in_smem = v.local, tune.carry_in_smem = v.carry, tune.state_in_smem = v.state;
      tune.threads = v.threads, tune.split = v.split, tune.split_chunk = v.chunk, tune.split_overlap = v.overlap;
      const auto got = ttt_grad(pd, x.to<Cuda>(), dy.to<Cuda>(), opt);
      tune = keep;
      const Worst w = compare(got, want);
      std::printf("[ttt grad cuda vs cpu] %-6s C %3lld nh %lld K %2lld B %lld L %3lld group %lld gate %d bias %d "
                  "local %s carry %s state %s threads %4d split %d chunk %d overlap %d: worst %.2e (%s)\n",
                  cfg.kind_name(), (long long)c.C, (long long)c.nh, (long long)c.K, (long long)c.B, (long long)c.L,
                  (long long)c.group, int(c.gate), int(c.bias), v.local ? "smem  " : "global", v.carry ? "smem  " : "global",
                  v.state ? "smem  " : "global", v.threads, int(v.split), v.chunk, int(v.overlap), w.all,
                  w.name.c_str());
      INFO(cfg.kind_name() << " L " << c.L << " local " << (v.local ? "smem" : "global") << " carry "
                           << (v.carry ? "smem" : "global") << " state " << (v.state ? "smem" : "global")
                           << " threads " << v.threads << " split " << v.split << " chunk " << v.chunk
                           << " overlap " << v.overlap << ": worst " << w.name);
      CHECK(w.all <= 2e-5);
    }
  }
}

TEST_CASE("CUDA TTT-Linear backward matches the CPU backward on random shapes", "[ttt_grad_cuda][cpu][linear]") {
  check_random_shapes(Kind::linear);
  // A block size the kernel is not built for is refused, naming the knob.
  {
    auto cfg = TttConfig::make(Kind::linear, 32, 1, 4);
    const auto tensors = random_tensors(cfg, 3);
    auto ws = weight_source(tensors);
    const auto pd = TttParams<float, Cuda>::load(ws, "", cfg, true);
    std::mt19937 g{7};
    const auto x = ref::random<float>({1, 8, 32}, g).to<Cuda>(), dy = ref::random<float>({1, 8, 32}, g).to<Cuda>();
    auto& tune = TttBackwardKernels<Cuda>::tuning();
    const int keep = tune.threads;
    tune.threads = 300;
    CHECK_THROWS_WITH(ttt_grad(pd, x, dy), TTT_CONTAINS("tuning().threads must be 256, 512 or 1024"));
    tune.threads = keep;
  }
}

TEST_CASE("CUDA TTT-MLP backward matches the CPU backward on random shapes", "[ttt_grad_cuda][cpu][mlp]") {
  check_random_shapes(Kind::mlp);
}

// ---- (c) bf16 ---------------------------------------------------------------------------------

// bf16 storage of x, dy, the projections and the tape (q/k/v/lr and the inner loop in fp32,
// gradients in fp32), on ttt-lm-pytorch-like weights and N(0, 1) inputs, against fp32 on
// CUDA. Every product's operands are rounded to bf16 (2^-9 relative); the gradients sum L
// such terms, so the bound is on the error relative to each tensor's max |fp32|.
TEST_CASE("CUDA bf16 TTT backward stays within bf16 rounding of fp32", "[ttt_grad_cuda][bf16]") {
  for (const Kind kind : {Kind::linear, Kind::mlp}) {
    auto cfg = TttConfig::make(kind, 128, 2, 16);
    cfg.use_gate = true;
    const auto tensors = random_tensors(cfg, 5);
    auto ws32 = weight_source(tensors), ws16 = weight_source(tensors);
    const auto p32 = TttParams<float, Cuda>::load(ws32, "", cfg, true);
    const auto p16 = TttParams<bf16, Cuda>::load(ws16, "", cfg, true);
    std::mt19937 g{9};
    const int64_t L = 16 * 8 + 7;
    // The inputs are bf16 values in both runs, so only the computation differs.
    const auto x16 = ops::cast<bf16>(ref::random<float>({1, L, cfg.hidden_size}, g, -1.f, 1.f).to<Cuda>());
    const auto dy16 = ops::cast<bf16>(ref::random<float>({1, L, cfg.hidden_size}, g, -1.f, 1.f).to<Cuda>());
    const auto r32 = ttt_grad(p32, ops::cast<float>(x16), ops::cast<float>(dy16));
    const auto r16 = ttt_grad(p16, x16, dy16);
    // fp32 on the host as the reference of both, so the bound reads as bf16's own error.
    auto ws_h = weight_source(tensors);
    const auto ph = TttParams<float, Cpu>::load(ws_h, "", cfg, true);
    const auto want = ttt_grad(ph, host_f32(x16), host_f32(dy16));
    const Worst w32 = compare(r32, want), w16 = compare(r16, want);
    std::printf("[ttt grad cuda bf16] %-6s C 128 nh 2 L %lld: bf16 worst %.2e (%s), fp32 worst %.2e (%s)\n",
                cfg.kind_name(), (long long)L, w16.all, w16.name.c_str(), w32.all, w32.name.c_str());
    CHECK(w32.all <= 2e-5);
    CHECK(w16.all <= 5e-2);
  }
}

// The training forward's checkpoints from the TTT-Linear tensor-core kernel in one call
// (TttKernels<Cuda>::inner_checkpointed) against the same kernel run one checkpoint group at a
// time (detail::inner_by_groups, the path it replaces): outputs, checkpoints and final state bit
// for bit (the fast weights stay fp32 accumulators in both), groups 1, 3 and longer than the
// sequence, a partial last mini-batch, head_dim 64 and 128.
TEST_CASE("CUDA tensor-core TTT-Linear writes the checkpoints the group loop stores", "[ttt_grad_cuda][checkpoints]") {
  for (const int64_t f : {int64_t(64), int64_t(128)}) {
    const int64_t Bn = 2, nh = 3, K = 16, L = 9 * K + 5, M = (L + K - 1) / K;
    std::mt19937 g{91};
    auto dev = [&](const Shape& s, float lo, float hi) { return ref::random<float>(s, g, lo, hi).to<Cuda>(); };
    TttInnerArgs<Cuda> a;
    a.kind = Kind::linear;
    a.mini_batch_size = K;
    a.operands = TttOperands::bf16;
    a.xq = dev({Bn, nh, L, f}, -0.2f, 0.2f), a.xk = dev({Bn, nh, L, f}, -0.2f, 0.2f);
    a.xv = dev({Bn, nh, L, f}, -0.2f, 0.2f), a.lr = dev({Bn, nh, L}, 0.f, 0.05f);
    a.tau = dev({K}, 0.05f, 1.f), a.ln_weight = dev({nh, f}, 0.5f, 1.5f), a.ln_bias = dev({nh, f}, -0.5f, 0.5f);
    a.phase = Tensor<int32_t, Cuda>::zeros({Bn});
    const auto W0 = dev({Bn, nh, f, f}, -0.1f, 0.1f), b0 = dev({Bn, nh, 1, f}, -0.1f, 0.1f);
    auto fresh = [&] {
      return TttFastWeights<Cuda>{W0.clone(), b0.clone(), {}, {}, Tensor<float, Cuda>::zeros(W0.shape()),
                                  Tensor<float, Cuda>::zeros(b0.shape()), {}, {}};
    };
    for (const int64_t G : {int64_t(1), int64_t(3), int64_t(M + 2)}) {
      const int64_t Mc = ttt_num_checkpoints(L, K, G);
      auto checkpoints = [&] {
        return TttCheckpoints<Cuda>{G, Tensor<float, Cuda>::zeros({Mc * Bn, nh, f, f}),
                                    Tensor<float, Cuda>::zeros({Mc * Bn, nh, 1, f}), {}, {}};
      };
      const auto one = checkpoints(), groups = checkpoints();
      const auto w_one = fresh(), w_groups = fresh();
      TttInnerArgs<Cuda> a1 = a, a2 = a;
      a1.out = Tensor<float, Cuda>::zeros({Bn, nh, L, f}), a2.out = Tensor<float, Cuda>::zeros({Bn, nh, L, f});
      INFO("head_dim " << f << ", group " << G << " (" << Mc << " checkpoints)");
      REQUIRE(TttKernels<Cuda>::inner_checkpointed(a1, w_one, one));
      layers::detail::inner_by_groups(a2, w_groups, groups);
      auto same = [](const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& y) {
        const auto hx = x.to<Cpu>(), hy = y.to<Cpu>();
        return hx.numel() == hy.numel() && std::equal(hx.data(), hx.data() + hx.numel(), hy.data());
      };
      CHECK(same(a1.out, a2.out));
      CHECK(same(one.W1, groups.W1));
      CHECK(same(one.b1, groups.b1));
      CHECK(same(w_one.W1, w_groups.W1));
      CHECK(same(w_one.b1, w_groups.b1));
      CHECK(same(one.W1.slice(0, 0, Bn).contiguous(), W0));
      if (Mc > 1) CHECK_FALSE(same(one.W1.slice(0, Bn, 2 * Bn).contiguous(), W0));
    }
  }
  // Plans without such a kernel leave the work to the caller (fp32 operands, TTT-MLP).
  TttInnerArgs<Cuda> fp32;
  fp32.kind = Kind::linear;
  fp32.operands = TttOperands::fp32;
  fp32.xq = Tensor<float, Cuda>::zeros({1, 1, 32, 64});
  fp32.xk = fp32.xq, fp32.xv = fp32.xq, fp32.out = fp32.xq, fp32.lr = Tensor<float, Cuda>::zeros({1, 1, 32});
  fp32.phase = Tensor<int32_t, Cuda>::zeros({1});
  TttFastWeights<Cuda> w;
  w.W1 = Tensor<float, Cuda>::zeros({1, 1, 64, 64}), w.b1 = Tensor<float, Cuda>::zeros({1, 1, 1, 64});
  CHECK_FALSE(TttKernels<Cuda>::inner_checkpointed(fp32, w, TttCheckpoints<Cuda>{}));
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("SKIPPED: no CUDA device\n");
    return 77;
  }
  std::printf("CUDA device: %s\n", cuda::device_name().c_str());
  return Catch::Session().run(argc, argv);
}
