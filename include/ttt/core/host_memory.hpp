#pragma once
// Host storage: 64-byte aligned (full cache lines, AVX-512 loads), counted so that the
// CLI can report the bytes a model and a session hold.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "ttt/core/backend.hpp"
#include "ttt/core/error.hpp"

namespace ttt {

namespace detail {
inline std::atomic<int64_t>& host_bytes_in_use() {
  static std::atomic<int64_t> n{0};
  return n;
}
}  // namespace detail

template <>
struct Memory<Cpu> {
  static constexpr size_t kAlignment = 64;

  static std::shared_ptr<void> allocate(size_t bytes) {
    size_t n = (bytes + kAlignment - 1) / kAlignment * kAlignment;
    if (n == 0) n = kAlignment;
    void* p = std::aligned_alloc(kAlignment, n);
    if (!p) fail("host allocation of ", bytes, " bytes failed");
    detail::host_bytes_in_use() += int64_t(n);
    return std::shared_ptr<void>(p, [n](void* q) {
      detail::host_bytes_in_use() -= int64_t(n);
      std::free(q);
    });
  }
  static void copy(void* dst, const void* src, size_t bytes) {
    if (bytes) std::memmove(dst, src, bytes);
  }
  static void to_host(void* dst, const void* src, size_t bytes) { copy(dst, src, bytes); }
  static void from_host(void* dst, const void* src, size_t bytes) { copy(dst, src, bytes); }
  static void zero(void* dst, size_t bytes) {
    if (bytes) std::memset(dst, 0, bytes);
  }
  static void synchronize() {}
  // Staging memory for the per-frame transfers and the ordered copies through it (on the
  // host both are plain).
  static std::shared_ptr<void> allocate_pinned(size_t bytes) { return allocate(bytes); }
  static void from_host_async(void* dst, const void* src, size_t bytes) { copy(dst, src, bytes); }
  static void to_host_async(void* dst, const void* src, size_t bytes) { copy(dst, src, bytes); }
  static int64_t bytes_in_use() { return detail::host_bytes_in_use().load(); }
};

}  // namespace ttt
