#pragma once
// TTT-Linear and TTT-MLP layers (ttt-lm-pytorch's TTTLinear / TTTMLP.forward), streaming.
//
//   TttParams<T, B>  the layer's weights (immutable after load; projections in T, the inner
//                    model's parameters in float)
//   TttState<B>      what changes while streaming: per batch item fast weights, running
//                    gradient sums, token count, conv history; always float32
//   ttt_forward      y = layer(x) for any number of new tokens, updating the state
//
// Any split of a stream into calls gives the outputs of one call (the reference itself
// only accepts calls aligned to mini-batches): the inner loop cuts every call at
// mini-batch boundaries (ttt_kernels.hpp). Batch items may sit at different offsets (after
// a per-item reset) and a call may leave chosen items' states untouched (exec_mask).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/arena.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/layers/ttt_config.hpp"
#include "ttt/layers/ttt_kernels.hpp"

namespace ttt::layers {

namespace detail {

// Host weights stay where they are on the CPU (zero-copy views of the mapped checkpoint
// when the dtype matches); other backends get a copy.
template <class B, class T>
Tensor<T, B> upload(const Tensor<T, Cpu>& t) {
  if constexpr (std::is_same_v<B, Cpu>) return t.contiguous();
  else return t.template to<B>();
}

inline std::string shape_mismatch(const std::string& file, const std::string& name, const Shape& got,
                                  const Shape& want) {
  return str(file, ": tensor '", name, "' has shape ", got.str(), ", expected ", want.str());
}

}  // namespace detail

template <class T, class B>
struct TttParams {
  TttConfig config;
  Tensor<T, B> q_proj, k_proj, v_proj, o_proj;  // [C, C] nn.Linear [out, in]; k_proj absent with share_qk
  // Without share_qk, q/k/v_proj (and their biases) and the inner-lr weight (in T) are row
  // blocks of one [3C + nh, C] weight: a decode step reads them in one matrix-vector product
  // and TttKernels<B>::prologue turns its output into the inner loop's inputs in one pass.
  // (In bf16 the lr logits are then bf16 products, as in ttt-lm-kernels' fused
  // qkv_learnable_ttt_lr_proj; the sigmoid and everything after it stay float.)
  Tensor<T, B> qkvl_proj, qkvl_bias;  // [3C + nh, C], [3C + nh] (zero lr part)
  Tensor<T, B> g_proj;                          // [C, C] (use_gate)
  Tensor<T, B> q_bias, k_bias, v_bias, o_bias;  // [C] (proj_bias)
  Tensor<float, B> conv_q_weight, conv_k_weight;  // [C, kc] (share_qk)
  Tensor<float, B> conv_q_bias, conv_k_bias;      // [C]
  Tensor<float, B> learnable_ttt_lr_weight;  // [nh, C] (stored [nh, 1, C])
  Tensor<float, B> learnable_ttt_lr_bias;    // [nh]    (stored [nh, 1])
  Tensor<float, B> learnable_token_idx;      // [K]
  Tensor<float, B> ttt_norm_weight, ttt_norm_bias;    // [nh, f]
  Tensor<float, B> post_norm_weight, post_norm_bias;  // [C]
  Tensor<float, B> W1, b1;  // [nh, f, F], [nh, 1, F]: the fast weights every stream starts from
  Tensor<float, B> W2, b2;  // [nh, F, f], [nh, 1, f] (mlp)
  Tensor<float, B> tau;     // [K] derived: max(0, 1/(i+1) + learnable_token_idx[i])

  // Reads ttt-lm-pytorch's names under `prefix` (e.g. "" or "transformer.layers.3.ttt.").
  // Missing tensors are initialised as ttt-lm-pytorch initialises them when the source is in
  // random-init mode or `allow_missing` is set; otherwise a missing or mis-shaped tensor
  // throws naming the file and key.
  static TttParams load(io::WeightSource& ws, const std::string& prefix, const TttConfig& cfg,
                        bool allow_missing = false) {
    TttParams p;
    p.config = cfg;
    const int64_t C = cfg.hidden_size, nh = cfg.num_heads, f = cfg.head_dim, K = cfg.mini_batch_size;
    const int64_t F = cfg.inner_dim(), kc = cfg.conv_kernel;
    NoArenaScope<B> no_arena;  // weights outlive any step
    const auto normal = io::Init::normal(0.02f), zeros = io::Init::constant(0.f), ones = io::Init::constant(1.f);
    auto get_t = [&](const std::string& name, const Shape& s, io::Init init) {
      return detail::upload<B>(ws.get_or_init<T>(prefix + name, s, init, allow_missing));
    };
    auto get_f = [&](const std::string& name, const Shape& s, io::Init init) {
      return detail::upload<B>(ws.get_or_init<float>(prefix + name, s, init, allow_missing));
    };
    // Rows [0, C) q, [C, 2C) k, [2C, 3C) v, [3C, 3C + nh) tail() of one host tensor, uploaded
    // once; the parameters are views of it.
    auto fused = [&](const char* suffix, const Shape& s1, io::Init init, auto tail_fn) {
      std::vector<Tensor<T, Cpu>> parts;
      for (const char* n : {"q_proj", "k_proj", "v_proj"})
        parts.push_back(ws.get_or_init<T>(prefix + n + suffix, s1, init, allow_missing));
      const Tensor<T, Cpu> tail = tail_fn();
      Shape s3 = s1;
      s3.d[0] = 3 * s1.d[0] + tail.size(0);
      auto cat = Tensor<T, Cpu>::empty(s3);
      for (int i = 0; i < 3; ++i) cat.slice(0, i * s1.d[0], (i + 1) * s1.d[0]).copy_from(parts[size_t(i)]);
      cat.slice(0, 3 * s1.d[0], 3 * s1.d[0] + tail.size(0)).copy_from(tail);
      return detail::upload<B>(cat);
    };
    if (!cfg.share_qk) {
      p.qkvl_proj = fused(".weight", {C, C}, normal, [&] {
        return ws.get_or_init<T>(prefix + "learnable_ttt_lr_weight", {nh, 1, C}, normal, allow_missing)
            .contiguous()
            .reshape({nh, C});
      });
      p.q_proj = p.qkvl_proj.slice(0, 0, C), p.k_proj = p.qkvl_proj.slice(0, C, 2 * C);
      p.v_proj = p.qkvl_proj.slice(0, 2 * C, 3 * C);
    } else {
      p.q_proj = get_t("q_proj.weight", {C, C}, normal);
      p.v_proj = get_t("v_proj.weight", {C, C}, normal);
    }
    p.o_proj = get_t("o_proj.weight", {C, C}, normal);
    if (cfg.use_gate) p.g_proj = get_t("g_proj.weight", {C, C}, normal);
    if (cfg.proj_bias) {
      if (!cfg.share_qk) {
        p.qkvl_bias = fused(".bias", {C}, zeros, [&] { return Tensor<T, Cpu>::zeros({nh}); });
        p.q_bias = p.qkvl_bias.slice(0, 0, C), p.k_bias = p.qkvl_bias.slice(0, C, 2 * C);
        p.v_bias = p.qkvl_bias.slice(0, 2 * C, 3 * C);
      } else {
        p.q_bias = get_t("q_proj.bias", {C}, zeros);
        p.v_bias = get_t("v_proj.bias", {C}, zeros);
      }
      p.o_bias = get_t("o_proj.bias", {C}, zeros);
    }
    if (cfg.share_qk) {
      // Spread like PyTorch's Conv1d default (uniform ±1/sqrt(kc)) for missing weights.
      const auto conv_init = io::Init::normal(1.f / std::sqrt(3.f * float(kc)));
      p.conv_q_weight = get_f("conv_q.weight", {C, 1, kc}, conv_init).reshape({C, kc});
      p.conv_q_bias = get_f("conv_q.bias", {C}, zeros);
      p.conv_k_weight = get_f("conv_k.weight", {C, 1, kc}, conv_init).reshape({C, kc});
      p.conv_k_bias = get_f("conv_k.bias", {C}, zeros);
    }
    p.learnable_ttt_lr_weight = get_f("learnable_ttt_lr_weight", {nh, 1, C}, normal).reshape({nh, C});
    p.learnable_ttt_lr_bias = get_f("learnable_ttt_lr_bias", {nh, 1}, zeros).reshape({nh});
    p.learnable_token_idx = get_f("learnable_token_idx", {K}, zeros);
    p.ttt_norm_weight = get_f("ttt_norm_weight", {nh, f}, ones);
    p.ttt_norm_bias = get_f("ttt_norm_bias", {nh, f}, zeros);
    p.post_norm_weight = get_f("post_norm.weight", {C}, ones);
    p.post_norm_bias = get_f("post_norm.bias", {C}, zeros);
    p.W1 = get_f("W1", {nh, f, F}, normal);
    p.b1 = get_f("b1", {nh, 1, F}, zeros);
    if (cfg.is_mlp()) {
      p.W2 = get_f("W2", {nh, F, f}, normal);
      p.b2 = get_f("b2", {nh, 1, f}, zeros);
    }
    p.update_derived();
    return p;
  }

  // Trained parameters (the derived tau and the fused views not counted twice).
  int64_t num_params() const {
    int64_t n = 0;
    auto add = [&](const auto& t) { n += t.defined() ? t.numel() : 0; };
    add(q_proj), add(k_proj), add(v_proj), add(o_proj), add(g_proj);
    add(q_bias), add(k_bias), add(v_bias), add(o_bias);
    add(conv_q_weight), add(conv_q_bias), add(conv_k_weight), add(conv_k_bias);
    add(learnable_ttt_lr_weight), add(learnable_ttt_lr_bias), add(learnable_token_idx);
    add(ttt_norm_weight), add(ttt_norm_bias), add(post_norm_weight), add(post_norm_bias);
    add(W1), add(b1), add(W2), add(b2);
    return n;
  }

  // Recomputes tau; call after changing learnable_token_idx.
  void update_derived() {
    NoArenaScope<B> no_arena;
    const auto lti = learnable_token_idx.to_vector();
    std::vector<float> t(lti.size());
    for (size_t i = 0; i < t.size(); ++i) t[i] = std::max(0.f, 1.f / float(i + 1) + lti[i]);
    tau = detail::upload<B>(Tensor<float, Cpu>::from_vector({int64_t(t.size())}, t));
  }
};

// Copies share storage (like Tensor): take a snapshot with clone(), restore by assigning a
// clone of it.
template <class B>
struct TttState {
  TttConfig config;
  int64_t batch = 0;
  // Fast weights at the start of each item's current mini-batch ([B, nh, ...], float32).
  Tensor<float, B> W1_states, b1_states, W2_states, b2_states;
  // Running sums over the tokens of the current mini-batch seen so far (not scaled by τ).
  Tensor<float, B> W1_grad, b1_grad, W2_grad, b2_grad;
  Tensor<float, B> conv_states;  // [B, C, conv_kernel] last conv inputs, oldest first (share_qk)
  std::vector<int64_t> offset;   // [B] tokens seen per item; mini-batch phase = offset % K

  template <class T>
  static TttState init(const TttParams<T, B>& p, int64_t batch) {
    TTT_CHECK(batch > 0, "TttState::init: batch must be > 0, got ", batch);
    NoArenaScope<B> no_arena;  // the state outlives any step
    TttState s;
    s.config = p.config;
    s.batch = batch;
    s.W1_init_ = p.W1;
    s.b1_init_ = p.b1;
    s.W2_init_ = p.W2;
    s.b2_init_ = p.b2;
    auto tiled = [&](const Tensor<float, B>& w) {
      Shape sh = Shape::of_rank(w.rank() + 1);
      sh.d[0] = batch;
      for (int i = 0; i < w.rank(); ++i) sh.d[i + 1] = w.shape().d[i];
      return Tensor<float, B>::empty(sh);
    };
    s.W1_states = tiled(p.W1);
    s.b1_states = tiled(p.b1);
    s.W1_grad = tiled(p.W1);
    s.b1_grad = tiled(p.b1);
    if (p.config.is_mlp()) {
      s.W2_states = tiled(p.W2);
      s.b2_states = tiled(p.b2);
      s.W2_grad = tiled(p.W2);
      s.b2_grad = tiled(p.b2);
    }
    if (p.config.share_qk) s.conv_states = Tensor<float, B>::empty({batch, p.config.hidden_size, p.config.conv_kernel});
    s.offset.assign(size_t(batch), 0);
    s.reset();
    return s;
  }

  bool defined() const { return batch > 0; }

  // Host bookkeeping of a ttt_forward_at call of L tokens: committing items move on.
  void advance(int64_t L, const std::vector<uint8_t>& exec) {
    TTT_CHECK(exec.empty() || int64_t(exec.size()) == batch, "TttState::advance: exec mask has ", exec.size(),
              " entries for batch ", batch);
    for (int64_t b = 0; b < batch; ++b)
      if (exec.empty() || exec[size_t(b)]) offset[size_t(b)] += L;
  }

  // Back to the layer's initial weights, zero sums, zero conv history, offset 0.
  void reset() {
    for (int64_t b = 0; b < batch; ++b) reset_item(b);
  }
  // Per batch item: items whose mask entry is non-zero are reset.
  void reset(const std::vector<uint8_t>& mask) {
    TTT_CHECK(int64_t(mask.size()) == batch, "TttState::reset: mask has ", mask.size(), " entries for batch ", batch);
    for (int64_t b = 0; b < batch; ++b)
      if (mask[size_t(b)]) reset_item(b);
  }
  void reset(const Tensor<uint8_t, B>& mask) {
    TTT_CHECK(mask.numel() == batch, "TttState::reset: mask ", mask.shape().str(), " for batch ", batch);
    reset(mask.to_vector());
  }

  // A deep copy (snapshot); restore by assigning it back. The initial weights are shared.
  TttState clone() const {
    NoArenaScope<B> no_arena;
    TttState s = *this;
    for (Tensor<float, B>* t : s.mutable_tensors())
      if (t->defined()) *t = t->clone();
    return s;
  }

  // Item src_b of `src` (a state of the same layer, any batch) into item dst_b of this one.
  void copy_item(int64_t dst_b, const TttState& src, int64_t src_b) {
    TTT_CHECK(0 <= dst_b && dst_b < batch && 0 <= src_b && src_b < src.batch, "TttState::copy_item: item ", src_b,
              " of ", src.batch, " into ", dst_b, " of ", batch);
    const auto d = named(), s = src.named();
    TTT_CHECK(d.size() == s.size(), "TttState::copy_item: states of different layers");
    for (size_t i = 0; i < d.size(); ++i)
      d[i].second->select(0, dst_b).copy_from(s[i].second->select(0, src_b));
    offset[size_t(dst_b)] = src.offset[size_t(src_b)];
  }

  // Names as the fixtures and ttt-lm-pytorch's TTTCache: W1_states, b1_states, W1_grad,
  // b1_grad (+ W2/b2 for mlp), conv_states (share_qk), and offset (I64 [B]).
  void save(io::SafeTensorsWriter& w, const std::string& prefix) const {
    for (auto& [name, t] : named()) w.add(prefix + name, *t);
    w.add(prefix + "offset", Tensor<int64_t, Cpu>::from_vector({batch}, offset));
  }

  // Overwrites this state (made by init for the same layer and batch) from `st`.
  void load(const io::SafeTensors& st, const std::string& prefix) {
    NoArenaScope<B> no_arena;
    for (auto& [name, t] : named()) {
      const std::string key = prefix + name;
      const Shape got = st.info(key).shape;
      if (got != t->shape()) fail(detail::shape_mismatch(st.path(), key, got, t->shape()));
      t->copy_from(st.load<float>(key).template to<B>());
    }
    const std::string key = prefix + "offset";
    const Shape got = st.info(key).shape;
    if (got != Shape{batch}) fail(detail::shape_mismatch(st.path(), key, got, Shape{batch}));
    const auto off = st.load_counters(key);
    offset = off;
  }

  // Views handed to TttKernels<B>::inner.
  TttFastWeights<B> fast_weights() const {
    return {W1_states, b1_states, W2_states, b2_states, W1_grad, b1_grad, W2_grad, b2_grad};
  }

 private:
  Tensor<float, B> W1_init_, b1_init_, W2_init_, b2_init_;  // the layer's W1, b1, W2, b2 (shared)

  std::vector<Tensor<float, B>*> mutable_tensors() {
    return {&W1_states, &b1_states, &W2_states, &b2_states, &W1_grad, &b1_grad, &W2_grad, &b2_grad, &conv_states};
  }
  std::vector<std::pair<std::string, const Tensor<float, B>*>> named() const {
    std::vector<std::pair<std::string, const Tensor<float, B>*>> v = {
        {"W1_states", &W1_states}, {"b1_states", &b1_states}, {"W1_grad", &W1_grad}, {"b1_grad", &b1_grad}};
    if (config.is_mlp()) {
      v.push_back({"W2_states", &W2_states});
      v.push_back({"b2_states", &b2_states});
      v.push_back({"W2_grad", &W2_grad});
      v.push_back({"b2_grad", &b2_grad});
    }
    if (config.share_qk) v.push_back({"conv_states", &conv_states});
    return v;
  }

  void reset_item(int64_t b) {
    W1_states.select(0, b).copy_from(W1_init_);
    b1_states.select(0, b).copy_from(b1_init_);
    ops::fill(W1_grad.select(0, b), 0.0);
    ops::fill(b1_grad.select(0, b), 0.0);
    if (config.is_mlp()) {
      W2_states.select(0, b).copy_from(W2_init_);
      b2_states.select(0, b).copy_from(b2_init_);
      ops::fill(W2_grad.select(0, b), 0.0);
      ops::fill(b2_grad.select(0, b), 0.0);
    }
    if (conv_states.defined()) ops::fill(conv_states.select(0, b), 0.0);
    offset[size_t(b)] = 0;
  }
};

// The inner loop's arguments that come from the parameters alone (the forward and the training
// forward add the per-call tensors).
template <class T, class B>
TttInnerArgs<B> inner_args(const TttParams<T, B>& p) {
  TttInnerArgs<B> a;
  a.kind = p.config.kind;
  a.mini_batch_size = p.config.mini_batch_size;
  a.eps = p.config.ttt_norm_eps;
  // The bf16 (f16) layer lets the inner loop's products run on bf16 operands.
  a.operands = std::is_same_v<T, float> ? TttOperands::fp32 : TttOperands::bf16;
  a.tau = p.tau;
  a.ln_weight = p.ttt_norm_weight;
  a.ln_bias = p.ttt_norm_bias;
  return a;
}

// The layer on x [B, L, C] (the block's normalised input), continuing each item's stream
// from `state`, with every step-dependent value made on the backend from `positions` [B, L]
// (each token's position in its stream since reset: the state's offset + t) and `exec`
// [B] (undefined: every item commits): RoPE positions mod K, each item's mini-batch phase
// and commit flag. A call thus holds no host value that changes from step to step, so a
// decode step can be captured once and replayed as a CUDA graph. Returns y [B, L, C] (after
// post_norm, the optional gate and o_proj). Items whose exec entry is 0 are computed from
// their state but their state (weights, sums, conv history) is left as it was. The host
// offsets are not moved: call ttt_advance after the call (outside captured work), or use
// ttt_forward, which does both. `workspace`: the session's persistent scratch, where a
// backend's one-kernel step keeps what must outlive the call (null: per-call scratch).
template <class T, class B>
Tensor<T, B> ttt_forward_at(const TttParams<T, B>& p, TttState<B>& s, const Tensor<T, B>& x_in,
                            const Tensor<int64_t, B>& positions, const Tensor<uint8_t, B>& exec,
                            Workspace<B>* workspace = nullptr) {
  const TttConfig& c = p.config;
  const int64_t C = c.hidden_size, nh = c.num_heads, f = c.head_dim, K = c.mini_batch_size;
  TTT_CHECK(x_in.rank() == 3 && x_in.size(2) == C, "ttt_forward: x must be [B, L, ", C, "], got ",
            x_in.shape().str());
  const int64_t Bn = x_in.size(0), L = x_in.size(1);
  TTT_CHECK(Bn == s.batch, "ttt_forward: x has batch ", Bn, " but the state was made for batch ", s.batch);
  TTT_CHECK(s.config.hidden_size == C && s.config.num_heads == nh && s.config.kind == c.kind &&
                s.config.mini_batch_size == K && s.config.inner_dim() == c.inner_dim() &&
                s.config.share_qk == c.share_qk,
            "ttt_forward: the state was made for a different layer (", s.config.kind_name(), ", C ",
            s.config.hidden_size, ", ", s.config.num_heads, " heads) than the parameters (", c.kind_name(), ", C ", C,
            ", ", nh, " heads)");
  TTT_CHECK(positions.rank() == 2 && positions.size(0) == Bn && positions.size(1) == L, "ttt_forward: positions ",
            positions.shape().str(), " for x ", x_in.shape().str());
  TTT_CHECK(!exec.defined() || exec.numel() == Bn, "ttt_forward: exec mask ", exec.shape().str(), " for batch ", Bn);
  if (L == 0) return Tensor<T, B>::empty({Bn, 0, C});
  const Tensor<T, B> x = x_in.contiguous();

  TttInnerArgs<B> a = inner_args(p);
  // The per-item flags [B] of a call that is not one kernel (see `done` below).
  auto make_flags = [&] {
    a.phase = Tensor<int32_t, B>::empty({Bn});
    a.commit = Tensor<uint8_t, B>::empty({Bn});
  };

  // The inner loop writes token-major (heads concatenated, c = h*f + d) for post_norm.
  const auto o = Tensor<float, B>::empty({Bn, L, nh, f});
  a.out = o.transpose(1, 2);  // [B, nh, L, f] view
  Tensor<T, B> y = Tensor<T, B>::empty({Bn, L, C});
  bool done = false;  // y made by one kernel (TttKernels<B>::step)

  if (!c.share_qk) {
    // One product for q, k, v and the lr logits, then one pass to the inner loop's inputs.
    Tensor<T, B> proj = ops::linear(x, p.qkvl_proj);  // [B, L, 3C + nh]
    if (p.qkvl_bias.defined()) ops::add_(proj, p.qkvl_bias);
    TttPrologue<T, B> pr;
    pr.proj = proj;
    pr.positions = positions;
    pr.exec = exec;
    pr.lr_bias = p.learnable_ttt_lr_bias;
    pr.ln_weight = p.ttt_norm_weight;
    pr.ln_bias = p.ttt_norm_bias;
    pr.mini_batch_size = K;
    pr.rope_theta = c.rope_theta;
    pr.lr_scale = c.base_lr / float(f);
    pr.ln_eps = c.ttt_norm_eps;
    pr.l2_norm_qk = c.l2_norm_qk;
    pr.ln_target = c.ln_target;
    TttStep<T, B> st{pr, a, y, p.post_norm_weight, p.post_norm_bias, c.post_norm_eps, workspace};
    done = TttKernels<B>::step(st, s.fast_weights());
    if (!done) {
      make_flags();
      pr.xq = Tensor<float, B>::empty({Bn, nh, L, f});
      pr.xk = Tensor<float, B>::empty({Bn, nh, L, f});
      pr.xv = Tensor<float, B>::empty({Bn, nh, L, f});
      pr.lr = Tensor<float, B>::empty({Bn, nh, L});
      pr.phase = a.phase;
      pr.commit = a.commit;
      TttKernels<B>::prologue(pr);
      a.xq = pr.xq, a.xk = pr.xk, a.xv = pr.xv, a.lr = pr.lr;
    }
  } else {
    // share_qk: q and k come from one projection through the causal convs.
    make_flags();
    auto rope_positions = Tensor<int64_t, B>::empty({Bn, L});  // mod K
    TttKernels<B>::call_flags(positions, exec, 0, K, rope_positions, a.phase, a.commit);
    auto project = [&](const Tensor<T, B>& w, const Tensor<T, B>& bias) {
      Tensor<T, B> yp = ops::linear(x, w);
      if (bias.defined()) ops::add_(yp, bias);
      return ops::cast<float>(yp);  // [B, L, C]
    };
    const Tensor<float, B> xqk = project(p.q_proj, p.q_bias);
    auto xq = Tensor<float, B>::empty({Bn, L, C}), xk = Tensor<float, B>::empty({Bn, L, C});
    TttKernels<B>::causal_conv(xq, xk, xqk, s.conv_states, p.conv_q_weight, p.conv_q_bias, p.conv_k_weight,
                               p.conv_k_bias, a.commit);
    Tensor<float, B> q4 = xq.reshape({Bn, L, nh, f}), k4 = xk.reshape({Bn, L, nh, f});
    Tensor<float, B> v4 = project(p.v_proj, p.v_bias).reshape({Bn, L, nh, f});
    if (c.l2_norm_qk) {
      TttKernels<B>::l2_normalize(q4);
      TttKernels<B>::l2_normalize(k4);
    }
    // Interleaved RoPE at positions taken mod K, each item from its own offset.
    ops::rope(q4, q4, rope_positions, c.rope_theta);
    ops::rope(k4, k4, rope_positions, c.rope_theta);
    if (c.ln_target) TttKernels<B>::ln_target(v4, k4, p.ttt_norm_weight, p.ttt_norm_bias, c.ttt_norm_eps);
    // Token-wise inner learning rate lr_t^h = base_lr * sigmoid(x_t · w_h + b_h) / f, in
    // float whatever T is: it scales every gradient of the inner loop.
    Tensor<float, B> lr = ops::linear(ops::cast<float>(x), p.learnable_ttt_lr_weight);  // [B, L, nh]
    ops::add_(lr, p.learnable_ttt_lr_bias);
    ops::unary(lr, lr, Unary::sigmoid);
    ops::unary(lr, lr, Unary::scale, c.base_lr / float(f));
    a.xq = q4.transpose(1, 2).contiguous();  // [B, nh, L, f]
    a.xk = k4.transpose(1, 2).contiguous();
    a.xv = v4.transpose(1, 2).contiguous();
    a.lr = lr.transpose(1, 2).contiguous();  // [B, nh, L]
  }

  if (!done) {
    TttKernels<B>::inner(a, s.fast_weights());
    TttKernels<B>::post_norm(y, o.reshape({Bn, L, C}), p.post_norm_weight, p.post_norm_bias, c.post_norm_eps);
  }
  if (c.use_gate) {
    Tensor<T, B> g = ops::linear(x, p.g_proj);
    ops::unary(g, g, Unary::gelu_tanh);
    ops::binary(y, g, y, Binary::mul);
  }
  Tensor<T, B> out = ops::linear(y, p.o_proj);
  if (p.o_bias.defined()) ops::add_(out, p.o_bias);
  return out;
}

// Host bookkeeping of a ttt_forward_at call of L tokens: committing items move on.
template <class B>
void ttt_advance(TttState<B>& s, int64_t L, const std::vector<uint8_t>& exec) {
  s.advance(L, exec);
}

// The eager form: the tokens' stream positions (each item's offset + t) and the exec mask
// (empty: all execute) are uploaded, the call runs exactly as a graph step does
// (ttt_forward_at), then the host offsets move on (ttt_advance).
template <class T, class B>
Tensor<T, B> ttt_forward(const TttParams<T, B>& p, TttState<B>& s, const Tensor<T, B>& x,
                         const std::vector<uint8_t>& exec) {
  TTT_CHECK(x.rank() == 3, "ttt_forward: x must be [B, L, C], got ", x.shape().str());
  const int64_t Bn = x.size(0), L = x.size(1);
  TTT_CHECK(Bn == s.batch, "ttt_forward: x has batch ", Bn, " but the state was made for batch ", s.batch);
  TTT_CHECK(exec.empty() || int64_t(exec.size()) == Bn, "ttt_forward: exec mask has ", exec.size(),
            " entries for batch ", Bn);
  std::vector<int64_t> pos(size_t(Bn * L));
  for (int64_t b = 0; b < Bn; ++b)
    for (int64_t t = 0; t < L; ++t) pos[size_t(b * L + t)] = s.offset[size_t(b)] + t;
  const auto positions = Tensor<int64_t, B>::from_vector({Bn, L}, pos);
  const auto exec_dev = exec.empty() ? Tensor<uint8_t, B>{} : Tensor<uint8_t, B>::from_vector({Bn}, exec);
  Tensor<T, B> y = ttt_forward_at(p, s, x, positions, exec_dev);
  ttt_advance(s, L, exec);
  return y;
}

// Same with the mask as a [B] tensor of the backend (copied to the host); undefined = all.
template <class T, class B>
Tensor<T, B> ttt_forward(const TttParams<T, B>& p, TttState<B>& s, const Tensor<T, B>& x,
                         const Tensor<uint8_t, B>& exec_mask = {}) {
  TTT_CHECK(!exec_mask.defined() || exec_mask.numel() == s.batch, "ttt_forward: exec_mask ",
            exec_mask.shape().str(), " for batch ", s.batch);
  return ttt_forward(p, s, x, exec_mask.defined() ? exec_mask.to_vector() : std::vector<uint8_t>{});
}

}  // namespace ttt::layers
