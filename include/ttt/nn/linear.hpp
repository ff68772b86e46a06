#pragma once
// The weight of a linear layer, with its storage as a policy: dense T, or quantised per
// output row to int8 or fp8 e4m3 (core/quant.hpp). A module holds LinearWeight<T, B> and
// calls nn::linear / nn::fused_linear, which pick the typed op (ops::linear on a Tensor or
// on a QuantWeight<F, B>) for the storage the weight was loaded with -- the same way a
// transformer layer holds a variant over its policies. Activations stay T, accumulation
// fp32.
//
// Which storage a weight gets is decided at load (linear_weight): a checkpoint tensor that
// has a `<name>_scale` companion is loaded as it is stored (see docs/weights.md,
// "Quantised checkpoints"); otherwise the weight is read as T and quantised to
// WeightSource::weight_format() (dense by default; `ttt-moshi --dtype fp8|int8`).
#include <string>
#include <variant>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/quant.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/module.hpp"

namespace ttt::nn {

template <class T, class B>
struct LinearWeight {
  // The alternatives in WeightFormat's order (format() is the index).
  using Variant = std::variant<Tensor<T, B>, QuantWeight<Int8, B>, QuantWeight<Fp8E4M3, B>>;
  Variant w;

  LinearWeight() = default;
  LinearWeight(Tensor<T, B> t) : w(std::move(t)) {}  // NOLINT: a dense weight is a LinearWeight
  template <class F>
  LinearWeight(QuantWeight<F, B> q) : w(std::move(q)) {}  // NOLINT

  WeightFormat format() const { return WeightFormat(w.index()); }
  bool defined() const {
    return visit([](const auto& v) { return v.defined(); });
  }
  bool quantized() const { return w.index() != 0; }
  template <class Fn>
  decltype(auto) visit(Fn&& f) const {
    return std::visit(std::forward<Fn>(f), w);
  }
  Shape shape() const {
    return visit([](const auto& v) { return v.shape(); });
  }
  int64_t size(int i) const { return shape().d[i < 0 ? shape().rank + i : i]; }
  int64_t numel() const {
    return visit([](const auto& v) { return v.numel(); });
  }
  // Bytes of storage (codes and scales for a quantised weight).
  int64_t bytes() const {
    return std::visit(
        [](const auto& v) -> int64_t {
          if constexpr (std::is_same_v<std::decay_t<decltype(v)>, Tensor<T, B>>) return v.numel() * int64_t(sizeof(T));
          else return v.bytes();
        },
        w);
  }
  // Output rows [n0, n1) as a weight of its own (a view).
  LinearWeight rows(int64_t n0, int64_t n1) const {
    return std::visit(
        [&](const auto& v) -> LinearWeight {
          if constexpr (std::is_same_v<std::decay_t<decltype(v)>, Tensor<T, B>>) return v.slice(0, n0, n1);
          else return v.rows(n0, n1);
        },
        w);
  }
  // The weight as U [N, K] (dequantised when quantised): for code that needs the matrix
  // itself (In-Place TTT's fast-weight reset value).
  template <class U>
  Tensor<U, B> to_dense() const {
    return std::visit(
        [](const auto& v) -> Tensor<U, B> {
          if constexpr (std::is_same_v<std::decay_t<decltype(v)>, Tensor<T, B>>) {
            return ops::cast<U>(v);
          } else {
            auto d = Tensor<U, B>::empty(v.shape());
            ops::dequantize(d, v);
            return d;
          }
        },
        w);
  }
};

// A dense weight w [N, K] stored as `f` (dense: unchanged).
template <class T, class B>
LinearWeight<T, B> quantize(const Tensor<T, B>& w, WeightFormat f) {
  switch (f) {
    case WeightFormat::int8: return ops::quantize_rows<Int8>(w);
    case WeightFormat::fp8_e4m3: return ops::quantize_rows<Fp8E4M3>(w);
    case WeightFormat::dense: break;
  }
  return w;
}

// y [.., N] = x [.., K] @ W^T (+ beta * y), whatever W's storage.
template <class T, class B>
void linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const LinearWeight<T, B>& w, float beta = 0.f) {
  w.visit([&](const auto& v) { ops::linear(y, x, v, beta); });
}
template <class T, class B>
Tensor<T, B> linear(const Tensor<T, B>& x, const LinearWeight<T, B>& w) {
  Shape s = x.shape();
  TTT_CHECK(s.rank >= 1, "linear: input needs rank >= 1");
  s.d[s.rank - 1] = w.size(0);
  auto y = Tensor<T, B>::empty(s);
  linear(y, x, w);
  return y;
}
template <class T, class B>
void fused_linear(const Tensor<T, B>& y, const Tensor<T, B>& x, const LinearWeight<T, B>& w, const FusedLinear<T, B>& f) {
  w.visit([&](const auto& v) { ops::fused_linear(y, x, v, f); });
}
template <class T, class B>
Tensor<T, B> fused_linear(const Tensor<T, B>& x, const LinearWeight<T, B>& w, const FusedLinear<T, B>& f) {
  Shape s = x.shape();
  TTT_CHECK(s.rank >= 1, "fused_linear: input needs rank >= 1");
  s.d[s.rank - 1] = f.glu ? w.size(0) / 2 : w.size(0);
  auto y = Tensor<T, B>::empty(s);
  fused_linear(y, x, w, f);
  return y;
}

// A checkpoint tensor stored quantised: `name` U8 [N, K] codes, `name + "_scale"` F32 [N],
// the format named by the file's metadata (io::WeightSource::quant_format).
template <class T, class B>
LinearWeight<T, B> load_quantized(io::WeightSource& ws, const std::string& name, const Shape& shape) {
  const WeightFormat f = ws.quant_format(name);
  auto codes = ws.get<uint8_t>(name, shape);
  auto scale = ws.get<float>(name + "_scale", {codes.size(0)}).contiguous();
  for (int64_t n = 0; n < scale.numel(); ++n)
    if (!(scale.data()[n] > 0.f))
      fail(ws.source(name), ": tensor '", name, "_scale' holds a scale that is not positive (", scale.data()[n],
           " at row ", n, ")");
  auto up = [&](auto q) -> LinearWeight<T, B> {
    q.data = to_backend<B>(codes);
    q.scale = to_backend<B>(scale);
    return q;
  };
  if (f == WeightFormat::int8) return up(QuantWeight<Int8, B>{});
  return up(QuantWeight<Fp8E4M3, B>{});
}

// A linear weight [N, K]: stored quantised in the checkpoint, or read (or, with random
// init, made on the backend) as T and quantised to ws.weight_format().
template <class T, class B>
LinearWeight<T, B> linear_weight(io::WeightSource& ws, const std::string& name, const Shape& shape,
                                 const io::Init& init) {
  if (ws.has(name + "_scale")) return load_quantized<T, B>(ws, name, shape);
  if (ws.weight_format() == WeightFormat::dense) return weight<T, B>(ws, name, shape, init);
  NoArenaScope<B> persistent;
  return quantize(weight<T, B>(ws, name, shape, init), ws.weight_format());
}
// Same for a tensor that must exist in the checkpoint (no init), e.g. a fused per-step
// weight the caller slices with rows().
template <class T, class B>
LinearWeight<T, B> linear_weight(io::WeightSource& ws, const std::string& name, const Shape& shape) {
  if (ws.has(name + "_scale")) return load_quantized<T, B>(ws, name, shape);
  NoArenaScope<B> persistent;
  auto w = to_backend<B>(ws.get<T>(name, shape));
  return ws.weight_format() == WeightFormat::dense ? LinearWeight<T, B>(w) : quantize(w.contiguous(), ws.weight_format());
}

// LayerScale folded into the projection that feeds it (nn/layer.hpp explains why): a dense
// weight gets its rows scaled; a quantised one its row scales (scale ⊙ (s_n q_n) = (scale_n
// s_n) q_n, the codes unchanged).
template <class T, class B>
void fold_layer_scale(std::vector<LinearWeight<T, B>>& weights, const Tensor<T, B>& scale) {
  // The return type is named, not decltype(lw.w): clang 14 recurses forever (then crashes)
  // on a captured loop variable inside a lambda's trailing return type.
  using Variant = typename LinearWeight<T, B>::Variant;
  for (auto& lw : weights) {
    lw.w = std::visit(
        [&](const auto& v) -> Variant {
          using V = std::decay_t<decltype(v)>;
          if constexpr (std::is_same_v<V, Tensor<T, B>>) {
            auto folded = Tensor<T, B>::empty(v.shape());  // [D, H]: row o scaled by scale[o]
            ops::binary(folded, v, scale.reshape({v.size(0), 1}).expand(v.shape()), Binary::mul);
            return folded;
          } else {
            V q = v;
            q.scale = Tensor<float, B>::empty(v.scale.shape());
            ops::binary(q.scale, v.scale, ops::cast<float>(scale).reshape({v.size(0)}), Binary::mul);
            return q;
          }
        },
        lw.w);
  }
}

}  // namespace ttt::nn
