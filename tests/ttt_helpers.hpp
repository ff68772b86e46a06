#pragma once
// Random TTT-layer parameters shared by the layer tests (test_ttt, test_ttt_cuda) and the
// backward tests (test_ttt_grad, test_ttt_grad_cuda): deliberately non-trivial (LayerNorm,
// token index, lr bias and every bias perturbed), O(1) projections of an O(1) input. And the
// shell runner of their ttt-layer CLI cases.
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <map>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "reference.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_config.hpp"

namespace ttt_test {

// Runs a shell command: (exit status, its stdout and stderr together); 128 when it did not exit
// normally, -1 when it could not be started.
inline std::pair<int, std::string> run_command(const std::string& cmd) {
  std::string out;
  FILE* fp = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!fp) return {-1, "popen failed: " + cmd};
  char buf[512];
  while (std::fgets(buf, sizeof buf, fp)) out += buf;
  const int status = ::pclose(fp);
  return {WIFEXITED(status) ? WEXITSTATUS(status) : 128, out};
}
// A shell word (paths in the tests hold no quote).
inline std::string quoted(const std::string& s) { return "'" + s + "'"; }

using ttt::HostTensor;
using ttt::Shape;

// with_conv: also conv_q / conv_k (the layers' causal convolutions; the backward has none). The
// draws come in a fixed order, so a seed gives the same tensors in every test.
inline std::map<std::string, HostTensor<float>> random_ttt_tensors(const ttt::layers::TttConfig& c, uint64_t seed,
                                                                   bool with_conv) {
  std::mt19937 g{uint32_t(seed)};
  std::map<std::string, HostTensor<float>> ws;
  const int64_t C = c.hidden_size, nh = c.num_heads, f = c.head_dim, F = c.inner_dim(), K = c.mini_batch_size;
  auto put = [&](const std::string& n, Shape s, float lo, float hi) { ws[n] = ref::random<float>(s, g, lo, hi); };
  const float a = 1.7f / std::sqrt(float(C));
  for (const char* n : {"q_proj", "k_proj", "v_proj", "o_proj", "g_proj"}) {
    put(std::string(n) + ".weight", {C, C}, -a, a);
    put(std::string(n) + ".bias", {C}, -0.1f, 0.1f);
  }
  if (with_conv)
    for (const char* n : {"conv_q", "conv_k"}) {
      put(std::string(n) + ".weight", {C, 1, c.conv_kernel}, -0.6f, 0.6f);
      put(std::string(n) + ".bias", {C}, -0.1f, 0.1f);
    }
  put("learnable_ttt_lr_weight", {nh, 1, C}, -0.1f, 0.1f);
  put("learnable_ttt_lr_bias", {nh, 1}, -1.f, 1.f);
  put("learnable_token_idx", {K}, -0.05f, 0.05f);
  put("ttt_norm_weight", {nh, f}, 0.5f, 1.5f);
  put("ttt_norm_bias", {nh, f}, -0.2f, 0.2f);
  put("post_norm.weight", {C}, 0.5f, 1.5f);
  put("post_norm.bias", {C}, -0.2f, 0.2f);
  const float w1 = 1.7f / std::sqrt(float(f)), w2 = 1.7f / std::sqrt(float(F));
  put("W1", {nh, f, F}, -w1, w1);
  put("b1", {nh, 1, F}, -0.1f, 0.1f);
  put("W2", {nh, F, f}, -w2, w2);
  put("b2", {nh, 1, f}, -0.1f, 0.1f);
  return ws;
}

inline ttt::io::WeightSource weight_source(const std::map<std::string, HostTensor<float>>& m) {
  ttt::io::WeightSource ws;
  for (const auto& [n, t] : m) ws.put(n, t);
  return ws;
}

// The ttt_grad fixture cases (ttt-lm-pytorch autograd in float64), sorted by name.
inline std::vector<std::string> grad_cases() {
  std::vector<std::string> v;
  for (const auto& e : std::filesystem::directory_iterator(std::string(TTT_TEST_DATA) + "/fixtures/ttt_grad"))
    if (e.is_directory()) v.push_back(e.path().filename().string());
  std::sort(v.begin(), v.end());
  return v;
}

// The backward tests' error: max |a - b| / max |b| (b the reference).
inline double rel_error(const HostTensor<float>& a, const HostTensor<float>& b) {
  const auto va = ref::values(a), vb = ref::values(b);
  return ref::max_abs_diff(va, vb) / std::max(ref::max_abs(vb), 1e-30);
}

}  // namespace ttt_test
