#pragma once
// Workspace<B>: the per-session scratch that must outlive one step but is not state. A
// kernel that needs persistent scratch (the one-kernel TTT step's completion counters, which
// must read zero at every call and are left zero by the kernel) asks for it by key; every
// layer of a session shares the buffer under a key, since layers run one after another on
// one stream. Scratch is not saved, and a snapshot of a session gets a fresh workspace.
//
// Buffers are made zero-filled the first time a key is asked for (or when a larger size is
// asked for: the old storage is released). Addresses then stay fixed, which is what a CUDA
// graph captured after the first frames needs: a session asks for the same sizes every frame.
#include <map>
#include <memory>
#include <string>

#include "ttt/core/arena.hpp"
#include "ttt/core/tensor.hpp"

namespace ttt {

template <class B>
class Workspace {
 public:
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;

  // A contiguous [shape] view of the buffer under `key` (element type E), at least as large
  // as asked; contents are whatever the last user left.
  template <class E>
  Tensor<E, B> get(const std::string& key, const Shape& shape) {
    const size_t bytes = size_t(shape.numel()) * sizeof(E);
    Entry& e = buffers_[key];
    if (!e.storage || e.bytes < bytes) {
      NoArenaScope<B> persistent;  // never from a step's arena
      auto t = Tensor<uint8_t, B>::zeros({int64_t(bytes > 0 ? bytes : 1)});
      e.storage = std::shared_ptr<void>(t.owner(), t.data());
      e.bytes = bytes;
    }
    return Tensor<E, B>::borrow(static_cast<E*>(e.storage.get()), shape, e.storage);
  }

  size_t num_buffers() const { return buffers_.size(); }

 private:
  struct Entry {
    std::shared_ptr<void> storage;
    size_t bytes = 0;
  };
  std::map<std::string, Entry> buffers_;
};

}  // namespace ttt
