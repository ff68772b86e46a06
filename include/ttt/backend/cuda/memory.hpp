#pragma once
// Memory<Cuda>: a caching allocator over cudaMalloc (blocks return to size-class free
// lists, never to the driver, so steady-state streaming allocates nothing) and copies
// ordered on the thread's stream. Freed blocks may be reused by later work on the same
// stream, which is ordered after the work that used them: the same rule as PyTorch's. So the
// free lists are keyed by (device, stream) of the allocation, whichever thread frees the block:
// a block freed on device 0 is never handed out on device 1, and a block freed while its
// stream may still be using it is never handed to another stream (two engine threads on one
// GPU each have their own stream).
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <tuple>
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
  // A block for work on `stream` of `device` (the calling thread's current device: cudaMalloc
  // allocates there).
  void* allocate(size_t bytes, int device, cudaStream_t stream) {
    const size_t n = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    auto& fl = free_[key(device, stream, n)];
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
  // From any thread: `device` and `stream` are the allocation's.
  void release(void* p, size_t bytes, int device, cudaStream_t stream) {
    const size_t n = round(bytes);
    std::lock_guard<std::mutex> lock(mu_);
    free_[key(device, stream, n)].push_back(p);
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
  using Key = std::tuple<int, uintptr_t, size_t>;  // device, stream, size class
  static Key key(int device, cudaStream_t stream, size_t n) { return {device, reinterpret_cast<uintptr_t>(stream), n}; }
  // Every device that holds cached blocks is drained (a block's last user may still run on
  // its stream) and its blocks freed there; the thread's current device is restored.
  void release_cached_locked() {
    int current = 0;
    const bool have_current = cudaGetDevice(&current) == cudaSuccess;
    std::set<int> devices;
    if (have_current) devices.insert(current);
    for (const auto& [k, fl] : free_)
      if (!fl.empty()) devices.insert(std::get<0>(k));
    for (int d : devices) {
      cudaSetDevice(d);
      cudaDeviceSynchronize();
    }
    for (auto& [k, fl] : free_) {
      if (!fl.empty()) cudaSetDevice(std::get<0>(k));
      for (void* p : fl) {
        cudaFree(p);
        reserved_ -= std::get<2>(k);
      }
    }
    free_.clear();
    (void)cudaGetLastError();
    if (have_current) cudaSetDevice(current);
  }
  std::mutex mu_;
  std::map<Key, std::vector<void*>> free_;
  size_t in_use_ = 0, reserved_ = 0, peak_ = 0;
};

}  // namespace cuda

template <>
struct Memory<Cuda> {
  static std::shared_ptr<void> allocate(size_t bytes) {
    const auto& ctx = cuda::Context::get();
    const int device = ctx.device();
    cudaStream_t stream = ctx.stream();
    void* p = cuda::CachingAllocator::get().allocate(bytes, device, stream);
    return std::shared_ptr<void>(
        p, [bytes, device, stream](void* q) { cuda::CachingAllocator::get().release(q, bytes, device, stream); });
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
