#pragma once
// Helpers shared by every module: moving loaded host weights onto the backend.
#include <type_traits>

#include "ttt/core/tensor.hpp"

namespace ttt::nn {

// Host weights stay where they are on the CPU backend (zero-copy views of the mapped
// checkpoint when the dtype matches); other backends get a copy.
template <class B, class T>
Tensor<T, B> to_backend(const Tensor<T, Cpu>& t) {
  if constexpr (std::is_same_v<B, Cpu>) return t.contiguous();
  else return t.template to<B>();
}

}  // namespace ttt::nn
