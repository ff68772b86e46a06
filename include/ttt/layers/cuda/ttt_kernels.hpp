#pragma once
// TttKernels<Cuda>, interim version: the inner loop runs on the host (a round trip of the
// call's q/k/v and the fast weights). Correct, and enough for parity tests and for the
// CUDA Moshi engine to build with TTT layers; the fused device kernels replace it.
#include <vector>

#include "ttt/backend/cuda/kernels.hpp"
#include "ttt/layers/ttt_kernels_cpu.hpp"

namespace ttt::layers {

template <>
struct TttKernels<Cuda> {
  static void inner(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s) {
    auto h = [](const Tensor<float, Cuda>& t) { return t.defined() ? t.to<Cpu>() : Tensor<float, Cpu>{}; };
    TttInnerArgs<Cpu> ha;
    ha.kind = a.kind;
    ha.mini_batch_size = a.mini_batch_size;
    ha.eps = a.eps;
    ha.xq = h(a.xq);
    ha.xk = h(a.xk);
    ha.xv = h(a.xv);
    ha.lr = h(a.lr);
    ha.tau = h(a.tau);
    ha.ln_weight = h(a.ln_weight);
    ha.ln_bias = h(a.ln_bias);
    ha.out = Tensor<float, Cpu>::empty(a.out.shape());
    ha.phase = a.phase;
    ha.commit = a.commit;
    TttFastWeights<Cpu> hs{h(s.W1), h(s.b1), h(s.W2), h(s.b2), h(s.W1_grad), h(s.b1_grad), h(s.W2_grad), h(s.b2_grad)};
    TttKernels<Cpu>::inner(ha, hs);
    a.out.copy_from(ha.out.to<Cuda>());
    auto back = [](const Tensor<float, Cuda>& d, const Tensor<float, Cpu>& t) {
      if (d.defined()) d.copy_from(t.to<Cuda>());
    };
    back(s.W1, hs.W1), back(s.b1, hs.b1), back(s.W2, hs.W2), back(s.b2, hs.b2);
    back(s.W1_grad, hs.W1_grad), back(s.b1_grad, hs.b1_grad), back(s.W2_grad, hs.W2_grad), back(s.b2_grad, hs.b2_grad);
  }

  static void causal_conv(const Tensor<float, Cuda>& out_q, const Tensor<float, Cuda>& out_k,
                          const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& history,
                          const Tensor<float, Cuda>& wq, const Tensor<float, Cuda>& bq, const Tensor<float, Cuda>& wk,
                          const Tensor<float, Cuda>& bk, const std::vector<uint8_t>& commit) {
    auto oq = Tensor<float, Cpu>::empty(out_q.shape()), ok = Tensor<float, Cpu>::empty(out_k.shape());
    auto hist = history.to<Cpu>();
    TttKernels<Cpu>::causal_conv(oq, ok, x.to<Cpu>(), hist, wq.to<Cpu>(), bq.to<Cpu>(), wk.to<Cpu>(), bk.to<Cpu>(),
                                 commit);
    out_q.copy_from(oq.to<Cuda>());
    out_k.copy_from(ok.to<Cuda>());
    history.copy_from(hist.to<Cuda>());
  }

  static void l2_normalize(const Tensor<float, Cuda>& x) {
    auto hx = x.to<Cpu>();
    TttKernels<Cpu>::l2_normalize(hx);
    x.copy_from(hx.to<Cuda>());
  }

  static void ln_target(const Tensor<float, Cuda>& xv, const Tensor<float, Cuda>& xk, const Tensor<float, Cuda>& weight,
                        const Tensor<float, Cuda>& bias, float eps) {
    auto hv = xv.to<Cpu>();
    TttKernels<Cpu>::ln_target(hv, xk.to<Cpu>(), weight.to<Cpu>(), bias.to<Cpu>(), eps);
    xv.copy_from(hv.to<Cuda>());
  }
};

}  // namespace ttt::layers
