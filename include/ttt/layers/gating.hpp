#pragma once
// SSMGating of ttt-video-dit (ttt_reference e): out = tanh(alpha) ⊙ x with alpha [C] per
// channel, so a residual branch added as x + tanh(alpha) ⊙ f(x) starts near the identity
// (alpha_init 0.1 gives tanh ≈ 0.0997). Weight name: `<prefix>alpha`.
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/arena.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/io/weight_source.hpp"

namespace ttt::layers {

template <class T, class B>
struct Gating {
  Tensor<float, B> alpha;  // [C]
  Tensor<T, B> scale;      // [C] derived: tanh(alpha), what the forward multiplies by

  // Reads `<prefix>alpha` ([dim], or any length when dim < 0).
  static Gating load(io::WeightSource& ws, const std::string& prefix, int64_t dim = -1) {
    return from_host(ws.get<float>(prefix + "alpha", {dim}));
  }
  // Same, but a missing alpha is initialised to alpha_init (new gates in an old checkpoint).
  static Gating load_or_init(io::WeightSource& ws, const std::string& prefix, int64_t dim, float alpha_init) {
    return from_host(ws.get_or_init<float>(prefix + "alpha", {dim}, io::Init::constant(alpha_init), true));
  }
  static Gating init(int64_t dim, float alpha_init) {
    TTT_CHECK(dim > 0, "Gating::init: dim must be > 0, got ", dim);
    return from_host(Tensor<float, Cpu>::from_vector({dim}, std::vector<float>(size_t(dim), alpha_init)));
  }

  // Recomputes scale; call after changing alpha.
  void update_derived() {
    NoArenaScope<B> no_arena;
    scale = ops::cast<T>(ops::tanh(alpha));  // a new tensor: never aliases alpha
  }

  int64_t dim() const { return alpha.numel(); }

  // out = tanh(alpha) ⊙ x for x [.., C]; out may alias x.
  void operator()(const Tensor<T, B>& out, const Tensor<T, B>& x) const {
    TTT_CHECK(x.rank() >= 1 && x.size(-1) == dim(), "Gating: input ", x.shape().str(), " does not end in ", dim());
    ops::binary(out, x, scale, Binary::mul);
  }
  Tensor<T, B> operator()(const Tensor<T, B>& x) const {
    auto out = Tensor<T, B>::empty(x.shape());
    (*this)(out, x);
    return out;
  }
  // residual += tanh(alpha) ⊙ y (the gated residual branch).
  void add_to(const Tensor<T, B>& residual, const Tensor<T, B>& y) const {
    TTT_CHECK(residual.shape() == y.shape(), "Gating::add_to: residual ", residual.shape().str(), " and branch ",
              y.shape().str(), " differ");
    ops::add_(residual, (*this)(y));
  }

 private:
  static Gating from_host(const Tensor<float, Cpu>& a) {
    NoArenaScope<B> no_arena;
    Gating g;
    if constexpr (std::is_same_v<B, Cpu>) g.alpha = a.contiguous();
    else g.alpha = a.template to<B>();
    g.update_derived();
    return g;
  }
};

}  // namespace ttt::layers
