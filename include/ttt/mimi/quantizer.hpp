#pragma once
// Mimi's split residual vector quantizer (moshi/quantization/vq.py, core_vq.py).
//
// Two RVQs quantise the same latent z [B, D, T]: `rvq_first` with 1 semantic codebook and
// `rvq_rest` with the acoustic ones; each has its own 1x1 input projection D -> d and output
// projection d -> D. Encoding one RVQ: r = Pin z; for each level k: c_k = argmin_v ‖r - E_k[v]‖,
// r -= E_k[c_k]. Decoding: Pout Σ_k E_k[c_k], and the two halves add. A codebook is
// E[v] = embedding_sum[v] / max(cluster_usage[v], 1e-5) (the EMA statistics as stored),
// computed in double at load.
#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "ttt/backend/ops_conv.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/mimi/config.hpp"
#include "ttt/nn/module.hpp"

namespace ttt::mimi {

template <class T, class B>
struct Rvq {
  Tensor<T, B> input_proj;                // [d, D] (stored [d, D, 1])
  Tensor<T, B> output_proj;               // [D, d] (stored [D, d, 1])
  std::vector<Tensor<T, B>> codebooks;    // per level [bins, d]
  std::vector<Tensor<float, B>> search;   // the same in float: the nearest-entry search runs in fp32

  // `prefix` e.g. "quantizer.rvq_first"; `levels` codebooks are read.
  static Rvq load(io::WeightSource& ws, const std::string& prefix, const QuantizerConfig& c, int64_t levels) {
    Rvq r;
    const int64_t D = c.input_dimension, d = c.dimension, V = c.bins;
    r.input_proj = nn::weight<T, B>(ws, prefix + ".input_proj.weight", {d, D, 1}, io::Init::normal(1.f / std::sqrt(float(D))))
                       .reshape({d, D});
    r.output_proj =
        nn::weight<T, B>(ws, prefix + ".output_proj.weight", {c.output_dimension, d, 1}, io::Init::normal(1.f / std::sqrt(float(d))))
            .reshape({c.output_dimension, d});
    for (int64_t k = 0; k < levels; ++k) {
      const std::string p = prefix + ".vq.layers." + std::to_string(k) + "._codebook.";
      const auto sum = ws.get_or_init<float>(p + "embedding_sum", {V, d}, io::Init::normal(1.f));
      const auto usage = ws.get_or_init<float>(p + "cluster_usage", {V}, io::Init::constant(1.f));
      if (ws.has(p + "_initialized")) (void)ws.get<float>(p + "_initialized", {1});  // bookkeeping only
      auto e = Tensor<float, Cpu>::empty({V, d});
      for (int64_t v = 0; v < V; ++v) {
        const double u = std::max(double(usage.data()[v]), 1e-5);
        for (int64_t i = 0; i < d; ++i) e.data()[v * d + i] = float(double(sum(v, i)) / u);
      }
      r.search.push_back(nn::to_backend<B>(e));
      r.codebooks.push_back(nn::to_backend<B>(ops::cast<T>(e)));
    }
    return r;
  }

  int64_t levels() const { return int64_t(codebooks.size()); }

  // codes [N, n] (n <= levels, column k = level k) of the latent rows z [N, D].
  void encode(const Tensor<int64_t, B>& codes, const Tensor<T, B>& z, int64_t n) const {
    auto r = ops::cast<float>(ops::linear(z, input_proj));  // [N, d]
    const int64_t N = z.size(0);
    auto idx = Tensor<int64_t, B>::empty({N});
    for (int64_t k = 0; k < n; ++k) {
      ops::vq_nearest(idx, r, search[size_t(k)]);
      codes.select(1, k).copy_from(idx);
      if (k + 1 < n) ops::binary(r, r, ops::embedding(search[size_t(k)], idx), Binary::sub);
    }
  }

  // out [N, D] (+)= Pout Σ_k E_k[codes[:, k]] (beta 0: overwrite, 1: accumulate).
  void decode(const Tensor<T, B>& out, const Tensor<int64_t, B>& codes, float beta) const {
    const int64_t N = codes.size(0), n = codes.size(1), d = codebooks[0].size(1);
    auto q = Tensor<float, B>::zeros({N, d});
    for (int64_t k = 0; k < n; ++k) ops::add_(q, ops::embedding(search[size_t(k)], codes.select(1, k).contiguous()));
    ops::linear(out, ops::cast<T>(q), output_proj, beta);
  }

  int64_t num_params() const {
    int64_t n = input_proj.numel() + output_proj.numel();
    for (auto& c : codebooks) n += c.numel();
    return n;
  }
};

template <class T, class B>
struct SplitRvq {
  Rvq<T, B> first, rest;
  int64_t bins = 0;

  static SplitRvq load(io::WeightSource& ws, const QuantizerConfig& c) {
    SplitRvq q;
    q.bins = c.bins;
    q.first = Rvq<T, B>::load(ws, "quantizer.rvq_first", c, c.n_q_semantic);
    q.rest = Rvq<T, B>::load(ws, "quantizer.rvq_rest", c, c.n_q - c.n_q_semantic);
    return q;
  }

  // codes [N, K] of latent rows z [N, D] with K codebooks (1 semantic + K - 1 acoustic).
  Tensor<int64_t, B> encode(const Tensor<T, B>& z, int64_t K) const {
    const int64_t N = z.size(0);
    auto codes = Tensor<int64_t, B>::empty({N, K});
    first.encode(codes.slice(1, 0, 1), z, 1);
    if (K > 1) rest.encode(codes.slice(1, 1, K), z, K - 1);
    return codes;
  }

  // Latent rows [N, D] of codes [N, K] (validated by the caller: 0 <= code < bins).
  Tensor<T, B> decode(const Tensor<int64_t, B>& codes) const {
    const int64_t N = codes.size(0), K = codes.size(1), D = first.output_proj.size(0);
    auto out = Tensor<T, B>::empty({N, D});
    first.decode(out, codes.slice(1, 0, 1), 0.f);
    if (K > 1) rest.decode(out, codes.slice(1, 1, K), 1.f);
    return out;
  }

  int64_t num_params() const { return first.num_params() + rest.num_params(); }
};

}  // namespace ttt::mimi
