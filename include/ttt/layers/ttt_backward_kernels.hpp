#pragma once
// The backward of the TTT inner loop behind a backend-templated interface, the training
// counterpart of ttt_kernels.hpp. TttBackwardKernels<B> is declared here and refuses to
// compile until a backend specialises it (ttt/layers/cpu/ttt_backward_kernels.hpp for the
// host). Everything around the inner loop (projections, RoPE, lr sigmoid, post_norm, gate,
// o_proj) is differentiated with the backend-generic ops in ttt_backward.hpp.
//
// Setting: whole sequences from the layer's initial fast weights (ttt-lm-pytorch's forward
// without a cache): per (batch item b, head h) the L tokens form M = ceil(L / K) mini-batches,
// the last one possibly short (the reference's remainder: its rows use τ_0..τ_{n-1} and its
// end-of-mini-batch update is thrown away). The forward of mini-batch m from its start state
// (W, b) is ttt_kernels.hpp's segment at phase 0; per head, with η_ij = τ_i lr_j:
//   Z = K W + b,  G = ln_fused_l2_bwd(Z, V - K)          (gradients at the start state)
//   E = tril(η ⊙ (Q Kᵀ + 1)),  Z̄ = Q W + b - E G,  out = Q + LN(Z̄)
//   W' = W - τ_{K-1} Kᵀ diag(lr) G,  b' = b - τ_{K-1} lrᵀ G   (full mini-batches only)
// (TTT-MLP: the two-layer version, ttt_reference c.)
//
// Contract of TttBackwardKernels<B>::inner_backward, per (b, h), all float32:
//   given dout = d loss / d out, return the gradients of the loss with respect to every
//   input of the inner loop: xq, xk, xv, lr, τ, the LN's γ/β and the item's initial fast
//   weights. The fast-weight states the backward needs are NOT stored per mini-batch:
//   the forward kept one checkpoint every `group` mini-batches (the state before mini-batch
//   c * group, c = 0 .. ceil(M / group) - 1); the backward walks the checkpoint groups in
//   reverse, re-runs the group's forward recurrence from its checkpoint (Z, G and the
//   update: no query path) to get each mini-batch's start state, then walks the group's
//   mini-batches in reverse: recompute that mini-batch's forward from its start state, back-
//   propagate dout through it, and carry dW, db (the gradient with respect to the state the
//   mini-batch starts from) to the mini-batch before. The carry after mini-batch 0 is the
//   gradient with respect to the initial fast weights.
//   Outputs are per (b, h) partial sums: the caller reduces dtau over (b, h), the LN and
//   fast-weight gradients over b. No atomics are needed: a backend may give each (b, h) its
//   own thread block (the chain over mini-batches is sequential, heads are independent),
//   exactly as the forward kernels do.
#include <cstdint>

#include "ttt/core/backend.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/layers/ttt_config.hpp"
#include "ttt/layers/ttt_kernels.hpp"

namespace ttt::layers {

template <class B>
struct TttInnerBackwardArgs {
  TttConfig::Kind kind = TttConfig::Kind::linear;
  int64_t mini_batch_size = 16;  // K
  float eps = 1e-6f;             // ttt_norm eps
  // Inputs of the forward (as TttInnerArgs).
  Tensor<float, B> xq, xk, xv;  // [B, nh, L, f] contiguous, after RoPE
  Tensor<float, B> lr;          // [B, nh, L] contiguous
  Tensor<float, B> tau;         // [K]
  Tensor<float, B> ln_weight;   // [nh, f]
  Tensor<float, B> ln_bias;     // [nh, f]
  // Checkpoints: the fast weights before mini-batch c * group, checkpoint c of item b at
  // rows [c * B + b] (so rows [c * B, (c + 1) * B) are a TttFastWeights-shaped view).
  int64_t group = 1;
  Tensor<float, B> W1c, b1c;  // [Mc * B, nh, f, F], [Mc * B, nh, 1, F]
  Tensor<float, B> W2c, b2c;  // [Mc * B, nh, F, f], [Mc * B, nh, 1, f] (mlp)
  // Upstream gradient of out = q + LN(z̄): [B, nh, L, f], any strides with the last one 1
  // (the layer passes a view of its token-major [B, L, nh, f]).
  Tensor<float, B> dout;
  // Outputs, overwritten.
  Tensor<float, B> dxq, dxk, dxv;         // [B, nh, L, f] contiguous
  Tensor<float, B> dlr;                   // [B, nh, L] contiguous
  Tensor<float, B> dtau;                  // [B, nh, K] per (b, h)
  Tensor<float, B> dln_weight, dln_bias;  // [B, nh, f] per (b, h)
  Tensor<float, B> dW1, db1;              // [B, nh, f, F], [B, nh, 1, F] per item
  Tensor<float, B> dW2, db2;              // [B, nh, F, f], [B, nh, 1, f] (mlp)
};

// Primary template: a backend without a TTT backward is a compile error, not a link error.
template <class B>
struct TttBackwardKernels {
  static_assert(always_false_v<B>,
                "no TttBackwardKernels<B> for this backend: include ttt/layers/cpu/ttt_backward_kernels.hpp (cpu) "
                "or ttt/cuda.hpp (cuda)");
};

}  // namespace ttt::layers
