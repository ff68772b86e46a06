#pragma once
// Backend tags and the two interfaces every backend specialises: Memory<B> (storage and
// copies) and Kernels<B> (the ops). The primary templates refuse to compile, so a
// missing backend header is a clear compile error instead of a link error.
#include <cstddef>
#include <memory>

namespace ttt {

struct Cpu {
  static constexpr const char* name = "cpu";
  static constexpr bool is_host = true;
};
struct Cuda {
  static constexpr const char* name = "cuda";
  static constexpr bool is_host = false;
};

template <class B>
inline constexpr bool always_false_v = false;

template <class B>
struct Memory {
  static_assert(always_false_v<B>,
                "no Memory<B> for this backend: include ttt/ttt.hpp (cpu) or ttt/cuda.hpp (cuda)");
};

template <class B>
struct Kernels {
  static_assert(always_false_v<B>,
                "no Kernels<B> for this backend: include ttt/ttt.hpp (cpu) or ttt/cuda.hpp (cuda)");
};

}  // namespace ttt
