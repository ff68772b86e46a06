#pragma once
// Mimi's ops: 1-D convolution, transposed convolution and the vector quantiser's nearest
// code (SEANet and RVQ), validated here as ops.hpp validates the rest of the op set, then
// Kernels<B>. A header of its own because only Mimi (and its tests and benchmarks) uses them,
// and ops.hpp had passed the house rule's ~800 lines.
#include <cstdint>

#include "ttt/backend/ops.hpp"

namespace ttt {
namespace ops {

namespace detail {
inline int64_t conv1d_out_len(int64_t Tin, int64_t K, int64_t stride, int64_t dilation) {
  return (Tin - dilation * (K - 1) - 1) / stride + 1;
}
template <class T, class B>
void check_conv_bias(const char* op, const Tensor<T, B>& bias, int64_t Cout) {
  TTT_CHECK(!bias.defined() || (bias.rank() == 1 && bias.size(0) == Cout && bias.is_contiguous()), op, ": bias ",
            bias.shape().str(), " must be contiguous [", Cout, "] (or an undefined tensor)");
}
}  // namespace detail

// 1-D convolution, PyTorch's F.conv1d(x, w, bias, stride, padding=0, dilation, groups).
// No padding: callers pad (Mimi's streaming convolutions prepend their own history).
//   x    [B, Cin, Tin]          any strides
//   w    [Cout, Cin/groups, K]  contiguous
//   bias [Cout] contiguous, or an undefined tensor (no bias)
//   out  [B, Cout, Tout]        contiguous, Tout = (Tin - dilation*(K-1) - 1) / stride + 1
//   out[b, o, t] = bias[o] + sum_{c < Cin/groups, k < K} w[o, c, k]
//                                                         * x[b, g*Cin/groups + c, t*stride + k*dilation]
//   with g = o / (Cout/groups).
// Requires Cin, Cout, K >= 1, stride, dilation, groups >= 1, Cin % groups == 0,
// Cout % groups == 0 and Tin >= dilation*(K-1) + 1 (at least one output step). out must not
// overlap x, w or bias. Products and sums in float for every T, one rounding to T at the end;
// the summation order is the backend's (a GEMM's), so results may differ in the last bits
// between backends and between calls that split the same sequence differently.
template <class T, class B>
void conv1d(const Tensor<T, B>& out, const Tensor<T, B>& x, const Tensor<T, B>& w, const Tensor<T, B>& bias,
            int64_t stride = 1, int64_t dilation = 1, int64_t groups = 1) {
  TTT_CHECK(x.rank() == 3, "conv1d: input must be [B, Cin, T], got ", x.shape().str());
  TTT_CHECK(w.rank() == 3 && w.is_contiguous(), "conv1d: weight must be contiguous [Cout, Cin/groups, K], got ",
            w.shape().str(), w.rank() == 3 ? " (non-contiguous)" : "");
  TTT_CHECK(stride >= 1 && dilation >= 1 && groups >= 1, "conv1d: stride ", stride, ", dilation ", dilation,
            " and groups ", groups, " must be >= 1");
  const int64_t Cin = x.size(1), Tin = x.size(2), Cout = w.size(0), K = w.size(2);
  TTT_CHECK(Cin >= 1 && Cout >= 1 && K >= 1, "conv1d: empty channels or kernel: input ", x.shape().str(), ", weight ",
            w.shape().str());
  TTT_CHECK(Cin % groups == 0 && Cout % groups == 0, "conv1d: ", groups, " groups do not divide ", Cin,
            " input and ", Cout, " output channels");
  TTT_CHECK(w.size(1) * groups == Cin, "conv1d: weight ", w.shape().str(), " with ", groups, " groups expects ",
            w.size(1) * groups, " input channels, input ", x.shape().str(), " has ", Cin);
  TTT_CHECK(Tin >= dilation * (K - 1) + 1, "conv1d: input length ", Tin, " is shorter than the kernel's span ",
            dilation * (K - 1) + 1, " (kernel ", K, ", dilation ", dilation, "; pad the input)");
  detail::check_conv_bias("conv1d", bias, Cout);
  const Shape s{x.size(0), Cout, detail::conv1d_out_len(Tin, K, stride, dilation)};
  detail::check_same_shape("conv1d", out, s);
  TTT_CHECK(out.is_contiguous(), "conv1d: output must be contiguous");
  if (out.numel()) Kernels<B>::conv1d(out, x, w, bias, stride, dilation, groups);
}
template <class T, class B>
Tensor<T, B> conv1d(const Tensor<T, B>& x, const Tensor<T, B>& w, const Tensor<T, B>& bias, int64_t stride = 1,
                    int64_t dilation = 1, int64_t groups = 1) {
  TTT_CHECK(x.rank() == 3, "conv1d: input must be [B, Cin, T], got ", x.shape().str());
  TTT_CHECK(w.rank() == 3, "conv1d: weight must be contiguous [Cout, Cin/groups, K], got ", w.shape().str());
  TTT_CHECK(stride >= 1 && dilation >= 1, "conv1d: stride ", stride, " and dilation ", dilation, " must be >= 1");
  TTT_CHECK(x.size(2) >= dilation * (w.size(2) - 1) + 1, "conv1d: input length ", x.size(2),
            " is shorter than the kernel's span ", dilation * (w.size(2) - 1) + 1, " (kernel ", w.size(2),
            ", dilation ", dilation, "; pad the input)");
  const int64_t Tout = detail::conv1d_out_len(x.size(2), w.size(2), stride, dilation);
  auto out = Tensor<T, B>::empty({x.size(0), w.size(0), Tout});
  conv1d(out, x, w, bias, stride, dilation, groups);
  return out;
}

// Transposed 1-D convolution, PyTorch's F.conv_transpose1d(x, w, bias, stride, padding=0,
// output_padding=0, groups) (dilation 1): every input step scatters a kernel-long window.
//   x    [B, Cin, Tin]          any strides, Tin >= 1
//   w    [Cin, Cout/groups, K]  contiguous (nn.ConvTranspose1d's layout)
//   bias [Cout] contiguous, or undefined
//   out  [B, Cout, (Tin-1)*stride + K] contiguous
//   out[b, o, j] = bias[o] + sum_{c < Cin/groups, t, k : t*stride + k == j} x[b, g*Cin/groups + c, t]
//                                                                          * w[g*Cin/groups + c, o - g*Cout/groups, k]
//   with g = o / (Cout/groups).
// Requires Cin, Cout, K >= 1, stride, groups >= 1, Cin % groups == 0, Cout % groups == 0;
// K < stride is allowed (outputs no window covers are the bias). Mimi: K = 2*stride, and
// groups = channels (weight [C, 1, K]) for its depthwise upsampler. No overlap of out with
// the inputs. Float arithmetic as conv1d (backend summation order).
template <class T, class B>
void conv_transpose1d(const Tensor<T, B>& out, const Tensor<T, B>& x, const Tensor<T, B>& w, const Tensor<T, B>& bias,
                      int64_t stride = 1, int64_t groups = 1) {
  TTT_CHECK(x.rank() == 3, "conv_transpose1d: input must be [B, Cin, T], got ", x.shape().str());
  TTT_CHECK(w.rank() == 3 && w.is_contiguous(),
            "conv_transpose1d: weight must be contiguous [Cin, Cout/groups, K], got ", w.shape().str(),
            w.rank() == 3 ? " (non-contiguous)" : "");
  TTT_CHECK(stride >= 1 && groups >= 1, "conv_transpose1d: stride ", stride, " and groups ", groups,
            " must be >= 1");
  const int64_t Cin = x.size(1), Tin = x.size(2), K = w.size(2);
  TTT_CHECK(Cin >= 1 && w.size(1) >= 1 && K >= 1, "conv_transpose1d: empty channels or kernel: input ",
            x.shape().str(), ", weight ", w.shape().str());
  TTT_CHECK(Tin >= 1, "conv_transpose1d: needs at least one input step, got ", x.shape().str());
  TTT_CHECK(w.size(0) == Cin, "conv_transpose1d: weight ", w.shape().str(), " expects ", w.size(0),
            " input channels, input ", x.shape().str(), " has ", Cin);
  TTT_CHECK(Cin % groups == 0, "conv_transpose1d: ", groups, " groups do not divide ", Cin, " input channels");
  const int64_t Cout = w.size(1) * groups;
  detail::check_conv_bias("conv_transpose1d", bias, Cout);
  const Shape s{x.size(0), Cout, (Tin - 1) * stride + K};
  detail::check_same_shape("conv_transpose1d", out, s);
  TTT_CHECK(out.is_contiguous(), "conv_transpose1d: output must be contiguous");
  if (out.numel()) Kernels<B>::conv_transpose1d(out, x, w, bias, stride, groups);
}
template <class T, class B>
Tensor<T, B> conv_transpose1d(const Tensor<T, B>& x, const Tensor<T, B>& w, const Tensor<T, B>& bias,
                              int64_t stride = 1, int64_t groups = 1) {
  TTT_CHECK(x.rank() == 3, "conv_transpose1d: input must be [B, Cin, T], got ", x.shape().str());
  TTT_CHECK(w.rank() == 3, "conv_transpose1d: weight must be contiguous [Cin, Cout/groups, K], got ",
            w.shape().str());
  TTT_CHECK(x.size(2) >= 1, "conv_transpose1d: needs at least one input step, got ", x.shape().str());
  TTT_CHECK(stride >= 1 && groups >= 1, "conv_transpose1d: stride ", stride, " and groups ", groups,
            " must be >= 1");
  auto out = Tensor<T, B>::empty({x.size(0), w.size(1) * groups, (x.size(2) - 1) * stride + w.size(2)});
  conv_transpose1d(out, x, w, bias, stride, groups);
  return out;
}

// Nearest codebook entry by Euclidean distance (torch.cdist + argmin, Mimi's RVQ search):
//   x [N, d] (any row stride, unit last stride), codebook [V, d] contiguous, codes int64 [N] (any stride)
//   codes[n] = argmin_v dist(n, v),  dist(n, v) = sum_j (x[n, j] - c[v, j])^2.
// The distance is computed from the differences, in float, from the float values of x and c:
// never as |x|^2 - 2 x.c + |c|^2, which cancels and flips codes on near-ties. Its summation
// order is fixed so every backend gets the same bits: 32 partial sums, s_l takes the j with
// j % 32 == l in increasing j as s_l = fmaf(e, e, s_l), e = x - c (rounded to float); then
// s_l += s_{l+16}, s_l += s_{l+8}, ..., s_l += s_{l+1} (a warp's __shfl_xor butterfly at
// offsets 16, 8, 4, 2, 1 gives the same bits); dist = s_0.
// Ties (equal float distances) go to the smallest index. A NaN distance never wins; a row
// whose distances are all NaN gets code 0. Requires N >= 0, V, d >= 1.
template <class T, class B>
void vq_nearest(const Tensor<int64_t, B>& codes, const Tensor<T, B>& x, const Tensor<T, B>& codebook) {
  TTT_CHECK(x.rank() == 2, "vq_nearest: input must be [N, d], got ", x.shape().str());
  TTT_CHECK(codebook.rank() == 2 && codebook.is_contiguous(), "vq_nearest: codebook must be contiguous [V, d], got ",
            codebook.shape().str(), codebook.rank() == 2 ? " (non-contiguous)" : "");
  TTT_CHECK(codebook.size(0) >= 1 && codebook.size(1) >= 1, "vq_nearest: empty codebook ", codebook.shape().str());
  TTT_CHECK(x.size(1) == codebook.size(1), "vq_nearest: input ", x.shape().str(), " and codebook ",
            codebook.shape().str(), " differ in dimension");
  detail::check_unit_last("vq_nearest", x);
  TTT_CHECK(codes.rank() == 1 && codes.size(0) == x.size(0), "vq_nearest: codes ", codes.shape().str(),
            " for input ", x.shape().str(), ", expected [", x.size(0), "]");
  if (x.size(0)) Kernels<B>::vq_nearest(codes, x, codebook);
}
template <class T, class B>
Tensor<int64_t, B> vq_nearest(const Tensor<T, B>& x, const Tensor<T, B>& codebook) {
  TTT_CHECK(x.rank() == 2, "vq_nearest: input must be [N, d], got ", x.shape().str());
  auto codes = Tensor<int64_t, B>::empty({x.size(0)});
  vq_nearest(codes, x, codebook);
  return codes;
}

}  // namespace ops
}  // namespace ttt
