#pragma once
// Design C, "inplace_ffn" (docs/designs.md): In-Place TTT. The linear_out of the gated FFN
// is a fast weight W [D, Hf] per stream,
//   W_j = W_out + lr · Σ_{i<j} V_iᵀ Z_i   over completed chunks of C frames,
// with Z the FFN's gated activations and the target V = conv_k(E) @ P from the frame's token
// embeddings E (a depthwise conv along time, zero padding inside the chunk). Frames of a
// chunk use the weights from before it; streaming buffers the chunk.
#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "ttt/moshi/design_common.hpp"
#include "ttt/moshi/ttt_options.hpp"

namespace ttt::moshi {

// A stream's In-Place TTT memory: the fast weights and the current chunk's buffers.
template <class B>
struct InplaceFastWeights {
  Tensor<float, B> W;           // [B, D, Hf] fast linear_out, fp32
  Tensor<float, B> zbuf;        // [B, C, Hf] the current chunk's FFN activations
  Tensor<float, B> ebuf;        // [B, C, D]  and token embeddings
  Tensor<float, B> w_out;       // [D, Hf] the pretrained weight (the reset value), shared
  std::vector<int64_t> offset;  // [B] frames since reset; the chunk phase is offset % C

  static InplaceFastWeights init(const Tensor<float, B>& w_out, int64_t batch, int64_t chunk) {
    NoArenaScope<B> persistent;
    InplaceFastWeights s;
    const int64_t D = w_out.size(0), Hf = w_out.size(1);
    s.w_out = w_out;
    s.W = Tensor<float, B>::empty({batch, D, Hf});
    s.zbuf = Tensor<float, B>::zeros({batch, chunk, Hf});
    s.ebuf = Tensor<float, B>::zeros({batch, chunk, D});
    s.offset.assign(size_t(batch), 0);
    s.reset(std::vector<uint8_t>(size_t(batch), 1));
    return s;
  }
  bool defined() const { return W.defined(); }
  // Items back to the pretrained weight at phase 0 (the chunk buffers are rewritten before
  // they are read again).
  void reset(const std::vector<uint8_t>& mask) {
    for (size_t b = 0; b < mask.size(); ++b) {
      if (!mask[b]) continue;
      W.select(0, int64_t(b)).copy_from(w_out);
      offset[b] = 0;
    }
  }
  void advance(int64_t Tn, const std::vector<uint8_t>& exec) {
    for (size_t b = 0; b < offset.size(); ++b)
      if (exec.empty() || exec[b]) offset[b] += Tn;
  }
  InplaceFastWeights clone() const {
    NoArenaScope<B> persistent;
    InplaceFastWeights c = *this;
    c.W = W.clone();
    c.zbuf = zbuf.clone();
    c.ebuf = ebuf.clone();
    return c;
  }
  // Item src_b of `src` (the same layer, any batch) into item dst_b of this one.
  void copy_item(int64_t dst_b, const InplaceFastWeights& src, int64_t src_b) {
    W.select(0, dst_b).copy_from(src.W.select(0, src_b));
    zbuf.select(0, dst_b).copy_from(src.zbuf.select(0, src_b));
    ebuf.select(0, dst_b).copy_from(src.ebuf.select(0, src_b));
    offset[size_t(dst_b)] = src.offset[size_t(src_b)];
  }
  void save(io::SafeTensorsWriter& w, const std::string& key) const {
    w.add(key + ".W", W);
    w.add(key + ".zbuf", zbuf);
    w.add(key + ".ebuf", ebuf);
    w.add(key + ".offset", Tensor<int64_t, Cpu>::from_vector({int64_t(offset.size())}, offset));
  }
  void load(const io::SafeTensors& st, const std::string& key) {
    for (auto [name, t] : {std::pair{".W", &W}, {".zbuf", &zbuf}, {".ebuf", &ebuf}}) {
      auto h = st.load<float>(key + name);
      TTT_CHECK(h.shape() == t->shape(), st.path(), ": state tensor '", key + name, "' has shape ", h.shape().str(),
                ", expected ", t->shape().str());
      t->copy_from(nn::to_backend<B>(h));
    }
    const auto off = st.load_counters(key + ".offset");
    TTT_CHECK(off.size() == offset.size(), st.path(), ": '", key, ".offset' does not match the batch");
    offset = off;
  }
};

template <class T, class B>
struct InplaceFfnLayer {
  static constexpr const char* design = InplaceFfnOptions::design;
  static constexpr bool needs_embeddings = true;
  // One-frame calls write the chunk buffers at device positions; whether a chunk completes
  // (the update runs) is host state, so it is part of the frame graph's key (graph_key).
  struct Params {
    nn::AttentionBlock<T, B> blk;
    Tensor<float, B> conv;  // [D, k] (ttt_conv.weight [D, 1, k])
    Tensor<float, B> proj;  // [D, D] used as stored: V = E~ @ P (undefined without target_proj)
    int64_t chunk = 256;
    float lr = 0.001f;
  };
  struct State {
    nn::KvRing<T, B> ring;  // undefined in teacher forcing
    InplaceFastWeights<B> mem;
    static constexpr auto fields = std::make_tuple(nn::field("kv", &State::ring), nn::field("inplace", &State::mem));
  };

  static Params load(io::WeightSource& ws, const std::string& prefix, const nn::LayerSpec& spec) {
    const std::string where = design_detail::where_of(spec);
    const auto o = InplaceFfnOptions::parse(spec.entry, where, spec.cfg);
    const int64_t D = spec.cfg.d_model, k = o.conv_kernel;
    Params p;
    p.blk = nn::AttentionBlock<T, B>::load(ws, prefix, spec.cfg);
    TTT_CHECK(p.blk.ff.ffn.gated && p.blk.ff.ffn.w_in.size() == 1, where,
              ": design 'inplace_ffn' needs a gated FFN with one weight set");
    // LayerScale is folded into w_out at load (nn::fold_layer_scale), and the fast weight's
    // update rule is stated for the unscaled projection: not combined.
    TTT_CHECK(!spec.cfg.layer_scale, where, ": design 'inplace_ffn' does not take a transformer with LayerScale");
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
    s.mem = InplaceFastWeights<B>::init(p.blk.ff.ffn.w_out[0].template to_dense<float>().clone(), batch, p.chunk);
    return s;
  }

  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const nn::LayerInput<T, B>& in) {
    TTT_CHECK(in.embeddings.defined(), "inplace_ffn: the frame embeddings were not provided");
    p.blk.attention(x, s.ring.defined() ? &s.ring : nullptr, in);
    const auto& ffb = p.blk.ff;
    auto f = ffb.norm2.as_prologue();
    f.glu = true;
    f.act = ffb.ffn.act;
    auto Z = nn::fused_linear(x, ffb.ffn.w_in[0], f);  // [B, T, Hf]: act(gate) * value of norm2(x)
    if (x.size(1) == 1) {
      step(p, s.mem, x, Z, in);
      return;
    }
    for (int64_t b = 0; b < x.size(0); ++b)
      run(p, s.mem, b, x.slice(0, b, b + 1), Z.slice(0, b, b + 1), in.embeddings.slice(0, b, b + 1),
          in.exec_host.empty() || in.exec_host[size_t(b)]);
  }

  // The items whose chunk a one-frame call completes (their update runs): a frame graph is
  // captured per distinct set.
  static uint64_t graph_key(const Params& p, const State& s, const std::vector<uint8_t>& exec) {
    uint64_t key = 0;
    for (size_t b = 0; b < s.mem.offset.size(); ++b)
      if ((exec.empty() || exec[b]) && s.mem.offset[b] % p.chunk == p.chunk - 1) key = key * 1099511628211ull + b + 1;
    return key;
  }

  static int64_t num_params(const Params& p) {
    return p.blk.num_params() + p.conv.numel() + nn::count_params(p.proj);
  }

 private:
  using Mem = InplaceFastWeights<B>;

  // xs [1, n, D] += zs W^T for one item's rows, W [D, Hf] its fast weight. The product
  // goes through ops::linear like the plain FFN's, so an untouched W (zero conv) gives the
  // pretrained layer bit for bit in fp32.
  static void add_fast_out(const Params&, const Tensor<float, B>& W, const Tensor<T, B>& xs, const Tensor<T, B>& zs) {
    if constexpr (std::is_same_v<T, float>) {
      ops::linear(xs, zs, W, 1.f);
    } else {
      ops::add_(xs, ops::cast<T>(ops::linear(ops::cast<float>(zs), W)));
    }
  }

  // Item b: x [1, T, D] += Z W^T frame by frame with the weights of each frame's
  // chunk, buffering the chunk and updating W at its end only when `commit`.
  static void run(const Params& p, Mem& s, int64_t b, const Tensor<T, B>& x, const Tensor<T, B>& Z,
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

  // One frame for every item: x += Z W_b^T; the chunk buffers take Z and E at slot
  // position % C (kv_write, masked by the device exec mask), and items whose chunk this
  // frame completes (host offsets: see graph_key) update W. Equal to run() with Tn = 1.
  static void step(const Params& p, Mem& s, const Tensor<T, B>& x, const Tensor<T, B>& Z, const nn::LayerInput<T, B>& in) {
    const int64_t Bn = x.size(0), C = p.chunk, Hf = Z.size(2), D = x.size(2);
    for (int64_t b = 0; b < Bn; ++b) add_fast_out(p, s.W.select(0, b), x.slice(0, b, b + 1), Z.slice(0, b, b + 1));
    // The rings' "k" and "v" are the same buffer: kv_write stores the row twice, same values.
    // The slots' position record is written but never read (scratch of this step).
    auto zr = s.zbuf.reshape({Bn, 1, C, Hf}), er = s.ebuf.reshape({Bn, 1, C, D});
    auto zf = ops::cast<float>(Z).reshape({Bn, 1, 1, Hf});
    auto ef = ops::cast<float>(in.embeddings).reshape({Bn, 1, 1, D});
    auto slot_pos = Tensor<int64_t, B>::empty({Bn, C});
    ops::kv_write(zr, zr, slot_pos, zf, zf, in.positions, in.exec_mask);
    ops::kv_write(er, er, slot_pos, ef, ef, in.positions, in.exec_mask);
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

}  // namespace ttt::moshi
