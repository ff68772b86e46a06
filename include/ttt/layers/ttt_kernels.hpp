#pragma once
// The inner loop of the TTT layers behind a backend-templated interface. TttKernels<B> is
// declared here and refuses to compile until a backend specialises it
// (ttt/layers/cpu/ttt_kernels.hpp for the host; a CUDA specialisation can be dropped in
// beside it). Everything around the inner loop (projections, RoPE, post_norm, gate,
// o_proj) is written with the backend-generic ops in ttt_layer.hpp.
//
// Contract of TttKernels<B>::inner, per (batch item b, head h), all float32:
//   the item's tokens start at phase p_b = offset_b mod K inside a mini-batch. The call is
//   cut at mini-batch boundaries into segments; a segment of n tokens starting at phase p
//   (p + n <= K) computes, with (W, b) the mini-batch-start state and (S_W, S_b) the
//   running sums of the tokens of this mini-batch already seen (zero when p = 0):
//     gradients at the mini-batch-start state:  g_j = ln_fused_l2_bwd(k_j W + b, v_j - k_j)
//     z̄_i = q_i W + b - τ_{p+i} (q_i S_W + S_b) - Σ_{j<=i} τ_{p+i} lr_j (q_i·k_j + 1) g_j
//     o_i = q_i + LN(z̄_i)
//     S_W += Σ_j lr_j k_jᵀ g_j ;  S_b += Σ_j lr_j g_j
//     if p + n == K (the mini-batch completes): W -= τ_{K-1} S_W, b -= τ_{K-1} S_b, sums = 0
//   A whole mini-batch (p = 0, n = K) is exactly ttt-lm-pytorch's dual form; a partial one
//   is its primal form batched over the segment (ttt_reference b.5, b.7, d.2). TTT-MLP is
//   the same with the two-layer forward and the gradient of both layers (ttt_reference c).
//
// Around the inner loop, two more steps have backend kernels of their own so that a decode
// step is a handful of launches (TttKernels<B>::prologue and ::post_norm below):
//   prologue   the rows of one projection [q | k | v | lr logits] in T  ->  xq, xk, xv
//              [B, nh, L, f] float after RoPE (and the video options), lr [B, nh, L]
//   post_norm  the inner loop's output, written token-major [B, L, nh, f], LayerNorm over C,
//              cast to T.
#include <cmath>
#include <cstdint>
#include <vector>

#include "ttt/config.hpp"
#include "ttt/core/backend.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/core/workspace.hpp"
#include "ttt/layers/ttt_config.hpp"

namespace ttt::layers {

// Per-item fast weights and running gradient sums (views into a TttState).
template <class B>
struct TttFastWeights {
  Tensor<float, B> W1, b1;            // [B, nh, f, F], [B, nh, 1, F]  (F = f linear, e*f mlp)
  Tensor<float, B> W2, b2;            // [B, nh, F, f], [B, nh, 1, f]  (mlp only)
  Tensor<float, B> W1_grad, b1_grad;  // running sums Σ lr_j k_jᵀ g_j, Σ lr_j g_j; shapes of W1, b1
  Tensor<float, B> W2_grad, b2_grad;  // (mlp only)
};

// Operand precision of the inner loop's matrix products. fp32: every product in float (the
// reference's numbers, 1e-5); bf16: products on tensor cores with bf16 operands and float
// accumulation, while the fast weights, running sums, LayerNorm statistics and gradients
// stay float (the layer's bf16 path; the CPU backend always computes in float).
enum class TttOperands { fp32, bf16 };

template <class B>
struct TttInnerArgs {
  TttConfig::Kind kind = TttConfig::Kind::linear;
  int64_t mini_batch_size = 16;  // K
  float eps = 1e-6f;             // ttt_norm eps
  TttOperands operands = TttOperands::fp32;
  Tensor<float, B> xq, xk, xv;   // [B, nh, L, f] contiguous, after RoPE
  Tensor<float, B> lr;           // [B, nh, L]  base_lr * sigmoid(x w_h + b_h) / f
  Tensor<float, B> tau;          // [K]  max(0, 1/(i+1) + learnable_token_idx[i])
  Tensor<float, B> ln_weight;    // [nh, f]
  Tensor<float, B> ln_bias;      // [nh, f]
  Tensor<float, B> out;          // [B, nh, L, f]  q + LN(z̄); any strides with the last one 1
                                 // (the layer passes a view of a token-major [B, L, nh, f])
  // Per batch item, on the backend (made by TttKernels<B>::call_flags or the prologue from the
  // tokens' stream positions and the exec mask): where its first token sits in its mini-batch,
  // and whether its state is written back (0: computed from the state, state left untouched).
  // Only device-resident flags exist, so a call holds no host value that changes from step to
  // step: the eager path and a replayed CUDA graph run the same code.
  Tensor<int32_t, B> phase;   // [B] in [0, K)
  Tensor<uint8_t, B> commit;  // [B]; undefined: every item commits
};

// Number of checkpoints for L tokens in mini-batches of K, one every `group` mini-batches.
inline int64_t ttt_num_checkpoints(int64_t L, int64_t K, int64_t group) {
  const int64_t M = (L + K - 1) / K;
  return (M + group - 1) / group;
}

// Where TttKernels<B>::inner_checkpointed writes the state for the backward (ttt_forward_train):
// the call starts at phase 0, and before its mini-batch m (m = 0, every, 2 every, ...) the
// state (W1, b1 and, for TTT-MLP, W2, b2) goes to checkpoint ci = m / every, rows [ci B + b]:
// exactly what running the inner loop one group of `every` mini-batches at a time, from a copy
// of the state taken before each group, would store.
template <class B>
struct TttCheckpoints {
  int64_t every = 1;
  Tensor<float, B> W1, b1;  // [Mc B, nh, f, F], [Mc B, nh, 1, F]
  Tensor<float, B> W2, b2;  // [Mc B, nh, F, f], [Mc B, nh, 1, f] (mlp only)
};

// Arguments of TttKernels<B>::prologue: everything between the projection and the inner loop.
//   q, k, v = columns [0, C), [C, 2C), [2C, 3C) of proj, as float, per head:
//   l2-normalised (l2_norm_qk), rotated by interleaved RoPE at position (positions[b, t] mod K),
//   then v <- k + LN(v - k) (ln_target); lr = lr_scale * sigmoid(proj[..., 3C + h] + lr_bias[h]).
// With `phase` / `commit` defined, phase[b] = positions[b, 0] mod K and commit[b] = exec[b] != 0
// (1 without exec) are written for the inner loop (the device-made flags of a graph step).
template <class T, class B>
struct TttPrologue {
  Tensor<T, B> proj;                    // [B, L, >= 3C + nh], last dimension contiguous
  Tensor<int64_t, B> positions;         // [B, L] stream positions (any strides)
  Tensor<uint8_t, B> exec;              // [B] or undefined
  Tensor<float, B> lr_bias;             // [nh]
  Tensor<float, B> ln_weight, ln_bias;  // [nh, f] (ln_target)
  int64_t mini_batch_size = 16;
  float rope_theta = 10000.f, lr_scale = 1.f, ln_eps = 1e-6f;
  bool l2_norm_qk = false, ln_target = false;
  Tensor<float, B> xq, xk, xv;          // out: [B, nh, L, f] contiguous
  Tensor<float, B> lr;                  // out: [B, nh, L] contiguous
  Tensor<int32_t, B> phase;             // out (optional): [B]
  Tensor<uint8_t, B> commit;            // out (optional): [B]
};

// One layer step between its two projections (prologue, inner loop, post_norm) for backends
// that can run it as one kernel: TttKernels<B>::step(st, state) returns false when they cannot
// (the caller then runs the three steps). `pro` and `in` carry only their inputs here (no
// xq / xk / xv / lr): `in.out` is the token-major float scratch [B, nh, L, f] view. A kernel
// that needs persistent scratch (completion counters that must read zero at every call) takes
// it from `workspace`, the session's; without one it allocates the call's own.
template <class T, class B>
struct TttStep {
  TttPrologue<T, B> pro;
  TttInnerArgs<B> in;
  Tensor<T, B> y;                          // [B, L, C] out: post_norm(o)
  Tensor<float, B> post_weight, post_bias;  // [C]
  float post_eps = 1e-6f;
  Workspace<B>* workspace = nullptr;
};

// Primary template: a backend without TTT kernels is a compile error, not a link error.
template <class B>
struct TttKernels {
  static_assert(always_false_v<B>,
                "no TttKernels<B> for this backend: include ttt/layers/cpu/ttt_kernels.hpp (cpu) or the "
                "backend's TTT kernel header");
};

// d/dx gelu_tanh(x) with the truncated constants of ttt-lm-pytorch's gelu_bwd (ttt_reference
// b.9): matching them keeps TTT-MLP within fp32 rounding of the reference.
TTT_HD inline float gelu_tanh_bwd(float x) {
  const float t = tanhf(0.79788456f * x * (1.f + 0.044715f * x * x));
  return 0.5f * x * ((1.f - t * t) * (0.79788456f + 0.1070322243f * x * x)) + 0.5f * (1.f + t);
}

}  // namespace ttt::layers
