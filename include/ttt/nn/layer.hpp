#pragma once
// The layer-policy interface of the streaming transformer (nn/transformer.hpp), the blocks an
// attention layer is made of, and the plain attention layer.
//
// A policy P<T, B> is a class with:
//   static constexpr const char* design;     // the name a config's layer plan uses to pick it
//   struct Params;                            // immutable weights
//   struct State;                             // what changes while streaming (see below)
//   static Params load(io::WeightSource&, const std::string& prefix, const LayerSpec&);
//   static State init_state(const Params&, int64_t batch, bool streaming);
//   static void forward(const Params&, State&, const Tensor<T, B>& x, const LayerInput<T, B>&);
//        // x [B, T, D] is the residual stream, updated in place; pure device work: host
//        // bookkeeping belongs in `advance`, so that a captured CUDA graph stays valid
//   static int64_t num_params(const Params&);
// and optionally (the transformer supplies the defaults):
//   static constexpr bool needs_embeddings;   // reads LayerInput::embeddings (default false)
//   static constexpr bool graph_safe;         // false: forward reads host values that change
//                                             // from frame to frame (default true)
//   reset / clone / save / load_state / advance   // default: applied to each State field
//   static uint64_t graph_key(const Params&, const State&, const std::vector<uint8_t>& exec);
//        // host-decided device work of the next one-frame call (default: none, key 0)
//
// State fields. A State lists the members that make up the stream's memory:
//   static constexpr auto fields = std::make_tuple(nn::field("kv", &State::ring), ...);
// Each is a stream-state type (KvRing, layers::TttState, or your own) with
//   bool defined() const;  void reset(const std::vector<uint8_t>& mask);  X clone() const;
//   void save(io::SafeTensorsWriter&, const std::string& key) const;
//   void load(const io::SafeTensors&, const std::string& key);
//   optional: void advance(int64_t T, const std::vector<uint8_t>& exec);   // host bookkeeping
// Undefined members (a KV ring in teacher forcing) are skipped. A field saves under
// "<layer prefix>.<name>": the name is the key prefix its save() extends.
#include <cmath>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/workspace.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/attention.hpp"
#include "ttt/nn/ffn.hpp"
#include "ttt/nn/linear.hpp"
#include "ttt/nn/norm.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::nn {

// One State member of a policy, by name (see the header comment).
template <class S, class M>
struct StateField {
  const char* name;
  M S::*member;
};
template <class S, class M>
constexpr StateField<S, M> field(const char* name, M S::*member) {
  return {name, member};
}

// What a policy is built from: the transformer's config, its layer index, and the layer
// plan's entry for this layer (null for a plain layer; e.g. Moshi's "ttt" list entry).
struct LayerSpec {
  TransformerConfig cfg;
  int64_t index = 0;
  io::Json entry;
  std::string where;  // for error messages
};

// Per-call inputs shared by every layer of a transformer.
template <class T, class B>
struct LayerInput {
  Tensor<int64_t, B> positions;       // [B, T] absolute positions since reset
  Tensor<uint8_t, B> exec_mask;       // [B], undefined = all execute
  std::vector<uint8_t> exec_host;     // [B] host copy (host bookkeeping only)
  int64_t step = 0;                   // per-step weight index base (moshi's offset_cpu)
  Tensor<T, B> embeddings;            // [B, T, D] the frame's token-embedding sum (In-Place TTT target)
  Workspace<B>* workspace = nullptr;  // the session's persistent scratch (null: per-call scratch)
};

// LayerScale folded into the projection that feeds it, at load: scale ⊙ (W h) = (diag(scale) W) h,
// so the residual add stays fused into the projection (linear with beta 1) and a streaming step
// launches no separate scale and add. Each weight set becomes a new tensor (the loaded one may
// be a read-only view of a mapped file). In float the product differs from scaling the output
// by one rounding of each weight. (fold_layer_scale, nn/linear.hpp: on a quantised weight it
// scales the row scales.)

template <class T, class B>
int64_t count_params(const Tensor<T, B>& t) {
  return t.defined() ? t.numel() : 0;
}

// The feed-forward half of a layer: x += LS2(FFN(N2(x))), per-step weights included.
template <class T, class B>
struct FfnBlock {
  Norm<T, B> norm2;
  Ffn<T, B> ffn;
  Tensor<T, B> ls2;  // [D] LayerScale (folded into ffn.w_out), undefined when layer_scale is null
  TransformerConfig cfg;

  static FfnBlock load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    FfnBlock p;
    p.cfg = c;
    p.norm2 = Norm<T, B>::load(ws, prefix + ".norm2", c.d_model, c.norm);
    p.ffn = Ffn<T, B>::load(ws, prefix, c);
    if (c.layer_scale) {
      p.ls2 = weight<T, B>(ws, prefix + ".layer_scale_2.scale", {c.d_model}, io::Init::constant(*c.layer_scale));
      fold_layer_scale(p.ffn.w_out, p.ls2);
    }
    return p;
  }
  int64_t num_params() const { return norm2.num_params() + ffn.num_params() + count_params(ls2); }

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
        h = nn::fused_linear(x, ffn.w_in[size_t(set)], f);
      } else {
        h = nn::fused_linear(x, ffn.w_in[size_t(set)], norm2.as_prologue());
        ops::unary(h, h, ffn.act);
      }
      nn::linear(x, h, ffn.w_out[size_t(set)], 1.f);  // LayerScale folded into w_out
      return;
    }
    auto xn = norm2(x);
    for (int64_t t = 0; t < Tn; ++t) {
      auto xt = x.slice(1, t, t + 1).contiguous(), nt = xn.slice(1, t, t + 1).contiguous();
      const int64_t set = cfg.weight_index(in.step + t);
      ffn.forward(xt, nt, set, 1.f);
      x.slice(1, t, t + 1).copy_from(xt);
    }
  }
};

// The parts every attention-based layer shares: norm1, attention, LayerScale 1, and the
// feed-forward block.
template <class T, class B>
struct AttentionBlock {
  Norm<T, B> norm1;
  Mha<T, B> attn;
  Tensor<T, B> ls1;  // [D] LayerScale (folded into attn.out_proj), undefined when layer_scale is null
  FfnBlock<T, B> ff;

  static AttentionBlock load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    AttentionBlock p;
    p.norm1 = Norm<T, B>::load(ws, prefix + ".norm1", c.d_model, c.norm);
    p.attn = Mha<T, B>::load(ws, prefix + ".self_attn", c);
    if (c.layer_scale) {
      p.ls1 = weight<T, B>(ws, prefix + ".layer_scale_1.scale", {c.d_model}, io::Init::constant(*c.layer_scale));
      fold_layer_scale(p.attn.out_proj, p.ls1);
    }
    p.ff = FfnBlock<T, B>::load(ws, prefix, c);
    return p;
  }
  int64_t num_params() const { return norm1.num_params() + attn.num_params() + count_params(ls1) + ff.num_params(); }

  // x += LS1(Attn(N1(x))). `normed`: N1(x) when the caller has it already (it then feeds
  // the projection as is); `extra`: keys attended besides the layer's own (Mha::forward).
  void attention(const Tensor<T, B>& x, KvRing<T, B>* ring, const LayerInput<T, B>& in,
                 const ExtraKeys<T, B>* extra = nullptr, const Tensor<T, B>& normed = {}) const {
    const Tensor<T, B>& src = normed.defined() ? normed : x;
    const Norm<T, B>* norm = normed.defined() ? nullptr : &norm1;
    attn.forward(x, src, norm, ring, in.positions, in.exec_mask, in.step, 1.f, extra);  // LayerScale folded
  }
  // x += LS2(FFN(N2(x)))
  void feed_forward(const Tensor<T, B>& x, const LayerInput<T, B>& in) const { ff.feed_forward(x, in); }
};

// The plain transformer layer: x = x + LS1(Attn(N1(x))); x = x + LS2(FFN(N2(x))).
template <class T, class B>
struct AttentionLayer {
  static constexpr const char* design = "attention";
  using Params = AttentionBlock<T, B>;
  struct State {
    KvRing<T, B> ring;  // undefined in teacher forcing
    static constexpr auto fields = std::make_tuple(field("kv", &State::ring));
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
};

template <template <class, class> class... Ps>
struct PolicyList {};

}  // namespace ttt::nn
