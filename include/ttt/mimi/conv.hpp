#pragma once
// Kyutai's streaming convolutions (moshi/modules/conv.py, 0.2.13), with their exact state
// semantics. Layout [B, C, T] throughout, as PyTorch's.
//
// StreamingConv1d (causal): the state keeps the last P = (K - 1)·dilation + 1 - stride inputs
// (zeros at the stream start; with pad_mode "replicate", the first input sample repeated);
// a call of T steps (T a multiple of the stride) computes conv1d([previous | x]) -> T / stride
// outputs and keeps the last P inputs. A whole-sequence call is the same from a fresh state.
//
// StreamingConvTranspose1d (causal): y = conv_transpose1d(x) has (T - 1)·stride + K outputs;
// the first K - stride of them get the previous call's overhang added (minus the bias it
// already carried), the last K - stride become the new overhang, and T·stride come out. A
// whole-sequence call keeps the first T·stride outputs (the right trim of the reference).
//
// Both states are stream-state fields (nn/layer.hpp protocol): per-item reset, clone, save,
// load.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "ttt/backend/ops_conv.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/module.hpp"

namespace ttt::mimi {

namespace conv_detail {

// A conv weight by its name, or from a weight-norm pair (`<name>_g`, `<name>_v`):
// w = g · v / ‖v‖ with the norm over every dimension but the first (torch's weight_norm,
// dim 0), computed in double.
template <class T, class B>
Tensor<T, B> load_weight(io::WeightSource& ws, const std::string& name, const Shape& shape, const io::Init& init) {
  if (ws.has(name + "_g") && ws.has(name + "_v")) {
    const auto v = ws.get<float>(name + "_v", shape);
    Shape gs = Shape::of_rank(shape.rank);
    gs.d[0] = shape.d[0];
    for (int i = 1; i < shape.rank; ++i) gs.d[i] = 1;
    const auto g = ws.get<float>(name + "_g", gs);
    const int64_t rows = shape.d[0], n = shape.numel() / rows;
    auto w = Tensor<T, Cpu>::empty(shape);
    const auto vc = v.contiguous();
    for (int64_t r = 0; r < rows; ++r) {
      double ss = 0;
      for (int64_t i = 0; i < n; ++i) ss += double(vc.data()[r * n + i]) * vc.data()[r * n + i];
      const double scale = double(g.data()[r]) / std::sqrt(ss);
      for (int64_t i = 0; i < n; ++i) w.data()[r * n + i] = from_f32<T>(float(double(vc.data()[r * n + i]) * scale));
    }
    return nn::to_backend<B>(w);
  }
  return nn::weight<T, B>(ws, name, shape, init);
}

}  // namespace conv_detail

template <class T, class B>
struct StreamingConv1d {
  Tensor<T, B> weight;  // [Cout, Cin / groups, K]
  Tensor<T, B> bias;    // [Cout] or undefined
  int64_t in_channels = 0, out_channels = 0, kernel = 1, stride = 1, dilation = 1, groups = 1;
  bool replicate = false;  // pad_mode "replicate": the history starts as the first sample

  int64_t history() const { return (kernel - 1) * dilation + 1 - stride; }

  struct State {
    Tensor<T, B> previous;  // [B, Cin, P] the last P inputs
    Tensor<T, B> first;     // [B, 1, 1] 1 until the first call (replicate padding only)

    bool defined() const { return previous.defined() || first.defined(); }
    void reset(const std::vector<uint8_t>& mask) {
      for (size_t b = 0; b < mask.size(); ++b) {
        if (!mask[b]) continue;
        if (previous.defined()) ops::fill(previous.select(0, int64_t(b)), 0.0);
        if (first.defined()) ops::fill(first.select(0, int64_t(b)), 1.0);
      }
    }
    State clone() const {
      NoArenaScope<B> persistent;
      return State{previous.defined() ? previous.clone() : previous, first.defined() ? first.clone() : first};
    }
    // Item src_b of `src` (the same conv, any batch) into item dst_b of this one.
    void copy_item(int64_t dst_b, const State& src, int64_t src_b) {
      if (previous.defined()) previous.select(0, dst_b).copy_from(src.previous.select(0, src_b));
      if (first.defined()) first.select(0, dst_b).copy_from(src.first.select(0, src_b));
    }
    void save(io::SafeTensorsWriter& w, const std::string& key) const {
      if (previous.defined()) w.add(key + ".previous", previous);
      if (first.defined()) w.add(key + ".first", first);
    }
    void load(const io::SafeTensors& st, const std::string& key) {
      if (previous.defined()) load_into(st, key + ".previous", previous);
      if (first.defined()) load_into(st, key + ".first", first);
    }
  };

  // `prefix` names the StreamingConv1d module (its weight is `<prefix>.conv.conv.weight`).
  static StreamingConv1d load(io::WeightSource& ws, const std::string& prefix, int64_t cin, int64_t cout, int64_t k,
                              int64_t stride = 1, int64_t dilation = 1, int64_t groups = 1, bool bias = true,
                              bool replicate = false) {
    TTT_CHECK(cin % groups == 0 && cout % groups == 0 && stride >= 1 && dilation >= 1 && k >= 1 &&
                  (k - 1) * dilation + 1 >= stride,
              prefix, ": bad convolution shape (", cin, " -> ", cout, ", kernel ", k, ", stride ", stride, ")");
    StreamingConv1d c;
    c.in_channels = cin, c.out_channels = cout, c.kernel = k, c.stride = stride, c.dilation = dilation;
    c.groups = groups, c.replicate = replicate;
    const std::string name = prefix + ".conv.conv.";
    // Random weights (no checkpoint) spread like PyTorch's default Conv1d init: uniform
    // ±1/sqrt(fan_in), i.e. std 1/sqrt(3 fan_in).
    const float std = 1.f / std::sqrt(3.f * float(cin / groups * k));
    c.weight = conv_detail::load_weight<T, B>(ws, name + "weight", {cout, cin / groups, k}, io::Init::normal(std));
    if (bias) c.bias = nn::weight<T, B>(ws, name + "bias", {cout}, io::Init::constant(0.f));
    return c;
  }

  State init_state(int64_t batch) const {
    NoArenaScope<B> persistent;
    State s;
    if (history() > 0) s.previous = Tensor<T, B>::zeros({batch, in_channels, history()});
    if (replicate && history() > 0) {
      s.first = Tensor<T, B>::empty({batch, 1, 1});
      ops::fill(s.first, 1.0);
    }
    return s;
  }

  // y [B, Cout, T / stride] from x [B, Cin, T]. `st` null: a whole sequence from a fresh state.
  Tensor<T, B> forward(const Tensor<T, B>& x, State* st) const {
    TTT_CHECK(x.rank() == 3 && x.size(1) == in_channels, "conv: input ", x.shape().str(), " for ", in_channels,
              " channels");
    const int64_t Bn = x.size(0), Tn = x.size(2), P = history();
    TTT_CHECK(Tn > 0 && Tn % stride == 0, "conv: ", Tn, " steps is not a positive multiple of the stride ", stride);
    if (P <= 0) return ops::conv1d(x, weight, bias, stride, dilation, groups);
    auto xin = Tensor<T, B>::empty({Bn, in_channels, P + Tn});
    auto head = xin.slice(2, 0, P);
    const auto x0 = x.slice(2, 0, 1).expand({Bn, in_channels, P});
    if (st) {
      if (replicate) {
        // head = previous + first · (x0 - previous): the first call replicates its first sample.
        ops::binary(head, x0, st->previous, Binary::sub);
        ops::binary(head, head, st->first.expand({Bn, in_channels, P}), Binary::mul);
        ops::binary(head, head, st->previous, Binary::add);
      } else {
        head.copy_from(st->previous);
      }
    } else if (replicate) {
      head.copy_from(x0);
    } else {
      ops::fill(head, 0.0);
    }
    xin.slice(2, P, P + Tn).copy_from(x);
    auto y = ops::conv1d(xin, weight, bias, stride, dilation, groups);
    if (st) {
      st->previous.copy_from(xin.slice(2, Tn, P + Tn));
      if (st->first.defined()) ops::fill(st->first, 0.0);
    }
    return y;
  }

 private:
  static void load_into(const io::SafeTensors& st, const std::string& key, const Tensor<T, B>& dst) {
    auto h = st.load<T>(key);
    TTT_CHECK(h.shape() == dst.shape(), st.path(), ": state tensor '", key, "' has shape ", h.shape().str(),
              ", this session expects ", dst.shape().str());
    dst.copy_from(nn::to_backend<B>(h));
  }
};

template <class T, class B>
struct StreamingConvTranspose1d {
  Tensor<T, B> weight;  // [Cin, Cout / groups, K]
  Tensor<T, B> bias;    // [Cout] or undefined
  int64_t in_channels = 0, out_channels = 0, kernel = 1, stride = 1, groups = 1;

  int64_t overhang() const { return kernel - stride; }

  struct State {
    Tensor<T, B> partial;  // [B, Cout, K - stride] the previous call's overhang, bias removed

    bool defined() const { return partial.defined(); }
    void reset(const std::vector<uint8_t>& mask) {
      for (size_t b = 0; b < mask.size(); ++b)
        if (mask[b]) ops::fill(partial.select(0, int64_t(b)), 0.0);
    }
    State clone() const {
      NoArenaScope<B> persistent;
      return State{partial.clone()};
    }
    void copy_item(int64_t dst_b, const State& src, int64_t src_b) {
      if (partial.defined()) partial.select(0, dst_b).copy_from(src.partial.select(0, src_b));
    }
    void save(io::SafeTensorsWriter& w, const std::string& key) const { w.add(key + ".partial", partial); }
    void load(const io::SafeTensors& st, const std::string& key) {
      auto h = st.load<T>(key + ".partial");
      TTT_CHECK(h.shape() == partial.shape(), st.path(), ": state tensor '", key, ".partial' has shape ",
                h.shape().str(), ", this session expects ", partial.shape().str());
      partial.copy_from(nn::to_backend<B>(h));
    }
  };

  // `prefix` names the StreamingConvTranspose1d module (`<prefix>.convtr.convtr.weight`).
  static StreamingConvTranspose1d load(io::WeightSource& ws, const std::string& prefix, int64_t cin, int64_t cout,
                                       int64_t k, int64_t stride, int64_t groups = 1, bool bias = true) {
    TTT_CHECK(cin % groups == 0 && cout % groups == 0 && stride >= 1 && k >= stride, prefix,
              ": bad transposed convolution shape (", cin, " -> ", cout, ", kernel ", k, ", stride ", stride, ")");
    StreamingConvTranspose1d c;
    c.in_channels = cin, c.out_channels = cout, c.kernel = k, c.stride = stride, c.groups = groups;
    const std::string name = prefix + ".convtr.convtr.";
    // Random weights as PyTorch's default ConvTranspose1d init (fan_in = Cout/groups · K).
    const float std = 1.f / std::sqrt(3.f * float(cout / groups * k));
    c.weight = conv_detail::load_weight<T, B>(ws, name + "weight", {cin, cout / groups, k}, io::Init::normal(std));
    if (bias) c.bias = nn::weight<T, B>(ws, name + "bias", {cout}, io::Init::constant(0.f));
    return c;
  }

  State init_state(int64_t batch) const {
    NoArenaScope<B> persistent;
    return State{Tensor<T, B>::zeros({batch, out_channels, overhang()})};
  }

  // y [B, Cout, T · stride] from x [B, Cin, T]. `st` null: a whole sequence.
  Tensor<T, B> forward(const Tensor<T, B>& x, State* st) const {
    TTT_CHECK(x.rank() == 3 && x.size(1) == in_channels && x.size(2) > 0, "conv_transpose: input ", x.shape().str(),
              " for ", in_channels, " channels");
    const int64_t Bn = x.size(0), Tn = x.size(2), n = Tn * stride, P = overhang();
    auto y = ops::conv_transpose1d(x, weight, bias, stride, groups);  // [B, Cout, n + P]
    if (st && P > 0) {
      auto head = y.slice(2, 0, P);
      ops::binary(head, head, st->partial, Binary::add);
      st->partial.copy_from(y.slice(2, n, n + P));
      if (bias.defined())
        ops::binary(st->partial, st->partial, bias.reshape({1, out_channels, 1}).expand({Bn, out_channels, P}),
                    Binary::sub);
    }
    return P > 0 ? y.slice(2, 0, n).contiguous() : y;
  }
};

}  // namespace ttt::mimi
