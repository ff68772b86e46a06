// CUDA kernels of the torch ops (ttt_ops.cpp declares them): the same code as the CPU's
// over our Cuda backend, instantiated in this one nvcc translation unit with the backend's
// definitions (ttt/cuda.cuh). The op runs on our backend's stream: it waits for torch's
// current stream before reading its tensors, and torch's stream waits for ours after.
#include "ttt_torch.hpp"

#include <ATen/cuda/CUDAContext.h>

#include "ttt/cuda.cuh"
#include "ttt/layers/cuda/ttt_backward_kernels.hpp"

namespace {
// Everything queued on torch's current stream before the op finishes before our work, and
// torch's stream waits for our work after it (our backend synchronises its own stream when
// it hands results back through from_blob otherwise).
struct StreamFence {
  StreamFence() { C10_CUDA_CHECK(cudaStreamSynchronize(at::cuda::getCurrentCUDAStream())); }
  ~StreamFence() { cudaDeviceSynchronize(); }
};

at::Tensor forward_cuda(const at::Tensor& x, std::vector<at::Tensor> params, std::vector<std::string> names,
                           std::string config) {
  StreamFence fence;
  return ttt_torch::forward<ttt::Cuda>(x, params, names, config);
}
std::vector<at::Tensor> backward_cuda(const at::Tensor& x, std::vector<at::Tensor> params,
                                         std::vector<std::string> names, std::string config, const at::Tensor& dy,
                                         int64_t checkpoint_group) {
  StreamFence fence;
  return ttt_torch::backward<ttt::Cuda>(x, params, names, config, dy, checkpoint_group);
}
std::vector<at::Tensor> forward_train_cuda(const at::Tensor& x, std::vector<at::Tensor> params,
                                           std::vector<std::string> names, std::string config, int64_t checkpoint_group) {
  StreamFence fence;
  return ttt_torch::forward_train<ttt::Cuda>(x, params, names, config, checkpoint_group);
}
std::vector<at::Tensor> backward_tape_cuda(const at::Tensor& x, std::vector<at::Tensor> params,
                                           std::vector<std::string> names, std::string config, const at::Tensor& dy,
                                           std::vector<at::Tensor> tape, int64_t checkpoint_group) {
  StreamFence fence;
  return ttt_torch::backward_tape<ttt::Cuda>(x, params, names, config, dy, tape, checkpoint_group);
}
}  // namespace

TORCH_LIBRARY_IMPL(ttt, CUDA, m) {
  m.impl("layer_forward", &forward_cuda);
  m.impl("layer_backward", &backward_cuda);
  m.impl("layer_forward_train", &forward_train_cuda);
  m.impl("layer_backward_tape", &backward_tape_cuda);
}
