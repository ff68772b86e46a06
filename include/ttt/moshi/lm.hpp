#pragma once
// Moshi's LMModel: the temporal transformer over summed token embeddings, the text head,
// and the depformer that predicts the audio codebooks of a frame one after another.
// forward() is the teacher-forced LMModel.forward(codes); the streaming pieces
// (forward_text for one frame, depformer_step) are what LmGen drives.
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "ttt/moshi/config.hpp"
#include "ttt/moshi/ttt_plan.hpp"
#include "ttt/nn/embedding.hpp"
#include "ttt/nn/transformer.hpp"

namespace ttt::moshi {

template <class T, class B, class Policies>
struct LmModel {
  using TemporalT = nn::Transformer<T, B, Policies>;
  using DepformerT = nn::Transformer<T, B, nn::PolicyList<nn::AttentionLayer>>;

  LmConfig cfg;
  std::vector<nn::Embedding<T, B>> emb;  // n_q audio tables
  nn::Embedding<T, B> text_emb;
  typename TemporalT::Params transformer;
  nn::Norm<T, B> out_norm;
  nn::LinearWeight<T, B> text_linear;
  Tensor<T, B> text_linear_bias;
  std::vector<nn::LinearWeight<T, B>> depformer_in;
  std::vector<nn::Embedding<T, B>> depformer_emb;  // dep_q - 1
  nn::Embedding<T, B> depformer_text_emb;
  typename DepformerT::Params depformer;
  std::vector<nn::Norm<T, B>> depformer_norms;  // empty: identity
  std::vector<nn::LinearWeight<T, B>> linears;
  std::vector<Tensor<T, B>> linears_bias;
  std::vector<Tensor<T, B>> extra_heads;  // loaded so checkpoints that have them load cleanly

  static LmModel load(const LmConfig& c, io::WeightSource& ws) {
    const LayerPlan plan = parse_ttt_plan(c, "config", TemporalT::designs());
    LmModel m;
    m.cfg = c;
    const int64_t D = c.dim, Dd = c.depformer.d_model;
    auto lin = [&](const std::string& name, int64_t out, int64_t in) {
      return nn::weight<T, B>(ws, name, {out, in}, io::Init::normal(1.f / std::sqrt(float(in))));
    };
    // The output heads and the depformer's input projections take the weight storage too.
    auto qlin = [&](const std::string& name, int64_t out, int64_t in) {
      return nn::linear_weight<T, B>(ws, name, {out, in}, io::Init::normal(1.f / std::sqrt(float(in))));
    };
    for (int64_t i = 0; i < c.n_q; ++i)
      m.emb.push_back(nn::Embedding<T, B>::load(ws, "emb." + std::to_string(i), c.card + 1, D, std::nullopt, c.norm_emb));
    m.text_emb = nn::Embedding<T, B>::load(ws, "text_emb", c.text_card + 1, D, std::nullopt, c.norm_emb);
    m.transformer = TemporalT::load(ws, "transformer", c.transformer, plan.entries, plan.designs, "config");
    m.out_norm = nn::Norm<T, B>::load(ws, "out_norm", D, c.transformer.norm);
    m.text_linear = qlin("text_linear.weight", c.text_card_out, D);
    if (c.bias_proj)
      m.text_linear_bias = nn::weight<T, B>(ws, "text_linear.bias", {c.text_card_out}, io::Init::constant(0.f));
    if (c.dep_q > 0) {
      for (int64_t i = 0; i < c.num_depformer_in(); ++i)
        m.depformer_in.push_back(qlin("depformer_in." + std::to_string(i) + ".weight", Dd, D));
      for (int64_t i = 0; i + 1 < c.dep_q; ++i)
        m.depformer_emb.push_back(nn::Embedding<T, B>::load(ws, "depformer_emb." + std::to_string(i), c.card + 1, Dd,
                                                            c.depformer_low_rank_embeddings, c.norm_emb));
      m.depformer_text_emb = nn::Embedding<T, B>::load(ws, "depformer_text_emb", c.text_card + 1, Dd,
                                                       c.depformer_low_rank_embeddings, c.norm_emb);
      m.depformer = DepformerT::load(ws, "depformer", c.depformer);
      if (c.depformer_norm)
        for (int64_t i = 0; i < c.dep_q; ++i)
          m.depformer_norms.push_back(nn::Norm<T, B>::load(ws, "depformer_norms." + std::to_string(i), Dd, *c.depformer_norm));
    }
    for (int64_t i = 0; i < c.dep_q; ++i) {
      m.linears.push_back(qlin("linears." + std::to_string(i) + ".weight", c.card, Dd));
      if (c.bias_proj)
        m.linears_bias.push_back(
            nn::weight<T, B>(ws, "linears." + std::to_string(i) + ".bias", {c.card}, io::Init::constant(0.f)));
    }
    for (int64_t i = 0; i < c.extra_heads_num_heads; ++i)
      m.extra_heads.push_back(lin("extra_heads." + std::to_string(i) + ".weight", c.extra_heads_dim, D));
    return m;
  }

  // Token range checks (the embeddings would silently give zeros otherwise).
  void check_tokens(const Tensor<int64_t, Cpu>& codes /*[B, K, T]*/, const std::string& what) const {
    const int64_t K = codes.size(1);
    for (int64_t b = 0; b < codes.size(0); ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < codes.size(2); ++t) {
          const int64_t v = codes(b, k, t), hi = k == 0 ? cfg.text_card : cfg.card;
          if (v < -1 || v > hi)
            fail(what, ": token ", v, " at [", b, ", ", k, ", ", t, "] is out of range [-1, ", hi, "] for ",
                 k == 0 ? "the text stream" : "audio codebook " + std::to_string(k - 1));
        }
  }

  // Embedding sum of tokens [K, B, T] (codebook-major so each codebook's ids are
  // contiguous): audio codebooks 0..n_q-1 in order, then text, as forward_text sums them.
  Tensor<T, B> embed(const Tensor<int64_t, B>& tokens) const {
    auto x = emb[0](tokens.select(0, 1));
    for (int64_t i = 1; i < cfg.n_q; ++i) ops::add_(x, emb[size_t(i)](tokens.select(0, i + 1)));
    ops::add_(x, text_emb(tokens.select(0, 0)));
    return x;
  }

  // Temporal transformer + out_norm + text head. tokens [K, B, T]; returns h [B, T, D]
  // (after out_norm: what the depformer consumes) and text logits [B, T, text_card_out].
  std::pair<Tensor<T, B>, Tensor<T, B>> forward_text(const Tensor<int64_t, B>& tokens, typename TemporalT::State& st,
                                                     const std::vector<uint8_t>& exec_host,
                                                     const Tensor<uint8_t, B>& exec_mask) const {
    auto x = embed(tokens);
    TemporalT::forward(transformer, st, x, exec_host, exec_mask,
                       TemporalT::needs_embeddings(transformer) ? x.clone() : Tensor<T, B>{});
    auto h = out_norm(x);
    return {h, text_head(h)};
  }

  int64_t depformer_in_index(int64_t k) const {
    if (!cfg.depformer_multi_linear) return 0;
    return cfg.depformer.weights_schedule.empty() ? k : cfg.depformer.weights_schedule[size_t(k)];
  }

  // Text logits [R, text_card_out] from the normalised temporal output h [R, D].
  Tensor<T, B> text_head(const Tensor<T, B>& h) const {
    auto logits = nn::linear(h, text_linear);
    if (text_linear_bias.defined()) ops::add_(logits, text_linear_bias);
    return logits;
  }

  // logits [R, card] of codebook k from the depformer output y [R, Dd].
  Tensor<T, B> audio_logits(int64_t k, const Tensor<T, B>& y) const {
    auto yn = depformer_norms.empty() ? y : depformer_norms[size_t(k)](y);
    auto l = nn::linear(yn, linears[size_t(k)]);
    if (!linears_bias.empty()) ops::add_(l, linears_bias[size_t(k)]);
    return l;
  }

  // Depformer input of codebook k: depformer_in(h) + embedding of the previous token
  // (the text token for k = 0). h [R, D], prev ids [R].
  Tensor<T, B> depformer_input(int64_t k, const Tensor<T, B>& h, const Tensor<int64_t, B>& prev) const {
    auto x = nn::linear(h, depformer_in[size_t(depformer_in_index(k))]);
    ops::add_(x, k == 0 ? depformer_text_emb(prev) : depformer_emb[size_t(k - 1)](prev));
    return x;
  }

  struct Output {
    Tensor<float, Cpu> logits;       // [B, dep_q, T, card], NaN where masked
    Tensor<uint8_t, Cpu> mask;       // [B, dep_q, T]
    Tensor<float, Cpu> text_logits;  // [B, 1, T, text_card_out]
    Tensor<uint8_t, Cpu> text_mask;  // [B, 1, T]
  };

  // Delays each codebook and prepends the initial tokens (moshi's _delay_sequence):
  // returns (transformer inputs = delayed[:, :, :-1], depformer inputs = delayed[:, :, 1:]),
  // both codebook-major [K, B, T].
  std::pair<Tensor<int64_t, Cpu>, Tensor<int64_t, Cpu>> delayed_inputs(const Tensor<int64_t, Cpu>& codes) const {
    const int64_t Bn = codes.size(0), K = codes.size(1), Tn = codes.size(2);
    auto in = Tensor<int64_t, Cpu>::empty({K, Bn, Tn}), dep = Tensor<int64_t, Cpu>::empty({K, Bn, Tn});
    for (int64_t k = 0; k < K; ++k) {
      const int64_t d = cfg.delays[size_t(k)], init = k == 0 ? cfg.text_card : cfg.card;
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t s = 0; s <= Tn; ++s) {  // s indexes the T+1 long delayed sequence
          const int64_t v = s == 0 || s - 1 < d ? init : codes(b, k, s - 1 - d);
          if (s < Tn) in(k, b, s) = v;
          if (s > 0) dep(k, b, s - 1) = v;
        }
    }
    return {in, dep};
  }

  // LMModel.forward(codes): codes [B, K, T] on the host.
  Output forward(const Tensor<int64_t, Cpu>& codes) const {
    const int64_t Bn = codes.size(0), K = codes.size(1), Tn = codes.size(2);
    TTT_CHECK(K == cfg.num_codebooks(), "forward: codes have ", K, " codebooks, the model expects ", cfg.num_codebooks());
    check_tokens(codes, "forward: codes");
    auto [in, dep] = delayed_inputs(codes);
    auto st = TemporalT::init_state(transformer, Bn, false);
    auto [h, text_logits] = forward_text(nn::to_backend<B>(in), st, {}, {});

    // Depformer over the dep_q codebooks of every frame at once: batch B*T, "time" = k.
    Output out;
    out.text_logits = Tensor<float, Cpu>::empty({Bn, 1, Tn, cfg.text_card_out});
    out.text_mask = Tensor<uint8_t, Cpu>::empty({Bn, 1, Tn});
    undelay(ops::cast<float>(text_logits).template to<Cpu>().reshape({Bn, 1, Tn, cfg.text_card_out}),
            std::vector<int64_t>{cfg.delays[0]}, codes, 0, out.text_logits, out.text_mask);
    out.logits = Tensor<float, Cpu>::empty({Bn, cfg.dep_q, Tn, cfg.card});
    out.mask = Tensor<uint8_t, Cpu>::empty({Bn, cfg.dep_q, Tn});
    if (cfg.dep_q == 0) return out;
    const int64_t Dd = cfg.depformer.d_model, R = Bn * Tn;
    auto hr = h.reshape({R, cfg.dim});
    auto dep_dev = nn::to_backend<B>(dep);
    auto x = Tensor<T, B>::empty({R, cfg.dep_q, Dd});
    for (int64_t k = 0; k < cfg.dep_q; ++k)
      x.select(1, k).copy_from(depformer_input(k, hr, dep_dev.select(0, k).reshape({R})));
    auto dst = DepformerT::init_state(depformer, R, false);
    DepformerT::forward(depformer, dst, x, {}, {});
    auto raw = Tensor<float, Cpu>::empty({Bn, cfg.dep_q, Tn, cfg.card});
    for (int64_t k = 0; k < cfg.dep_q; ++k) {
      auto l = ops::cast<float>(audio_logits(k, x.select(1, k).contiguous())).template to<Cpu>();  // [R, card]
      raw.select(1, k).copy_from(l.reshape({Bn, Tn, cfg.card}));
    }
    std::vector<int64_t> d(cfg.delays.begin() + 1, cfg.delays.begin() + 1 + cfg.dep_q);
    undelay(raw, d, codes, 1, out.logits, out.mask);
    return out;
  }

 private:
  // moshi's _undelay_sequence, plus the zero-token mask: out[:, k, t] = in[:, k, t + d_k],
  // NaN and mask 0 for the last d_k steps and where codes[:, k0 + k, t] == -1.
  static void undelay(const Tensor<float, Cpu>& in, const std::vector<int64_t>& delays,
                      const Tensor<int64_t, Cpu>& codes, int64_t k0, const Tensor<float, Cpu>& out,
                      const Tensor<uint8_t, Cpu>& mask) {
    const int64_t Bn = in.size(0), K = in.size(1), Tn = in.size(2), V = in.size(3);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t t = 0; t < Tn; ++t) {
          const int64_t src = t + delays[size_t(k)];
          const bool ok = src < Tn && codes(b, k0 + k, t) != -1;
          mask(b, k, t) = ok;
          const bool have = src < Tn;
          for (int64_t v = 0; v < V; ++v) out(b, k, t, v) = have ? in(b, k, src, v) : nan;
        }
  }
};

}  // namespace ttt::moshi
