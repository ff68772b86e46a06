#pragma once
// Walking strided tensors on the host: rank <= 4 padded to 4, inner rows handed to a
// callback so contiguous cases vectorise.
#include <array>
#include <cstdint>

#include "ttt/core/shape.hpp"

namespace ttt::cpu {

// Calls f(offsets[N], inner_strides[N], n) for every innermost row of `shape`, where
// offsets are element offsets into each operand.
template <size_t N, class F>
void for_each_row(const Shape& shape, const std::array<Shape, N>& strides, F&& f) {
  int64_t d[4] = {1, 1, 1, 1};
  int64_t st[N][4] = {};
  const int pad = 4 - shape.rank;
  for (int i = 0; i < shape.rank; ++i) {
    d[pad + i] = shape.d[i];
    for (size_t k = 0; k < N; ++k) st[k][pad + i] = strides[k].d[i];
  }
  std::array<int64_t, N> inner{};
  for (size_t k = 0; k < N; ++k) inner[k] = st[k][3];
  std::array<int64_t, N> off{};
  for (int64_t i0 = 0; i0 < d[0]; ++i0)
    for (int64_t i1 = 0; i1 < d[1]; ++i1)
      for (int64_t i2 = 0; i2 < d[2]; ++i2) {
        for (size_t k = 0; k < N; ++k) off[k] = i0 * st[k][0] + i1 * st[k][1] + i2 * st[k][2];
        f(off, inner, d[3]);
      }
}

// Offset of row r (row-major over all but the last dimension).
inline int64_t row_offset(const Shape& shape, const Shape& strides, int64_t r) {
  int64_t off = 0;
  for (int i = shape.rank - 2; i >= 0; --i) {
    int64_t n = shape.d[i];
    off += (r % n) * strides.d[i];
    r /= n;
  }
  return off;
}

inline int64_t num_rows(const Shape& shape) {
  int64_t r = 1;
  for (int i = 0; i + 1 < shape.rank; ++i) r *= shape.d[i];
  return r;
}

}  // namespace ttt::cpu
