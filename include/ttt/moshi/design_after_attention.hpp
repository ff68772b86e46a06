#pragma once
// Design B, "after_attention" (docs/designs.md): attention, then a gated TTT branch with its
// own pre-norm, then the FFN.
//   x += LS1(Attn(N1(x)));  x += tanh(α) ⊙ TTT(Nt(x));  x += LS2(FFN(N2(x)))
#include <string>
#include <tuple>

#include "ttt/layers/gating.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/moshi/design_common.hpp"
#include "ttt/moshi/ttt_options.hpp"

namespace ttt::moshi {

template <class T, class B>
struct AfterAttentionLayer {
  static constexpr const char* design = AfterAttentionOptions::design;
  struct Params {
    nn::AttentionBlock<T, B> blk;
    nn::Norm<T, B> norm_in;
    layers::TttParams<T, B> ttt;
    layers::Gating<T, B> gate;
  };
  struct State {
    nn::KvRing<T, B> ring;  // undefined in teacher forcing
    layers::TttState<B> ttt;
    static constexpr auto fields = std::make_tuple(nn::field("kv", &State::ring), nn::field("ttt.", &State::ttt));
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const nn::LayerSpec& spec) {
    const std::string where = design_detail::where_of(spec);
    const auto o = AfterAttentionOptions::parse(spec.entry, where, spec.cfg);
    const int64_t D = spec.cfg.d_model;
    Params p;
    p.blk = nn::AttentionBlock<T, B>::load(ws, prefix, spec.cfg);
    p.norm_in = design_detail::load_new_norm<T, B>(ws, prefix + ".ttt_norm_in", D, spec.cfg.norm);
    p.ttt = layers::TttParams<T, B>::load(ws, prefix + ".ttt.", o.ttt.layer_config(D, where), true);
    p.gate = layers::Gating<T, B>::load_or_init(ws, prefix + ".ttt_gate.", D, o.gate_alpha_init);
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    return State{streaming ? p.blk.attn.make_ring(batch) : nn::KvRing<T, B>{}, layers::TttState<B>::init(p.ttt, batch)};
  }
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const nn::LayerInput<T, B>& in) {
    p.blk.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
    auto y = layers::ttt_forward_at(p.ttt, s.ttt, p.norm_in(x), in.positions, in.exec_mask, in.workspace);
    p.gate.add_to(x, y);
    p.blk.feed_forward(x, in);
  }
  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + p.norm_in.num_params() + p.ttt.num_params() + p.gate.dim();
  }
};

}  // namespace ttt::moshi
