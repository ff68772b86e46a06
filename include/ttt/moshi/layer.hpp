#pragma once
// The layer-policy interface of the streaming transformer, and the plain Moshi layer.
//
// A policy P<T, B> is a class with:
//   static constexpr const char* design;          // the "design" name in the config's "ttt" list
//   static constexpr bool needs_embeddings;       // reads LayerInput::embeddings
//   static constexpr bool graph_safe;             // forward() is pure device work (CUDA graphs)
//   struct Params;                                 // immutable weights
//   struct State;                                  // what changes while streaming
//   static Params load(io::WeightSource&, const std::string& prefix, const LayerSpec&);
//   static State init_state(const Params&, int64_t batch, bool streaming);
//   static void forward(const Params&, State&, const Tensor<T, B>& x, const LayerInput<T, B>&);
//        // x [B, T, D] is the residual stream, updated in place
//   static void reset(State&, const std::vector<uint8_t>& mask);   // per batch item
//   static State clone(const State&);
//   static void save(const State&, io::SafeTensorsWriter&, const std::string& prefix);
//   static void load_state(State&, const io::SafeTensors&, const std::string& prefix);
//   static int64_t num_params(const Params&);
// The transformer holds a std::variant over a compile-time list of policies; the config
// picks one per layer. See docs/architecture.md, "Adding a layer policy".
#include <optional>
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/moshi/config.hpp"
#include "ttt/nn/attention.hpp"
#include "ttt/nn/ffn.hpp"
#include "ttt/nn/norm.hpp"

namespace ttt::moshi {

// What a policy is built from: the transformer's config, its layer index, and the
// config's entry for this layer (null for plain layers).
struct LayerSpec {
  TransformerConfig cfg;
  int64_t index = 0;
  io::Json entry;  // the "ttt" list entry that names this layer, or null
  std::string where;  // for error messages
};

// Per-call inputs shared by every layer of a transformer.
template <class T, class B>
struct LayerInput {
  Tensor<int64_t, B> positions;       // [B, T] absolute positions since reset
  Tensor<uint8_t, B> exec_mask;       // [B], undefined = all execute
  std::vector<uint8_t> exec_host;     // [B] host copy
  int64_t step = 0;                   // moshi's offset_cpu: per-step weight index base
  Tensor<T, B> embeddings;            // [B, T, D] the frame's token-embedding sum (In-Place TTT target)
};

// Residual add with moshi's optional LayerScale: x += scale * update.
template <class T, class B>
void add_scaled(const Tensor<T, B>& x, const Tensor<T, B>& update, const Tensor<T, B>& scale) {
  if (scale.defined()) ops::binary(update, update, scale, Binary::mul);
  ops::binary(x, x, update, Binary::add);
}

// The feed-forward half of a Moshi layer: x += LS2(FFN(N2(x))), per-step weights included.
template <class T, class B>
struct FfnBlock {
  nn::Norm<T, B> norm2;
  nn::Ffn<T, B> ffn;
  Tensor<T, B> ls2;  // [D] LayerScale, undefined when layer_scale is null
  TransformerConfig cfg;

  static FfnBlock load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    FfnBlock p;
    p.cfg = c;
    p.norm2 = nn::Norm<T, B>::load(ws, prefix + ".norm2", c.d_model, c.norm);
    p.ffn = nn::Ffn<T, B>::load(ws, prefix, c);
    if (c.layer_scale)
      p.ls2 = nn::weight<T, B>(ws, prefix + ".layer_scale_2.scale", {c.d_model}, io::Init::constant(*c.layer_scale));
    return p;
  }
  int64_t num_params() const {
    int64_t n = norm2.weight.numel() + (norm2.bias.defined() ? norm2.bias.numel() : 0) + (ls2.defined() ? ls2.numel() : 0);
    for (auto& w : ffn.w_in) n += w.numel();
    for (auto& w : ffn.w_out) n += w.numel();
    return n;
  }

  void feed_forward(const Tensor<T, B>& x, const LayerInput<T, B>& in) const {
    const int64_t Tn = x.size(1);
    const bool per_step = ffn.w_in.size() > 1;
    if (!per_step || Tn == 1) {
      const int64_t set = per_step ? cfg.weight_index(in.step) : 0;
      Tensor<T, B> h;
      if (ffn.gated) {
        // norm2, linear_in and the gating in one pass.
        auto f = norm2.as_prologue();
        f.glu = true;
        f.act = ffn.act;
        h = ops::fused_linear(x, ffn.w_in[size_t(set)], f);
      } else {
        h = ops::fused_linear(x, ffn.w_in[size_t(set)], norm2.as_prologue());
        ops::unary(h, h, ffn.act);
      }
      if (ls2.defined()) {
        auto u = ops::linear(h, ffn.w_out[size_t(set)]);
        add_scaled(x, u, ls2);
      } else {
        ops::linear(x, h, ffn.w_out[size_t(set)], 1.f);
      }
      return;
    }
    auto xn = norm2(x);
    for (int64_t t = 0; t < Tn; ++t) {
      auto xt = x.slice(1, t, t + 1).contiguous(), nt = xn.slice(1, t, t + 1).contiguous();
      const int64_t set = cfg.weight_index(in.step + t);
      if (ls2.defined()) {
        auto u = Tensor<T, B>::empty(xt.shape());
        ffn.forward(u, nt, set, 0.f);
        add_scaled(xt, u, ls2);
      } else {
        ffn.forward(xt, nt, set, 1.f);
      }
      x.slice(1, t, t + 1).copy_from(xt);
    }
  }
};

// The parts every attention-based layer shares: norm1, attention, LayerScale 1, and the
// feed-forward block.
template <class T, class B>
struct AttentionBlock {
  nn::Norm<T, B> norm1;
  nn::Mha<T, B> attn;
  Tensor<T, B> ls1;  // [D] LayerScale, undefined when layer_scale is null
  FfnBlock<T, B> ff;

  static AttentionBlock load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    AttentionBlock p;
    p.norm1 = nn::Norm<T, B>::load(ws, prefix + ".norm1", c.d_model, c.norm);
    p.attn = nn::Mha<T, B>::load(ws, prefix + ".self_attn", c);
    if (c.layer_scale)
      p.ls1 = nn::weight<T, B>(ws, prefix + ".layer_scale_1.scale", {c.d_model}, io::Init::constant(*c.layer_scale));
    p.ff = FfnBlock<T, B>::load(ws, prefix, c);
    return p;
  }
  int64_t num_params() const {
    int64_t n = norm1.weight.numel() + (norm1.bias.defined() ? norm1.bias.numel() : 0) + (ls1.defined() ? ls1.numel() : 0);
    for (auto& w : attn.in_proj) n += w.numel();
    for (auto& w : attn.out_proj) n += w.numel();
    return n + ff.num_params();
  }

  // x += LS1(Attn(N1(x)))
  void attention(const Tensor<T, B>& x, nn::KvRing<T, B>* ring, const LayerInput<T, B>& in) const {
    if (ls1.defined()) {
      auto u = Tensor<T, B>::empty(x.shape());
      attn.forward(u, x, &norm1, ring, in.positions, in.exec_mask, in.step, 0.f);
      add_scaled(x, u, ls1);
    } else {
      attn.forward(x, x, &norm1, ring, in.positions, in.exec_mask, in.step, 1.f);
    }
  }
  // x += LS2(FFN(N2(x)))
  void feed_forward(const Tensor<T, B>& x, const LayerInput<T, B>& in) const { ff.feed_forward(x, in); }
};

// The plain Moshi layer: x = x + LS1(Attn(N1(x))); x = x + LS2(FFN(N2(x))).
template <class T, class B>
struct AttentionLayer {
  static constexpr const char* design = "attention";
  static constexpr bool needs_embeddings = false;
  static constexpr bool graph_safe = true;
  using Params = AttentionBlock<T, B>;
  struct State {
    nn::KvRing<T, B> ring;  // undefined in teacher forcing
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec) {
    if (!spec.entry.is_null()) fail(spec.where, ": design 'attention' takes no options");
    return Params::load(ws, prefix, spec.cfg);
  }
  static int64_t num_params(const Params& p) { return p.num_params(); }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    State s;
    if (streaming) s.ring = p.attn.make_ring(batch);
    return s;
  }
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    p.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
    p.feed_forward(x, in);
  }
  static void reset(State& s, const std::vector<uint8_t>& mask) {
    if (s.ring.defined()) s.ring.reset(mask);
  }
  static State clone(const State& s) { return State{s.ring.defined() ? s.ring.clone() : nn::KvRing<T, B>{}}; }
  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) {
    if (s.ring.defined()) s.ring.save(w, prefix + ".kv");
  }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) {
    if (s.ring.defined()) s.ring.load(st, prefix + ".kv");
  }
};

template <template <class, class> class... Ps>
struct PolicyList {};

}  // namespace ttt::moshi
