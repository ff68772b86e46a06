#pragma once
// int8 / fp8 e4m3 codes (core/quant.hpp) on the device, for the kernels that read and write
// quantised weights (linear_quant.cuh) and a quantised KV cache (attention.cuh) (nvcc only):
// decoding in registers, and quantising one row per block.
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/device.cuh"
#include "ttt/core/quant.hpp"

namespace ttt::cuda::kernels {

// One row of n values quantised by the whole block of kThreads threads (all must call it):
// codes F::encode(x / scale) into `codes`, returns scale = max |x| / F::qmax (1 for an
// all-zero row) to every thread. The CPU's cpu::quantize_row formula: the same bytes.
template <int kThreads, class F, class T>
__device__ __forceinline__ float quantize_row(const T* x, int64_t n, uint8_t* codes) {
  float amax = 0.f;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) amax = fmaxf(amax, fabsf(to_f32(x[k])));
  amax = device::block_all_reduce<kThreads>(amax, device::MaxOp{});
  const float s = amax > 0.f ? amax / F::qmax : 1.f;
  for (int64_t k = threadIdx.x; k < n; k += kThreads) codes[k] = F::encode(to_f32(x[k]) / s);
  return s;
}

// int8: byte b biased to unsigned (b ^ 0x80) placed in a float's low mantissa bits:
// 2^23 + (b + 128) exactly; subtracting 2^23 + 128 leaves b. Two instructions per weight.
// fp8 e4m3: the hardware's exact e4m3x2 -> f16x2 conversion (sm_89+), then to float.
// Both equal F::decode bit for bit.
template <class F>
__device__ __forceinline__ void decode16(const uint4& u, float (&out)[16]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (std::is_same_v<F, Int8>) {
      const uint32_t b = w[j] ^ 0x80808080u;
#pragma unroll
      for (int i = 0; i < 4; ++i)
        out[4 * j + i] = __uint_as_float(__byte_perm(b, 0x4B00u, 0x5440u + unsigned(i))) - 8388736.f;
    } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
      const __half2_raw lo = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w[j] & 0xFFFFu), __NV_E4M3);
      const __half2_raw hi = __nv_cvt_fp8x2_to_halfraw2(__nv_fp8x2_storage_t(w[j] >> 16), __NV_E4M3);
      const float2 a = __half22float2(__half2(lo)), b = __half22float2(__half2(hi));
      out[4 * j] = a.x, out[4 * j + 1] = a.y, out[4 * j + 2] = b.x, out[4 * j + 3] = b.y;
#else
#pragma unroll
      for (int i = 0; i < 4; ++i) out[4 * j + i] = F::decode(uint8_t(w[j] >> (8 * i)));
#endif
    }
  }
}

// One code: the same values (fp8 through the hardware conversion on sm_89+).
template <class F>
__device__ __forceinline__ float decode1(uint8_t c) {
  if constexpr (std::is_same_v<F, Int8>) {
    return float(int8_t(c));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(__nv_fp8_storage_t(c), __NV_E4M3)));
#else
    return F::decode(c);
#endif
  }
}

}  // namespace ttt::cuda::kernels
