#pragma once
// SEANet encoder and decoder (moshi/modules/seanet.py) as a sequence of stages over
// [B, C, T] activations, module indices as Kyutai's nn.Sequential counts them (ELUs
// included), so weights load under the release names (`encoder.model.3.conv.conv.weight`).
//
//   encoder: conv k7 C->F; per ratio r (reversed): residual blocks at width w, ELU,
//            conv k=2r stride r w->2w; ELU, conv k3 -> dimension
//   decoder: conv k7 dimension->F·2^n; per ratio r: ELU, conv-transpose k=2r stride r w->w/2,
//            residual blocks at w/2; ELU, conv k3 F->C
//   residual block: x + conv_k1(ELU(conv_k(ELU(x)))) with width w -> w/compress -> w and
//            dilation base^j for the j-th block of a stage.
#include <cstdint>
#include <string>
#include <vector>

#include "ttt/mimi/config.hpp"
#include "ttt/mimi/conv.hpp"

namespace ttt::mimi {

template <class T, class B>
class Seanet {
 public:
  using Conv = StreamingConv1d<T, B>;
  using ConvTr = StreamingConvTranspose1d<T, B>;

  struct Stage {
    enum class Kind { elu, conv, conv_transpose, residual } kind = Kind::elu;
    int64_t index = 0;  // module index in Kyutai's Sequential
    Conv conv;          // conv, or the residual block's first conv
    Conv conv2;         // the residual block's 1x1 conv
    ConvTr convtr;
  };

  // One state per stage that has convolutions (the residual block's two convs together).
  struct StageState {
    typename Conv::State a, b;
    typename ConvTr::State tr;
  };
  struct State {
    std::vector<StageState> stages;
  };

  std::vector<Stage> stages;
  std::string prefix;  // "encoder.model" / "decoder.model"

  static Seanet load_encoder(io::WeightSource& ws, const SeanetConfig& c) {
    Seanet s;
    s.prefix = "encoder.model";
    int64_t idx = 0, width = c.n_filters;
    s.add_conv(ws, idx++, c.channels, width, c.kernel_size, 1, c);
    for (auto it = c.ratios.rbegin(); it != c.ratios.rend(); ++it) {
      for (int64_t j = 0; j < c.n_residual_layers; ++j) s.add_residual(ws, idx++, width, j, c);
      s.add_elu(idx++);
      s.add_conv(ws, idx++, width, 2 * width, 2 * *it, *it, c);
      width *= 2;
    }
    s.add_elu(idx++);
    s.add_conv(ws, idx++, width, c.dimension, c.last_kernel_size, 1, c);
    return s;
  }

  static Seanet load_decoder(io::WeightSource& ws, const SeanetConfig& c) {
    Seanet s;
    s.prefix = "decoder.model";
    int64_t idx = 0, width = c.n_filters << c.ratios.size();
    s.add_conv(ws, idx++, c.dimension, width, c.kernel_size, 1, c);
    for (int64_t r : c.ratios) {
      s.add_elu(idx++);
      Stage st;
      st.kind = Stage::Kind::conv_transpose;
      st.index = idx++;
      st.convtr = ConvTr::load(ws, s.name(st.index), width, width / 2, 2 * r, r);
      s.stages.push_back(std::move(st));
      width /= 2;
      for (int64_t j = 0; j < c.n_residual_layers; ++j) s.add_residual(ws, idx++, width, j, c);
    }
    s.add_elu(idx++);
    s.add_conv(ws, idx++, width, c.channels, c.last_kernel_size, 1, c);
    return s;
  }

  State init_state(int64_t batch) const {
    State st;
    for (const Stage& s : stages) {
      StageState ss;
      if (s.kind == Stage::Kind::conv || s.kind == Stage::Kind::residual) ss.a = s.conv.init_state(batch);
      if (s.kind == Stage::Kind::residual) ss.b = s.conv2.init_state(batch);
      if (s.kind == Stage::Kind::conv_transpose) ss.tr = s.convtr.init_state(batch);
      st.stages.push_back(std::move(ss));
    }
    return st;
  }

  // x [B, Cin, T] -> [B, Cout, T'] (T' = T / hop for the encoder, T · hop for the decoder).
  // `st` null: a whole sequence.
  Tensor<T, B> forward(Tensor<T, B> x, State* st) const {
    for (size_t i = 0; i < stages.size(); ++i) {
      const Stage& s = stages[i];
      StageState* ss = st ? &st->stages[i] : nullptr;
      switch (s.kind) {
        case Stage::Kind::elu: {
          auto y = Tensor<T, B>::empty(x.shape());
          ops::unary(y, x, Unary::elu);
          x = y;
          break;
        }
        case Stage::Kind::conv:
          x = s.conv.forward(x, ss ? &ss->a : nullptr);
          break;
        case Stage::Kind::conv_transpose:
          x = s.convtr.forward(x, ss ? &ss->tr : nullptr);
          break;
        case Stage::Kind::residual: {
          auto h = ops::unary(x, Unary::elu);
          h = s.conv.forward(h, ss ? &ss->a : nullptr);
          ops::unary(h, h, Unary::elu);
          h = s.conv2.forward(h, ss ? &ss->b : nullptr);
          ops::add_(h, x);  // true skip
          x = h;
          break;
        }
      }
    }
    return x;
  }

  // The state fields of every stage, for reset / clone / save / load (keys name the module:
  // "<prefix>.<index>[.block.1|.block.3]").
  template <class F>
  void for_each_state(State& st, F&& fn) const {
    for (size_t i = 0; i < stages.size(); ++i) {
      const Stage& s = stages[i];
      StageState& ss = st.stages[i];
      const std::string key = name(s.index);
      if (s.kind == Stage::Kind::conv) fn(key, ss.a);
      if (s.kind == Stage::Kind::residual) fn(key + ".block.1", ss.a), fn(key + ".block.3", ss.b);
      if (s.kind == Stage::Kind::conv_transpose) fn(key, ss.tr);
    }
  }

  int64_t num_params() const {
    int64_t n = 0;
    auto add = [&](const auto& t) { n += t.defined() ? t.numel() : 0; };
    for (const Stage& s : stages) add(s.conv.weight), add(s.conv.bias), add(s.conv2.weight), add(s.conv2.bias),
        add(s.convtr.weight), add(s.convtr.bias);
    return n;
  }

 private:
  std::string name(int64_t index) const { return prefix + "." + std::to_string(index); }

  void add_elu(int64_t index) {
    Stage st;
    st.kind = Stage::Kind::elu;
    st.index = index;
    stages.push_back(std::move(st));
  }
  void add_conv(io::WeightSource& ws, int64_t index, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                const SeanetConfig& c) {
    Stage st;
    st.kind = Stage::Kind::conv;
    st.index = index;
    st.conv = Conv::load(ws, name(index), cin, cout, k, stride, 1, 1, true, c.replicate);
    stages.push_back(std::move(st));
  }
  void add_residual(io::WeightSource& ws, int64_t index, int64_t width, int64_t j, const SeanetConfig& c) {
    Stage st;
    st.kind = Stage::Kind::residual;
    st.index = index;
    int64_t dilation = 1;
    for (int64_t i = 0; i < j; ++i) dilation *= c.dilation_base;
    const int64_t hidden = width / c.compress;
    st.conv = Conv::load(ws, name(index) + ".block.1", width, hidden, c.residual_kernel_size, 1, dilation, 1, true,
                         c.replicate);
    st.conv2 = Conv::load(ws, name(index) + ".block.3", hidden, width, 1, 1, 1, 1, true, c.replicate);
    stages.push_back(std::move(st));
  }
};

}  // namespace ttt::mimi
