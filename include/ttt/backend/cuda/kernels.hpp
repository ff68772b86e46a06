#pragma once
// Kernels<Cuda>: declarations only, so that any C++ translation unit can call the CUDA
// backend. The definitions live in kernels.cuh and are instantiated for the supported
// element types by including ttt/cuda.cuh in exactly one nvcc-compiled file.
#include "ttt/backend/cuda/memory.hpp"
#include "ttt/backend/ops.hpp"

namespace ttt {

template <>
struct Kernels<Cuda> {
  // linear / fused_linear use the GEMV kernel up to this many rows, cuBLAS above.
  static void set_gemv_max_rows(int rows);
  // The streaming GEMV (kernels/gemv_stream.cuh): 0 off, 1 wherever a GEMV runs, 2 also dense
  // products cuBLAS would take; negative: the default (TTT_GEMV_STREAM, else 1).
  static void set_gemv_stream(int mode);
  // Tests and benchmarks: conv1d / conv_transpose1d always on the implicit-GEMM kernel with
  // tile `tile` (0..3: 128x128, 64x128, 32x128, 64x64) and `splits` splits of the reduction
  // (0: chosen per call); tile -1 restores the automatic choice of kernel and tile.
  static void set_conv_gemm(int tile, int splits);
  // conv1d / conv_transpose1d with groups = 1 go through im2col / col2im + cuBLAS from this many
  // multiply-adds on (negative: the default, kConvLoweredMinMacs; 0: always, for tests).
  static void set_conv_lowered_min_macs(int64_t macs);
  template <class T>
  static void copy(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in);
  template <class To, class From>
  static void cast(const Tensor<To, Cuda>& out, const Tensor<From, Cuda>& in);
  template <class T>
  static void fill(const Tensor<T, Cuda>& out, double value);
  template <class T>
  static void unary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary op, float alpha);
  template <class T>
  static void binary(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, Binary op);
  template <class T>
  static void glu(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Unary act);
  template <class T>
  static void matmul(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& a, const Tensor<T, Cuda>& b, float alpha,
                     float beta);
  template <class T>
  static void linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w, float beta);
  template <class T>
  static void fused_linear(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                           const FusedLinear<T, Cuda>& f);
  // Quantised weights (core/quant.hpp; backend/cuda/kernels/linear_quant.cuh).
  // linear_q / fused_linear_q use the int8 / fp8 GEMV up to this many rows (0..8), the
  // dequantising cuBLAS path above (tests and benchmarks; negative: kGemvQDefaultRows).
  static void set_gemv_q_max_rows(int rows);
  // The dequantising path's tile of decoded weight rows and the largest fp32 result kept in
  // its scratch, in bytes (tests: small values make many tiles; negative: the defaults; a
  // tile of 0 decodes the whole weight at once).
  static void set_dequant_tiles(int64_t tile_bytes, int64_t acc_bytes);
  template <class F, class T>
  static void quantize_rows(const QuantWeight<F, Cuda>& out, const Tensor<T, Cuda>& w);
  template <class T, class F>
  static void dequantize(const Tensor<T, Cuda>& out, const QuantWeight<F, Cuda>& w);
  template <class T, class F>
  static void linear_q(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w, float beta);
  template <class T, class F>
  static void fused_linear_q(const Tensor<T, Cuda>& y, const Tensor<T, Cuda>& x, const QuantWeight<F, Cuda>& w,
                             const FusedLinear<T, Cuda>& f);
  template <class T>
  static void reduce(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, Reduce op);
  template <class T>
  static void argmax(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& in);
  template <class T>
  static void softmax(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in);
  template <class T>
  static void layer_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& weight,
                         const Tensor<T, Cuda>& bias, float eps);
  // The backward of unary and layer_norm (training; backend/cuda/kernels/backward.cuh).
  template <class T>
  static void unary_backward(const Tensor<T, Cuda>& dx, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& dy, Unary op,
                             float alpha);
  template <class T>
  static void layer_norm_backward(const Tensor<T, Cuda>& dx, const Tensor<T, Cuda>& dweight,
                                  const Tensor<T, Cuda>& dbias, const Tensor<T, Cuda>& x,
                                  const Tensor<T, Cuda>& weight, const Tensor<T, Cuda>& dy, float eps);
  template <class T>
  static void rms_norm(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& in, const Tensor<T, Cuda>& alpha, float eps);
  template <class T>
  static void rope(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions,
                   float max_period);
  template <class T>
  static void add_sin_embedding(const Tensor<T, Cuda>& x, const Tensor<int64_t, Cuda>& positions, float max_period,
                                float scale);
  template <class T>
  static void embedding(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& table, const Tensor<int64_t, Cuda>& ids);
  template <class T>
  static void attention(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q, const Tensor<T, Cuda>& k,
                        const Tensor<T, Cuda>& v, const Tensor<int64_t, Cuda>& q_pos,
                        const Tensor<int64_t, Cuda>& k_pos, const AttentionParams& p);
  template <class T>
  static void kv_write(const Tensor<T, Cuda>& ring_k, const Tensor<T, Cuda>& ring_v,
                       const Tensor<int64_t, Cuda>& ring_pos, const Tensor<T, Cuda>& k, const Tensor<T, Cuda>& v,
                       const Tensor<int64_t, Cuda>& positions, const Tensor<uint8_t, Cuda>& exec_mask);
  // The same with the keys and values stored quantised (QuantKv; kernels/attention.cuh).
  template <class T, class F>
  static void attention_q(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& q, const QuantKv<F, Cuda>& k,
                          const QuantKv<F, Cuda>& v, const Tensor<int64_t, Cuda>& q_pos,
                          const Tensor<int64_t, Cuda>& k_pos, const AttentionParams& p);
  template <class T, class F>
  static void kv_write_q(const QuantKv<F, Cuda>& ring_k, const QuantKv<F, Cuda>& ring_v,
                         const Tensor<int64_t, Cuda>& ring_pos, const Tensor<T, Cuda>& k, const Tensor<T, Cuda>& v,
                         const Tensor<int64_t, Cuda>& positions, const Tensor<uint8_t, Cuda>& exec_mask);
  template <class T>
  static void conv1d(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                     const Tensor<T, Cuda>& bias, int64_t stride, int64_t dilation, int64_t groups);
  template <class T>
  static void conv_transpose1d(const Tensor<T, Cuda>& out, const Tensor<T, Cuda>& x, const Tensor<T, Cuda>& w,
                               const Tensor<T, Cuda>& bias, int64_t stride, int64_t groups);
  template <class T>
  static void vq_nearest(const Tensor<int64_t, Cuda>& codes, const Tensor<T, Cuda>& x,
                         const Tensor<T, Cuda>& codebook);
  template <class T>
  static void random_normal(const Tensor<T, Cuda>& out, float std, uint64_t seed, uint64_t key);
  template <class T>
  static void sample(const Tensor<int64_t, Cuda>& out, const Tensor<T, Cuda>& logits, const SampleParams& p,
                     const Tensor<int64_t, Cuda>& counter);
};

}  // namespace ttt
