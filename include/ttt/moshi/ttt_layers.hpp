#pragma once
// The four ways to put TTT into Moshi's temporal transformer, as layer policies
// (docs/ttt_moshi_designs.md is the contract; docs/config.md the "ttt" schema):
//   ReplaceLayer         x += tanh(a) * TTT(N1(x));                          x += LS2(FFN(N2(x)))
//   AfterAttentionLayer  x += LS1(Attn(N1(x))); x += tanh(a) * TTT(Nt(x));  x += LS2(FFN(N2(x)))
//   InplaceFfnLayer      the FFN's linear_out is a fast weight updated once per chunk (In-Place TTT)
//   KvMemoryLayer        attention over a recent window plus virtual K/V read from a TTT memory
// New weights a checkpoint lacks are initialised by the references' rules and reported.
#include <cmath>
#include <string>
#include <vector>

#include "ttt/layers/gating.hpp"
#include "ttt/layers/ttt_layer.hpp"
#include "ttt/moshi/layer.hpp"
#include "ttt/moshi/ttt_designs.hpp"

namespace ttt::moshi {

namespace ttt_detail {

inline layers::TttConfig make_config(const TttOptions& o, int64_t dim, const std::string& where) {
  layers::TttConfig c;
  c.kind = o.kind == "mlp" ? layers::TttConfig::Kind::mlp : layers::TttConfig::Kind::linear;
  c.hidden_size = dim;
  c.num_heads = o.num_heads;
  c.mini_batch_size = o.mini_batch_size;
  c.mlp_expansion = o.mlp_expansion;
  c.base_lr = o.base_lr;
  c.rope_theta = o.rope_theta;
  c.use_gate = o.use_gate;
  c.finalize(where);
  return c;
}

inline std::string where_of(const LayerSpec& spec) { return spec.where + ": layer " + std::to_string(spec.index); }

inline TttOptions options_of(const LayerSpec& spec) {
  return TttOptions::parse(spec.entry, where_of(spec), spec.cfg.num_heads, spec.cfg.d_model);
}

template <class T, class B>
int64_t count(const layers::TttParams<T, B>& p) {
  int64_t n = 0;
  auto add = [&](const auto& t) { n += t.defined() ? t.numel() : 0; };
  add(p.q_proj), add(p.k_proj), add(p.v_proj), add(p.o_proj), add(p.g_proj);
  add(p.q_bias), add(p.k_bias), add(p.v_bias), add(p.o_bias);
  add(p.learnable_ttt_lr_weight), add(p.learnable_ttt_lr_bias), add(p.learnable_token_idx);
  add(p.ttt_norm_weight), add(p.ttt_norm_bias), add(p.post_norm_weight), add(p.post_norm_bias);
  add(p.W1), add(p.b1), add(p.W2), add(p.b2);
  return n;
}

// A norm of the model's kind whose weights a checkpoint may lack (ones / zeros then).
template <class T, class B>
nn::Norm<T, B> load_new_norm(io::WeightSource& ws, const std::string& prefix, int64_t dim, NormKind kind) {
  if (is_rms(kind)) {
    ws.init_missing(prefix + ".alpha", {1, 1, dim}, io::Init::constant(1.f));
  } else {
    ws.init_missing(prefix + ".weight", {dim}, io::Init::constant(1.f));
    ws.init_missing(prefix + ".bias", {dim}, io::Init::constant(0.f));
  }
  return nn::Norm<T, B>::load(ws, prefix, dim, kind);
}

}  // namespace ttt_detail

// A. TTT instead of attention.
template <class T, class B>
struct ReplaceLayer {
  static constexpr const char* design = "replace";
  static constexpr bool needs_embeddings = false;
  static constexpr bool graph_safe = true;  // phases come from the device positions (ttt_forward_at)
  struct Params {
    nn::Norm<T, B> norm1;
    FfnBlock<T, B> ff;
    layers::TttParams<T, B> ttt;
    layers::Gating<T, B> gate;
  };
  struct State {
    layers::TttState<B> ttt;
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec) {
    const TttOptions o = ttt_detail::options_of(spec);
    const int64_t D = spec.cfg.d_model;
    Params p;
    p.norm1 = nn::Norm<T, B>::load(ws, prefix + ".norm1", D, spec.cfg.norm);
    p.ff = FfnBlock<T, B>::load(ws, prefix, spec.cfg);
    p.ttt = layers::TttParams<T, B>::load(ws, prefix + ".ttt.", ttt_detail::make_config(o, D, ttt_detail::where_of(spec)), true);
    p.gate = layers::Gating<T, B>::load_or_init(ws, prefix + ".ttt_gate.", D, o.gate_alpha_init);
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool) { return State{layers::TttState<B>::init(p.ttt, batch)}; }
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    auto y = layers::ttt_forward_at(p.ttt, s.ttt, p.norm1(x), in.positions, in.exec_mask);
    p.gate.add_to(x, y);
    p.ff.feed_forward(x, in);
  }
  static void advance(State& s, int64_t Tn, const std::vector<uint8_t>& exec) { layers::ttt_advance(s.ttt, Tn, exec); }
  static void reset(State& s, const std::vector<uint8_t>& mask) { s.ttt.reset(mask); }
  static State clone(const State& s) { return State{s.ttt.clone()}; }
  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) { s.ttt.save(w, prefix + ".ttt."); }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) { s.ttt.load(st, prefix + ".ttt."); }
  static int64_t num_params(const Params& p) {
    return p.norm1.weight.numel() + p.ff.num_params() + ttt_detail::count(p.ttt) + p.gate.dim();
  }
};

// B. Attention, then a gated TTT branch with its own pre-norm, then the FFN.
template <class T, class B>
struct AfterAttentionLayer {
  static constexpr const char* design = "after_attention";
  static constexpr bool needs_embeddings = false;
  static constexpr bool graph_safe = true;
  struct Params {
    AttentionBlock<T, B> blk;
    nn::Norm<T, B> norm_in;
    layers::TttParams<T, B> ttt;
    layers::Gating<T, B> gate;
  };
  struct State {
    nn::KvRing<T, B> ring;
    layers::TttState<B> ttt;
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec) {
    const TttOptions o = ttt_detail::options_of(spec);
    const int64_t D = spec.cfg.d_model;
    Params p;
    p.blk = AttentionBlock<T, B>::load(ws, prefix, spec.cfg);
    p.norm_in = ttt_detail::load_new_norm<T, B>(ws, prefix + ".ttt_norm_in", D, spec.cfg.norm);
    p.ttt = layers::TttParams<T, B>::load(ws, prefix + ".ttt.", ttt_detail::make_config(o, D, ttt_detail::where_of(spec)), true);
    p.gate = layers::Gating<T, B>::load_or_init(ws, prefix + ".ttt_gate.", D, o.gate_alpha_init);
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    State s{streaming ? p.blk.attn.make_ring(batch) : nn::KvRing<T, B>{}, layers::TttState<B>::init(p.ttt, batch)};
    return s;
  }
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    p.blk.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
    auto y = layers::ttt_forward_at(p.ttt, s.ttt, p.norm_in(x), in.positions, in.exec_mask);
    p.gate.add_to(x, y);
    p.blk.feed_forward(x, in);
  }
  static void advance(State& s, int64_t Tn, const std::vector<uint8_t>& exec) { layers::ttt_advance(s.ttt, Tn, exec); }
  static void reset(State& s, const std::vector<uint8_t>& mask) {
    if (s.ring.defined()) s.ring.reset(mask);
    s.ttt.reset(mask);
  }
  static State clone(const State& s) {
    return State{s.ring.defined() ? s.ring.clone() : nn::KvRing<T, B>{}, s.ttt.clone()};
  }
  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) {
    if (s.ring.defined()) s.ring.save(w, prefix + ".kv");
    s.ttt.save(w, prefix + ".ttt.");
  }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) {
    if (s.ring.defined()) s.ring.load(st, prefix + ".kv");
    s.ttt.load(st, prefix + ".ttt.");
  }
  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + p.norm_in.weight.numel() + ttt_detail::count(p.ttt) + p.gate.dim();
  }
};

// C. In-Place TTT: linear_out of the gated FFN is a fast weight W [D, Hf] per stream,
// W_j = W_out + lr * sum_{i<j} V_i^T Z_i over completed chunks of C frames, with the target
// V = conv_k(E) @ P from the frame's token embeddings E (zero padding inside the chunk).
// Frames of a chunk use the weights from before it; streaming buffers the chunk.
template <class T, class B>
struct InplaceFfnLayer {
  static constexpr const char* design = "inplace_ffn";
  static constexpr bool needs_embeddings = true;
  // One-frame calls write the chunk buffers at device positions; whether a chunk completes
  // (the update runs) is host state, so it is part of the frame graph's key (graph_key).
  static constexpr bool graph_safe = true;
  struct Params {
    AttentionBlock<T, B> blk;
    Tensor<float, B> conv;  // [D, k] (ttt_conv.weight [D, 1, k])
    Tensor<float, B> proj;  // [D, D] used as stored: V = E~ @ P (undefined without target_proj)
    int64_t chunk = 256;
    float lr = 0.001f;
  };
  struct State {
    nn::KvRing<T, B> ring;
    Tensor<float, B> W;     // [B, D, Hf] fast linear_out, fp32
    Tensor<float, B> zbuf;  // [B, C, Hf] the current chunk's FFN activations
    Tensor<float, B> ebuf;  // [B, C, D]  and token embeddings
    Tensor<float, B> w_out;  // [D, Hf] the pretrained weight (reset value), shared
    Tensor<int64_t, B> slot_pos;  // [B, C] scratch for kv_write's position record (not state)
    std::vector<int64_t> offset;  // [B] frames since reset; phase = offset % C
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec) {
    const TttOptions o = ttt_detail::options_of(spec);
    const int64_t D = spec.cfg.d_model, k = o.conv_kernel;
    Params p;
    p.blk = AttentionBlock<T, B>::load(ws, prefix, spec.cfg);
    TTT_CHECK(p.blk.ff.ffn.gated && p.blk.ff.ffn.w_in.size() == 1, ttt_detail::where_of(spec),
              ": design 'inplace_ffn' needs a gated FFN with one weight set");
    p.chunk = o.chunk_size;
    p.lr = o.lr;
    // ttt_conv is zero-initialised (the layer then equals the pretrained one); ttt_proj
    // is zeros plus N(0, 0.02) on the diagonal (In-Place TTT's rule for square Linears).
    ws.init_missing(prefix + ".gating.ttt_conv.weight", {D, 1, k}, io::Init::constant(0.f));
    p.conv = nn::to_backend<B>(ws.get<float>(prefix + ".gating.ttt_conv.weight", {D, 1, k}).contiguous().reshape({D, k}));
    if (o.target_proj) {
      const std::string name = prefix + ".gating.ttt_proj.weight";
      if (!ws.has(name)) {
        auto diag = io::detail::make_init({D}, io::Init::normal(0.02f), ws.seed(), name);
        auto P = Tensor<float, Cpu>::zeros({D, D});
        for (int64_t i = 0; i < D; ++i) P(i, i) = diag.data()[i];
        ws.put_initialised(name, P);
      }
      p.proj = nn::to_backend<B>(ws.get<float>(name, {D, D}));
    }
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    NoArenaScope<B> persistent;
    State s;
    if (streaming) s.ring = p.blk.attn.make_ring(batch);
    const auto& wo = p.blk.ff.ffn.w_out[0];  // [D, Hf]
    const int64_t D = wo.size(0), Hf = wo.size(1);
    s.w_out = ops::cast<float>(wo).clone();
    s.W = Tensor<float, B>::empty({batch, D, Hf});
    s.zbuf = Tensor<float, B>::zeros({batch, p.chunk, Hf});
    s.ebuf = Tensor<float, B>::zeros({batch, p.chunk, D});
    s.slot_pos = Tensor<int64_t, B>::zeros({batch, p.chunk});
    s.offset.assign(size_t(batch), 0);
    reset(s, std::vector<uint8_t>(size_t(batch), 1));
    return s;
  }

  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    TTT_CHECK(in.embeddings.defined(), "inplace_ffn: the frame embeddings were not provided");
    p.blk.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
    const auto& ffb = p.blk.ff;
    auto f = ffb.norm2.as_prologue();
    f.glu = true;
    f.act = ffb.ffn.act;
    auto Z = ops::fused_linear(x, ffb.ffn.w_in[0], f);  // [B, T, Hf]: act(gate) * value of norm2(x)
    const int64_t Bn = x.size(0);
    if (x.size(1) == 1) {
      step(p, s, x, Z, in);
      return;
    }
    for (int64_t b = 0; b < Bn; ++b)
      run(p, s, b, x.slice(0, b, b + 1), Z.slice(0, b, b + 1), in.embeddings.slice(0, b, b + 1),
          in.exec_host.empty() || in.exec_host[size_t(b)]);
  }

  // Host bookkeeping after a call of Tn frames (outside a captured frame).
  static void advance(State& s, int64_t Tn, const std::vector<uint8_t>& exec) {
    for (size_t b = 0; b < s.offset.size(); ++b)
      if (exec.empty() || exec[b]) s.offset[b] += Tn;
  }
  // The items whose chunk a one-frame call completes (their update runs): a frame graph is
  // captured per distinct set.
  static uint64_t graph_key(const Params& p, const State& s, const std::vector<uint8_t>& exec) {
    uint64_t key = 0;
    for (size_t b = 0; b < s.offset.size(); ++b)
      if ((exec.empty() || exec[b]) && s.offset[b] % p.chunk == p.chunk - 1) key = key * 1099511628211ull + b + 1;
    return key;
  }

  static void reset(State& s, const std::vector<uint8_t>& mask) {
    if (s.ring.defined()) s.ring.reset(mask);
    for (size_t b = 0; b < mask.size(); ++b) {
      if (!mask[b]) continue;
      s.W.select(0, int64_t(b)).copy_from(s.w_out);
      s.offset[b] = 0;
    }
  }
  static State clone(const State& s) {
    NoArenaScope<B> persistent;
    State c = s;
    if (s.ring.defined()) c.ring = s.ring.clone();
    c.W = s.W.clone();
    c.zbuf = s.zbuf.clone();
    c.ebuf = s.ebuf.clone();
    return c;
  }
  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) {
    if (s.ring.defined()) s.ring.save(w, prefix + ".kv");
    w.add(prefix + ".inplace.W", s.W);
    w.add(prefix + ".inplace.zbuf", s.zbuf);
    w.add(prefix + ".inplace.ebuf", s.ebuf);
    w.add(prefix + ".inplace.offset", Tensor<int64_t, Cpu>::from_vector({int64_t(s.offset.size())}, s.offset));
  }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) {
    if (s.ring.defined()) s.ring.load(st, prefix + ".kv");
    for (auto [name, t] : {std::pair{".inplace.W", &s.W}, {".inplace.zbuf", &s.zbuf}, {".inplace.ebuf", &s.ebuf}}) {
      auto h = st.load<float>(prefix + name);
      TTT_CHECK(h.shape() == t->shape(), st.path(), ": state tensor '", prefix + name, "' has shape ", h.shape().str(),
                ", expected ", t->shape().str());
      t->copy_from(nn::to_backend<B>(h));
    }
    const auto off = st.load_counters(prefix + ".inplace.offset");
    TTT_CHECK(off.size() == s.offset.size(), st.path(), ": '", prefix, ".inplace.offset' does not match the batch");
    s.offset = off;
  }
  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + p.conv.numel() + (p.proj.defined() ? p.proj.numel() : 0);
  }

 private:
  // xs [1, n, D] += LS2(zs W^T) for one item's rows, W [D, Hf] its fast weight. The product
  // goes through ops::linear like the plain FFN's, so an untouched W (zero conv) gives the
  // pretrained layer bit for bit in fp32.
  static void add_fast_out(const Params& p, const Tensor<float, B>& W, const Tensor<T, B>& xs, const Tensor<T, B>& zs) {
    const auto& ls2 = p.blk.ff.ls2;
    if constexpr (std::is_same_v<T, float>) {
      if (ls2.defined()) {
        auto u = ops::linear(zs, W);
        add_scaled(xs, u, ls2);
      } else {
        ops::linear(xs, zs, W, 1.f);
      }
    } else {
      auto u = ops::cast<T>(ops::linear(ops::cast<float>(zs), W));
      if (ls2.defined()) add_scaled(xs, u, ls2);
      else ops::add_(xs, u);
    }
  }

  // Item b: x [1, T, D] += LS2(Z W^T) frame by frame with the weights of each frame's
  // chunk, buffering the chunk and updating W at its end only when `commit`.
  static void run(const Params& p, State& s, int64_t b, const Tensor<T, B>& x, const Tensor<T, B>& Z,
                  const Tensor<T, B>& E, bool commit) {
    const int64_t Tn = Z.size(1), C = p.chunk;
    auto W = s.W.select(0, b);  // [D, Hf]
    int64_t ph = s.offset[size_t(b)] % C;
    for (int64_t t0 = 0; t0 < Tn;) {
      const int64_t n = std::min(C - ph, Tn - t0);
      auto xs = x.slice(1, t0, t0 + n), zs = Z.slice(1, t0, t0 + n);  // contiguous rows of one item
      add_fast_out(p, W, xs, zs);
      if (commit) {
        auto zb = s.zbuf.slice(0, b, b + 1), eb = s.ebuf.slice(0, b, b + 1);
        ops::cast(zb.slice(1, ph, ph + n), zs);
        ops::cast(eb.slice(1, ph, ph + n), E.slice(1, t0, t0 + n));
        if (ph + n == C) update(p, zb, eb, s.W.slice(0, b, b + 1));
      }
      t0 += n;
      ph = (ph + n) % C;
    }
  }

  // One frame for every item: x += LS2(Z W_b^T); the chunk buffers take Z and E at slot
  // position % C (kv_write, masked by the device exec mask), and items whose chunk this
  // frame completes (host offsets: see graph_key) update W. Equal to run() with Tn = 1.
  static void step(const Params& p, State& s, const Tensor<T, B>& x, const Tensor<T, B>& Z, const LayerInput<T, B>& in) {
    const int64_t Bn = x.size(0), C = p.chunk, Hf = Z.size(2), D = x.size(2);
    for (int64_t b = 0; b < Bn; ++b) add_fast_out(p, s.W.select(0, b), x.slice(0, b, b + 1), Z.slice(0, b, b + 1));
    // The rings' "k" and "v" are the same buffer: kv_write stores the row twice, same values.
    auto zr = s.zbuf.reshape({Bn, 1, C, Hf}), er = s.ebuf.reshape({Bn, 1, C, D});
    auto zf = ops::cast<float>(Z).reshape({Bn, 1, 1, Hf});
    auto ef = ops::cast<float>(in.embeddings).reshape({Bn, 1, 1, D});
    ops::kv_write(zr, zr, s.slot_pos, zf, zf, in.positions, in.exec_mask);
    ops::kv_write(er, er, s.slot_pos, ef, ef, in.positions, in.exec_mask);
    for (int64_t b = 0; b < Bn; ++b)
      if ((in.exec_host.empty() || in.exec_host[size_t(b)]) && s.offset[size_t(b)] % C == C - 1)
        update(p, s.zbuf.slice(0, b, b + 1), s.ebuf.slice(0, b, b + 1), s.W.slice(0, b, b + 1));
  }

  // W += lr * V^T Z for one complete chunk: V = conv(E) (@ P).
  static void update(const Params& p, const Tensor<float, B>& zbuf, const Tensor<float, B>& ebuf,
                     const Tensor<float, B>& W) {
    const int64_t n = ebuf.size(0), C = ebuf.size(1), D = ebuf.size(2), k = p.conv.size(1), half = k / 2;
    auto Et = Tensor<float, B>::zeros({n, C, D});
    for (int64_t m = 0; m < k; ++m) {
      const int64_t sft = m - half;  // E~[t] += w[:, m] * E[t + sft], zero outside the chunk
      const int64_t lo = std::max<int64_t>(0, -sft), hi = std::min<int64_t>(C, C - sft);
      if (lo >= hi) continue;
      auto dst = Et.slice(1, lo, hi);
      auto term = ops::mul(ebuf.slice(1, lo + sft, hi + sft), p.conv.select(1, m).contiguous());
      ops::add_(dst, term);
    }
    auto V = p.proj.defined() ? ops::matmul(Et, p.proj) : Et;  // [n, C, D]
    ops::matmul(W, V.transpose(1, 2), zbuf, p.lr, 1.f);         // [n, D, Hf]
  }
};

// D. TTT-augmented KV cache: the layer's attention sees its recent R frames exactly, plus N
// virtual keys/values made from a TTT memory of the layer input: source frame p gives
// k = RoPE(to_k(m[p]), p - R), v = to_v(m[p]), visible from frames p .. p + N - 1, with a
// learned per-head logit bias.
template <class T, class B>
struct KvMemoryLayer {
  static constexpr const char* design = "kv_memory";
  static constexpr bool needs_embeddings = false;
  static constexpr bool graph_safe = true;
  struct Params {
    AttentionBlock<T, B> blk;  // attention window = R
    layers::TttParams<T, B> mem;
    Tensor<T, B> to_kv;        // [2D, D]: to_k rows then to_v rows (one product per step)
    Tensor<T, B> to_k, to_v;   // [D, D] views of to_kv
    Tensor<float, B> vbias;    // [H]
    int64_t recent = 100, num_virtual = 10;
  };
  struct State {
    nn::KvRing<T, B> ring;   // recent keys, capacity R
    nn::KvRing<T, B> vring;  // virtual keys by source frame, capacity N
    layers::TttState<B> mem;
    bool memory = true;      // false with num_virtual = 0: the memory never runs
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec) {
    const TttOptions o = ttt_detail::options_of(spec);
    const int64_t D = spec.cfg.d_model, H = spec.cfg.num_heads;
    TTT_CHECK(spec.cfg.kv_repeat == 1, ttt_detail::where_of(spec), ": design 'kv_memory' needs kv_repeat = 1");
    Params p;
    TransformerConfig c = spec.cfg;
    c.context = o.recent;
    p.blk = AttentionBlock<T, B>::load(ws, prefix, c);
    p.recent = o.recent;
    p.num_virtual = o.num_virtual;
    const std::string mp = prefix + ".self_attn.memory.";
    p.mem = layers::TttParams<T, B>::load(ws, mp, ttt_detail::make_config(o, D, ttt_detail::where_of(spec)), true);
    ws.init_missing(mp + "to_k.weight", {D, D}, io::Init::normal(0.02f));
    ws.init_missing(mp + "to_v.weight", {D, D}, io::Init::normal(0.02f));
    ws.init_missing(mp + "virtual_bias", {H}, io::Init::constant(o.virtual_bias_init));
    {
      auto cat = Tensor<T, Cpu>::empty({2 * D, D});
      cat.slice(0, 0, D).copy_from(ws.get<T>(mp + "to_k.weight", {D, D}));
      cat.slice(0, D, 2 * D).copy_from(ws.get<T>(mp + "to_v.weight", {D, D}));
      p.to_kv = nn::to_backend<B>(cat);
      p.to_k = p.to_kv.slice(0, 0, D), p.to_v = p.to_kv.slice(0, D, 2 * D);
    }
    p.vbias = nn::to_backend<B>(ws.get<float>(mp + "virtual_bias", {H}));
    return p;
  }
  static State init_state(const Params& p, int64_t batch, bool streaming) {
    State s;
    if (streaming) {
      s.ring = p.blk.attn.make_ring(batch);
      if (p.num_virtual > 0) s.vring = nn::KvRing<T, B>::make(batch, p.blk.attn.num_heads, p.num_virtual, p.blk.attn.head_dim);
    }
    s.mem = layers::TttState<B>::init(p.mem, batch);
    s.memory = p.num_virtual > 0;
    return s;
  }

  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    const auto& a = p.blk.attn;
    const int64_t Bn = x.size(0), Tn = x.size(1), D = x.size(2), H = a.num_heads, hd = a.head_dim;
    if (p.num_virtual == 0) {  // exactly the windowed attention layer
      p.blk.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
      p.blk.feed_forward(x, in);
      return;
    }
    auto u = p.blk.norm1(x);
    // The memory reads the layer input; its outputs become virtual keys and values.
    auto m = layers::ttt_forward_at(p.mem, s.mem, u, in.positions, in.exec_mask);
    const auto vkv = ops::linear(m, p.to_kv).reshape({Bn, Tn, 2 * H, hd});
    auto vk = vkv.slice(2, 0, H), vv = vkv.slice(2, H, 2 * H);  // [B, T, H, hd] views
    if (a.rope) {  // virtual keys sit R frames back: RoPE at position - R (made on the device)
      auto vpos = Tensor<int64_t, B>::empty({Bn, Tn});
      layers::TttKernels<B>::call_flags(in.positions, {}, -p.recent, 0, vpos, {}, {});
      ops::rope(vk, vk, vpos, a.max_period);
    }

    auto qkv = Tensor<T, B>::empty({Bn, Tn, a.qkv_dim()});
    a.project(qkv, u, a.in_proj, in.step);
    auto heads = qkv.reshape({Bn, Tn, 3 * H, hd});
    auto q = heads.slice(2, 0, H), k = heads.slice(2, H, 2 * H), v = heads.slice(2, 2 * H, 3 * H);
    if (a.rope) {
      auto qk = heads.slice(2, 0, 2 * H);
      ops::rope(qk, qk, in.positions, a.max_period);
    }
    // Keys: [virtual (ring, then this call) | recent (ring, then this call)].
    const bool st = s.ring.defined();
    const int64_t N = st ? p.num_virtual : 0, R = st ? s.ring.capacity() : 0, nv = N + Tn, S = nv + R + Tn;
    auto kc = Tensor<T, B>::empty({Bn, H, S, hd}), vc = Tensor<T, B>::empty({Bn, H, S, hd});
    auto pc = Tensor<int64_t, B>::empty({Bn, S});
    auto put = [&](int64_t at, const Tensor<T, B>& kk, const Tensor<T, B>& vvv, const Tensor<int64_t, B>& pp) {
      const int64_t n = kk.size(2);
      kc.slice(2, at, at + n).copy_from(kk);
      vc.slice(2, at, at + n).copy_from(vvv);
      pc.slice(1, at, at + n).copy_from(pp);
    };
    if (st) put(0, s.vring.k, s.vring.v, s.vring.pos);
    put(N, vk.transpose(1, 2), vv.transpose(1, 2), in.positions);
    if (st) put(nv, s.ring.k, s.ring.v, s.ring.pos);
    put(nv + R, k.transpose(1, 2), v.transpose(1, 2), in.positions);
    AttentionParams ap{p.recent, 1.f / std::sqrt(float(hd)), nv, p.num_virtual, p.vbias.data()};
    auto o = Tensor<T, B>::empty({Bn, Tn, H, hd});
    ops::attention(o, q, kc, vc, in.positions, pc, ap);
    if (st) {
      ops::kv_write(s.ring.k, s.ring.v, s.ring.pos, k, v, in.positions, in.exec_mask);
      ops::kv_write(s.vring.k, s.vring.v, s.vring.pos, vk, vv, in.positions, in.exec_mask);
    }
    if (p.blk.ls1.defined()) {
      auto upd = Tensor<T, B>::empty(x.shape());
      a.project_into(upd, o.reshape({Bn, Tn, D}), a.out_proj, in.step, 0.f);
      add_scaled(x, upd, p.blk.ls1);
    } else {
      a.project_into(x, o.reshape({Bn, Tn, D}), a.out_proj, in.step, 1.f);
    }
    p.blk.feed_forward(x, in);
  }

  static void advance(State& s, int64_t Tn, const std::vector<uint8_t>& exec) {
    if (s.memory) layers::ttt_advance(s.mem, Tn, exec);
  }
  static void reset(State& s, const std::vector<uint8_t>& mask) {
    if (s.ring.defined()) s.ring.reset(mask);
    if (s.vring.defined()) s.vring.reset(mask);
    s.mem.reset(mask);
  }
  static State clone(const State& s) {
    State c;
    if (s.ring.defined()) c.ring = s.ring.clone();
    if (s.vring.defined()) c.vring = s.vring.clone();
    c.mem = s.mem.clone();
    c.memory = s.memory;
    return c;
  }
  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) {
    if (s.ring.defined()) s.ring.save(w, prefix + ".kv");
    if (s.vring.defined()) s.vring.save(w, prefix + ".vkv");
    s.mem.save(w, prefix + ".memory.");
  }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) {
    if (s.ring.defined()) s.ring.load(st, prefix + ".kv");
    if (s.vring.defined()) s.vring.load(st, prefix + ".vkv");
    s.mem.load(st, prefix + ".memory.");
  }
  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + ttt_detail::count(p.mem) + p.to_k.numel() + p.to_v.numel() + p.vbias.numel();
  }
};

}  // namespace ttt::moshi
