#pragma once
// A bump allocator for the temporaries of one streaming step. While an ArenaScope is
// active on a thread, every Tensor<_, B> allocated on that thread comes from the arena.
// Reset at the start of each step, the same sequence of requests yields the same
// addresses, which is what lets a CUDA graph captured once replay every frame, and it
// keeps malloc out of the CPU hot path.
#include <cstdint>
#include <memory>
#include <vector>

#include "ttt/core/backend.hpp"
#include "ttt/core/error.hpp"

namespace ttt {

template <class B>
class Arena {
 public:
  explicit Arena(size_t chunk_bytes = size_t(64) << 20) : chunk_bytes_(chunk_bytes) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  void reset() {
    chunk_ = 0;
    used_ = 0;
  }

  // Returns storage that stays valid until the arena is destroyed; contents are only
  // meaningful until the next reset().
  std::shared_ptr<void> allocate(size_t bytes) {
    constexpr size_t kAlign = 256;
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    if (bytes == 0) bytes = kAlign;
    while (chunk_ < chunks_.size() && used_ + bytes > sizes_[chunk_]) {
      ++chunk_;
      used_ = 0;
    }
    if (chunk_ == chunks_.size()) {
      size_t n = bytes > chunk_bytes_ ? bytes : chunk_bytes_;
      chunks_.push_back(Memory<B>::allocate(n));
      sizes_.push_back(n);
      used_ = 0;
    }
    char* base = static_cast<char*>(chunks_[chunk_].get());
    void* p = base + used_;
    used_ += bytes;
    // Aliasing constructor: shares ownership of the chunk, never frees on its own.
    return std::shared_ptr<void>(chunks_[chunk_], p);
  }

  size_t capacity() const {
    size_t n = 0;
    for (size_t s : sizes_) n += s;
    return n;
  }

  static Arena*& current() {
    thread_local Arena* a = nullptr;
    return a;
  }

 private:
  size_t chunk_bytes_;
  std::vector<std::shared_ptr<void>> chunks_;
  std::vector<size_t> sizes_;
  size_t chunk_ = 0, used_ = 0;
};

// Routes this thread's allocations of backend B into `arena` for the scope's lifetime.
template <class B>
class ArenaScope {
 public:
  explicit ArenaScope(Arena<B>& arena) : prev_(Arena<B>::current()) {
    arena.reset();
    Arena<B>::current() = &arena;
  }
  ~ArenaScope() { Arena<B>::current() = prev_; }
  ArenaScope(const ArenaScope&) = delete;
  ArenaScope& operator=(const ArenaScope&) = delete;

 private:
  Arena<B>* prev_;
};

// Scopes that must allocate long-lived storage while an arena is active (a KV ring
// created lazily inside a step) suspend it.
template <class B>
class NoArenaScope {
 public:
  NoArenaScope() : prev_(Arena<B>::current()) { Arena<B>::current() = nullptr; }
  ~NoArenaScope() { Arena<B>::current() = prev_; }
  NoArenaScope(const NoArenaScope&) = delete;
  NoArenaScope& operator=(const NoArenaScope&) = delete;

 private:
  Arena<B>* prev_;
};

template <class B>
std::shared_ptr<void> allocate_storage(size_t bytes) {
  if (Arena<B>* a = Arena<B>::current()) return a->allocate(bytes);
  return Memory<B>::allocate(bytes);
}

}  // namespace ttt
