#pragma once
// Shared pieces of the Moshi tests.
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "catch.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/policies.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using Model = moshi::LmModel<float, Cpu, moshi::DefaultPolicies>;
using Gen = moshi::LmGen<float, Cpu, moshi::DefaultPolicies>;

inline double max_err_unmasked(const ttt::Tensor<float, ttt::Cpu>& a, const ttt::Tensor<float, ttt::Cpu>& ref) {
  REQUIRE(a.shape() == ref.shape());
  double m = 0;
  auto av = a.to_vector(), rv = ref.to_vector();
  for (size_t i = 0; i < av.size(); ++i) {
    REQUIRE(std::isnan(av[i]) == std::isnan(rv[i]));
    if (!std::isnan(rv[i])) m = std::max(m, double(std::abs(av[i] - rv[i])));
  }
  return m;
}

// Max |a - ref| over the positions `mask` [B, K, T] keeps (logits [B, K, T, V]); a NaN must
// be NaN in both.
inline double max_masked_err(const Tensor<float, Cpu>& a, const Tensor<float, Cpu>& ref, const Tensor<uint8_t, Cpu>& mask) {
  REQUIRE(a.shape() == ref.shape());
  const int64_t V = ref.size(3);
  auto av = a.contiguous(), rv = ref.contiguous();
  auto mv = mask.contiguous();
  double e = 0;
  for (int64_t i = 0; i < mv.numel(); ++i) {
    if (!mv.data()[i]) continue;
    for (int64_t v = 0; v < V; ++v) {
      const float x = av.data()[i * V + v], y = rv.data()[i * V + v];
      REQUIRE(std::isnan(x) == std::isnan(y));
      if (!std::isnan(y)) e = std::max(e, double(std::abs(x - y)));
    }
  }
  return e;
}

// Issue 13's argmax criterion: of the kept positions whose reference top-2 margin exceeds
// `margin`, (how many there are, how many keep the reference's argmax in `a`).
inline std::pair<int64_t, int64_t> argmax_agreement(const Tensor<float, Cpu>& a, const Tensor<float, Cpu>& r,
                                                    const Tensor<uint8_t, Cpu>& m, double margin) {
  const int64_t V = r.size(3);
  auto av = a.contiguous(), rv = r.contiguous();
  auto mv = m.contiguous();
  int64_t confident = 0, agree = 0;
  for (int64_t i = 0; i < mv.numel(); ++i) {
    if (!mv.data()[i]) continue;
    const float *ra = rv.data() + i * V, *aa = av.data() + i * V;
    int64_t best = 0, abest = 0;
    for (int64_t v = 1; v < V; ++v) {
      if (ra[v] > ra[best]) best = v;
      if (aa[v] > aa[abest]) abest = v;
    }
    float second = -INFINITY;
    for (int64_t v = 0; v < V; ++v)
      if (v != best) second = std::max(second, ra[v]);
    if (ra[best] - second > margin) {
      ++confident;
      agree += abest == best;
    }
  }
  return {confident, agree};
}

// Streams the delayed inputs of `codes` through the temporal transformer in chunks of the
// given sizes and the depformer step by step (teacher forced), and returns logits laid
// out like forward()'s (undelayed, NaN-masked, f32 on the host). Any engine dtype and backend.
template <class M>
struct model_backend;
template <class T, class B, class P>
struct model_backend<moshi::LmModel<T, B, P>> {
  using type = B;
};
template <class M>
typename M::Output stream_teacher_forced(const M& m, const Tensor<int64_t, Cpu>& codes, const std::vector<int64_t>& chunks) {
  using B = typename model_backend<M>::type;
  const auto& cfg = m.cfg;
  const int64_t Bn = codes.size(0), Tn = codes.size(2), D = cfg.dim, Dd = cfg.depformer.d_model;
  auto [in, dep] = m.delayed_inputs(codes);
  auto st = M::TemporalT::init_state(m.transformer, Bn, true);
  auto dst = M::DepformerT::init_state(m.depformer, Bn, true);
  auto raw_text = Tensor<float, Cpu>::empty({Bn, 1, Tn, cfg.text_card_out});
  auto raw = Tensor<float, Cpu>::empty({Bn, cfg.dep_q, Tn, cfg.card});
  int64_t s = 0;
  for (size_t ci = 0; s < Tn; ++ci) {
    const int64_t n = std::min(chunks[ci % chunks.size()], Tn - s);
    auto tok = nn::to_backend<B>(in.slice(2, s, s + n).contiguous());
    auto [h, tl] = m.forward_text(tok, st, {}, {});
    for (int64_t j = 0; j < n; ++j) {
      raw_text.select(2, s + j).copy_from(
          ops::cast<float>(tl.select(1, j).contiguous()).template to<Cpu>().reshape({Bn, 1, cfg.text_card_out}));
      M::DepformerT::reset(m.depformer, dst, std::vector<uint8_t>(size_t(Bn), 1));
      auto hj = h.select(1, j).contiguous();
      for (int64_t k = 0; k < cfg.dep_q; ++k) {
        auto prev = nn::to_backend<B>(dep.select(0, k).select(1, s + j).contiguous());
        auto x = m.depformer_input(k, hj, prev).reshape({Bn, 1, Dd});
        M::DepformerT::forward(m.depformer, dst, x, {}, {});
        raw.select(1, k).select(1, s + j).copy_from(
            ops::cast<float>(m.audio_logits(k, x.reshape({Bn, Dd}))).template to<Cpu>());
      }
    }
    s += n;
  }
  (void)D;
  // Undelay exactly as forward does.
  typename M::Output out;
  out.logits = Tensor<float, Cpu>::empty(raw.shape());
  out.text_logits = Tensor<float, Cpu>::empty(raw_text.shape());
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t t = 0; t < Tn; ++t) {
      for (int64_t k = 0; k < cfg.dep_q; ++k) {
        const int64_t src = t + cfg.delays[size_t(1 + k)];
        for (int64_t v = 0; v < cfg.card; ++v) out.logits(b, k, t, v) = src < Tn ? raw(b, k, src, v) : NAN;
      }
      const int64_t src = t + cfg.delays[0];
      for (int64_t v = 0; v < cfg.text_card_out; ++v) out.text_logits(b, 0, t, v) = src < Tn ? raw_text(b, 0, src, v) : NAN;
    }
  return out;
}


// The Moshi fixture in `dir` streamed frame by frame (every query reads the KV ring) through
// model M loaded with its temporal KV cache stored as `kv` (--kv-dtype).
template <class M>
typename M::Output stream_fixture(const std::string& dir, const Tensor<int64_t, Cpu>& codes, WeightFormat kv) {
  auto cfg = moshi::LmConfig::load(dir + "/config.json");
  cfg.transformer.kv_format = kv;
  io::WeightSource ws(dir + "/model.safetensors");
  return stream_teacher_forced(M::load(cfg, ws), codes, {1});
}

// A Moshi fixture's codes and reference logits (moshi/<case>), with the error of an engine's
// output against them and issue 13's argmax count (max_masked_err, argmax_agreement).
struct FixtureRef {
  Tensor<int64_t, Cpu> codes;
  Tensor<float, Cpu> logits, text_logits;
  Tensor<uint8_t, Cpu> mask, text_mask;

  explicit FixtureRef(const std::string& dir)
      : codes(io::SafeTensors::open(dir + "/codes.safetensors").load<int64_t>("codes").contiguous()) {
    auto ref = io::SafeTensors::open(dir + "/out.safetensors");
    logits = ref.load<float>("logits"), text_logits = ref.load<float>("text_logits");
    mask = ref.load<uint8_t>("mask"), text_mask = ref.load<uint8_t>("text_mask");
  }
  template <class Out>
  double err(const Out& o) const {
    return std::max(max_masked_err(o.logits, logits, mask), max_masked_err(o.text_logits, text_logits, text_mask));
  }
  // (positions with a top-2 margin above `margin`, how many of them keep the argmax), audio and text.
  template <class Out>
  std::pair<int64_t, int64_t> argmax(const Out& o, double margin) const {
    const auto [c1, a1] = argmax_agreement(o.logits, logits, mask, margin);
    const auto [c2, a2] = argmax_agreement(o.text_logits, text_logits, text_mask, margin);
    return {c1 + c2, a1 + a2};
  }
};
