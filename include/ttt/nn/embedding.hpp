#pragma once
// moshi's ScaledEmbedding: a table lookup where id -1 embeds as exact zeros, with the
// optional LayerNorm after the lookup (norm_emb) and the optional low-rank projection
// (table [V, r] then Linear(r -> D)).
#include <optional>
#include <string>

#include "ttt/backend/ops.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/module.hpp"

namespace ttt::nn {

template <class T, class B>
struct Embedding {
  Tensor<T, B> table;     // [V, r or D]
  Tensor<T, B> low_rank;  // [D, r] or undefined
  Tensor<T, B> norm_w, norm_b;
  int64_t dim = 0;

  int64_t vocab() const { return table.size(0); }

  static Embedding load(io::WeightSource& ws, const std::string& prefix, int64_t vocab, int64_t dim,
                        std::optional<int64_t> low_rank, bool norm) {
    Embedding e;
    e.dim = dim;
    const int64_t r = low_rank.value_or(dim);
    e.table = nn::weight<T, B>(ws, prefix + ".weight", {vocab, r}, io::Init::normal(1.f / std::sqrt(float(r))));
    if (norm) {
      e.norm_w = nn::weight<T, B>(ws, prefix + ".norm.weight", {r}, io::Init::constant(1.f));
      e.norm_b = nn::weight<T, B>(ws, prefix + ".norm.bias", {r}, io::Init::constant(0.f));
    }
    if (low_rank)
      e.low_rank = nn::weight<T, B>(ws, prefix + ".low_rank.weight", {dim, r}, io::Init::normal(1.f / std::sqrt(float(r))));
    return e;
  }

  // ids [N...] -> [N..., D]. Ids are validated by the caller (token range checks happen
  // where tokens enter the engine); -1 gives zeros.
  Tensor<T, B> operator()(const Tensor<int64_t, B>& ids) const {
    auto y = ops::embedding(table, ids);
    if (norm_w.defined()) {
      // LayerNorm of the zero row is not zero: moshi zeroes after the norm, so do we.
      ops::layer_norm(y, y, norm_w, norm_b, 1e-5f);
      mask_zero_ids(y, ids);
    }
    if (low_rank.defined()) return ops::linear(y, low_rank);
    return y;
  }

 private:
  static void mask_zero_ids(const Tensor<T, B>& y, const Tensor<int64_t, B>& ids) {
    // Rare path (norm_emb is unused by released models): done on the host.
    auto h = y.template to<Cpu>();
    auto id = ids.template to<Cpu>();
    const int64_t D = h.size(-1);
    for (int64_t i = 0; i < id.numel(); ++i)
      if (id.data()[i] == -1)
        for (int64_t d = 0; d < D; ++d) h.data()[i * D + d] = from_f32<T>(0.f);
    y.copy_from(to_backend<B>(h));
  }
};

}  // namespace ttt::nn
