#pragma once
// The op set, identical on every backend. Each op validates shapes here, once, then
// calls Kernels<B>, the backend's specialisation. Ops come in two forms: one writes into
// a caller-provided `out` (streaming hot paths, CUDA graphs), one allocates and returns.
//
// Conventions: tensors are [.., N] with the op acting on the last dimension where it
// reduces or normalises; inputs may be strided views; outputs of row ops must have a
// unit last stride. Floating ops run for T in {float, bf16, f16} with float arithmetic
// (fp32 accumulation, fp32 norm statistics and softmax). Mimi's convolutions and vector
// quantiser: ops_conv.hpp.
#include <cstdint>

#include "ttt/core/quant.hpp"
#include "ttt/core/tensor.hpp"

namespace ttt {

// elu: torch.nn.ELU(alpha=1), x > 0 ? x : expm1(x); unary's `alpha` argument is not ELU's alpha (only
// scale reads it).
enum class Unary : uint8_t { scale, silu, gelu, gelu_tanh, tanh, sigmoid, exp, relu, identity, elu };
enum class Binary : uint8_t { add, sub, mul, div };
enum class Reduce : uint8_t { sum, mean, max };

// Parameters of the masked attention op (flashinfer style: one struct per kernel).
// A key is visible to a query iff k_pos >= 0, q_pos - k_pos >= 0 and, when context > 0,
// q_pos - k_pos < context. The first `prefix` keys form a second set (the virtual keys of
// a TTT memory): visible iff 0 <= q_pos - k_pos < prefix_context, with prefix_bias[h]
// (H floats in the backend's memory, may be null) added to their logits; one softmax
// spans both sets.
struct AttentionParams {
  int64_t context = 0;
  float scale = 1.f;
  int64_t prefix = 0;
  int64_t prefix_context = 0;
  const float* prefix_bias = nullptr;
};

// Top-k sampling with temperature: among the top_k logits, pick argmax(p_i / E_i) with
// E_i ~ Exp(1) (the exponential race moshi's sampler uses); E_i is drawn from
// Philox(seed, counter * 64 + salt, row * vocab + token), so every backend draws the same.
// temperature <= 0 or top_k == 1 means greedy argmax.
//
// Per-row parameters (ops::sample_rows fills the row_* pointers; all null = the scalars for
// every row): row r then uses row_temperature[r], row_top_k[r] (<= 0: all) and draws E_i
// from Philox(row_seed[r], row_counter[r] * 64 + salt, token), a key without the row index:
// a stream's draws depend on its own seed and frame counter only, never on its row, the
// batch size or the other rows (a conversation moved to another slot continues the same).
struct SampleParams {
  float temperature = 1.f;
  int top_k = 0;  // 0 = all
  uint64_t seed = 0;
  uint32_t salt = 0;
  const float* row_temperature = nullptr;  // [N] on the logits' backend
  const int64_t* row_top_k = nullptr;      // [N]
  const int64_t* row_seed = nullptr;       // [N] uint64 bits
  const int64_t* row_counter = nullptr;    // [N]
};

// The per-row parameters of ops::sample_rows, as tensors on the backend (a captured CUDA
// graph reads them from device memory: update them by a copy, not by new tensors).
template <class B>
struct SampleRows {
  Tensor<float, B> temperature;  // [N] <= 0: greedy
  Tensor<int64_t, B> top_k;      // [N] <= 0: all
  Tensor<int64_t, B> seed;       // [N] uint64 bits
  Tensor<int64_t, B> counter;    // [N] the row's own frame counter
  uint32_t salt = 0;             // which draw of the frame (text, audio codebook k)
};

// A linear with its neighbours fused in (one kernel on CUDA for batch-1 decoding):
//   y = epilogue(norm(x) @ W^T) (+ beta * y)
// norm: none, RMSNorm (weight = alpha) or LayerNorm (weight, bias may be undefined);
// glu: W is [2H, K], y [.., H] = act(first half) * second half (beta must be 0).
// Numerically identical to norm, linear and glu run one after the other.
enum class FusedNorm : uint8_t { none, rms, layer };
template <class T, class B>
struct FusedLinear {
  FusedNorm norm = FusedNorm::none;
  Tensor<T, B> norm_weight, norm_bias;
  float eps = 0.f;
  bool glu = false;
  Unary act = Unary::identity;
  float beta = 0.f;
};

namespace ops {

namespace detail {
template <class T, class B>
void check_same_shape(const char* op, const Tensor<T, B>& out, const Shape& s) {
  TTT_CHECK(out.shape() == s, op, ": output shape ", out.shape().str(), ", expected ", s.str());
}
template <class T, class B>
void check_rows(const char* op, const Tensor<T, B>& t) {
  TTT_CHECK(t.rank() >= 1, op, ": needs rank >= 1");
}
template <class T, class B>
void check_unit_last(const char* op, const Tensor<T, B>& t) {
  TTT_CHECK(t.rank() == 0 || t.stride(-1) == 1 || t.size(-1) == 1, op,
            ": needs a unit stride on the last dimension (got strides ", t.strides().str(), ")");
}
}  // namespace detail

// ---- copies and conversions --------------------------------------------------------

template <class To, class From, class B>
void cast(const Tensor<To, B>& out, const Tensor<From, B>& in) {
  detail::check_same_shape("cast", out, in.shape());
  if (in.numel() == 0) return;
  Kernels<B>::cast(out, in);
}
template <class To, class From, class B>
Tensor<To, B> cast(const Tensor<From, B>& in) {
  if constexpr (std::is_same_v<To, From>) {
    return in;
  } else {
    auto out = Tensor<To, B>::empty(in.shape());
    cast(out, in);
    return out;
  }
}

template <class T, class B>
void fill(const Tensor<T, B>& out, double value) {
  if (out.numel()) Kernels<B>::fill(out, value);
}

// ---- elementwise -------------------------------------------------------------------

template <class T, class B>
void unary(const Tensor<T, B>& out, const Tensor<T, B>& in, Unary op, float alpha = 1.f) {
  detail::check_same_shape("unary", out, in.shape());
  if (in.numel()) Kernels<B>::unary(out, in, op, alpha);
}
template <class T, class B>
Tensor<T, B> unary(const Tensor<T, B>& in, Unary op, float alpha = 1.f) {
  auto out = Tensor<T, B>::empty(in.shape());
  unary(out, in, op, alpha);
  return out;
}
template <class T, class B> Tensor<T, B> silu(const Tensor<T, B>& x) { return unary(x, Unary::silu); }
template <class T, class B> Tensor<T, B> gelu(const Tensor<T, B>& x) { return unary(x, Unary::gelu); }
template <class T, class B> Tensor<T, B> gelu_tanh(const Tensor<T, B>& x) { return unary(x, Unary::gelu_tanh); }
template <class T, class B> Tensor<T, B> tanh(const Tensor<T, B>& x) { return unary(x, Unary::tanh); }
template <class T, class B> Tensor<T, B> sigmoid(const Tensor<T, B>& x) { return unary(x, Unary::sigmoid); }
template <class T, class B> Tensor<T, B> exp(const Tensor<T, B>& x) { return unary(x, Unary::exp); }
template <class T, class B> Tensor<T, B> scale(const Tensor<T, B>& x, float s) { return unary(x, Unary::scale, s); }

// out = a (op) b with numpy broadcasting of a and b to out's shape. out may alias a or b.
template <class T, class B>
void binary(const Tensor<T, B>& out, const Tensor<T, B>& a, const Tensor<T, B>& b, Binary op) {
  Shape s = broadcast_shapes(a.shape(), b.shape());
  detail::check_same_shape("binary", out, s);
  if (out.numel() == 0) return;
  auto widen = [&](const Tensor<T, B>& t) {
    Tensor<T, B> v = t;
    while (v.rank() < s.rank) v = v.unsqueeze(0);
    return v.expand(s);
  };
  Kernels<B>::binary(out, widen(a), widen(b), op);
}
template <class T, class B>
Tensor<T, B> binary(const Tensor<T, B>& a, const Tensor<T, B>& b, Binary op) {
  auto out = Tensor<T, B>::empty(broadcast_shapes(a.shape(), b.shape()));
  binary(out, a, b, op);
  return out;
}
template <class T, class B> Tensor<T, B> add(const Tensor<T, B>& a, const Tensor<T, B>& b) { return binary(a, b, Binary::add); }
template <class T, class B> Tensor<T, B> sub(const Tensor<T, B>& a, const Tensor<T, B>& b) { return binary(a, b, Binary::sub); }
template <class T, class B> Tensor<T, B> mul(const Tensor<T, B>& a, const Tensor<T, B>& b) { return binary(a, b, Binary::mul); }
template <class T, class B> Tensor<T, B> div(const Tensor<T, B>& a, const Tensor<T, B>& b) { return binary(a, b, Binary::div); }
template <class T, class B> void add_(const Tensor<T, B>& a, const Tensor<T, B>& b) { binary(a, a, b, Binary::add); }

// Gated activation: in [.., 2H] -> out [.., H] = act(in[.., :H]) * in[.., H:].
template <class T, class B>
void glu(const Tensor<T, B>& out, const Tensor<T, B>& in, Unary act) {
  TTT_CHECK(in.rank() >= 1 && in.size(-1) % 2 == 0, "glu: last dimension of ", in.shape().str(), " must be even");
  Shape s = in.shape();
  s.d[s.rank - 1] /= 2;
  detail::check_same_shape("glu", out, s);
  detail::check_unit_last("glu", in);
  detail::check_unit_last("glu", out);
  if (out.numel()) Kernels<B>::glu(out, in, act);
}
template <class T, class B>
Tensor<T, B> glu(const Tensor<T, B>& in, Unary act) {
  Shape s = in.shape();
  TTT_CHECK(s.rank >= 1, "glu: needs rank >= 1");
  s.d[s.rank - 1] /= 2;
  auto out = Tensor<T, B>::empty(s);
  glu(out, in, act);
  return out;
}

// ---- matrix products ---------------------------------------------------------------

// out[.., M, N] = alpha * a[.., M, K] @ b[.., K, N] + beta * out. Batch dimensions (up to
// two) broadcast; transposed operands are passed as transpose() views. beta = 1 fuses a
// residual add. Accumulation is fp32 for every T.
template <class T, class B>
void matmul(const Tensor<T, B>& out, const Tensor<T, B>& a, const Tensor<T, B>& b, float alpha = 1.f,
            float beta = 0.f) {
  TTT_CHECK(a.rank() >= 2 && b.rank() >= 2, "matmul: operands need rank >= 2, got ", a.shape().str(), " and ",
            b.shape().str());
  const int64_t M = a.size(-2), K = a.size(-1), N = b.size(-1);
  TTT_CHECK(b.size(-2) == K, "matmul: inner dimensions differ: ", a.shape().str(), " @ ", b.shape().str());
  Shape ba = a.shape(), bb = b.shape();
  ba.rank -= 2;
  bb.rank -= 2;
  Shape batch = broadcast_shapes(ba, bb);
  Shape s = batch;
  s.rank += 2;
  s.d[s.rank - 2] = M;
  s.d[s.rank - 1] = N;
  detail::check_same_shape("matmul", out, s);
  detail::check_unit_last("matmul", out);
  if (out.numel() == 0) return;
  // Normalise to rank 4 with broadcast batch strides so backends see one layout.
  Shape s4 = s;
  while (s4.rank < 4) {
    for (int i = s4.rank; i > 0; --i) s4.d[i] = s4.d[i - 1];
    s4.d[0] = 1;
    ++s4.rank;
  }
  auto widen = [&](Tensor<T, B> t, int64_t rows, int64_t cols) {
    while (t.rank() < 4) t = t.unsqueeze(0);
    Shape e = s4;
    e.d[2] = rows;
    e.d[3] = cols;
    return t.expand(e);
  };
  Tensor<T, B> o = out;
  while (o.rank() < 4) o = o.unsqueeze(0);
  if (K == 0) {
    if (beta == 0.f) fill(o, 0.0);
    else if (beta != 1.f) unary(o, o, Unary::scale, beta);
    return;
  }
  Kernels<B>::matmul(o, widen(a, M, K), widen(b, K, N), alpha, beta);
}
template <class T, class B>
Tensor<T, B> matmul(const Tensor<T, B>& a, const Tensor<T, B>& b) {
  TTT_CHECK(a.rank() >= 2 && b.rank() >= 2, "matmul: operands need rank >= 2");
  Shape ba = a.shape(), bb = b.shape();
  ba.rank -= 2;
  bb.rank -= 2;
  Shape s = broadcast_shapes(ba, bb);
  s.rank += 2;
  s.d[s.rank - 2] = a.size(-2);
  s.d[s.rank - 1] = b.size(-1);
  auto out = Tensor<T, B>::empty(s);
  matmul(out, a, b);
  return out;
}

// y[.., N] = x[.., K] @ W^T for a row-major weight W [N, K] (PyTorch's nn.Linear).
// beta = 1 accumulates into y (residual add). Batch-1 decoding is a GEMV and backends
// give it their own bandwidth-bound path.
template <class T, class B>
void linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const Tensor<T, B>& w, float beta = 0.f) {
  TTT_CHECK(w.rank() == 2, "linear: weight must be [out, in], got ", w.shape().str());
  TTT_CHECK(x.rank() >= 1 && x.size(-1) == w.size(1), "linear: input ", x.shape().str(), " does not match weight ",
            w.shape().str());
  Shape s = x.shape();
  s.d[s.rank - 1] = w.size(0);
  detail::check_same_shape("linear", y, s);
  if (y.numel() == 0) return;
  TTT_CHECK(x.is_contiguous() && y.is_contiguous() && w.is_contiguous(),
            "linear: needs contiguous input, output and weight");
  int64_t rows = x.numel() / x.size(-1);
  Kernels<B>::linear(y.reshape({rows, w.size(0)}), x.reshape({rows, w.size(1)}), w, beta);
}
template <class T, class B>
Tensor<T, B> linear(const Tensor<T, B>& x, const Tensor<T, B>& w) {
  Shape s = x.shape();
  TTT_CHECK(s.rank >= 1 && w.rank() == 2, "linear: bad ranks");
  s.d[s.rank - 1] = w.size(0);
  auto y = Tensor<T, B>::empty(s);
  linear(y, x, w);
  return y;
}

namespace detail {
// The checks of fused_linear for a weight of shape [N_w, K] (dense or quantised, `what` says
// which); returns the input's rows.
template <class T, class B>
int64_t check_fused_linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const Shape& w, const char* what,
                           const FusedLinear<T, B>& f) {
  TTT_CHECK(x.rank() >= 1 && x.size(-1) == w.d[1], "fused_linear: input ", x.shape().str(), " does not match ", what,
            " ", w.str());
  TTT_CHECK(!f.glu || (w.d[0] % 2 == 0 && f.beta == 0.f), "fused_linear: glu needs an even output and beta = 0");
  const int64_t K = w.d[1], N = f.glu ? w.d[0] / 2 : w.d[0];
  Shape s = x.shape();
  s.d[s.rank - 1] = N;
  detail::check_same_shape("fused_linear", y, s);
  TTT_CHECK(x.is_contiguous() && y.is_contiguous(), "fused_linear: needs contiguous input and output");
  if (f.norm != FusedNorm::none) {
    TTT_CHECK(f.norm_weight.defined() || f.norm == FusedNorm::layer, "fused_linear: RMS norm needs its alpha");
    TTT_CHECK(!f.norm_weight.defined() || (f.norm_weight.numel() == K && f.norm_weight.is_contiguous()),
              "fused_linear: norm weight ", f.norm_weight.shape().str(), " does not match width ", K);
    TTT_CHECK(!f.norm_bias.defined() || (f.norm_bias.numel() == K && f.norm_bias.is_contiguous()),
              "fused_linear: norm bias ", f.norm_bias.shape().str(), " does not match width ", K);
  }
  return K ? x.numel() / K : 0;
}
}  // namespace detail

template <class T, class B>
void fused_linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const Tensor<T, B>& w, const FusedLinear<T, B>& f) {
  TTT_CHECK(w.rank() == 2 && w.is_contiguous(), "fused_linear: weight must be contiguous [out, in], got ", w.shape().str());
  const int64_t rows = detail::check_fused_linear(y, x, w.shape(), "weight", f);
  if (y.numel() == 0) return;
  Kernels<B>::fused_linear(y.reshape({rows, y.size(-1)}), x.reshape({rows, w.size(1)}), w, f);
}
template <class T, class B>
Tensor<T, B> fused_linear(const Tensor<T, B>& x, const Tensor<T, B>& w, const FusedLinear<T, B>& f) {
  Shape s = x.shape();
  TTT_CHECK(s.rank >= 1 && w.rank() == 2, "fused_linear: bad ranks");
  s.d[s.rank - 1] = f.glu ? w.size(0) / 2 : w.size(0);
  auto y = Tensor<T, B>::empty(s);
  fused_linear(y, x, w, f);
  return y;
}

// ---- quantised weights (weight-only int8 / fp8 e4m3, per output row; core/quant.hpp) ----

namespace detail {
template <class F, class B>
void check_quant(const char* op, const QuantWeight<F, B>& w) {
  TTT_CHECK(w.data.rank() == 2 && w.data.is_contiguous(), op, ": quantised weight must be contiguous [out, in], got ",
            w.data.shape().str());
  TTT_CHECK(w.scale.shape() == Shape{w.data.size(0)} && w.scale.is_contiguous(), op, ": scale ",
            w.scale.shape().str(), " does not match weight ", w.data.shape().str());
}
template <class F, class B>
void check_quant_kv(const char* op, const QuantKv<F, B>& x) {
  TTT_CHECK(x.codes.rank() == 4 && x.codes.is_contiguous(), op, ": quantised keys / values must be contiguous [B, H, S, D], got ",
            x.codes.shape().str());
  TTT_CHECK((x.scale.shape() == Shape{x.codes.size(0), x.codes.size(1), x.codes.size(2)}) && x.scale.is_contiguous(), op,
            ": scale ", x.scale.shape().str(), " does not match codes ", x.codes.shape().str());
}
}  // namespace detail

// out = quantised w [N, K]: scale[n] = max_k |w[n, k]| / F::qmax (1 for a zero row), codes
// F::encode(w / scale). The same bytes on every backend.
template <class F, class T, class B>
void quantize_rows(const QuantWeight<F, B>& out, const Tensor<T, B>& w) {
  TTT_CHECK(w.rank() == 2, "quantize_rows: weight must be [out, in], got ", w.shape().str());
  detail::check_quant("quantize_rows", out);
  detail::check_same_shape("quantize_rows", out.data, w.shape());
  if (w.numel()) Kernels<B>::quantize_rows(out, w.is_contiguous() ? w : w.contiguous());
}
template <class F, class T, class B>
QuantWeight<F, B> quantize_rows(const Tensor<T, B>& w) {
  TTT_CHECK(w.rank() == 2, "quantize_rows: weight must be [out, in], got ", w.shape().str());
  QuantWeight<F, B> q{Tensor<uint8_t, B>::empty(w.shape()), Tensor<float, B>::empty({w.size(0)})};
  quantize_rows(q, w);
  return q;
}
// out [N, K] = scale[n] * decode(q[n, k]), rounded to T.
template <class T, class F, class B>
void dequantize(const Tensor<T, B>& out, const QuantWeight<F, B>& w) {
  detail::check_quant("dequantize", w);
  detail::check_same_shape("dequantize", out, w.data.shape());
  TTT_CHECK(out.is_contiguous(), "dequantize: needs a contiguous output");
  if (out.numel()) Kernels<B>::dequantize(out, w);
}
// out [B, H, S, D] = scale * decode(codes) of quantised keys or values, rounded to T.
template <class T, class F, class B>
void dequantize(const Tensor<T, B>& out, const QuantKv<F, B>& x) {
  detail::check_quant_kv("dequantize", x);
  detail::check_same_shape("dequantize", out, x.codes.shape());
  TTT_CHECK(out.is_contiguous(), "dequantize: needs a contiguous output");
  const auto rows = x.as_rows();
  if (out.numel()) Kernels<B>::dequantize(out.reshape(rows.shape()), rows);
}

// y[.., N] = x[.., K] @ (scale * decode(q))^T (+ beta * y): linear with a quantised weight.
// fp32 accumulation over x as stored (T) and the decoded codes; the scale multiplies the sum.
template <class T, class F, class B>
void linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const QuantWeight<F, B>& w, float beta = 0.f) {
  detail::check_quant("linear", w);
  TTT_CHECK(x.rank() >= 1 && x.size(-1) == w.size(1), "linear: input ", x.shape().str(),
            " does not match quantised weight ", w.shape().str());
  Shape s = x.shape();
  s.d[s.rank - 1] = w.size(0);
  detail::check_same_shape("linear", y, s);
  if (y.numel() == 0) return;
  TTT_CHECK(x.is_contiguous() && y.is_contiguous(), "linear: needs contiguous input and output");
  const int64_t rows = x.numel() / x.size(-1);
  Kernels<B>::linear_q(y.reshape({rows, w.size(0)}), x.reshape({rows, w.size(1)}), w, beta);
}
template <class T, class F, class B>
void fused_linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const QuantWeight<F, B>& w,
                  const FusedLinear<T, B>& f) {
  detail::check_quant("fused_linear", w);
  const int64_t rows = detail::check_fused_linear(y, x, w.shape(), "quantised weight", f);
  if (y.numel() == 0) return;
  Kernels<B>::fused_linear_q(y.reshape({rows, y.size(-1)}), x.reshape({rows, w.size(1)}), w, f);
}
template <class T, class F, class B>
Tensor<T, B> fused_linear(const Tensor<T, B>& x, const QuantWeight<F, B>& w, const FusedLinear<T, B>& f) {
  Shape s = x.shape();
  TTT_CHECK(s.rank >= 1 && w.data.rank() == 2, "fused_linear: bad ranks");
  s.d[s.rank - 1] = f.glu ? w.size(0) / 2 : w.size(0);
  auto y = Tensor<T, B>::empty(s);
  fused_linear(y, x, w, f);
  return y;
}

namespace detail {
template <class T, class B>
void linear_kernel(const Tensor<T, B>& y, const Tensor<T, B>& x, const Tensor<T, B>& w, float beta) {
  Kernels<B>::linear(y, x, w, beta);
}
template <class T, class F, class B>
void linear_kernel(const Tensor<T, B>& y, const Tensor<T, B>& x, const QuantWeight<F, B>& w, float beta) {
  Kernels<B>::linear_q(y, x, w, beta);
}
}  // namespace detail

// The composition fused_linear stands for, out of the backend's plain kernels: the
// reference (CPU) and the fallback (large batches on CUDA). W: Tensor<T, B> or QuantWeight.
template <class T, class B, class W>
void fused_linear_unfused(const Tensor<T, B>& y, const Tensor<T, B>& x, const W& w, const FusedLinear<T, B>& f) {
  Tensor<T, B> xn = x;
  if (f.norm != FusedNorm::none) {
    xn = Tensor<T, B>::empty(x.shape());
    if (f.norm == FusedNorm::rms) Kernels<B>::rms_norm(xn, x, f.norm_weight, f.eps);
    else Kernels<B>::layer_norm(xn, x, f.norm_weight, f.norm_bias, f.eps);
  }
  if (!f.glu) {
    detail::linear_kernel(y, xn, w, f.beta);
    return;
  }
  auto h = Tensor<T, B>::empty({x.size(0), w.size(0)});
  detail::linear_kernel(h, xn, w, 0.f);
  Kernels<B>::glu(y, h, f.act);
}

// ---- reductions over the last dimension ----------------------------------------------

template <class T, class B>
void reduce(const Tensor<T, B>& out, const Tensor<T, B>& in, Reduce op) {
  detail::check_rows("reduce", in);
  Shape s = in.shape();
  s.rank -= 1;
  detail::check_same_shape("reduce", out, s);
  TTT_CHECK(in.size(-1) > 0 || op != Reduce::max, "reduce max over an empty dimension");
  if (out.numel()) Kernels<B>::reduce(out, in, op);
}
template <class T, class B>
Tensor<T, B> reduce(const Tensor<T, B>& in, Reduce op) {
  detail::check_rows("reduce", in);
  Shape s = in.shape();
  s.rank -= 1;
  auto out = Tensor<T, B>::empty(s);
  reduce(out, in, op);
  return out;
}
template <class T, class B> Tensor<T, B> sum(const Tensor<T, B>& x) { return reduce(x, Reduce::sum); }
template <class T, class B> Tensor<T, B> mean(const Tensor<T, B>& x) { return reduce(x, Reduce::mean); }
template <class T, class B> Tensor<T, B> max(const Tensor<T, B>& x) { return reduce(x, Reduce::max); }

// Index of the first maximum along the last dimension (NaN never wins).
template <class T, class B>
void argmax(const Tensor<int64_t, B>& out, const Tensor<T, B>& in) {
  detail::check_rows("argmax", in);
  Shape s = in.shape();
  s.rank -= 1;
  TTT_CHECK(in.size(-1) > 0, "argmax over an empty dimension");
  TTT_CHECK(out.shape() == s, "argmax: output shape ", out.shape().str(), ", expected ", s.str());
  if (out.numel()) Kernels<B>::argmax(out, in);
}
template <class T, class B>
Tensor<int64_t, B> argmax(const Tensor<T, B>& in) {
  detail::check_rows("argmax", in);
  Shape s = in.shape();
  s.rank -= 1;
  auto out = Tensor<int64_t, B>::empty(s);
  argmax(out, in);
  return out;
}

// ---- row-wise normalisation ---------------------------------------------------------

template <class T, class B>
void softmax(const Tensor<T, B>& out, const Tensor<T, B>& in) {
  detail::check_rows("softmax", in);
  detail::check_same_shape("softmax", out, in.shape());
  detail::check_unit_last("softmax", out);
  if (out.numel()) Kernels<B>::softmax(out, in);
}
template <class T, class B>
Tensor<T, B> softmax(const Tensor<T, B>& in) {
  auto out = Tensor<T, B>::empty(in.shape());
  softmax(out, in);
  return out;
}

// LayerNorm over the last dimension with biased variance; weight/bias may be empty
// (undefined) tensors. Statistics in fp32 whatever T is.
template <class T, class B>
void layer_norm(const Tensor<T, B>& out, const Tensor<T, B>& in, const Tensor<T, B>& weight,
                const Tensor<T, B>& bias, float eps) {
  detail::check_rows("layer_norm", in);
  detail::check_same_shape("layer_norm", out, in.shape());
  detail::check_unit_last("layer_norm", out);
  const int64_t n = in.size(-1);
  TTT_CHECK(!weight.defined() || (weight.numel() == n && weight.is_contiguous()), "layer_norm: weight ",
            weight.shape().str(), " does not match width ", n);
  TTT_CHECK(!bias.defined() || (bias.numel() == n && bias.is_contiguous()), "layer_norm: bias ",
            bias.shape().str(), " does not match width ", n);
  if (out.numel()) Kernels<B>::layer_norm(out, in, weight, bias, eps);
}
template <class T, class B>
Tensor<T, B> layer_norm(const Tensor<T, B>& in, const Tensor<T, B>& weight, const Tensor<T, B>& bias, float eps) {
  auto out = Tensor<T, B>::empty(in.shape());
  layer_norm(out, in, weight, bias, eps);
  return out;
}

// ---- backward of row ops (training) ----------------------------------------------------

// dx = dy * op'(x) elementwise (math::apply_grad: the exact derivative of unary's formula).
// Shapes equal; any strides.
template <class T, class B>
void unary_backward(const Tensor<T, B>& dx, const Tensor<T, B>& x, const Tensor<T, B>& dy, Unary op,
                    float alpha = 1.f) {
  detail::check_same_shape("unary_backward", dx, x.shape());
  TTT_CHECK(dy.shape() == x.shape(), "unary_backward: dy ", dy.shape().str(), " for x ", x.shape().str());
  if (x.numel()) Kernels<B>::unary_backward(dx, x, dy, op, alpha);
}
template <class T, class B>
Tensor<T, B> unary_backward(const Tensor<T, B>& x, const Tensor<T, B>& dy, Unary op, float alpha = 1.f) {
  auto dx = Tensor<T, B>::empty(x.shape());
  unary_backward(dx, x, dy, op, alpha);
  return dx;
}

// Backward of layer_norm(x, weight, bias, eps) over the last dimension (n wide), given the
// output gradient dy. Per row, with x̂ = (x - μ)/σ, σ = sqrt(var_biased + eps), u = dy ⊙ w:
//   dx = (u - mean(u) - x̂ mean(u ⊙ x̂)) / σ
// and over all rows dweight = Σ dy ⊙ x̂, dbias = Σ dy (overwritten; either may be undefined:
// not computed). weight undefined means w = 1. Statistics recomputed from x in double, sums
// over rows in double.
template <class T, class B>
void layer_norm_backward(const Tensor<T, B>& dx, const Tensor<T, B>& dweight, const Tensor<T, B>& dbias,
                         const Tensor<T, B>& x, const Tensor<T, B>& weight, const Tensor<T, B>& dy, float eps) {
  detail::check_rows("layer_norm_backward", x);
  detail::check_same_shape("layer_norm_backward", dx, x.shape());
  TTT_CHECK(dy.shape() == x.shape(), "layer_norm_backward: dy ", dy.shape().str(), " for x ", x.shape().str());
  detail::check_unit_last("layer_norm_backward", dx);
  const int64_t n = x.size(-1);
  for (const Tensor<T, B>* t : {&weight, &dweight, &dbias})
    TTT_CHECK(!t->defined() || (t->numel() == n && t->is_contiguous()), "layer_norm_backward: weight-shaped tensor ",
              t->shape().str(), " does not match width ", n);
  if (dweight.defined()) fill(dweight, 0.0);
  if (dbias.defined()) fill(dbias, 0.0);
  if (x.numel()) Kernels<B>::layer_norm_backward(dx, dweight, dbias, x, weight, dy, eps);
}

// RMSNorm as moshi writes it: y = x * (alpha * rsqrt(eps + mean(x^2))), fp32 statistics.
template <class T, class B>
void rms_norm(const Tensor<T, B>& out, const Tensor<T, B>& in, const Tensor<T, B>& alpha, float eps) {
  detail::check_rows("rms_norm", in);
  detail::check_same_shape("rms_norm", out, in.shape());
  detail::check_unit_last("rms_norm", out);
  TTT_CHECK(alpha.numel() == in.size(-1) && alpha.is_contiguous(), "rms_norm: alpha ", alpha.shape().str(),
            " does not match width ", in.size(-1));
  if (out.numel()) Kernels<B>::rms_norm(out, in, alpha, eps);
}
template <class T, class B>
Tensor<T, B> rms_norm(const Tensor<T, B>& in, const Tensor<T, B>& alpha, float eps) {
  auto out = Tensor<T, B>::empty(in.shape());
  rms_norm(out, in, alpha, eps);
  return out;
}

// ---- positions ------------------------------------------------------------------------

// Interleaved RoPE (pairs 2i, 2i+1) on x [B, T, H, D], in place allowed (out may be x).
// positions [B, T] (int64, absolute). freq_i = exp(i * (-ln(max_period) * 2 / D)), all fp32.
template <class T, class B>
void rope(const Tensor<T, B>& out, const Tensor<T, B>& x, const Tensor<int64_t, B>& positions, float max_period) {
  TTT_CHECK(x.rank() == 4 && x.size(3) % 2 == 0, "rope: expects [B, T, H, D] with even D, got ", x.shape().str());
  detail::check_same_shape("rope", out, x.shape());
  TTT_CHECK(positions.rank() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(1),
            "rope: positions ", positions.shape().str(), " do not match ", x.shape().str());
  detail::check_unit_last("rope", out);
  detail::check_unit_last("rope", x);
  if (out.numel()) Kernels<B>::rope(out, x, positions, max_period);
}

// Sinusoidal embedding [B, T, C] = [cos(phase), sin(phase)], phase = pos / max_period^(i/(C/2-1)),
// computed in fp32 (moshi's create_sin_embedding), added to x with `scale`.
template <class T, class B>
void add_sin_embedding(const Tensor<T, B>& x, const Tensor<int64_t, B>& positions, float max_period,
                       float scale = 1.f) {
  TTT_CHECK(x.rank() == 3 && x.size(2) % 2 == 0 && x.size(2) >= 4, "add_sin_embedding: expects [B, T, C], C even >= 4, got ",
            x.shape().str());
  TTT_CHECK(positions.rank() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(1),
            "add_sin_embedding: positions ", positions.shape().str(), " do not match ", x.shape().str());
  TTT_CHECK(x.is_contiguous(), "add_sin_embedding: needs a contiguous tensor");
  if (x.numel()) Kernels<B>::add_sin_embedding(x, positions, max_period, scale);
}

// ---- lookup, attention, sampling -------------------------------------------------------

// out[.., D] = table[ids[..]]; id -1 gives zeros (moshi's zero token). Other ids outside
// [0, V) are a caller bug: they also give zeros (never an out-of-bounds read).
template <class T, class B>
void embedding(const Tensor<T, B>& out, const Tensor<T, B>& table, const Tensor<int64_t, B>& ids) {
  TTT_CHECK(table.rank() == 2 && table.is_contiguous(), "embedding: table must be contiguous [V, D], got ",
            table.shape().str());
  Shape s = ids.shape();
  TTT_CHECK(s.rank < kMaxRank, "embedding: ids rank too large");
  s.d[s.rank++] = table.size(1);
  detail::check_same_shape("embedding", out, s);
  TTT_CHECK(out.is_contiguous() && ids.is_contiguous(), "embedding: needs contiguous ids and output");
  if (out.numel()) Kernels<B>::embedding(out, table, ids);
}
template <class T, class B>
Tensor<T, B> embedding(const Tensor<T, B>& table, const Tensor<int64_t, B>& ids) {
  Shape s = ids.shape();
  s.d[s.rank++] = table.size(1);
  auto out = Tensor<T, B>::empty(s);
  embedding(out, table, ids);
  return out;
}

namespace detail {
// The shape checks of attention, shared by the dense and the quantised KV forms.
template <class T, class B>
void check_attention(const Tensor<T, B>& out, const Tensor<T, B>& q, const Shape& k, const Shape& v,
                     const Tensor<int64_t, B>& q_pos, const Tensor<int64_t, B>& k_pos, const AttentionParams& p) {
  TTT_CHECK(q.rank() == 4 && k.rank == 4 && v.rank == 4, "attention: q, k, v must be rank 4");
  const int64_t Bn = q.size(0), Tq = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t Hk = k.d[1], S = k.d[2];
  TTT_CHECK(k.d[0] == Bn && v.d[0] == Bn && k.d[3] == D && v.d[3] == D && v.d[1] == Hk && v.d[2] == S && Hk > 0 &&
                H % Hk == 0,
            "attention: q ", q.shape().str(), " k ", k.str(), " v ", v.str(), " do not match");
  TTT_CHECK(q_pos.rank() == 2 && q_pos.size(0) == Bn && q_pos.size(1) == Tq, "attention: q_pos ",
            q_pos.shape().str(), " for q ", q.shape().str());
  TTT_CHECK(k_pos.rank() == 2 && k_pos.size(0) == Bn && k_pos.size(1) == S, "attention: k_pos ",
            k_pos.shape().str(), " for k ", k.str());
  detail::check_same_shape("attention", out, q.shape());
  for (auto* t : {&out, &q}) detail::check_unit_last("attention", *t);
  TTT_CHECK(p.prefix >= 0 && p.prefix <= S, "attention: prefix ", p.prefix, " out of range for ", S, " keys");
  TTT_CHECK(p.prefix == 0 || p.prefix_context > 0, "attention: a key prefix needs prefix_context > 0");
}
}  // namespace detail

// Masked softmax attention. q [B, T, H, D], k and v [B, Hk, S, D] (H % Hk == 0: grouped
// keys), q_pos [B, T], k_pos [B, S]; out [B, T, H, D]. Softmax in fp32. A query that sees
// no key gets zeros.
template <class T, class B>
void attention(const Tensor<T, B>& out, const Tensor<T, B>& q, const Tensor<T, B>& k, const Tensor<T, B>& v,
               const Tensor<int64_t, B>& q_pos, const Tensor<int64_t, B>& k_pos, const AttentionParams& p) {
  detail::check_attention(out, q, k.shape(), v.shape(), q_pos, k_pos, p);
  detail::check_unit_last("attention", k);
  detail::check_unit_last("attention", v);
  if (out.numel()) Kernels<B>::attention(out, q, k, v, q_pos, k_pos, p);
}
// The same over keys and values stored in format F (core/quant.hpp QuantKv): the result of
// attention on k = k.scale * decode(k.codes), v likewise, computed without decoding the cache
// to T first (the scales fold into the scores and the softmax weights).
template <class T, class F, class B>
void attention(const Tensor<T, B>& out, const Tensor<T, B>& q, const QuantKv<F, B>& k, const QuantKv<F, B>& v,
               const Tensor<int64_t, B>& q_pos, const Tensor<int64_t, B>& k_pos, const AttentionParams& p) {
  detail::check_quant_kv("attention", k);
  detail::check_quant_kv("attention", v);
  detail::check_attention(out, q, k.codes.shape(), v.codes.shape(), q_pos, k_pos, p);
  if (out.numel()) Kernels<B>::attention_q(out, q, k, v, q_pos, k_pos, p);
}

namespace detail {
// The checks of kv_write; returns the first of k's T tokens that can survive in a ring of C
// slots (only the last C can).
template <class T, class B>
int64_t check_kv_write(const Shape& ring, const Tensor<int64_t, B>& ring_pos, const Tensor<T, B>& k,
                       const Tensor<T, B>& v, const Tensor<int64_t, B>& positions, const Tensor<uint8_t, B>& exec_mask) {
  const int64_t Bn = ring.d[0], H = ring.d[1], C = ring.d[2], D = ring.d[3];
  TTT_CHECK(k.rank() == 4 && k.size(0) == Bn && k.size(2) == H && k.size(3) == D && v.shape() == k.shape(),
            "kv_write: k ", k.shape().str(), " does not match ring ", ring.str());
  TTT_CHECK(ring_pos.rank() == 2 && ring_pos.size(0) == Bn && ring_pos.size(1) == C && ring_pos.is_contiguous(),
            "kv_write: ring_pos ", ring_pos.shape().str());
  TTT_CHECK(positions.rank() == 2 && positions.size(0) == Bn && positions.size(1) == k.size(1),
            "kv_write: positions ", positions.shape().str());
  TTT_CHECK(!exec_mask.defined() || exec_mask.numel() == Bn, "kv_write: exec_mask must be [B]");
  detail::check_unit_last("kv_write", k);
  detail::check_unit_last("kv_write", v);
  const int64_t Tk = k.size(1);
  return Tk > C ? Tk - C : 0;
}
}  // namespace detail

// Writes k, v [B, T, Hk, D] at positions [B, T] into ring buffers [B, Hk, C, D] (slot =
// pos mod C) and records ring_pos [B, C] = pos. Batch items whose exec_mask [B] entry is 0
// are left unchanged (an undefined mask means all execute). Only the last C tokens of a
// call can survive, so earlier ones are skipped.
template <class T, class B>
void kv_write(const Tensor<T, B>& ring_k, const Tensor<T, B>& ring_v, const Tensor<int64_t, B>& ring_pos,
              const Tensor<T, B>& k, const Tensor<T, B>& v, const Tensor<int64_t, B>& positions,
              const Tensor<uint8_t, B>& exec_mask) {
  TTT_CHECK(ring_k.rank() == 4 && ring_k.is_contiguous() && ring_v.shape() == ring_k.shape() && ring_v.is_contiguous(),
            "kv_write: ring buffers must be contiguous [B, H, C, D]");
  const int64_t t0 = detail::check_kv_write(ring_k.shape(), ring_pos, k, v, positions, exec_mask), Tk = k.size(1);
  if (Tk == 0) return;
  Kernels<B>::kv_write(ring_k, ring_v, ring_pos, k.slice(1, t0, Tk), v.slice(1, t0, Tk),
                       positions.slice(1, t0, Tk), exec_mask);
}
// The same into a ring stored in format F: each written row of D is quantised as
// quantize_rows does (scale = max |x| / F::qmax, codes F::encode(x / scale)), so both
// backends store the same bytes.
template <class T, class F, class B>
void kv_write(const QuantKv<F, B>& ring_k, const QuantKv<F, B>& ring_v, const Tensor<int64_t, B>& ring_pos,
              const Tensor<T, B>& k, const Tensor<T, B>& v, const Tensor<int64_t, B>& positions,
              const Tensor<uint8_t, B>& exec_mask) {
  detail::check_quant_kv("kv_write", ring_k);
  detail::check_quant_kv("kv_write", ring_v);
  TTT_CHECK(ring_v.codes.shape() == ring_k.codes.shape(), "kv_write: key ring ", ring_k.codes.shape().str(),
            " and value ring ", ring_v.codes.shape().str(), " differ");
  const int64_t t0 = detail::check_kv_write(ring_k.codes.shape(), ring_pos, k, v, positions, exec_mask),
                Tk = k.size(1);
  if (Tk == 0) return;
  Kernels<B>::kv_write_q(ring_k, ring_v, ring_pos, k.slice(1, t0, Tk), v.slice(1, t0, Tk), positions.slice(1, t0, Tk),
                         exec_mask);
}

// One token per row of logits [N, V] -> out [N]. `counter` is a [1] tensor on the backend
// (a frame index kept on the device so a captured CUDA graph samples fresh tokens).
template <class T, class B>
void sample(const Tensor<int64_t, B>& out, const Tensor<T, B>& logits, const SampleParams& p,
            const Tensor<int64_t, B>& counter) {
  TTT_CHECK(logits.rank() == 2 && logits.size(1) > 0, "sample: logits must be [N, V], got ", logits.shape().str());
  TTT_CHECK(out.rank() == 1 && out.size(0) == logits.size(0), "sample: output ", out.shape().str(), " for logits ",
            logits.shape().str());
  TTT_CHECK(counter.numel() == 1, "sample: counter must hold one value");
  detail::check_unit_last("sample", logits);
  TTT_CHECK(p.top_k >= 0, "sample: top_k must be >= 0, got ", p.top_k);
  if (out.numel()) Kernels<B>::sample(out, logits, p, counter);
}

// One token per row of logits [N, V] -> out [N], each row with its own parameters (SampleRows).
template <class T, class B>
void sample_rows(const Tensor<int64_t, B>& out, const Tensor<T, B>& logits, const SampleRows<B>& r) {
  TTT_CHECK(logits.rank() == 2 && logits.size(1) > 0, "sample_rows: logits must be [N, V], got ", logits.shape().str());
  const int64_t N = logits.size(0);
  TTT_CHECK(out.rank() == 1 && out.size(0) == N, "sample_rows: output ", out.shape().str(), " for logits ",
            logits.shape().str());
  TTT_CHECK(r.temperature.shape() == Shape{N} && r.top_k.shape() == Shape{N} && r.seed.shape() == Shape{N} &&
                r.counter.shape() == Shape{N},
            "sample_rows: per-row parameters must each be [", N, "]");
  TTT_CHECK(r.temperature.is_contiguous() && r.top_k.is_contiguous() && r.seed.is_contiguous() &&
                r.counter.is_contiguous(),
            "sample_rows: per-row parameters must be contiguous");
  detail::check_unit_last("sample_rows", logits);
  if (!N) return;
  SampleParams p;
  p.salt = r.salt;
  p.row_temperature = r.temperature.data();
  p.row_top_k = r.top_k.data();
  p.row_seed = r.seed.data();
  p.row_counter = r.counter.data();
  Kernels<B>::sample(out, logits, p, r.counter.slice(0, 0, 1));
}

// Seeded weights: element i is a normal draw of standard deviation `std`, truncated at
// 3 std, from Philox(seed, key, i) -- the same tensor on every backend, made where it lives
// (a 7B model's random weights never cross the PCIe bus).
template <class T, class B>
void random_normal(const Tensor<T, B>& out, float std, uint64_t seed, uint64_t key) {
  TTT_CHECK(out.is_contiguous(), "random_normal: needs a contiguous tensor");
  if (out.numel()) Kernels<B>::random_normal(out, std, seed, key);
}

}  // namespace ops
}  // namespace ttt
