#pragma once
// The backward of TTT-Linear / TTT-MLP (training): gradients of a loss with respect to the
// layer's input and every parameter, as ttt-lm-pytorch's autograd computes them for its
// forward without a cache (whole sequences from the layer's initial fast weights, the
// remainder as a short mini-batch).
//
//   TttTrainOptions     checkpoint_group: mini-batches between stored fast-weight states
//   TttTape<T, B>       what the training forward keeps for the backward
//   ttt_forward_train   y = layer(x), filling a tape
//   ttt_backward        d loss / d(x, parameters) from the tape and dy = d loss / d y
//   ttt_grad            both
//
// Forward (ttt_layer.hpp), per token, in the order the backward undoes it:
//   proj = x [Wq | Wk | Wv | w_lr]ᵀ (+ bias)                    linear
//   q, k = RoPE(proj_q, proj_k) at positions mod K; v = proj_v;
//   lr = base_lr / f · sigmoid(proj_lr + b_lr)                  TttKernels::prologue
//   o = inner(q, k, v, lr; τ, γ, β, W1, b1, W2, b2)             TttKernels::inner
//   yp = LayerNorm_C(o; post_norm);  y' = gelu_tanh(x Wgᵀ) ⊙ yp (use_gate) ; y = y' Woᵀ (+ bias)
// Backward: dy -> dWo, dy' = dy Wo -> (gate: dWg, dx) -> dyp -> layer_norm_backward -> do
// -> TttBackwardKernels::inner_backward (dq, dk, dv, dlr, dτ, dγ, dβ, dW1..) -> RoPE⁻¹ (RoPE
// at -position: a rotation's inverse is its transpose) -> dlogit = dlr · lr (1 - sigmoid) ->
// one product for dx and one for [dWq | dWk | dWv | dw_lr]; dτ -> d learnable_token_idx
// where 1/(i+1) + learnable_token_idx[i] >= 0 (the clamp).
//
// Saved vs recomputed: the tape holds x (shared, not copied), proj ([B, L, 3C + nh] in T),
// the inner loop's output o ([B, L, C] float), the gate's pre-activation ([B, L, C] in T,
// use_gate) and the fast weights before every checkpoint_group-th mini-batch. The backward
// recomputes the prologue (elementwise), post_norm and the gate activation from those, and
// every per-token quantity of the inner loop (Z, G, Z̄, the attention-like K x K products)
// one mini-batch at a time (ttt_backward_kernels.hpp).
//
// Supported: the reference layer (linear / mlp, use_gate, proj_bias). share_qk and the
// video options (l2_norm_qk, ln_target) have no backward yet: the calls throw.
#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/layers/ttt_backward_kernels.hpp"
#include "ttt/layers/ttt_kernels.hpp"
#include "ttt/layers/ttt_layer.hpp"

namespace ttt::layers {

struct TttTrainOptions {
  // Fast weights are stored before every checkpoint_group-th mini-batch; the backward
  // re-runs the forward recurrence inside a group. 1: one state per mini-batch (no re-run);
  // larger: less memory (1 / group of it) for one more key-path pass over the group.
  int64_t checkpoint_group = 1;
};

template <class T, class B>
struct TttTape {
  TttTrainOptions options;
  Tensor<T, B> x;                     // [B, L, C] the input (shares the caller's storage)
  Tensor<T, B> proj;                  // [B, L, 3C + nh] q | k | v | lr logits (+ bias)
  Tensor<float, B> o;                 // [B, L, nh, f] q + LN(z̄), post_norm's input
  Tensor<T, B> gate;                  // [B, L, C] x Wgᵀ before gelu_tanh (use_gate)
  Tensor<float, B> W1c, b1c, W2c, b2c;  // checkpoints (TttInnerBackwardArgs)

  // Bytes the tape holds beyond x.
  int64_t saved_bytes() const {
    int64_t n = 0;
    auto add = [&](const auto& t) { n += t.defined() ? int64_t(t.nbytes()) : 0; };
    add(proj), add(o), add(gate), add(W1c), add(b1c), add(W2c), add(b2c);
    return n;
  }
};

// Gradients: x [B, L, C] and one tensor per parameter under the weight file's name, in the
// shape the file stores it (learnable_ttt_lr_weight [nh, 1, C], W1 [nh, f, F], ...).
template <class B>
struct TttGrads {
  Tensor<float, B> x;
  std::vector<std::pair<std::string, Tensor<float, B>>> params;

  bool contains(const std::string& name) const {
    for (const auto& [n, t] : params)
      if (n == name) return true;
    return false;
  }
  const Tensor<float, B>& operator[](const std::string& name) const {
    for (const auto& [n, t] : params)
      if (n == name) return t;
    fail("TttGrads: no gradient named '", name, "'");
  }
};

namespace detail {

inline void check_trainable(const TttConfig& c, const char* where) {
  TTT_CHECK(!c.share_qk && !c.l2_norm_qk && !c.ln_target, where,
            ": the backward supports the reference layer only (no share_qk, l2_norm_qk or ln_target yet)");
}

// Σ over rows of t [R, N] -> [N] (double accumulation on the CPU).
template <class B>
Tensor<float, B> col_sum(const Tensor<float, B>& t) {
  return ops::reduce(t.transpose(0, 1), Reduce::sum);
}

// Σ over the leading dimension of a contiguous t [N, ...] -> [...] (shape `rest`).
template <class B>
Tensor<float, B> sum_leading(const Tensor<float, B>& t, const Shape& rest) {
  const int64_t N = t.size(0);
  return col_sum(t.reshape({N, t.numel() / N})).reshape(rest);
}

template <class B>
Tensor<int64_t, B> stream_positions(int64_t Bn, int64_t L, int64_t K, bool inverse) {
  std::vector<int64_t> pos(size_t(Bn * L));
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t t = 0; t < L; ++t) pos[size_t(b * L + t)] = inverse ? -(t % K) : t;
  return Tensor<int64_t, B>::from_vector({Bn, L}, pos);
}

// The prologue of the tape's projections: xq, xk, xv [B, nh, L, f], lr [B, nh, L].
template <class T, class B>
void run_prologue(const TttParams<T, B>& p, const Tensor<T, B>& proj, int64_t Bn, int64_t L,
                  TttPrologue<T, B>& pr) {
  const TttConfig& c = p.config;
  const int64_t nh = c.num_heads, f = c.head_dim;
  pr.proj = proj;
  pr.positions = stream_positions<B>(Bn, L, c.mini_batch_size, false);
  pr.lr_bias = p.learnable_ttt_lr_bias;
  pr.ln_weight = p.ttt_norm_weight;
  pr.ln_bias = p.ttt_norm_bias;
  pr.mini_batch_size = c.mini_batch_size;
  pr.rope_theta = c.rope_theta;
  pr.lr_scale = c.base_lr / float(f);
  pr.ln_eps = c.ttt_norm_eps;
  pr.xq = Tensor<float, B>::empty({Bn, nh, L, f});
  pr.xk = Tensor<float, B>::empty({Bn, nh, L, f});
  pr.xv = Tensor<float, B>::empty({Bn, nh, L, f});
  pr.lr = Tensor<float, B>::empty({Bn, nh, L});
  TttKernels<B>::prologue(pr);
}

// TttKernels<B>::inner_checkpointed by pieces, for backends without a kernel for it: the inner
// loop one checkpoint group of ck.every mini-batches at a time, the state copied into the
// group's checkpoint before each. `a` spans the whole sequence (phase 0, out a [B, nh, L, f]
// view). The inputs of the Mf full groups are first copied in group-major order, [Mf, B nh,
// G K w], so that each group's piece is a contiguous slice: one copy per tensor instead of one
// per group (at group 1 the per-group launches, not the arithmetic, set the time). The last
// group, when shorter, is sliced and copied on its own.
template <class B>
void inner_by_groups(const TttInnerArgs<B>& a, const TttFastWeights<B>& fw, const TttCheckpoints<B>& ck) {
  const int64_t Bn = a.xq.size(0), nh = a.xq.size(1), L = a.xq.size(2), f = a.xq.size(3), K = a.mini_batch_size;
  const int64_t G = ck.every, Mc = ttt_num_checkpoints(L, K, G), span = G * K, Mf = Mc > 1 ? L / span : 0;
  const bool mlp = a.kind == TttConfig::Kind::mlp;
  auto grouped = [&](const Tensor<float, B>& t, int64_t w) {  // [B, nh, L(, w)] -> [Mf, B nh, span w]
    Tensor<float, B> full = t.reshape({Bn * nh, L * w});
    if (Mf * span != L) full = full.slice(1, 0, Mf * span * w).contiguous();
    return full.reshape({Bn * nh, Mf, span * w}).transpose(0, 1).contiguous();
  };
  Tensor<float, B> gq, gk, gv, gl;
  if (Mf > 0) gq = grouped(a.xq, f), gk = grouped(a.xk, f), gv = grouped(a.xv, f), gl = grouped(a.lr, 1);
  TttInnerArgs<B> piece = a;
  for (int64_t ci = 0; ci < Mc; ++ci) {
    ck.W1.slice(0, ci * Bn, (ci + 1) * Bn).copy_from(fw.W1);
    ck.b1.slice(0, ci * Bn, (ci + 1) * Bn).copy_from(fw.b1);
    if (mlp) {
      ck.W2.slice(0, ci * Bn, (ci + 1) * Bn).copy_from(fw.W2);
      ck.b2.slice(0, ci * Bn, (ci + 1) * Bn).copy_from(fw.b2);
    }
    const int64_t t0 = ci * span, t1 = std::min(L, t0 + span);
    if (ci < Mf) {
      piece.xq = gq.select(0, ci).reshape({Bn, nh, span, f}), piece.xk = gk.select(0, ci).reshape({Bn, nh, span, f});
      piece.xv = gv.select(0, ci).reshape({Bn, nh, span, f}), piece.lr = gl.select(0, ci).reshape({Bn, nh, span});
    } else {
      auto cut = [&](const Tensor<float, B>& t) { return Mc == 1 ? t : t.slice(2, t0, t1).contiguous(); };
      piece.xq = cut(a.xq), piece.xk = cut(a.xk), piece.xv = cut(a.xv), piece.lr = cut(a.lr);
    }
    piece.out = a.out.slice(2, t0, t1);  // [B, nh, n, f] view
    TttKernels<B>::inner(piece, fw);
  }
}

}  // namespace detail

// The layer on x [B, L, C] from its initial fast weights (a fresh stream), exactly as
// ttt_forward computes it, keeping what ttt_backward needs in `tape` (null: none kept).
template <class T, class B>
Tensor<T, B> ttt_forward_train(const TttParams<T, B>& p, const Tensor<T, B>& x_in, TttTape<T, B>* tape = nullptr,
                               const TttTrainOptions& opt = {}) {
  const TttConfig& c = p.config;
  detail::check_trainable(c, "ttt_forward_train");
  const int64_t C = c.hidden_size, nh = c.num_heads, f = c.head_dim, K = c.mini_batch_size, F = c.inner_dim();
  TTT_CHECK(x_in.rank() == 3 && x_in.size(2) == C && x_in.size(0) > 0 && x_in.size(1) > 0,
            "ttt_forward_train: x must be a non-empty [B, L, ", C, "], got ", x_in.shape().str());
  TTT_CHECK(opt.checkpoint_group >= 1, "ttt_forward_train: checkpoint_group must be >= 1, got ",
            opt.checkpoint_group);
  NoArenaScope<B> no_arena;  // the tape outlives any step
  const Tensor<T, B> x = x_in.contiguous();
  const int64_t Bn = x.size(0), L = x.size(1);

  Tensor<T, B> proj = ops::linear(x, p.qkvl_proj);  // [B, L, 3C + nh]
  if (p.qkvl_bias.defined()) ops::add_(proj, p.qkvl_bias);
  TttInnerArgs<B> a = inner_args(p);
  a.phase = Tensor<int32_t, B>::empty({Bn});
  a.commit = Tensor<uint8_t, B>::empty({Bn});
  TttPrologue<T, B> pr;
  pr.phase = a.phase;
  pr.commit = a.commit;
  detail::run_prologue(p, proj, Bn, L, pr);

  // The inner loop from the initial weights over the whole sequence, writing the state before
  // every G-th mini-batch (TttKernels<B>::inner_checkpointed), or, where the backend has no
  // kernel for that, one checkpoint group at a time: each group starts at phase 0 with zero
  // running sums, so the pieces are the one-call numbers.
  auto s = TttState<B>::init(p, Bn);
  const TttFastWeights<B> fw = s.fast_weights();
  const int64_t G = opt.checkpoint_group, Mc = ttt_num_checkpoints(L, K, G);
  const bool mlp = c.is_mlp();
  Tensor<float, B> W1c = Tensor<float, B>::empty({Mc * Bn, nh, f, F}), b1c = Tensor<float, B>::empty({Mc * Bn, nh, 1, F});
  Tensor<float, B> W2c, b2c;
  if (mlp) {
    W2c = Tensor<float, B>::empty({Mc * Bn, nh, F, f});
    b2c = Tensor<float, B>::empty({Mc * Bn, nh, 1, f});
  }
  const auto o = Tensor<float, B>::empty({Bn, L, nh, f});
  ops::fill(a.phase, 0.0);  // a fresh stream: the first mini-batch starts at phase 0
  a.xq = pr.xq, a.xk = pr.xk, a.xv = pr.xv, a.lr = pr.lr;
  a.out = o.transpose(1, 2);  // [B, nh, L, f] view
  const TttCheckpoints<B> ck{G, W1c, b1c, W2c, b2c};
  if (!TttKernels<B>::inner_checkpointed(a, fw, ck)) detail::inner_by_groups(a, fw, ck);

  Tensor<T, B> y = Tensor<T, B>::empty({Bn, L, C});
  TttKernels<B>::post_norm(y, o.reshape({Bn, L, C}), p.post_norm_weight, p.post_norm_bias, c.post_norm_eps);
  Tensor<T, B> gate_pre;
  if (c.use_gate) {
    gate_pre = ops::linear(x, p.g_proj);
    ops::binary(y, ops::unary(gate_pre, Unary::gelu_tanh), y, Binary::mul);
  }
  Tensor<T, B> out = ops::linear(y, p.o_proj);
  if (p.o_bias.defined()) ops::add_(out, p.o_bias);
  if (tape) {
    tape->options = opt;
    tape->x = x;
    tape->proj = proj;
    tape->o = o;
    tape->gate = gate_pre;
    tape->W1c = W1c, tape->b1c = b1c, tape->W2c = W2c, tape->b2c = b2c;
  }
  return out;
}

// d loss / d(x, every parameter) from a tape of ttt_forward_train and dy = d loss / d y
// [B, L, C]. The parameters must be those the tape was made with.
template <class T, class B>
TttGrads<B> ttt_backward(const TttParams<T, B>& p, const TttTape<T, B>& tape, const Tensor<T, B>& dy) {
  const TttConfig& c = p.config;
  detail::check_trainable(c, "ttt_backward");
  TTT_CHECK(tape.proj.defined(), "ttt_backward: empty tape (run ttt_forward_train with a tape first)");
  const int64_t C = c.hidden_size, nh = c.num_heads, f = c.head_dim, K = c.mini_batch_size, F = c.inner_dim();
  const int64_t Bn = tape.x.size(0), L = tape.x.size(1), BL = Bn * L, P = 3 * C + nh;
  TTT_CHECK(dy.shape() == tape.x.shape(), "ttt_backward: dy ", dy.shape().str(), " for x ", tape.x.shape().str());
  NoArenaScope<B> no_arena;
  const bool mlp = c.is_mlp();
  auto as_float = [](const Tensor<T, B>& t) { return ops::cast<float>(t).contiguous(); };
  const Tensor<float, B> o2 = tape.o.reshape({BL, C});
  TttGrads<B> g;
  auto put = [&](const std::string& name, const Tensor<float, B>& t) { g.params.emplace_back(name, t); };

  // The projections' products: in float for a float layer; with T operands (bf16: tensor
  // cores, fp32 accumulation) for a T layer, like its forward, the results widened to float.
  // prod(a, b) = a b for operands already in T (dy, x, the weights) or rounded to T.
  constexpr bool wide = std::is_same_v<T, float>;
  auto in_t = [](const Tensor<float, B>& t) {
    if constexpr (wide) return t;
    else return ops::cast<T>(t);
  };
  auto prod = [](const Tensor<T, B>& a, const Tensor<T, B>& b) {
    if constexpr (wide) return ops::matmul(a, b);
    else return ops::cast<float>(ops::matmul(a, b));
  };
  const Tensor<T, B> dyT = dy.contiguous().reshape({BL, C}), xT = tape.x.reshape({BL, C});

  // y = y' Woᵀ (+ b): dWo = dyᵀ y', dy' = dy Wo.
  Tensor<float, B> yp = ops::layer_norm(o2, p.post_norm_weight, p.post_norm_bias, c.post_norm_eps);
  Tensor<float, B> Y = yp, gact, gpre;
  if (c.use_gate) {
    gpre = as_float(tape.gate).reshape({BL, C});
    gact = ops::unary(gpre, Unary::gelu_tanh);
    Y = ops::mul(yp, gact);
  }
  const Tensor<float, B> dWo = prod(dyT.transpose(0, 1), in_t(Y));
  const Tensor<float, B> dY = prod(dyT, p.o_proj);
  // y' = gelu_tanh(x Wgᵀ) ⊙ yp
  Tensor<float, B> dyp = dY, dWg, dx_gate;
  if (c.use_gate) {
    dyp = ops::mul(dY, gact);
    const Tensor<T, B> dgpre = in_t(ops::unary_backward(gpre, ops::mul(dY, yp), Unary::gelu_tanh));
    dWg = prod(dgpre.transpose(0, 1), xT);
    dx_gate = prod(dgpre, p.g_proj);
  }
  // yp = LayerNorm_C(o)
  const auto do2 = Tensor<float, B>::empty({BL, C});
  const auto dpost_w = Tensor<float, B>::empty({C}), dpost_b = Tensor<float, B>::empty({C});
  ops::layer_norm_backward(do2, dpost_w, dpost_b, o2, p.post_norm_weight, dyp, c.post_norm_eps);

  // The inner loop, from the recomputed prologue.
  TttPrologue<T, B> pr;
  detail::run_prologue(p, tape.proj, Bn, L, pr);
  TttInnerBackwardArgs<B> ba;
  ba.kind = c.kind;
  ba.mini_batch_size = K;
  ba.eps = c.ttt_norm_eps;
  ba.xq = pr.xq, ba.xk = pr.xk, ba.xv = pr.xv, ba.lr = pr.lr;
  ba.tau = p.tau;
  ba.ln_weight = p.ttt_norm_weight;
  ba.ln_bias = p.ttt_norm_bias;
  ba.group = tape.options.checkpoint_group;
  ba.W1c = tape.W1c, ba.b1c = tape.b1c, ba.W2c = tape.W2c, ba.b2c = tape.b2c;
  ba.dout = do2.reshape({Bn, L, nh, f}).transpose(1, 2);
  ba.dxq = Tensor<float, B>::empty({Bn, nh, L, f});
  ba.dxk = Tensor<float, B>::empty({Bn, nh, L, f});
  ba.dxv = Tensor<float, B>::empty({Bn, nh, L, f});
  ba.dlr = Tensor<float, B>::empty({Bn, nh, L});
  ba.dtau = Tensor<float, B>::empty({Bn, nh, K});
  ba.dln_weight = Tensor<float, B>::empty({Bn, nh, f});
  ba.dln_bias = Tensor<float, B>::empty({Bn, nh, f});
  ba.dW1 = Tensor<float, B>::empty({Bn, nh, f, F});
  ba.db1 = Tensor<float, B>::empty({Bn, nh, 1, F});
  if (mlp) {
    ba.dW2 = Tensor<float, B>::empty({Bn, nh, F, f});
    ba.db2 = Tensor<float, B>::empty({Bn, nh, 1, f});
  }
  TttBackwardKernels<B>::inner_backward(ba);

  // The prologue: RoPE⁻¹ on dq, dk; the sigmoid on dlr.
  const auto dproj = Tensor<float, B>::empty({Bn, L, P});
  const auto inv_pos = detail::stream_positions<B>(Bn, L, K, true);
  auto unrotate = [&](const Tensor<float, B>& d, int64_t col) {
    Tensor<float, B> t = d.transpose(1, 2).contiguous();  // [B, L, nh, f]
    ops::rope(t, t, inv_pos, c.rope_theta);
    dproj.slice(2, col, col + C).copy_from(t.reshape({Bn, L, C}));
  };
  unrotate(ba.dxq, 0);
  unrotate(ba.dxk, C);
  dproj.slice(2, 2 * C, 3 * C).copy_from(ba.dxv.transpose(1, 2).contiguous().reshape({Bn, L, C}));
  auto logits = Tensor<float, B>::empty({Bn, L, nh});
  ops::cast(logits, tape.proj.slice(2, 3 * C, P));
  ops::add_(logits, p.learnable_ttt_lr_bias);
  const Tensor<float, B> dlogit = ops::unary_backward(logits, ba.dlr.transpose(1, 2).contiguous(), Unary::sigmoid);
  ops::unary(dlogit, dlogit, Unary::scale, c.base_lr / float(f));
  dproj.slice(2, 3 * C, P).copy_from(dlogit);

  // proj = x [Wq | Wk | Wv | w_lr]ᵀ: dx += dproj W, dW = dprojᵀ x.
  const Tensor<float, B> dproj2 = dproj.reshape({BL, P});
  const Tensor<T, B> dprojT = in_t(dproj2);
  const Tensor<float, B> dx2 = prod(dprojT, p.qkvl_proj);
  if (c.use_gate) ops::binary(dx2, dx2, dx_gate, Binary::add);
  const Tensor<float, B> dW = prod(dprojT.transpose(0, 1), xT);  // [3C + nh, C]
  const Tensor<float, B> dbias = p.qkvl_bias.defined() ? detail::col_sum(dproj2) : Tensor<float, B>{};

  // τ_i = max(0, 1/(i+1) + learnable_token_idx[i]).
  std::vector<float> dtau = detail::sum_leading(ba.dtau.reshape({Bn * nh, K}), Shape{K}).to_vector();
  const std::vector<float> lti = p.learnable_token_idx.to_vector();
  for (int64_t i = 0; i < K; ++i)
    if (1.f / float(i + 1) + lti[size_t(i)] < 0.f) dtau[size_t(i)] = 0.f;

  put("q_proj.weight", dW.slice(0, 0, C));
  put("k_proj.weight", dW.slice(0, C, 2 * C));
  put("v_proj.weight", dW.slice(0, 2 * C, 3 * C));
  put("o_proj.weight", dWo);
  if (c.use_gate) put("g_proj.weight", dWg);
  if (dbias.defined()) {
    put("q_proj.bias", dbias.slice(0, 0, C));
    put("k_proj.bias", dbias.slice(0, C, 2 * C));
    put("v_proj.bias", dbias.slice(0, 2 * C, 3 * C));
  }
  if (p.o_bias.defined()) put("o_proj.bias", detail::col_sum(as_float(dy).reshape({BL, C})));
  put("learnable_ttt_lr_weight", dW.slice(0, 3 * C, P).reshape({nh, 1, C}));
  put("learnable_ttt_lr_bias", detail::col_sum(dlogit.reshape({BL, nh})).reshape({nh, 1}));
  put("learnable_token_idx", Tensor<float, B>::from_vector({K}, dtau));
  put("ttt_norm_weight", detail::sum_leading(ba.dln_weight, Shape{nh, f}));
  put("ttt_norm_bias", detail::sum_leading(ba.dln_bias, Shape{nh, f}));
  put("post_norm.weight", dpost_w);
  put("post_norm.bias", dpost_b);
  put("W1", detail::sum_leading(ba.dW1, Shape{nh, f, F}));
  put("b1", detail::sum_leading(ba.db1, Shape{nh, 1, F}));
  if (mlp) {
    put("W2", detail::sum_leading(ba.dW2, Shape{nh, F, f}));
    put("b2", detail::sum_leading(ba.db2, Shape{nh, 1, f}));
  }
  g.x = dx2.reshape({Bn, L, C});
  return g;
}

template <class T, class B>
struct TttGradResult {
  Tensor<T, B> y;
  TttGrads<B> grads;
};

// y = layer(x) and the gradients of sum(y ⊙ dy) (any loss whose gradient at y is dy).
template <class T, class B>
TttGradResult<T, B> ttt_grad(const TttParams<T, B>& p, const Tensor<T, B>& x, const Tensor<T, B>& dy,
                             const TttTrainOptions& opt = {}) {
  TttTape<T, B> tape;
  TttGradResult<T, B> r;
  r.y = ttt_forward_train(p, x, &tape, opt);
  r.grads = ttt_backward(p, tape, dy);
  return r;
}

}  // namespace ttt::layers
