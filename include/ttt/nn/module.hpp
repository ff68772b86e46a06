#pragma once
// Helpers shared by every module: moving loaded host weights onto the backend.
#include <type_traits>

#include "ttt/backend/ops.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/io/weight_source.hpp"

namespace ttt::nn {

// Host weights stay where they are on the CPU backend (zero-copy views of the mapped
// checkpoint when the dtype matches); other backends get a copy.
template <class B, class T>
Tensor<T, B> to_backend(const Tensor<T, Cpu>& t) {
  if constexpr (std::is_same_v<B, Cpu>) return t.contiguous();
  else return t.template to<B>();
}

// A module weight on backend B: from the checkpoint, or (random-init mode) made by
// `init` directly where it lives.
template <class T, class B>
Tensor<T, B> weight(io::WeightSource& ws, const std::string& name, const Shape& shape, const io::Init& init) {
  if constexpr (!B::is_host) {
    if (ws.claim_init(name)) {
      NoArenaScope<B> persistent;
      auto t = Tensor<T, B>::empty(shape);
      if (init.kind == io::Init::Kind::constant) ops::fill(t, init.value);
      else ops::random_normal(t, init.value, ws.seed(), io::detail::fnv1a(name));
      return t;
    }
  }
  return to_backend<B>(ws.get_or_init<T>(name, shape, init));
}

}  // namespace ttt::nn
