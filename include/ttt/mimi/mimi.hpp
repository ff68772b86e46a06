#pragma once
// Kyutai's Mimi codec (moshi 0.2.13 MimiModel): audio [B, 1, S] at 24 kHz <-> codes [B, K, F]
// at 12.5 Hz (frames of 1920 samples), both ways streaming.
//
//   encode: SEANet encoder [B, 1, S] -> [B, D, S / hop] (25 Hz) -> transformer -> downsample
//           conv (k = 2s, stride s, replicate padding) -> latent [B, D, F] -> split RVQ -> codes
//   decode: split RVQ -> latent -> upsample conv-transpose (depthwise, k = 2s) -> transformer
//           -> SEANet decoder -> audio
//
// The weights (Mimi) are immutable; a conversation's streaming state is a separate value
// (Mimi::Session: every conv's history, both transformers' KV rings and offsets, and the
// samples that do not yet make a whole frame), which can be snapshotted, saved, loaded and
// reset per batch item, like the LM's sessions. Whole-sequence calls (encode / decode) are
// Kyutai's non-streaming path; with a stream longer than the transformer context and several
// transformer steps per frame, the two paths differ (Kyutai's ring evicts keys before a call's
// first queries see them: nn::TransformerConfig::ring_write_first), and both are reproduced.
#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "ttt/core/arena.hpp"
#include "ttt/core/graph.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/mimi/config.hpp"
#include "ttt/mimi/conv.hpp"
#include "ttt/mimi/quantizer.hpp"
#include "ttt/mimi/seanet.hpp"
#include "ttt/nn/transformer.hpp"

namespace ttt::mimi {

template <class T, class B>
class Mimi {
 public:
  using Transformer = nn::Transformer<T, B, nn::PolicyList<nn::AttentionLayer>>;

  MimiConfig cfg;
  Seanet<T, B> encoder, decoder;
  typename Transformer::Params encoder_transformer, decoder_transformer;
  StreamingConv1d<T, B> downsample;
  StreamingConvTranspose1d<T, B> upsample;
  SplitRvq<T, B> quantizer;

  static Mimi load(const MimiConfig& c, io::WeightSource& ws) {
    Mimi m;
    m.cfg = c;
    const int64_t D = c.latent_dim(), s = c.downsample_stride();
    m.encoder = Seanet<T, B>::load_encoder(ws, c.seanet);
    m.decoder = Seanet<T, B>::load_decoder(ws, c.seanet);
    m.encoder_transformer = Transformer::load(ws, "encoder_transformer.transformer", c.transformer);
    m.decoder_transformer = Transformer::load(ws, "decoder_transformer.transformer", c.transformer);
    // Kyutai's ConvDownsample1d / ConvTrUpsample1d with learnt weights (resample_method
    // "conv"): the downsample mixes channels, the upsample is depthwise (groups = D).
    m.downsample = StreamingConv1d<T, B>::load(ws, "downsample.conv", D, D, 2 * s, s, 1, 1, false, true);
    m.upsample = StreamingConvTranspose1d<T, B>::load(ws, "upsample.convtr", D, D, 2 * s, s, D, false);
    m.quantizer = SplitRvq<T, B>::load(ws, c.quantizer);
    return m;
  }

  int64_t frame_size() const { return cfg.frame_size(); }
  int64_t num_codebooks() const { return cfg.num_codebooks; }
  int64_t cardinality() const { return cfg.quantizer.bins; }

  int64_t num_params() const {
    return encoder.num_params() + decoder.num_params() + Transformer::num_params(encoder_transformer) +
           Transformer::num_params(decoder_transformer) + downsample.weight.numel() + upsample.weight.numel() +
           quantizer.num_params();
  }

  // ---- whole sequences --------------------------------------------------------------------

  // The latent [B, D, F] of pcm [B, 1, S] (zero-padded on the right to whole frames).
  Tensor<T, B> encode_latent(const Tensor<T, B>& pcm) const {
    check_pcm(pcm);
    const int64_t Bn = pcm.size(0), S = pcm.size(2), fs = frame_size(), F = (S + fs - 1) / fs;
    TTT_CHECK(F > 0, "mimi: encode of an empty signal");
    auto x = Tensor<T, B>::zeros({Bn, 1, F * fs});
    x.slice(2, 0, S).copy_from(pcm);
    return latent_of(x);
  }
  // codes [B, K, F] of pcm [B, 1, S].
  Tensor<int64_t, B> encode(const Tensor<T, B>& pcm) const { return quantize(encode_latent(pcm)); }
  // pcm [B, 1, F · frame_size] of codes [B, K, F].
  Tensor<T, B> decode(const Tensor<int64_t, B>& codes) const { return synthesize(dequantize(codes)); }

  // ---- streaming ----------------------------------------------------------------------------

  // Per-session device plumbing of the streaming calls: pinned staging buffers, the arena
  // that makes a frame's allocations replayable, and one captured graph per direction. Never
  // shared between sessions: a graph bakes in the addresses of one session's state.
  struct Runtime {
    Arena<B> arena{size_t(8) << 20};
    FrameGraph<B> enc_graph, dec_graph;
    // encode: in = positions i64 [B, s] | pcm f32 [B, frame]; out = codes i64 [B, K]
    // decode: in = positions i64 [B, s] | codes i64 [B, K];    out = pcm f32 [B, frame]
    std::shared_ptr<void> enc_in_h, enc_out_h, dec_in_h, dec_out_h;
    std::shared_ptr<void> enc_in_d, enc_out_d, dec_in_d, dec_out_d;
    size_t enc_in = 0, enc_out = 0, dec_in = 0, dec_out = 0;
  };

  struct Session {
    std::shared_ptr<Runtime> rt;
    typename Seanet<T, B>::State enc, dec;
    typename Transformer::State enc_tr, dec_tr;
    typename StreamingConv1d<T, B>::State down;
    typename StreamingConvTranspose1d<T, B>::State up;
    std::vector<std::vector<float>> pending;  // [B] samples waiting for a whole frame
    int64_t batch() const { return int64_t(pending.size()); }
  };

  Session start(int64_t batch) const {
    TTT_CHECK(batch > 0, "mimi: batch must be positive, got ", batch);
    Session s;
    s.enc = encoder.init_state(batch);
    s.dec = decoder.init_state(batch);
    s.enc_tr = Transformer::init_state(encoder_transformer, batch, true);
    s.dec_tr = Transformer::init_state(decoder_transformer, batch, true);
    s.down = downsample.init_state(batch);
    s.up = upsample.init_state(batch);
    s.pending.assign(size_t(batch), {});
    s.rt = make_runtime(batch);
    return s;
  }

  // Capturing frames into CUDA graphs is on by default.
  void set_graphs(bool on) { graphs_ = on; }

  // Streaming encode of any number of samples per item (pcm [B, n], host): samples are
  // buffered to whole frames; returns the codes [B, K, f] of the frames completed (f >= 0, the
  // same for every item since every item gets n samples).
  Tensor<int64_t, Cpu> encode_step(Session& s, const Tensor<float, Cpu>& pcm) const {
    const int64_t Bn = s.batch(), fs = frame_size(), K = num_codebooks();
    TTT_CHECK(pcm.rank() == 2 && pcm.size(0) == Bn, "mimi: encode_step takes pcm [B, n] for batch ", Bn, ", got ",
              pcm.shape().str());
    const auto p = pcm.contiguous();
    for (int64_t b = 0; b < Bn; ++b) {
      auto& q = s.pending[size_t(b)];
      q.insert(q.end(), p.data() + b * p.size(1), p.data() + (b + 1) * p.size(1));
    }
    const int64_t F = int64_t(s.pending[0].size()) / fs;
    auto codes = Tensor<int64_t, Cpu>::empty({Bn, K, F});
    // One frame per call through the network: the transformers see frame-sized calls, as
    // Kyutai's streaming encode does.
    Runtime& rt = *s.rt;
    const int64_t steps = cfg.downsample_stride();
    for (int64_t f = 0; f < F; ++f) {
      int64_t* pos = static_cast<int64_t*>(rt.enc_in_h.get());
      float* x = reinterpret_cast<float*>(pos + Bn * steps);
      stage_positions(pos, s.enc_tr, steps);
      for (int64_t b = 0; b < Bn; ++b) {
        auto& q = s.pending[size_t(b)];
        std::copy(q.begin() + f * fs, q.begin() + (f + 1) * fs, x + b * fs);
      }
      rt.enc_graph.run([&] { encode_frame(s); });
      Memory<B>::synchronize();
      Transformer::advance(s.enc_tr, steps, {});
      const int64_t* out = static_cast<const int64_t*>(rt.enc_out_h.get());
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t k = 0; k < K; ++k) codes(b, k, f) = out[b * K + k];
    }
    for (auto& q : s.pending) q.erase(q.begin(), q.begin() + F * fs);
    return codes;
  }

  // Streaming decode of f >= 1 frames of codes [B, K, f] (host): pcm [B, f · frame_size].
  Tensor<float, Cpu> decode_step(Session& s, const Tensor<int64_t, Cpu>& codes) const {
    const int64_t Bn = s.batch(), fs = frame_size(), K = num_codebooks();
    check_codes(codes);
    TTT_CHECK(codes.size(0) == Bn, "mimi: decode_step codes ", codes.shape().str(), " for batch ", Bn);
    const int64_t F = codes.size(2);
    auto out = Tensor<float, Cpu>::empty({Bn, F * fs});
    Runtime& rt = *s.rt;
    const int64_t steps = cfg.downsample_stride();
    for (int64_t f = 0; f < F; ++f) {
      int64_t* pos = static_cast<int64_t*>(rt.dec_in_h.get());
      int64_t* c = pos + Bn * steps;
      stage_positions(pos, s.dec_tr, steps);
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t k = 0; k < K; ++k) c[b * K + k] = codes(b, k, f);
      rt.dec_graph.run([&] { decode_frame(s); });
      Memory<B>::synchronize();
      Transformer::advance(s.dec_tr, steps, {});
      const float* y = static_cast<const float*>(rt.dec_out_h.get());
      for (int64_t b = 0; b < Bn; ++b) std::copy(y + b * fs, y + (b + 1) * fs, out.data() + b * F * fs + f * fs);
    }
    return out;
  }

  // Items with mask 1 start a new stream; the others continue.
  void reset(Session& s, const std::vector<uint8_t>& mask) const {
    TTT_CHECK(int64_t(mask.size()) == s.batch(), "mimi: reset mask has ", mask.size(), " entries for batch ", s.batch());
    for_each_state(s, [&](const std::string&, auto& m) { m.reset(mask); });
    Transformer::reset(encoder_transformer, s.enc_tr, mask);
    Transformer::reset(decoder_transformer, s.dec_tr, mask);
    for (size_t b = 0; b < mask.size(); ++b)
      if (mask[b]) s.pending[b].clear();
  }

  Session snapshot(const Session& s) const {
    Session c = s;
    c.rt = make_runtime(s.batch());
    for_each_state(c, [&](const std::string&, auto& m) { m = m.clone(); });
    c.enc_tr = Transformer::clone(s.enc_tr);
    c.dec_tr = Transformer::clone(s.dec_tr);
    return c;
  }

  // Item src_b of `src` into item dst_b of `dst` (sessions of this model, any batch sizes):
  // every conv and transformer state row of that item and its buffered samples, by device
  // copies of that item only; the other items of `dst` are untouched. What moves a stream
  // between sessions (save / resume one conversation of a batch) and what snapshots and
  // restores an item that must not advance in a batched frame (a copy of one item's state).
  // `side` limits the copy to the encoder's state (SEANet encoder, its transformer, the
  // downsample, the buffered samples) or the decoder's (upsample, transformer, SEANet decoder).
  enum class Side { both, encoder, decoder };
  void copy_item(Session& dst, int64_t dst_b, const Session& src, int64_t src_b, Side side = Side::both) const {
    TTT_CHECK(0 <= dst_b && dst_b < dst.batch() && 0 <= src_b && src_b < src.batch(), "mimi: copy_item: item ", src_b,
              " of ", src.batch(), " into ", dst_b, " of ", dst.batch());
    const bool enc = side != Side::decoder, dec = side != Side::encoder;
    // The conv states in the same order in both sessions (the same model walks them).
    std::vector<const void*> from;
    for_each_state(const_cast<Session&>(src), [&](const std::string&, auto& m) { from.push_back(&m); });
    size_t i = 0;
    for_each_state(dst, [&](const std::string& key, auto& m) {
      using S = std::decay_t<decltype(m)>;
      const S& sm = *static_cast<const S*>(from[i++]);
      const bool is_enc = key.rfind("encoder", 0) == 0 || key == "downsample";
      if (is_enc ? enc : dec) m.copy_item(dst_b, sm, src_b);
    });
    if (enc) Transformer::copy_item(dst.enc_tr, dst_b, src.enc_tr, src_b);
    if (dec) Transformer::copy_item(dst.dec_tr, dst_b, src.dec_tr, src_b);
    if (enc) dst.pending[size_t(dst_b)] = src.pending[size_t(src_b)];
  }

  // Session files: format "ttt-mimi-session"; every state tensor under its module's name.
  void save(Session& s, io::SafeTensorsWriter& w, const std::string& prefix = "mimi") const {
    for_each_state(s, [&](const std::string& key, auto& m) { m.save(w, prefix + "." + key); });
    Transformer::save(s.enc_tr, w, prefix + ".encoder_transformer");
    Transformer::save(s.dec_tr, w, prefix + ".decoder_transformer");
    std::vector<int64_t> lens;
    std::vector<float> all;
    for (auto& q : s.pending) lens.push_back(int64_t(q.size())), all.insert(all.end(), q.begin(), q.end());
    w.add(prefix + ".pending_lengths", Tensor<int64_t, Cpu>::from_vector({s.batch()}, lens));
    w.add(prefix + ".pending", Tensor<float, Cpu>::from_vector({int64_t(all.size())}, all));
  }
  void load(Session& s, const io::SafeTensors& st, const std::string& prefix = "mimi") const {
    for_each_state(s, [&](const std::string& key, auto& m) { m.load(st, prefix + "." + key); });
    Transformer::load_state(s.enc_tr, st, prefix + ".encoder_transformer");
    Transformer::load_state(s.dec_tr, st, prefix + ".decoder_transformer");
    const auto lens = st.load_counters(prefix + ".pending_lengths");
    TTT_CHECK(int64_t(lens.size()) == s.batch(), st.path(), ": '", prefix, ".pending_lengths' holds ", lens.size(),
              " items, this session has ", s.batch());
    const auto all = st.load<float>(prefix + ".pending").to_vector();
    size_t at = 0;
    for (size_t b = 0; b < lens.size(); ++b) {
      TTT_CHECK(lens[b] < frame_size() && at + size_t(lens[b]) <= all.size(), st.path(), ": bad '", prefix,
                ".pending' for item ", b);
      s.pending[b].assign(all.begin() + int64_t(at), all.begin() + int64_t(at + size_t(lens[b])));
      at += size_t(lens[b]);
    }
  }

  // Codes in range (every code must index its codebook: out-of-range ids would read
  // outside the tables).
  void check_codes(const Tensor<int64_t, Cpu>& codes, const std::string& what = "mimi: codes") const {
    TTT_CHECK(codes.rank() == 3 && codes.size(1) == num_codebooks(), what, " must be [B, ", num_codebooks(),
              ", F], got ", codes.shape().str());
    const auto c = codes.contiguous();
    for (int64_t i = 0; i < c.numel(); ++i) {
      const int64_t v = c.data()[i];
      if (v < 0 || v >= cardinality()) {
        const int64_t F = c.size(2), K = c.size(1);
        fail(what, ": code ", v, " at [", i / (K * F), ", ", (i / F) % K, ", ", i % F, "] is out of range [0, ",
             cardinality(), ")");
      }
    }
  }

 private:
  static void check_pcm(const Tensor<T, B>& pcm) {
    TTT_CHECK(pcm.rank() == 3 && pcm.size(1) == 1, "mimi: pcm must be [B, 1, S], got ", pcm.shape().str());
  }

  // Whole sequences: x [B, 1, T] (T whole frames) -> latent [B, D, T / (hop·s)].
  Tensor<T, B> latent_of(const Tensor<T, B>& x) const {
    auto e = encoder.forward(x, nullptr);  // [B, D, T / hop]
    e = whole_transformer(encoder_transformer, e);
    return downsample.forward(e, nullptr);  // [B, D, F]
  }
  // latent [B, D, F] -> audio [B, 1, F · frame_size].
  Tensor<T, B> synthesize(const Tensor<T, B>& latent) const {
    auto u = upsample.forward(latent, nullptr);  // [B, D, F · s]
    u = whole_transformer(decoder_transformer, u);
    return decoder.forward(u, nullptr);
  }

  std::shared_ptr<Runtime> make_runtime(int64_t batch) const {
    NoArenaScope<B> persistent;
    auto rt = std::make_shared<Runtime>();
    const size_t pos = size_t(batch * cfg.downsample_stride()) * 8, fs = size_t(frame_size()),
                 K = size_t(num_codebooks());
    rt->enc_in = pos + size_t(batch) * fs * 4, rt->enc_out = size_t(batch) * K * 8;
    rt->dec_in = pos + size_t(batch) * K * 8, rt->dec_out = size_t(batch) * fs * 4;
    for (auto [h, d, n] : {std::tuple{&rt->enc_in_h, &rt->enc_in_d, rt->enc_in}, {&rt->enc_out_h, &rt->enc_out_d, rt->enc_out},
                           {&rt->dec_in_h, &rt->dec_in_d, rt->dec_in}, {&rt->dec_out_h, &rt->dec_out_d, rt->dec_out}}) {
      *h = Memory<B>::allocate_pinned(n);
      *d = Memory<B>::allocate(n);
    }
    rt->enc_graph.set_enabled(graphs_);
    rt->dec_graph.set_enabled(graphs_);
    return rt;
  }

  // The positions of a transformer's next `steps` steps per item (offset + t).
  static void stage_positions(int64_t* pos, const typename Transformer::State& st, int64_t steps) {
    for (int64_t b = 0; b < st.batch(); ++b)
      for (int64_t t = 0; t < steps; ++t) pos[b * steps + t] = st.offsets[size_t(b)] + t;
  }

  // The device work of one streaming frame (what a CUDA graph captures): staged inputs in,
  // the network on the session's state, the outputs back to the pinned buffer.
  void encode_frame(Session& s) const {
    Runtime& rt = *s.rt;
    ArenaScope<B> scope(rt.arena);
    const int64_t Bn = s.batch(), steps = cfg.downsample_stride(), fs = frame_size(), K = num_codebooks();
    Memory<B>::from_host_async(rt.enc_in_d.get(), rt.enc_in_h.get(), rt.enc_in);
    int64_t* din = static_cast<int64_t*>(rt.enc_in_d.get());
    const auto pos = Tensor<int64_t, B>::borrow(din, {Bn, steps});
    const auto pcm = Tensor<float, B>::borrow(reinterpret_cast<float*>(din + Bn * steps), {Bn, 1, fs});
    auto e = encoder.forward(ops::cast<T>(pcm), &s.enc);
    e = transformer_step(encoder_transformer, e, s.enc_tr, pos);
    const auto codes = quantize(downsample.forward(e, &s.down));  // [B, K, 1]
    Tensor<int64_t, B>::borrow(static_cast<int64_t*>(rt.enc_out_d.get()), {Bn, K, 1}).copy_from(codes);
    Memory<B>::to_host_async(rt.enc_out_h.get(), rt.enc_out_d.get(), rt.enc_out);
  }
  void decode_frame(Session& s) const {
    Runtime& rt = *s.rt;
    ArenaScope<B> scope(rt.arena);
    const int64_t Bn = s.batch(), steps = cfg.downsample_stride(), fs = frame_size(), K = num_codebooks();
    Memory<B>::from_host_async(rt.dec_in_d.get(), rt.dec_in_h.get(), rt.dec_in);
    int64_t* din = static_cast<int64_t*>(rt.dec_in_d.get());
    const auto pos = Tensor<int64_t, B>::borrow(din, {Bn, steps});
    const auto codes = Tensor<int64_t, B>::borrow(din + Bn * steps, {Bn, K, 1});
    auto u = upsample.forward(dequantize(codes), &s.up);
    u = transformer_step(decoder_transformer, u, s.dec_tr, pos);
    const auto y = decoder.forward(u, &s.dec);  // [B, 1, fs]
    Tensor<float, B>::borrow(static_cast<float*>(rt.dec_out_d.get()), {Bn, 1, fs}).copy_from(ops::cast<float>(y));
    Memory<B>::to_host_async(rt.dec_out_h.get(), rt.dec_out_d.get(), rt.dec_out);
  }

  // One streaming call of a transformer on [B, D, T] at device positions [B, T] (the host
  // offsets move on after the frame: Transformer::advance).
  static Tensor<T, B> transformer_step(const typename Transformer::Params& p, const Tensor<T, B>& x,
                                       typename Transformer::State& st, const Tensor<int64_t, B>& positions) {
    auto xt = x.transpose(1, 2).contiguous();
    nn::LayerInput<T, B> in;
    in.positions = positions;
    in.step = st.step;
    Transformer::run(p, st, xt, in);
    return xt.transpose(1, 2).contiguous();
  }

  // A whole sequence through a transformer on [B, D, T] (Kyutai's conv layout: through
  // [B, T, D] and back), no cache: the causal mask with the context window.
  static Tensor<T, B> whole_transformer(const typename Transformer::Params& p, const Tensor<T, B>& x) {
    auto xt = x.transpose(1, 2).contiguous();
    auto st = Transformer::init_state(p, x.size(0), false);
    Transformer::forward(p, st, xt, {}, {});
    return xt.transpose(1, 2).contiguous();
  }

  // latent [B, D, F] -> codes [B, K, F].
  Tensor<int64_t, B> quantize(const Tensor<T, B>& latent) const {
    const int64_t Bn = latent.size(0), D = latent.size(1), F = latent.size(2), K = num_codebooks();
    auto rows = latent.transpose(1, 2).contiguous().reshape({Bn * F, D});
    auto codes = quantizer.encode(rows, K);  // [B·F, K]
    return codes.reshape({Bn, F, K}).transpose(1, 2).contiguous();
  }
  // codes [B, K, F] -> latent [B, D, F].
  Tensor<T, B> dequantize(const Tensor<int64_t, B>& codes) const {
    const int64_t Bn = codes.size(0), K = codes.size(1), F = codes.size(2), D = cfg.latent_dim();
    auto rows = codes.transpose(1, 2).contiguous().reshape({Bn * F, K});
    return quantizer.decode(rows).reshape({Bn, F, D}).transpose(1, 2).contiguous();
  }

  // fn(key, field) for every conv state of a session (the transformers are handled apart).
  template <class F>
  void for_each_state(Session& s, F&& fn) const {
    encoder.for_each_state(s.enc, fn);
    decoder.for_each_state(s.dec, fn);
    fn(std::string("downsample"), s.down);
    fn(std::string("upsample"), s.up);
  }

  bool graphs_ = true;
};

}  // namespace ttt::mimi
