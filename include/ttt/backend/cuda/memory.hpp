#pragma once
// Memory<Cuda>: a caching allocator over cudaMalloc (blocks return to size-class free
// lists, never to the driver, so steady-state streaming allocates nothing) and copies
// ordered on the thread's stream. Freed blocks may be reused by later work on the same
// stream, which is ordered after the work that used them: the same rule as PyTorch's.
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/core/backend.hpp"

namespace ttt {

namespace cuda {

class CachingAllocator {
 public:
  static CachingAllocator& get() {
    static CachingAllocator* a = new CachingAllocator();  // never destroyed: outlives static tensors
    return *a;
  }
  void* allocate(size_t bytes) {
    const size_t n = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto& fl = free_[n];
    void* p = nullptr;
    if (!fl.empty()) {
      p = fl.back();
      fl.pop_back();
    } else {
      cudaError_t e = cudaMalloc(&p, n);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        release_cached_locked();  // give cached blocks back and retry once
        e = cudaMalloc(&p, n);
        if (e != cudaSuccess) {
          (void)cudaGetLastError();
          fail("CUDA out of memory allocating ", n, " bytes (", in_use_, " in use, ", reserved_, " reserved)");
        }
      }
      reserved_ += n;
    }
    in_use_ += n;
    if (in_use_ > peak_) peak_ = in_use_;
    return p;
  }
  void release(void* p, size_t bytes) {
    const size_t n = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    free_[n].push_back(p);
    in_use_ -= n;
  }
  void release_cached() {
    std::lock_guard<std::mutex> lock(mu_);
    release_cached_locked();
  }
  size_t in_use() const { return in_use_; }
  size_t reserved() const { return reserved_; }
  size_t peak() const { return peak_; }

 private:
  static size_t round(size_t b) {
    if (b <= 512) return 512;
    if (b <= (size_t(1) << 20)) return (b + 511) / 512 * 512;
    return (b + (size_t(1) << 20) - 1) / (size_t(1) << 20) * (size_t(1) << 20);
  }
  void release_cached_locked() {
    cudaDeviceSynchronize();
    for (auto& [n, fl] : free_)
      for (void* p : fl) {
        cudaFree(p);
        reserved_ -= n;
      }
    free_.clear();
  }
  std::mutex mu_;
  std::map<size_t, std::vector<void*>> free_;
  size_t in_use_ = 0, reserved_ = 0, peak_ = 0;
};

}  // namespace cuda

template <>
struct Memory<Cuda> {
  static std::shared_ptr<void> allocate(size_t bytes) {
    void* p = cuda::CachingAllocator::get().allocate(bytes);
    return std::shared_ptr<void>(p, [bytes](void* q) { cuda::CachingAllocator::get().release(q, bytes); });
  }
  static void copy(void* dst, const void* src, size_t bytes) {
    if (bytes)
      TTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, cuda::Context::get().stream()));
  }
  static void to_host(void* dst, const void* src, size_t bytes) {
    if (!bytes) return;
    auto& c = cuda::Context::get();
    TTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, c.stream()));
    c.synchronize();
  }
  static void from_host(void* dst, const void* src, size_t bytes) {
    if (!bytes) return;
    auto& c = cuda::Context::get();
    TTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, c.stream()));
    c.synchronize();  // the host buffer may die right after
  }
  static void zero(void* dst, size_t bytes) {
    if (bytes) TTT_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, cuda::Context::get().stream()));
  }
  static void synchronize() { cuda::Context::get().synchronize(); }
  // Page-locked host memory: copies from and to it are truly asynchronous and can be
  // captured in a CUDA graph (the frame's inputs and outputs travel through it).
  static std::shared_ptr<void> allocate_pinned(size_t bytes) {
    void* p = nullptr;
    TTT_CUDA_CHECK(cudaMallocHost(&p, bytes ? bytes : 1));
    return std::shared_ptr<void>(p, [](void* q) { cudaFreeHost(q); });
  }
  // Ordered on the stream, no synchronisation: `src`/`dst` must be pinned and stay valid
  // until the stream reaches the copy.
  static void from_host_async(void* dst, const void* src, size_t bytes) {
    if (bytes)
      TTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, cuda::Context::get().stream()));
  }
  static void to_host_async(void* dst, const void* src, size_t bytes) {
    if (bytes)
      TTT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, cuda::Context::get().stream()));
  }
  static int64_t bytes_in_use() { return int64_t(cuda::CachingAllocator::get().in_use()); }
};

}  // namespace ttt
