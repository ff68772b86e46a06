#pragma once
// Tensor<T, B>: storage plus layout (CuTe's idea). A view is the same type sharing the
// storage of the tensor it was taken from, so views keep their storage alive and
// slicing never copies. Rank <= 4; strides are in elements and may be 0 (broadcast).
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "ttt/core/arena.hpp"
#include "ttt/core/backend.hpp"
#include "ttt/core/dtype.hpp"
#include "ttt/core/error.hpp"
#include "ttt/core/host_memory.hpp"
#include "ttt/core/shape.hpp"

namespace ttt {

template <class T, class B>
class Tensor {
 public:
  using value_type = T;
  using backend_type = B;

  Tensor() = default;
  Tensor(std::shared_ptr<void> owner, T* data, const Shape& shape, const Shape& strides)
      : owner_(std::move(owner)), data_(data), shape_(shape), strides_(strides) {
    TTT_CHECK(shape.rank == strides.rank, "shape ", shape.str(), " and strides ", strides.str(),
              " differ in rank");
    for (int i = 0; i < shape.rank; ++i) TTT_CHECK(shape.d[i] >= 0, "negative extent in ", shape.str());
  }

  // Uninitialised storage (from the thread's arena when one is active).
  static Tensor empty(const Shape& shape) {
    for (int i = 0; i < shape.rank; ++i) TTT_CHECK(shape.d[i] >= 0, "negative extent in ", shape.str());
    auto owner = allocate_storage<B>(size_t(shape.numel()) * sizeof(T));
    return Tensor(owner, static_cast<T*>(owner.get()), shape, contiguous_strides(shape));
  }
  static Tensor zeros(const Shape& shape) {
    Tensor t = empty(shape);
    Memory<B>::zero(t.data_, t.nbytes());
    return t;
  }
  static Tensor from_host(const Shape& shape, const T* src) {
    Tensor t = empty(shape);
    Memory<B>::from_host(t.data_, src, t.nbytes());
    return t;
  }
  static Tensor from_vector(const Shape& shape, const std::vector<T>& v) {
    TTT_CHECK(int64_t(v.size()) == shape.numel(), "from_vector: ", v.size(), " values for shape ",
              shape.str());
    return from_host(shape, v.data());
  }
  // A contiguous view over memory the caller owns (or that `keep` keeps alive).
  static Tensor borrow(T* data, const Shape& shape, std::shared_ptr<void> keep = {}) {
    return Tensor(std::move(keep), data, shape, contiguous_strides(shape));
  }

  bool defined() const { return data_ != nullptr; }
  T* data() const { return data_; }
  const Shape& shape() const { return shape_; }
  const Shape& strides() const { return strides_; }
  int rank() const { return shape_.rank; }
  int64_t size(int d) const { return shape_.d[shape_.dim(d)]; }
  int64_t stride(int d) const { return strides_.d[shape_.dim(d)]; }
  int64_t numel() const { return shape_.numel(); }
  size_t nbytes() const { return size_t(numel()) * sizeof(T); }
  const std::shared_ptr<void>& owner() const { return owner_; }

  bool is_contiguous() const {
    int64_t acc = 1;
    for (int i = shape_.rank - 1; i >= 0; --i) {
      if (shape_.d[i] != 1 && strides_.d[i] != acc) return false;
      acc *= shape_.d[i];
    }
    return true;
  }

  // Elements [begin, end) of dimension `dim` (negative begin/end count from the end).
  Tensor slice(int dim, int64_t begin, int64_t end) const {
    int d = shape_.dim(dim);
    int64_t n = shape_.d[d];
    if (begin < 0) begin += n;
    if (end < 0) end += n;
    TTT_CHECK(0 <= begin && begin <= end && end <= n, "slice [", begin, ", ", end, ") out of range for dim ",
              d, " of ", shape_.str());
    Tensor t = *this;
    t.data_ = data_ + begin * strides_.d[d];
    t.shape_.d[d] = end - begin;
    return t;
  }
  // Index `i` of dimension `dim`, dropping that dimension.
  Tensor select(int dim, int64_t i) const {
    int d = shape_.dim(dim);
    if (i < 0) i += shape_.d[d];
    TTT_CHECK(0 <= i && i < shape_.d[d], "index ", i, " out of range for dim ", d, " of ", shape_.str());
    Tensor t;
    t.owner_ = owner_;
    t.data_ = data_ + i * strides_.d[d];
    t.shape_ = Shape::of_rank(shape_.rank - 1);
    t.strides_ = Shape::of_rank(shape_.rank - 1);
    for (int k = 0, j = 0; k < shape_.rank; ++k) {
      if (k == d) continue;
      t.shape_.d[j] = shape_.d[k];
      t.strides_.d[j++] = strides_.d[k];
    }
    return t;
  }
  // A view with a new shape; one extent may be -1. Requires contiguous storage.
  Tensor reshape(Shape s) const {
    int infer = -1;
    int64_t known = 1;
    for (int i = 0; i < s.rank; ++i) {
      if (s.d[i] == -1) {
        TTT_CHECK(infer < 0, "reshape: more than one -1 in ", s.str());
        infer = i;
      } else {
        known *= s.d[i];
      }
    }
    if (infer >= 0) {
      TTT_CHECK(known > 0 && numel() % known == 0, "reshape: cannot infer ", s.str(), " from ", shape_.str());
      s.d[infer] = numel() / known;
    }
    TTT_CHECK(s.numel() == numel(), "reshape: ", shape_.str(), " has ", numel(), " elements, ", s.str(), " needs ",
              s.numel());
    TTT_CHECK(is_contiguous(), "reshape of a non-contiguous view ", shape_.str(), " strides ", strides_.str(),
              "; call contiguous() first");
    Tensor t = *this;
    t.shape_ = s;
    t.strides_ = contiguous_strides(s);
    return t;
  }
  Tensor transpose(int a, int b) const {
    int da = shape_.dim(a), db = shape_.dim(b);
    Tensor t = *this;
    std::swap(t.shape_.d[da], t.shape_.d[db]);
    std::swap(t.strides_.d[da], t.strides_.d[db]);
    return t;
  }
  Tensor unsqueeze(int dim) const {
    TTT_CHECK(shape_.rank < kMaxRank, "unsqueeze: rank ", kMaxRank, " is the maximum");
    int d = dim < 0 ? dim + shape_.rank + 1 : dim;
    TTT_CHECK(d >= 0 && d <= shape_.rank, "unsqueeze: dim ", dim, " out of range");
    Tensor t = *this;
    t.shape_.rank = t.strides_.rank = shape_.rank + 1;
    for (int i = shape_.rank; i > d; --i) {
      t.shape_.d[i] = shape_.d[i - 1];
      t.strides_.d[i] = strides_.d[i - 1];
    }
    t.shape_.d[d] = 1;
    t.strides_.d[d] = d < shape_.rank ? strides_.d[d] * shape_.d[d] : 1;
    return t;
  }
  // Broadcast size-1 dimensions to `s` (stride 0); same rank required.
  Tensor expand(const Shape& s) const {
    TTT_CHECK(s.rank == shape_.rank, "expand: rank of ", s.str(), " differs from ", shape_.str());
    Tensor t = *this;
    for (int i = 0; i < s.rank; ++i) {
      if (shape_.d[i] == s.d[i]) continue;
      TTT_CHECK(shape_.d[i] == 1, "expand: cannot expand ", shape_.str(), " to ", s.str());
      t.shape_.d[i] = s.d[i];
      t.strides_.d[i] = 0;
    }
    return t;
  }

  Tensor contiguous() const {
    if (is_contiguous()) return *this;
    return clone();
  }
  Tensor clone() const {
    Tensor t = empty(shape_);
    t.copy_from(*this);
    return t;
  }
  // Strided copy of a same-shaped tensor into this one.
  void copy_from(const Tensor& src) const {
    TTT_CHECK(src.shape() == shape_, "copy_from: shape ", src.shape().str(), " into ", shape_.str());
    if (numel() == 0) return;
    if (is_contiguous() && src.is_contiguous()) {
      Memory<B>::copy(data_, src.data_, nbytes());
    } else {
      Kernels<B>::copy(*this, src);
    }
  }

  template <class B2>
  Tensor<T, B2> to() const {
    Tensor c = contiguous();
    auto out = Tensor<T, B2>::empty(shape_);
    if constexpr (std::is_same_v<B, B2>) {
      Memory<B>::copy(out.data(), c.data(), nbytes());
    } else if constexpr (B::is_host) {
      Memory<B2>::from_host(out.data(), c.data(), nbytes());
    } else {
      static_assert(B2::is_host, "device-to-device transfers between backends are not supported");
      Memory<B>::to_host(out.data(), c.data(), nbytes());
    }
    return out;
  }
  // Host copy of the elements in row-major order.
  std::vector<T> to_vector() const {
    std::vector<T> v(static_cast<size_t>(numel()));
    Tensor c = contiguous();
    if (!v.empty()) Memory<B>::to_host(v.data(), c.data(), nbytes());
    return v;
  }

  // Host element access (checked rank, unchecked bounds in release).
  template <class... I>
  T& operator()(I... idx) const {
    static_assert(B::is_host, "element access needs a host tensor; use to<Cpu>()");
    static_assert(sizeof...(I) <= size_t(kMaxRank));
    const int64_t ix[] = {int64_t(idx)...};
    int64_t off = 0;
    for (size_t i = 0; i < sizeof...(I); ++i) off += ix[i] * strides_.d[i];
    return data_[off];
  }

 private:
  std::shared_ptr<void> owner_;
  T* data_ = nullptr;
  Shape shape_;
  Shape strides_;
};

template <class T>
using HostTensor = Tensor<T, Cpu>;

}  // namespace ttt
