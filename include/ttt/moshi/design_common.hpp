#pragma once
// Pieces the TTT-in-Moshi design policies share (design_*.hpp).
#include <string>

#include "ttt/io/weight_source.hpp"
#include "ttt/nn/layer.hpp"
#include "ttt/nn/norm.hpp"

namespace ttt::moshi::design_detail {

inline std::string where_of(const nn::LayerSpec& spec) { return spec.where + ": layer " + std::to_string(spec.index); }

// A norm of the model's kind whose weights a checkpoint may lack (ones / zeros then).
template <class T, class B>
nn::Norm<T, B> load_new_norm(io::WeightSource& ws, const std::string& prefix, int64_t dim, nn::NormKind kind) {
  if (nn::is_rms(kind)) {
    ws.init_missing(prefix + ".alpha", {1, 1, dim}, io::Init::constant(1.f));
  } else {
    ws.init_missing(prefix + ".weight", {dim}, io::Init::constant(1.f));
    ws.init_missing(prefix + ".bias", {dim}, io::Init::constant(0.f));
  }
  return nn::Norm<T, B>::load(ws, prefix, dim, kind);
}

}  // namespace ttt::moshi::design_detail
