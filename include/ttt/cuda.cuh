#pragma once
// The CUDA backend's definitions, instantiated. Include this header in exactly ONE
// nvcc-compiled file of a program (e.g. a cuda_instantiate.cu holding only this line);
// every other file includes ttt/cuda.hpp and links against the instantiations below.
//
// To support another element type or conversion, add it to one of the type lists.
#include "ttt/cuda.hpp"
#include "ttt/backend/cuda/kernels.cuh"
#include "ttt/layers/cuda/ttt_kernels.cuh"
#include "ttt/layers/cuda/ttt_backward.cuh"

// Element types with the full op set (float arithmetic inside).
#define TTT_CUDA_FLOAT_TYPES(X) X(float) X(::ttt::bf16) X(::ttt::f16)
// Element types that can be stored, copied and filled.
#define TTT_CUDA_STORAGE_TYPES(X) \
  X(float) X(::ttt::bf16) X(::ttt::f16) X(int64_t) X(int32_t) X(uint8_t)
// (To, From) pairs of cast: every pair of float types, and the index types.
#define TTT_CUDA_CAST_PAIRS(X)                                                                        \
  X(float, float) X(float, ::ttt::bf16) X(float, ::ttt::f16)                                          \
  X(::ttt::bf16, float) X(::ttt::bf16, ::ttt::bf16) X(::ttt::bf16, ::ttt::f16)                        \
  X(::ttt::f16, float) X(::ttt::f16, ::ttt::bf16) X(::ttt::f16, ::ttt::f16)                           \
  X(int64_t, int32_t) X(int32_t, int64_t)

#define TTT_CUDA_T_(T) ::ttt::Tensor<T, ::ttt::Cuda>
#define TTT_CUDA_I64_ ::ttt::Tensor<int64_t, ::ttt::Cuda>

#define TTT_CUDA_INSTANTIATE_STORAGE(T)                                                          \
  template void ::ttt::Kernels<::ttt::Cuda>::copy<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&); \
  template void ::ttt::Kernels<::ttt::Cuda>::fill<T>(const TTT_CUDA_T_(T)&, double);

#define TTT_CUDA_INSTANTIATE_CAST(To, From) \
  template void ::ttt::Kernels<::ttt::Cuda>::cast<To, From>(const TTT_CUDA_T_(To)&, const TTT_CUDA_T_(From)&);

#define TTT_CUDA_INSTANTIATE_FLOAT(T)                                                                               \
  template void ::ttt::Kernels<::ttt::Cuda>::unary<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, ::ttt::Unary,     \
                                                      float);                                                       \
  template void ::ttt::Kernels<::ttt::Cuda>::binary<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                 \
                                                       const TTT_CUDA_T_(T)&, ::ttt::Binary);                       \
  template void ::ttt::Kernels<::ttt::Cuda>::glu<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, ::ttt::Unary);     \
  template void ::ttt::Kernels<::ttt::Cuda>::matmul<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                 \
                                                       const TTT_CUDA_T_(T)&, float, float);                        \
  template void ::ttt::Kernels<::ttt::Cuda>::linear<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                 \
                                                       const TTT_CUDA_T_(T)&, float);                               \
  template void ::ttt::Kernels<::ttt::Cuda>::fused_linear<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,           \
                                                             const TTT_CUDA_T_(T)&,                                 \
                                                             const ::ttt::FusedLinear<T, ::ttt::Cuda>&);            \
  template void ::ttt::Kernels<::ttt::Cuda>::reduce<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, ::ttt::Reduce); \
  template void ::ttt::Kernels<::ttt::Cuda>::argmax<T>(const TTT_CUDA_I64_&, const TTT_CUDA_T_(T)&);                \
  template void ::ttt::Kernels<::ttt::Cuda>::softmax<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&);               \
  template void ::ttt::Kernels<::ttt::Cuda>::layer_norm<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,             \
                                                           const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, float);    \
  template void ::ttt::Kernels<::ttt::Cuda>::unary_backward<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,         \
                                                              const TTT_CUDA_T_(T)&, ::ttt::Unary, float);          \
  template void ::ttt::Kernels<::ttt::Cuda>::layer_norm_backward<T>(                                                \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                   \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, float);                                                         \
  template void ::ttt::Kernels<::ttt::Cuda>::rms_norm<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,               \
                                                         const TTT_CUDA_T_(T)&, float);                             \
  template void ::ttt::Kernels<::ttt::Cuda>::rope<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                   \
                                                     const TTT_CUDA_I64_&, float);                                  \
  template void ::ttt::Kernels<::ttt::Cuda>::add_sin_embedding<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_I64_&,       \
                                                                  float, float);                                    \
  template void ::ttt::Kernels<::ttt::Cuda>::embedding<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,              \
                                                          const TTT_CUDA_I64_&);                                    \
  template void ::ttt::Kernels<::ttt::Cuda>::attention<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,              \
                                                          const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,             \
                                                          const TTT_CUDA_I64_&, const TTT_CUDA_I64_&,               \
                                                          const ::ttt::AttentionParams&);                           \
  template void ::ttt::Kernels<::ttt::Cuda>::kv_write<T>(                                                           \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, const TTT_CUDA_I64_&, const TTT_CUDA_T_(T)&,                    \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_I64_&, const ::ttt::Tensor<uint8_t, ::ttt::Cuda>&);                      \
  template void ::ttt::Kernels<::ttt::Cuda>::conv1d<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,                 \
                                                       const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, int64_t,      \
                                                       int64_t, int64_t);                                          \
  template void ::ttt::Kernels<::ttt::Cuda>::conv_transpose1d<T>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,       \
                                                                 const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,       \
                                                                 int64_t, int64_t);                                \
  template void ::ttt::Kernels<::ttt::Cuda>::vq_nearest<T>(const TTT_CUDA_I64_&, const TTT_CUDA_T_(T)&,             \
                                                           const TTT_CUDA_T_(T)&);                                 \
  template void ::ttt::Kernels<::ttt::Cuda>::random_normal<T>(const TTT_CUDA_T_(T)&, float, uint64_t, uint64_t); \
  template void ::ttt::Kernels<::ttt::Cuda>::sample<T>(const TTT_CUDA_I64_&, const TTT_CUDA_T_(T)&,                  \
                                                       const ::ttt::SampleParams&, const TTT_CUDA_I64_&);

// Quantised weights and KV caches: every float type with both formats.
#define TTT_CUDA_INSTANTIATE_QUANT_(T, F)                                                                        \
  template void ::ttt::Kernels<::ttt::Cuda>::quantize_rows<F, T>(const ::ttt::QuantWeight<F, ::ttt::Cuda>&,       \
                                                                 const TTT_CUDA_T_(T)&);                         \
  template void ::ttt::Kernels<::ttt::Cuda>::dequantize<T, F>(const TTT_CUDA_T_(T)&,                              \
                                                              const ::ttt::QuantWeight<F, ::ttt::Cuda>&);         \
  template void ::ttt::Kernels<::ttt::Cuda>::linear_q<T, F>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,         \
                                                            const ::ttt::QuantWeight<F, ::ttt::Cuda>&, float);    \
  template void ::ttt::Kernels<::ttt::Cuda>::fused_linear_q<T, F>(const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&,   \
                                                                  const ::ttt::QuantWeight<F, ::ttt::Cuda>&,      \
                                                                  const ::ttt::FusedLinear<T, ::ttt::Cuda>&);      \
  template void ::ttt::Kernels<::ttt::Cuda>::attention_q<T, F>(                                                  \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, const ::ttt::QuantKv<F, ::ttt::Cuda>&,                         \
      const ::ttt::QuantKv<F, ::ttt::Cuda>&, const TTT_CUDA_I64_&, const TTT_CUDA_I64_&,                          \
      const ::ttt::AttentionParams&);                                                                            \
  template void ::ttt::Kernels<::ttt::Cuda>::kv_write_q<T, F>(                                                   \
      const ::ttt::QuantKv<F, ::ttt::Cuda>&, const ::ttt::QuantKv<F, ::ttt::Cuda>&, const TTT_CUDA_I64_&,          \
      const TTT_CUDA_T_(T)&, const TTT_CUDA_T_(T)&, const TTT_CUDA_I64_&,                                         \
      const ::ttt::Tensor<uint8_t, ::ttt::Cuda>&);
#define TTT_CUDA_INSTANTIATE_QUANT(T) TTT_CUDA_INSTANTIATE_QUANT_(T, ::ttt::Int8) TTT_CUDA_INSTANTIATE_QUANT_(T, ::ttt::Fp8E4M3)

TTT_CUDA_STORAGE_TYPES(TTT_CUDA_INSTANTIATE_STORAGE)
TTT_CUDA_CAST_PAIRS(TTT_CUDA_INSTANTIATE_CAST)
TTT_CUDA_FLOAT_TYPES(TTT_CUDA_INSTANTIATE_FLOAT)
TTT_CUDA_FLOAT_TYPES(TTT_CUDA_INSTANTIATE_QUANT)
