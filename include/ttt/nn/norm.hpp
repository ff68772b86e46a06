#pragma once
// Kyutai's norms: LayerNorm (weight, bias) and RMSNorm (alpha [1, 1, D]); statistics in
// fp32 for every engine dtype.
#include <string>

#include "ttt/backend/ops.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/module.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::nn {

template <class T, class B>
struct Norm {
  NormKind kind = NormKind::layer_norm;
  float eps = 1e-5f;
  Tensor<T, B> weight;  // [D] (alpha for RMS norms)
  Tensor<T, B> bias;    // [D] (layer norms only)

  static Norm load(io::WeightSource& ws, const std::string& prefix, int64_t dim, NormKind kind) {
    Norm n;
    n.kind = kind;
    n.eps = norm_eps(kind);
    if (is_rms(kind)) {
      n.weight = nn::weight<T, B>(ws, prefix + ".alpha", {1, 1, dim}, io::Init::constant(1.f)).reshape({dim});
    } else {
      n.weight = nn::weight<T, B>(ws, prefix + ".weight", {dim}, io::Init::constant(1.f));
      n.bias = nn::weight<T, B>(ws, prefix + ".bias", {dim}, io::Init::constant(0.f));
    }
    return n;
  }

  void operator()(const Tensor<T, B>& out, const Tensor<T, B>& in) const {
    if (is_rms(kind)) ops::rms_norm(out, in, weight, eps);
    else ops::layer_norm(out, in, weight, bias, eps);
  }
  int64_t num_params() const { return weight.numel() + (bias.defined() ? bias.numel() : 0); }

  // This norm as the prologue of a fused linear.
  FusedLinear<T, B> as_prologue() const {
    FusedLinear<T, B> f;
    f.norm = is_rms(kind) ? FusedNorm::rms : FusedNorm::layer;
    f.norm_weight = weight;
    f.norm_bias = bias;
    f.eps = eps;
    return f;
  }
  Tensor<T, B> operator()(const Tensor<T, B>& in) const {
    auto out = Tensor<T, B>::empty(in.shape());
    (*this)(out, in);
    return out;
  }
};

}  // namespace ttt::nn
