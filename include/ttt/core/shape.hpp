#pragma once
#include <cstdint>
#include <initializer_list>
#include <string>

#include "ttt/config.hpp"
#include "ttt/core/error.hpp"

namespace ttt {

// Up to kMaxRank extents (or strides, in elements). Rank 0 is a scalar with one element.
struct Shape {
  int rank = 0;
  int64_t d[kMaxRank] = {0, 0, 0, 0};

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) {
    TTT_CHECK(dims.size() <= size_t(kMaxRank), "tensor rank ", dims.size(), " exceeds ", kMaxRank);
    for (int64_t v : dims) d[rank++] = v;
  }
  static Shape of_rank(int r) {
    TTT_CHECK(r >= 0 && r <= kMaxRank, "tensor rank ", r, " out of range");
    Shape s;
    s.rank = r;
    return s;
  }
  int64_t operator[](int i) const { return d[i]; }
  int64_t& operator[](int i) { return d[i]; }
  int64_t numel() const {
    int64_t n = 1;
    for (int i = 0; i < rank; ++i) n *= d[i];
    return n;
  }
  // Python-style negative dimension index, checked.
  int dim(int i) const {
    int j = i < 0 ? i + rank : i;
    TTT_CHECK(j >= 0 && j < rank, "dimension ", i, " out of range for rank ", rank);
    return j;
  }
  int64_t back() const { return rank ? d[rank - 1] : 1; }
  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.rank != b.rank) return false;
    for (int i = 0; i < a.rank; ++i)
      if (a.d[i] != b.d[i]) return false;
    return true;
  }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }
  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank; ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
  }
};

inline Shape contiguous_strides(const Shape& s) {
  Shape st = Shape::of_rank(s.rank);
  int64_t acc = 1;
  for (int i = s.rank - 1; i >= 0; --i) {
    st.d[i] = acc;
    acc *= s.d[i];
  }
  return st;
}

// Numpy broadcasting of two shapes (trailing dimensions aligned).
inline Shape broadcast_shapes(const Shape& a, const Shape& b) {
  Shape out = Shape::of_rank(a.rank > b.rank ? a.rank : b.rank);
  for (int i = 0; i < out.rank; ++i) {
    int ia = a.rank - out.rank + i, ib = b.rank - out.rank + i;
    int64_t da = ia >= 0 ? a.d[ia] : 1, db = ib >= 0 ? b.d[ib] : 1;
    TTT_CHECK(da == db || da == 1 || db == 1, "shapes ", a.str(), " and ", b.str(),
              " cannot be broadcast together");
    out.d[i] = da == 1 ? db : da;
  }
  return out;
}

}  // namespace ttt
