#pragma once
// The torch side of the TTT layer ops, generic over our backend: torch tensors in, the
// layer's forward (y) or its backward (d x and d every parameter) out, through
// ttt::layers::ttt_forward_train / ttt_backward. ttt_ops.cpp instantiates it for Cpu,
// ttt_ops_cuda.cu for Cuda.
//
// Parameters travel as two parallel lists (names, tensors) under ttt-lm-pytorch's names
// ("q_proj.weight", "W1", ...) in the shapes its module stores them; they go into an
// in-memory io::WeightSource, and TttParams::load reads them exactly as it reads a
// checkpoint (shape checks, the fused q|k|v|lr weight), so the op and `ttt-layer` agree.
//
// Two ways to the backward: forward_train returns the layer's tape (TttTape: projections, the
// inner output, the gate's pre-activation, fast-weight checkpoints) as torch tensors beside y
// and backward_tape consumes them; or backward re-runs the training forward itself (nothing
// held between the ops: one more forward for less memory).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_backward.hpp"
#include "ttt/layers/ttt_layer.hpp"

namespace ttt_torch {

inline ttt::layers::TttConfig parse_config(const std::string& json) {
  ttt::io::Json j;
  try {
    j = ttt::io::Json::parse(json);
  } catch (const ttt::io::Json::exception& e) {
    TORCH_CHECK(false, "ttt: config is not valid JSON (", e.what(), ")");
  }
  return ttt::layers::TttConfig::from_json(ttt::io::JsonView(j, "ttt op config"));
}

inline ttt::Shape shape_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() <= ttt::kMaxRank, "ttt: tensor rank ", t.dim(), " exceeds ", ttt::kMaxRank);
  ttt::Shape s = ttt::Shape::of_rank(int(t.dim()));
  for (int i = 0; i < int(t.dim()); ++i) s.d[i] = t.size(i);
  return s;
}

// A contiguous float32 copy of `t` (or `t` itself) on `device`, named for errors.
inline at::Tensor as_f32(const at::Tensor& t, const c10::Device& device, const std::string& name) {
  TORCH_CHECK(t.defined(), "ttt: tensor '", name, "' is undefined");
  TORCH_CHECK(t.device() == device, "ttt: tensor '", name, "' is on ", t.device(), ", x is on ", device);
  TORCH_CHECK(t.is_floating_point(), "ttt: tensor '", name, "' must be floating point, got ", t.scalar_type());
  return t.to(at::kFloat).contiguous();
}

// Our tensor viewing a torch tensor's memory; `keep` holds the torch storage alive.
template <class B>
ttt::Tensor<float, B> view_of(const at::Tensor& t) {
  auto keep = std::make_shared<at::Tensor>(t);
  return ttt::Tensor<float, B>::borrow(t.data_ptr<float>(), shape_of(t), std::shared_ptr<void>(keep, keep.get()));
}

template <class B>
at::Tensor to_torch(const ttt::Tensor<float, B>& t, const at::TensorOptions& opt) {
  const ttt::Tensor<float, B> c = t.contiguous();
  std::vector<int64_t> sizes(c.shape().d, c.shape().d + c.rank());
  // Hold our storage in the torch tensor's deleter: no copy.
  auto* hold = new ttt::Tensor<float, B>(c);
  return at::from_blob(
      c.data(), sizes, [hold](void*) { delete hold; }, opt.dtype(at::kFloat));
}

template <class B>
ttt::layers::TttParams<float, B> load_params(const std::vector<std::string>& names,
                                             const std::vector<at::Tensor>& params,
                                             const ttt::layers::TttConfig& cfg) {
  TORCH_CHECK(names.size() == params.size(), "ttt: ", names.size(), " names for ", params.size(), " parameters");
  ttt::io::WeightSource ws;
  for (size_t i = 0; i < names.size(); ++i) {
    // The source holds CPU tensors; TttParams::load uploads them to B.
    at::Tensor h = params[i].detach().to(at::kCPU, at::kFloat).contiguous();
    ws.put(names[i], ttt::Tensor<float, ttt::Cpu>::from_host(shape_of(h), h.data_ptr<float>()));
  }
  return ttt::layers::TttParams<float, B>::load(ws, "", cfg);
}

inline void check_x(const at::Tensor& x, const ttt::layers::TttConfig& cfg, const char* what) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) == cfg.hidden_size && x.size(0) > 0 && x.size(1) > 0, "ttt: ", what,
              " must be a non-empty [B, L, ", cfg.hidden_size, "], got ", x.sizes());
}

// The layer's output for x [B, L, C].
template <class B>
at::Tensor forward(const at::Tensor& x_in, const std::vector<at::Tensor>& params,
                      const std::vector<std::string>& names, const std::string& config) {
  const auto cfg = parse_config(config);
  check_x(x_in, cfg, "x");
  const at::Tensor x = as_f32(x_in, x_in.device(), "x");
  try {
    auto p = load_params<B>(names, params, cfg);
    auto y = ttt::layers::ttt_forward_train<float, B>(p, view_of<B>(x), nullptr);
    return to_torch(y, x.options()).to(x_in.scalar_type());
  } catch (const ttt::Error& e) {
    TORCH_CHECK(false, "ttt op: ", e.what());
  }
}

// [d x, d params...] as torch tensors in the parameters' shapes and dtypes.
template <class B>
std::vector<at::Tensor> grads_to_torch(const ttt::layers::TttGrads<B>& g, const std::vector<std::string>& names,
                                       const std::vector<at::Tensor>& params, const at::Tensor& x_in,
                                       const at::Tensor& x) {
  std::vector<at::Tensor> out;
  out.push_back(to_torch(g.x, x.options()).to(x_in.scalar_type()));
  for (size_t i = 0; i < names.size(); ++i) {
    TORCH_CHECK(g.contains(names[i]), "ttt: the backward has no gradient for '", names[i], "'");
    out.push_back(to_torch(g[names[i]], x.options()).reshape(params[i].sizes()).to(params[i].scalar_type()));
  }
  return out;
}

inline void check_dy(const at::Tensor& x_in, const at::Tensor& dy_in, const ttt::layers::TttConfig& cfg) {
  check_x(x_in, cfg, "x");
  check_x(dy_in, cfg, "dy");
  TORCH_CHECK(dy_in.sizes() == x_in.sizes(), "ttt: dy ", dy_in.sizes(), " differs from x ", x_in.sizes());
}

// [d x, d params[0], d params[1], ...] for the upstream gradient dy [B, L, C], re-running the
// training forward (nothing kept from the forward op).
template <class B>
std::vector<at::Tensor> backward(const at::Tensor& x_in, const std::vector<at::Tensor>& params,
                                 const std::vector<std::string>& names, const std::string& config,
                                 const at::Tensor& dy_in, int64_t checkpoint_group) {
  const auto cfg = parse_config(config);
  check_dy(x_in, dy_in, cfg);
  const at::Tensor x = as_f32(x_in, x_in.device(), "x"), dy = as_f32(dy_in, x_in.device(), "dy");
  try {
    auto p = load_params<B>(names, params, cfg);
    ttt::layers::TttTape<float, B> tape;
    ttt::layers::ttt_forward_train(p, view_of<B>(x), &tape, {checkpoint_group});
    return grads_to_torch(ttt::layers::ttt_backward(p, tape, view_of<B>(dy)), names, params, x_in, x);
  } catch (const ttt::Error& e) {
    TORCH_CHECK(false, "ttt op: ", e.what());
  }
}

// The tape (TttTape) as torch tensors, in the order proj, o, gate, W1c, b1c, W2c, b2c; a tensor
// the configuration does not have (gate without use_gate, W2c / b2c for TTT-Linear) is empty [0].
// They hold our storage (no copy) and go back to backward_tape unchanged.
template <class B>
std::vector<at::Tensor> forward_train(const at::Tensor& x_in, const std::vector<at::Tensor>& params,
                                      const std::vector<std::string>& names, const std::string& config,
                                      int64_t checkpoint_group) {
  const auto cfg = parse_config(config);
  check_x(x_in, cfg, "x");
  const at::Tensor x = as_f32(x_in, x_in.device(), "x");
  try {
    auto p = load_params<B>(names, params, cfg);
    ttt::layers::TttTape<float, B> tape;
    auto y = ttt::layers::ttt_forward_train<float, B>(p, view_of<B>(x), &tape, {checkpoint_group});
    auto opt = x.options();
    auto t = [&](const ttt::Tensor<float, B>& v) { return v.defined() ? to_torch(v, opt) : at::empty({0}, opt); };
    return {to_torch(y, opt).to(x_in.scalar_type()), t(tape.proj), t(tape.o), t(tape.gate),
            t(tape.W1c), t(tape.b1c), t(tape.W2c), t(tape.b2c)};
  } catch (const ttt::Error& e) {
    TORCH_CHECK(false, "ttt op: ", e.what());
  }
}

// The backward from forward_train's tape: no forward re-run.
template <class B>
std::vector<at::Tensor> backward_tape(const at::Tensor& x_in, const std::vector<at::Tensor>& params,
                                      const std::vector<std::string>& names, const std::string& config,
                                      const at::Tensor& dy_in, const std::vector<at::Tensor>& saved,
                                      int64_t checkpoint_group) {
  const auto cfg = parse_config(config);
  check_dy(x_in, dy_in, cfg);
  TORCH_CHECK(saved.size() == 7, "ttt: the tape has 7 tensors (proj, o, gate, W1c, b1c, W2c, b2c), got ",
              saved.size());
  const at::Tensor x = as_f32(x_in, x_in.device(), "x"), dy = as_f32(dy_in, x_in.device(), "dy");
  static const char* tape_names[7] = {"proj", "o", "gate", "W1c", "b1c", "W2c", "b2c"};
  std::vector<at::Tensor> keep;  // float32 contiguous copies (or the tensors themselves)
  auto v = [&](int i) {
    if (saved[size_t(i)].numel() == 0) return ttt::Tensor<float, B>{};
    keep.push_back(as_f32(saved[size_t(i)], x_in.device(), std::string("tape.") + tape_names[i]));
    return view_of<B>(keep.back());
  };
  try {
    auto p = load_params<B>(names, params, cfg);
    ttt::layers::TttTape<float, B> tape;
    tape.options.checkpoint_group = checkpoint_group;
    tape.x = view_of<B>(x);
    tape.proj = v(0), tape.o = v(1), tape.gate = v(2);
    tape.W1c = v(3), tape.b1c = v(4), tape.W2c = v(5), tape.b2c = v(6);
    return grads_to_torch(ttt::layers::ttt_backward(p, tape, view_of<B>(dy)), names, params, x_in, x);
  } catch (const ttt::Error& e) {
    TORCH_CHECK(false, "ttt op: ", e.what());
  }
}

}  // namespace ttt_torch
