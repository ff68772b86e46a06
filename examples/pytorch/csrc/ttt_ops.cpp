// The TTT layer as torch custom ops (namespace `ttt`), CPU kernels here, CUDA kernels in
// ttt_ops_cuda.cu when the extension is built with CUDA (TTT_TORCH_CUDA):
//   torch.ops.ttt.layer_forward(x, params, names, config) -> y
//   torch.ops.ttt.layer_backward(x, params, names, config, dy, checkpoint_group) -> [dx, dparams...]
//   torch.ops.ttt.layer_forward_train(x, params, names, config, checkpoint_group) -> [y, tape (7)...]
//   torch.ops.ttt.layer_backward_tape(x, params, names, config, dy, tape, checkpoint_group) -> [dx, dparams...]
// `config` is the layer's JSON (TttConfig::from_json keys); `names` are ttt-lm-pytorch's
// parameter names, one per tensor of `params`. Autograd is ttt_torch.ops.TttLayerFunction
// (an autograd.Function over the two ops), which works the same on torch 1.13 and 2.x.
#include "ttt_torch.hpp"

#include "ttt/layers/cpu/ttt_backward_kernels.hpp"
#include "ttt/layers/cpu/ttt_kernels.hpp"

TORCH_LIBRARY(ttt, m) {
  m.def("layer_forward(Tensor x, Tensor[] params, str[] names, str config) -> Tensor");
  m.def("layer_backward(Tensor x, Tensor[] params, str[] names, str config, Tensor dy, int checkpoint_group) -> Tensor[]");
  m.def("layer_forward_train(Tensor x, Tensor[] params, str[] names, str config, int checkpoint_group) -> Tensor[]");
  m.def("layer_backward_tape(Tensor x, Tensor[] params, str[] names, str config, Tensor dy, Tensor[] tape, int checkpoint_group) -> Tensor[]");
}

namespace {
at::Tensor forward_cpu(const at::Tensor& x, std::vector<at::Tensor> params, std::vector<std::string> names,
                          std::string config) {
  return ttt_torch::forward<ttt::Cpu>(x, params, names, config);
}
std::vector<at::Tensor> backward_cpu(const at::Tensor& x, std::vector<at::Tensor> params,
                                        std::vector<std::string> names, std::string config, const at::Tensor& dy,
                                        int64_t checkpoint_group) {
  return ttt_torch::backward<ttt::Cpu>(x, params, names, config, dy, checkpoint_group);
}
std::vector<at::Tensor> forward_train_cpu(const at::Tensor& x, std::vector<at::Tensor> params,
                                          std::vector<std::string> names, std::string config, int64_t checkpoint_group) {
  return ttt_torch::forward_train<ttt::Cpu>(x, params, names, config, checkpoint_group);
}
std::vector<at::Tensor> backward_tape_cpu(const at::Tensor& x, std::vector<at::Tensor> params,
                                          std::vector<std::string> names, std::string config, const at::Tensor& dy,
                                          std::vector<at::Tensor> tape, int64_t checkpoint_group) {
  return ttt_torch::backward_tape<ttt::Cpu>(x, params, names, config, dy, tape, checkpoint_group);
}
}  // namespace

TORCH_LIBRARY_IMPL(ttt, CPU, m) {
  m.impl("layer_forward", &forward_cpu);
  m.impl("layer_backward", &backward_cpu);
  m.impl("layer_forward_train", &forward_train_cpu);
  m.impl("layer_backward_tape", &backward_tape_cpu);
}
