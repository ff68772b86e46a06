#pragma once
// Design D, "kv_memory" (docs/designs.md): a TTT-augmented KV cache. The layer's attention
// sees its recent R frames exactly, plus N virtual keys/values made from a TTT memory of the
// layer input: source frame p gives
//   k = RoPE(to_k(m[p]), p - R),  v = to_v(m[p]),  m = TTT(N1(x)),
// visible from frames p .. p + N - 1, with a learned per-head logit bias. The attention
// itself is the plain layer's (nn::Mha with ExtraKeys); this policy only makes the keys.
#include <cmath>
#include <string>
#include <tuple>

#include "ttt/layers/ttt_kernels.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/moshi/design_common.hpp"
#include "ttt/moshi/ttt_options.hpp"

namespace ttt::moshi {

template <class T, class B>
struct KvMemoryLayer {
  static constexpr const char* design = KvMemoryOptions::design;
  struct Params {
    nn::AttentionBlock<T, B> blk;  // attention window = R
    layers::TttParams<T, B> mem;
    Tensor<T, B> to_kv;        // [2D, D]: to_k rows then to_v rows (one product per step)
    Tensor<float, B> vbias;    // [H]
    int64_t recent = 100, num_virtual = 10;
  };
  struct State {
    nn::KvRing<T, B> ring;    // recent keys, capacity R (undefined in teacher forcing)
    nn::KvRing<T, B> vring;   // virtual keys by source frame, capacity N
    layers::TttState<B> mem;  // undefined with N = 0: the memory never runs
    static constexpr auto fields = std::make_tuple(nn::field("kv", &State::ring), nn::field("vkv", &State::vring),
                                                   nn::field("memory.", &State::mem));
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const nn::LayerSpec& spec) {
    const std::string where = design_detail::where_of(spec);
    const auto o = KvMemoryOptions::parse(spec.entry, where, spec.cfg);
    const int64_t D = spec.cfg.d_model, H = spec.cfg.num_heads;
    Params p;
    nn::TransformerConfig c = spec.cfg;
    c.context = o.recent;
    p.blk = nn::AttentionBlock<T, B>::load(ws, prefix, c);
    p.recent = o.recent;
    p.num_virtual = o.num_virtual;
    const std::string mp = prefix + ".self_attn.memory.";
    p.mem = layers::TttParams<T, B>::load(ws, mp, o.ttt.layer_config(D, where), true);
    ws.init_missing(mp + "to_k.weight", {D, D}, io::Init::normal(0.02f));
    ws.init_missing(mp + "to_v.weight", {D, D}, io::Init::normal(0.02f));
    ws.init_missing(mp + "virtual_bias", {H}, io::Init::constant(o.virtual_bias_init));
    auto cat = Tensor<T, Cpu>::empty({2 * D, D});
    cat.slice(0, 0, D).copy_from(ws.get<T>(mp + "to_k.weight", {D, D}));
    cat.slice(0, D, 2 * D).copy_from(ws.get<T>(mp + "to_v.weight", {D, D}));
    p.to_kv = nn::to_backend<B>(cat);
    p.vbias = nn::to_backend<B>(ws.get<float>(mp + "virtual_bias", {H}));
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    State s;
    if (streaming) {
      s.ring = p.blk.attn.make_ring(batch);
      if (p.num_virtual > 0) s.vring = nn::KvRing<T, B>::make(batch, p.blk.attn.num_heads, p.num_virtual, p.blk.attn.head_dim);
    }
    if (p.num_virtual > 0) s.mem = layers::TttState<B>::init(p.mem, batch);
    return s;
  }

  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const nn::LayerInput<T, B>& in) {
    nn::KvRing<T, B>* ring = s.ring.defined() ? &s.ring : nullptr;
    if (p.num_virtual == 0) {  // exactly the windowed attention layer
      p.blk.attention(x, ring, in);
      p.blk.feed_forward(x, in);
      return;
    }
    const auto& a = p.blk.attn;
    const int64_t Bn = x.size(0), Tn = x.size(1), H = a.num_heads, hd = a.head_dim;
    auto u = p.blk.norm1(x);
    // The memory reads the layer input; its outputs become virtual keys and values.
    auto m = layers::ttt_forward_at(p.mem, s.mem, u, in.positions, in.exec_mask, in.workspace);
    const auto vkv = ops::linear(m, p.to_kv).reshape({Bn, Tn, 2 * H, hd});
    nn::ExtraKeys<T, B> virt;
    virt.ring = s.vring.defined() ? &s.vring : nullptr;
    virt.k = vkv.slice(2, 0, H), virt.v = vkv.slice(2, H, 2 * H);  // [B, T, H, hd] views
    virt.positions = in.positions;
    virt.window = p.num_virtual;
    virt.bias = p.vbias;
    if (a.rope) {  // virtual keys sit R frames back: RoPE at position - R (made on the device)
      auto vpos = Tensor<int64_t, B>::empty({Bn, Tn});
      layers::TttKernels<B>::call_flags(in.positions, {}, -p.recent, 0, vpos, {}, {});
      ops::rope(virt.k, virt.k, vpos, a.max_period);
    }
    p.blk.attention(x, ring, in, &virt, u);
    p.blk.feed_forward(x, in);
  }

  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + p.mem.num_params() + p.to_kv.numel() + p.vbias.numel();
  }
};

}  // namespace ttt::moshi
