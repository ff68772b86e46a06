#pragma once
// Design A, "replace" (docs/designs.md): TTT instead of attention.
//   x += tanh(α) ⊙ TTT(N1(x));  x += LS2(FFN(N2(x)))
// The layer's self_attn weights are not read; the TTT module and the gate are new weights
// (initialised by the references' rules when a checkpoint lacks them).
#include <string>
#include <tuple>

#include "ttt/layers/gating.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/moshi/design_common.hpp"
#include "ttt/moshi/ttt_options.hpp"

namespace ttt::moshi {

template <class T, class B>
struct ReplaceLayer {
  static constexpr const char* design = ReplaceOptions::design;
  struct Params {
    nn::Norm<T, B> norm1;
    nn::FfnBlock<T, B> ff;
    layers::TttParams<T, B> ttt;
    layers::Gating<T, B> gate;
  };
  struct State {
    layers::TttState<B> ttt;
    static constexpr auto fields = std::make_tuple(nn::field("ttt.", &State::ttt));
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const nn::LayerSpec& spec) {
    const std::string where = design_detail::where_of(spec);
    const auto o = ReplaceOptions::parse(spec.entry, where, spec.cfg);
    const int64_t D = spec.cfg.d_model;
    Params p;
    p.norm1 = nn::Norm<T, B>::load(ws, prefix + ".norm1", D, spec.cfg.norm);
    p.ff = nn::FfnBlock<T, B>::load(ws, prefix, spec.cfg);
    p.ttt = layers::TttParams<T, B>::load(ws, prefix + ".ttt.", o.ttt.layer_config(D, where), true);
    p.gate = layers::Gating<T, B>::load_or_init(ws, prefix + ".ttt_gate.", D, o.gate_alpha_init);
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool) { return State{layers::TttState<B>::init(p.ttt, batch)}; }
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const nn::LayerInput<T, B>& in) {
    auto y = layers::ttt_forward_at(p.ttt, s.ttt, p.norm1(x), in.positions, in.exec_mask, in.workspace);
    p.gate.add_to(x, y);
    p.ff.feed_forward(x, in);
  }
  static int64_t num_params(const Params& p) {
    return p.norm1.num_params() + p.ff.num_params() + p.ttt.num_params() + p.gate.dim();
  }
};

}  // namespace ttt::moshi
