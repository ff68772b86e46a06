#pragma once
// Kyutai's feed-forward blocks: the gated one (ActivationGating: linear_in [2H, D], first
// half activated, times the second half, linear_out [D, H]) and the plain one (linear1,
// exact GELU, linear2). Per-step weights (the depformer) are one set per weight index.
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/linear.hpp"
#include "ttt/nn/module.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::nn {

template <class T, class B>
struct Ffn {
  bool gated = false;
  Unary act = Unary::gelu;
  std::vector<LinearWeight<T, B>> w_in;   // per weight set: [2H, D] gated, [F, D] plain
  std::vector<LinearWeight<T, B>> w_out;  // per weight set: [D, H] gated, [D, F] plain

  int64_t hidden(int64_t set = 0) const { return w_out[size_t(set)].size(1); }
  int64_t num_params() const {
    int64_t n = 0;
    for (auto& w : w_in) n += w.numel();
    for (auto& w : w_out) n += w.numel();
    return n;
  }

  static Ffn load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    Ffn f;
    f.gated = c.gated;
    f.act = c.activation;
    const int64_t D = c.d_model, sets = c.num_weight_sets();
    for (int64_t i = 0; i < sets; ++i) {
      const int64_t dff = c.feedforward(i);
      if (f.gated) {
        const std::string p = c.weights_per_step ? prefix + ".gating." + std::to_string(i) : prefix + ".gating";
        // The hidden size comes from the checkpoint when there is one (the rule differs
        // between moshi, candle and mlx for unusual sizes).
        int64_t H = c.gated_hidden(dff);
        if (ws.has(p + ".linear_out.weight")) H = ws.shape_of(p + ".linear_out.weight").d[1];
        f.w_in.push_back(nn::linear_weight<T, B>(ws, p + ".linear_in.weight", {2 * H, D}, io::Init::normal(1.f / std::sqrt(float(D)))));
        f.w_out.push_back(nn::linear_weight<T, B>(ws, p + ".linear_out.weight", {D, H}, io::Init::normal(1.f / std::sqrt(float(H)))));
      } else {
        f.w_in.push_back(nn::linear_weight<T, B>(ws, prefix + ".linear1.weight", {dff, D}, io::Init::normal(1.f / std::sqrt(float(D)))));
        f.w_out.push_back(nn::linear_weight<T, B>(ws, prefix + ".linear2.weight", {D, dff}, io::Init::normal(1.f / std::sqrt(float(dff)))));
      }
    }
    return f;
  }

  // residual [R, D] (+)= FFN(x [R, D]) with weight set `set` (beta = 1 fuses the residual
  // add into the output projection; beta = 0 overwrites).
  void forward(const Tensor<T, B>& out, const Tensor<T, B>& x, int64_t set, float beta) const {
    const auto& wi = w_in[size_t(set)];
    const auto& wo = w_out[size_t(set)];
    Shape hs = x.shape();
    hs.d[hs.rank - 1] = wi.size(0);
    auto h = Tensor<T, B>::empty(hs);
    nn::linear(h, x, wi);
    if (gated) {
      auto g = ops::glu(h, act);
      nn::linear(out, g, wo, beta);
    } else {
      ops::unary(h, h, act);
      nn::linear(out, h, wo, beta);
    }
  }
};

}  // namespace ttt::nn
