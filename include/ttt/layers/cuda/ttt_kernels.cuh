#pragma once
// TttKernels<Cuda> definitions (nvcc only; ttt/cuda.cuh includes this once per program): the
// entry points, which check their arguments, fill the kernels' params and launch them, and
// the instantiations of the templated ones.
//
//   ttt_plan.cuh           TttKernels<Cuda>::plan: the inner kernel a call runs
//   ttt_inner_fp32.cuh     the fp32 inner kernels (FMA tiles, clusters of 1-8 CTAs)
//   ttt_mma.cuh            the bf16-operand inner kernels on tensor cores
//   ttt_decode.cuh         the one-token inner kernels and the fused one-token step
//   ttt_aux_kernels.cuh    call_flags, causal conv, l2_normalize, ln_target, prologue, post_norm
//   ttt_inner_common.cuh   the inner kernels' params, shared-memory layout and device helpers
// Shapes no kernel takes run the inner loop on the host (inner_on_host below), exactly.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ttt/backend/cuda/context.hpp"
#include "ttt/layers/cpu/ttt_kernels.hpp"
#include "ttt/layers/cuda/ttt_aux_kernels.cuh"
#include "ttt/layers/cuda/ttt_decode.cuh"
#include "ttt/layers/cuda/ttt_inner_common.cuh"
#include "ttt/layers/cuda/ttt_kernels.hpp"
#include "ttt/layers/cuda/ttt_plan.cuh"

namespace ttt::layers::cuda_kernels {

// Launches the one-token TTT-Linear kernel (fused: the whole step, see ttt_decode.cuh).
template <class T, bool kFused>
void launch_decode(const decode::DecodeParams<T>& dp, int64_t f, int64_t heads) {
  if (f == 32) {
    if constexpr (!kFused) launch(decode::ttt_linear_decode_kernel<T, 32, false>, unsigned(heads), 64u, 0, 1, dp);
  } else if (f == 64) {
    launch(decode::ttt_linear_decode_kernel<T, 64, kFused>, unsigned(heads * 2), 128u, 0, 2, dp);
  } else {
    launch(decode::ttt_linear_decode_kernel<T, 128, kFused>, unsigned(heads * 4), 256u, 0, 4, dp);
  }
}

// The InnerParams fields every inner kernel reads: state, ttt_norm, tau, output and sizes.
// The caller sets the inputs, the launch shape (R, nc, Fc, sm) and the flags.
inline InnerParams state_params(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, bool mlp, int64_t Bn,
                                int64_t nh, int64_t L, int64_t f, int64_t F) {
  InnerParams p{};
  p.tau = a.tau.data(), p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data();
  p.out = a.out.data(), p.out_sb = a.out.stride(0), p.out_sh = a.out.stride(1), p.out_st = a.out.stride(2);
  p.W1 = s.W1.data(), p.b1 = s.b1.data(), p.S1 = s.W1_grad.data(), p.Sb1 = s.b1_grad.data();
  if (mlp) p.W2 = s.W2.data(), p.b2 = s.b2.data(), p.S2 = s.W2_grad.data(), p.Sb2 = s.b2_grad.data();
  p.L = L, p.nh = int(nh), p.f = int(f), p.F = int(F), p.K = int(a.mini_batch_size), p.eps = a.eps;
  p.batch = int(Bn);
  return p;
}

// An inner call's params for the kernels of plan pl (all but the fp32 kernels' smem layout).
inline InnerParams call_params(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s, const TttCudaPlan& pl) {
  const int64_t F = s.W1.size(3);
  InnerParams p = state_params(a, s, a.kind == TttConfig::Kind::mlp, a.xq.size(0), a.xq.size(1), a.xq.size(2),
                               a.xq.size(3), F);
  p.phase = a.phase.data();
  p.commit = a.commit.defined() ? a.commit.data() : nullptr;
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data();
  p.R = pl.rows, p.nc = pl.cluster, p.Fc = int(F) / pl.cluster;
  return p;
}

// The inner loop through the host: q/k/v and the state go down, the results come back.
inline void inner_on_host(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s) {
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
  ha.operands = a.operands;
  // The flags come down too (this path is not graph-safe).
  ha.phase = a.phase.to<Cpu>();
  if (a.commit.defined()) ha.commit = a.commit.to<Cpu>();
  TttFastWeights<Cpu> hs{h(s.W1), h(s.b1), h(s.W2), h(s.b2), h(s.W1_grad), h(s.b1_grad), h(s.W2_grad), h(s.b2_grad)};
  TttKernels<Cpu>::inner(ha, hs);
  a.out.copy_from(ha.out.to<Cuda>());
  auto back = [](const Tensor<float, Cuda>& d, const Tensor<float, Cpu>& t) {
    if (d.defined()) d.copy_from(t.to<Cuda>());
  };
  back(s.W1, hs.W1), back(s.b1, hs.b1), back(s.W2, hs.W2), back(s.b2, hs.b2);
  back(s.W1_grad, hs.W1_grad), back(s.b1_grad, hs.b1_grad), back(s.W2_grad, hs.W2_grad), back(s.b2_grad, hs.b2_grad);
}

}  // namespace ttt::layers::cuda_kernels

namespace ttt::layers {

void TttKernels<Cuda>::inner(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s) {
  using namespace cuda_kernels;
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), K = a.mini_batch_size;
  const int64_t F = s.W1.size(3);
  TTT_CHECK(a.phase.defined() && a.phase.numel() == Bn && a.phase.is_contiguous() &&
                (!a.commit.defined() || (a.commit.numel() == Bn && a.commit.is_contiguous())),
            "TttKernels<Cuda>::inner: phase / commit must be contiguous [", Bn, "]");
  TTT_CHECK(mlp || F == f, "TttKernels<Cuda>::inner: TTT-Linear needs W1 [B, nh, f, f], got inner width ", F,
            " for head_dim ", f);
  if (L == 0 || Bn == 0 || nh == 0) return;
  const TttCudaPlan pl = plan(a.kind, Bn, nh, L, f, F, K, a.operands);
  if (!pl.device || !device_layout_problem(a, s, mlp).empty()) {
    inner_on_host(a, s);
    return;
  }

  InnerParams p = call_params(a, s, pl);
  p.sm = pl.tensor_cores || pl.decode ? InnerSmem{} : inner_smem(mlp, p.f, p.F, p.nc, p.R, p.K);
  const InnerKernel kernel = pl.tensor_cores ? tc_kernel(mlp, f) : inner_kernel(mlp);
  const unsigned threads = unsigned(pl.tensor_cores ? tc_threads(mlp, f) : kThreads);
  if (pl.decode && mlp) {
    launch(decode::ttt_mlp_decode_kernel, unsigned(Bn * nh * pl.cluster), unsigned(decode::MlpDecodeLayout::THREADS), 0,
           pl.cluster, p);
  } else if (pl.decode) {
    decode::DecodeParams<float> dp{};
    dp.in = p;
    launch_decode<float, false>(dp, f, Bn * nh);
  } else {
    allow_smem(kernel, pl.smem_bytes);
    launch(kernel, unsigned(Bn * nh * pl.cluster), threads, size_t(pl.smem_bytes), pl.cluster, p);
  }
}

// The TTT-Linear tensor-core kernel writes the checkpoints itself (ttt_mma.cuh): the training
// forward at group 1 is one launch instead of one per mini-batch (512 at L 8192) and the
// state's copies. Every other plan returns false: the caller runs inner() group by group.
bool TttKernels<Cuda>::inner_checkpointed(const TttInnerArgs<Cuda>& a, const TttFastWeights<Cuda>& s,
                                          const TttCheckpoints<Cuda>& ck) {
  using namespace cuda_kernels;
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  if (mlp) return false;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), K = a.mini_batch_size;
  const int64_t F = s.W1.size(3);
  if (L == 0 || Bn == 0 || nh == 0 || F != f) return false;
  const TttCudaPlan pl = plan(a.kind, Bn, nh, L, f, F, K, a.operands);
  if (!pl.device || !pl.tensor_cores || !device_layout_problem(a, s, mlp).empty()) return false;
  TTT_CHECK(a.phase.defined() && a.phase.numel() == Bn && a.phase.is_contiguous() &&
                (!a.commit.defined() || (a.commit.numel() == Bn && a.commit.is_contiguous())),
            "TttKernels<Cuda>::inner_checkpointed: phase / commit must be contiguous [", Bn, "]");
  TTT_CHECK(ck.every >= 1, "TttKernels<Cuda>::inner_checkpointed: every must be >= 1, got ", ck.every);
  const int64_t Mc = ttt_num_checkpoints(L, K, ck.every);
  TTT_CHECK(ck.W1.shape() == Shape({Mc * Bn, nh, f, F}) && ck.b1.shape() == Shape({Mc * Bn, nh, 1, F}) &&
                ck.W1.is_contiguous() && ck.b1.is_contiguous(),
            "TttKernels<Cuda>::inner_checkpointed: checkpoints must be contiguous [", Mc * Bn, ", ", nh, ", ", f, ", ",
            F, "] and [", Mc * Bn, ", ", nh, ", 1, ", F, "], got ", ck.W1.shape().str(), " and ", ck.b1.shape().str());
  InnerParams p = call_params(a, s, pl);
  p.ck_W1 = ck.W1.data(), p.ck_b1 = ck.b1.data(), p.ck_every = int(std::min<int64_t>(ck.every, 1 << 30));
  const InnerKernel kernel = tc_kernel(false, f);
  allow_smem(kernel, pl.smem_bytes);
  launch(kernel, unsigned(Bn * nh * pl.cluster), unsigned(tc_threads(false, f)), size_t(pl.smem_bytes), pl.cluster, p);
  return true;
}

void TttKernels<Cuda>::causal_conv(const Tensor<float, Cuda>& out_q, const Tensor<float, Cuda>& out_k,
                                          const Tensor<float, Cuda>& x, const Tensor<float, Cuda>& history,
                                          const Tensor<float, Cuda>& wq, const Tensor<float, Cuda>& bq,
                                          const Tensor<float, Cuda>& wk, const Tensor<float, Cuda>& bk,
                                          const Tensor<uint8_t, Cuda>& commit) {
  using namespace cuda_kernels;
  const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), kc = history.size(2);
  for (const Tensor<float, Cuda>* t : {&out_q, &out_k, &x, &history, &wq, &bq, &wk, &bk})
    TTT_CHECK(t->is_contiguous(), "TttKernels<Cuda>::causal_conv: tensors must be contiguous");
  TTT_CHECK(!commit.defined() || (commit.numel() == Bn && commit.is_contiguous()),
            "TttKernels<Cuda>::causal_conv: commit must be contiguous [", Bn, "]");
  if (Bn == 0 || C == 0) return;
  ConvParams p{x.data(), history.data(), wq.data(), bq.data(), wk.data(), bk.data(), out_q.data(), out_k.data(),
               Bn, L, C, int(kc), commit.defined() ? commit.data() : nullptr};
  if (L > 0) launch(causal_conv_kernel, grid_for(Bn * L * C, 256, kAuxBlocksPerSm), 256, 0, 1, p);
  launch(conv_history_kernel, grid_for(Bn * C, 256, kAuxBlocksPerSm), 256, 0, 1, p);
}

void TttKernels<Cuda>::call_flags(const Tensor<int64_t, Cuda>& positions, const Tensor<uint8_t, Cuda>& exec,
                                  int64_t add, int64_t mod, const Tensor<int64_t, Cuda>& out_pos,
                                  const Tensor<int32_t, Cuda>& phase, const Tensor<uint8_t, Cuda>& commit) {
  using namespace cuda_kernels;
  TTT_CHECK(positions.rank() == 2 && out_pos.shape() == positions.shape() && out_pos.is_contiguous(),
            "call_flags: positions ", positions.shape().str(), " and out ", out_pos.shape().str());
  const int64_t Bn = positions.size(0), L = positions.size(1);
  TTT_CHECK((!phase.defined() || (phase.numel() == Bn && phase.is_contiguous())) &&
                (!commit.defined() || (commit.numel() == Bn && commit.is_contiguous())) &&
                (!exec.defined() || (exec.numel() == Bn && exec.is_contiguous())),
            "call_flags: phase, commit and exec must be contiguous [", Bn, "]");
  if (Bn == 0 || L == 0) return;
  FlagsParams p{positions.data(), positions.stride(0), positions.stride(1), exec.defined() ? exec.data() : nullptr,
                out_pos.data(), phase.defined() ? phase.data() : nullptr, commit.defined() ? commit.data() : nullptr,
                Bn, L, add, mod};
  launch(call_flags_kernel, grid_for(Bn * L, 256, kAuxBlocksPerSm), 256, 0, 1, p);
}

template <class T>
void TttKernels<Cuda>::prologue(const TttPrologue<T, Cuda>& a) {
  using namespace cuda_kernels;
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), C = nh * f;
  TTT_CHECK(a.proj.rank() == 3 && a.proj.size(0) == Bn && a.proj.size(1) == L && a.proj.size(2) >= 3 * C + nh &&
                a.proj.stride(2) == 1,
            "TttKernels<Cuda>::prologue: proj ", a.proj.shape().str(), " for ", nh, " heads of ", f);
  TTT_CHECK(a.positions.rank() == 2 && a.positions.size(0) == Bn && a.positions.size(1) == L,
            "TttKernels<Cuda>::prologue: positions ", a.positions.shape().str());
  for (const Tensor<float, Cuda>* t : {&a.xq, &a.xk, &a.xv, &a.lr, &a.lr_bias, &a.ln_weight, &a.ln_bias})
    TTT_CHECK(t->is_contiguous(), "TttKernels<Cuda>::prologue: tensors must be contiguous");
  TTT_CHECK(f % 2 == 0, "TttKernels<Cuda>::prologue: odd head_dim ", f);
  if (Bn == 0 || L == 0) return;
  PrologueParams<T> p{};
  p.proj = a.proj.data(), p.proj_b = a.proj.stride(0), p.proj_t = a.proj.stride(1);
  p.pos = a.positions.data(), p.pos_b = a.positions.stride(0), p.pos_t = a.positions.stride(1);
  p.exec = a.exec.defined() ? a.exec.data() : nullptr;
  p.lr_bias = a.lr_bias.data(), p.ln_w = a.ln_weight.data(), p.ln_b = a.ln_bias.data();
  p.xq = a.xq.data(), p.xk = a.xk.data(), p.xv = a.xv.data(), p.lr = a.lr.data();
  p.phase = a.phase.defined() ? a.phase.data() : nullptr;
  p.commit = a.commit.defined() ? a.commit.data() : nullptr;
  p.B = Bn, p.L = L, p.K = a.mini_batch_size, p.nh = int(nh), p.f = int(f);
  p.theta = a.rope_theta, p.lr_scale = a.lr_scale, p.ln_eps = a.ln_eps;
  p.l2 = a.l2_norm_qk ? 1 : 0, p.ln_target = a.ln_target ? 1 : 0;
  launch(prologue_kernel<T>, grid_for(Bn * L * nh * 32, 256, kAuxBlocksPerSm), 256, 0, 1, p);
}

template <class T>
bool TttKernels<Cuda>::step(const TttStep<T, Cuda>& st, const TttFastWeights<Cuda>& s) {
  using namespace cuda_kernels;
  if constexpr (std::is_same_v<T, ::ttt::f16>) {
    return false;
  } else {
    const TttInnerArgs<Cuda>& a = st.in;
    const TttPrologue<T, Cuda>& pr = st.pro;
    const TttCudaTuning& tune = tuning();
    if (a.kind != TttConfig::Kind::linear || pr.l2_norm_qk || pr.ln_target || !tune.decode_kernel || !tune.fused_step ||
        tune.cluster != 0 || tune.host_fallback)
      return false;
    if (!st.y.defined() || st.y.rank() != 3 || !st.y.is_contiguous() || !a.out.defined() || a.out.rank() != 4)
      return false;
    const int64_t Bn = st.y.size(0), L = st.y.size(1), C = st.y.size(2), nh = a.out.size(1), f = a.out.size(3);
    const int64_t F = s.W1.defined() ? s.W1.size(3) : 0;
    if (L != 1 || F != f || (f != 64 && f != 128) || !has_decode_kernel(f) || nh * f != C ||
        a.mini_batch_size > 32)
      return false;
    if (!pr.proj.defined() || pr.proj.rank() != 3 || pr.proj.stride(2) != 1 || pr.proj.size(2) < 3 * C + nh)
      return false;
    if (!pr.positions.defined()) return false;
    if (a.out.stride(3) != 1 || !st.post_weight.is_contiguous() || !st.post_bias.is_contiguous()) return false;
    for (const Tensor<float, Cuda>* t : {&s.W1, &s.b1, &s.W1_grad, &s.b1_grad, &a.tau, &a.ln_weight, &a.ln_bias})
      if (!t->defined() || !t->is_contiguous()) return false;
    if (!aligned16(s.W1.data()) || !aligned16(s.W1_grad.data())) return false;

    decode::DecodeParams<T> dp{};
    InnerParams& p = dp.in;
    p = state_params(a, s, false, Bn, nh, 1, f, f);
    p.nc = 1;
    TTT_CHECK(pr.positions.rank() == 2 && pr.positions.size(0) == Bn, "TttKernels<Cuda>::step: positions ",
              pr.positions.shape().str(), " for batch ", Bn);
    dp.pos = pr.positions.data(), dp.pos_b = pr.positions.stride(0);
    dp.exec = pr.exec.defined() ? pr.exec.data() : nullptr;
    dp.proj = pr.proj.data(), dp.proj_b = pr.proj.stride(0);
    dp.lr_bias = pr.lr_bias.data(), dp.lr_scale = pr.lr_scale, dp.theta = pr.rope_theta;
    dp.y = st.y.data(), dp.pn_w = st.post_weight.data(), dp.pn_b = st.post_bias.data(), dp.pn_eps = st.post_eps;
    // Completion counters [B] (zero between calls: the last CTA of an item resets its own)
    // and per-CTA LayerNorm partials [B, nh, f / 32, 2]: the session's when it has a workspace.
    const Shape cshape{Bn}, sshape{Bn * nh * (f / 32) * 2};
    const Tensor<int32_t, Cuda> counters = st.workspace ? st.workspace->template get<int32_t>("ttt.step.counters", cshape)
                                                        : Tensor<int32_t, Cuda>::zeros(cshape);
    const Tensor<float, Cuda> scratch = st.workspace ? st.workspace->template get<float>("ttt.step.scratch", sshape)
                                                     : Tensor<float, Cuda>::empty(sshape);
    dp.counters = counters.data();
    dp.scratch = scratch.data();
    launch_decode<T, true>(dp, f, Bn * nh);
    return true;
  }
}

template <class T>
void TttKernels<Cuda>::post_norm(const Tensor<T, Cuda>& out, const Tensor<float, Cuda>& in,
                                 const Tensor<float, Cuda>& weight, const Tensor<float, Cuda>& bias, float eps) {
  using namespace cuda_kernels;
  TTT_CHECK(in.is_contiguous() && out.is_contiguous() && out.shape() == in.shape() && weight.is_contiguous() &&
                bias.is_contiguous(),
            "TttKernels<Cuda>::post_norm: contiguous tensors of one shape, got ", in.shape().str(), " and ",
            out.shape().str());
  const int64_t n = in.size(-1), rows = n > 0 ? in.numel() / n : 0;
  if (rows == 0) return;
  PostNormParams<T> p{in.data(), out.data(), weight.data(), bias.data(), rows, n, eps};
  const unsigned grid = unsigned(std::min<int64_t>(rows, int64_t(::ttt::cuda::Context::get().sm_count()) * 8));
  launch(post_norm_kernel<T>, grid, kRowThreads, 0, 1, p);
}

#define TTT_CUDA_INSTANTIATE_TTT_IO(T)                                                                         \
  template void TttKernels<Cuda>::prologue<T>(const TttPrologue<T, Cuda>&);                                    \
  template bool TttKernels<Cuda>::step<T>(const TttStep<T, Cuda>&, const TttFastWeights<Cuda>&);                \
  template void TttKernels<Cuda>::post_norm<T>(const Tensor<T, Cuda>&, const Tensor<float, Cuda>&,             \
                                               const Tensor<float, Cuda>&, const Tensor<float, Cuda>&, float);
TTT_CUDA_INSTANTIATE_TTT_IO(float)
TTT_CUDA_INSTANTIATE_TTT_IO(::ttt::bf16)
TTT_CUDA_INSTANTIATE_TTT_IO(::ttt::f16)
#undef TTT_CUDA_INSTANTIATE_TTT_IO

void TttKernels<Cuda>::l2_normalize(const Tensor<float, Cuda>& x) {
  using namespace cuda_kernels;
  const int64_t n = x.size(-1);
  if (x.numel() == 0 || n == 0) return;
  TTT_CHECK(x.rank() >= 1 && x.rank() <= 4, "l2_normalize: rank ", x.rank());
  RowsParams p{};
  p.x = x.data();
  p.n = n;
  p.inner = x.stride(-1);
  p.rows = x.numel() / n;
  const int outer = x.rank() - 1;
  for (int j = 0; j < 3; ++j) p.size[j] = 1, p.stride[j] = 0;
  for (int i = 0; i < outer; ++i) {
    p.size[3 - outer + i] = x.size(i);
    p.stride[3 - outer + i] = x.stride(i);
  }
  launch(l2_normalize_kernel, grid_for(p.rows * 32, 256, kAuxBlocksPerSm), 256, 0, 1, p);
}

void TttKernels<Cuda>::ln_target(const Tensor<float, Cuda>& xv, const Tensor<float, Cuda>& xk,
                                        const Tensor<float, Cuda>& weight, const Tensor<float, Cuda>& bias, float eps) {
  using namespace cuda_kernels;
  TTT_CHECK(xv.rank() == 4 && xk.shape() == xv.shape() && xv.is_contiguous() && xk.is_contiguous() &&
                weight.is_contiguous() && bias.is_contiguous(),
            "TttKernels<Cuda>::ln_target: xv and xk must be contiguous [B, L, nh, f] of one shape");
  const int64_t nh = xv.size(2), f = xv.size(3);
  if (xv.numel() == 0) return;
  LnTargetParams p{xv.data(), xk.data(), weight.data(), bias.data(), xv.numel() / f, int(nh), int(f), eps};
  launch(ln_target_kernel, grid_for(p.rows * 32, 256, kAuxBlocksPerSm), 256, 0, 1, p);
}

}  // namespace ttt::layers
