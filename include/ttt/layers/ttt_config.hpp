#pragma once
// Configuration of one TTT-Linear / TTT-MLP layer (ttt-lm-pytorch's TTTLinear / TTTMLP),
// plus the three ttt-video-dit options that change the layer's inputs (all off by default).
#include <cstdint>
#include <string>

#include "ttt/core/error.hpp"
#include "ttt/io/json.hpp"

namespace ttt::layers {

struct TttConfig {
  enum class Kind { linear, mlp };

  Kind kind = Kind::linear;
  int64_t hidden_size = 0;      // C
  int64_t num_heads = 0;        // nh
  int64_t head_dim = 0;         // f = C / nh
  int64_t mini_batch_size = 16; // K
  int64_t mlp_expansion = 4;    // TTT-MLP hidden width = mlp_expansion * f
  float base_lr = 1.f;          // ttt_base_lr: 1.0 for linear, 0.1 for mlp (the JAX scripts)
  float rope_theta = 10000.f;
  float ttt_norm_eps = 1e-6f;   // the per-head LayerNorm inside the inner model and on its output
  float post_norm_eps = 1e-6f;
  bool use_gate = false;        // gelu_tanh(x Wg^T) * post_norm(o)
  bool share_qk = false;        // one projection, then causal depthwise convs conv_q / conv_k
  int64_t conv_kernel = 4;
  // ttt-video-dit options: L2-normalised q/k per head (before RoPE), a normalised
  // reconstruction target (ln_reconstruction_target), biases on q/k/v/o projections.
  bool l2_norm_qk = false;
  bool ln_target = false;
  bool proj_bias = false;

  bool is_mlp() const { return kind == Kind::mlp; }
  // Width of the first fast-weight layer's output (f for linear, e*f for mlp).
  int64_t inner_dim() const { return is_mlp() ? mlp_expansion * head_dim : head_dim; }
  const char* kind_name() const { return is_mlp() ? "mlp" : "linear"; }

  static float default_base_lr(Kind k) { return k == Kind::mlp ? 0.1f : 1.f; }

  // Builds a config from sizes; head_dim is derived. Throws on inconsistent values.
  static TttConfig make(Kind kind, int64_t hidden_size, int64_t num_heads, int64_t mini_batch_size = 16) {
    TttConfig c;
    c.kind = kind;
    c.hidden_size = hidden_size;
    c.num_heads = num_heads;
    c.mini_batch_size = mini_batch_size;
    c.base_lr = default_base_lr(kind);
    c.finalize("TttConfig");
    return c;
  }

  // Derives head_dim and checks every value; `where` names the source in messages.
  void finalize(const std::string& where) {
    TTT_CHECK(hidden_size > 0, where, ": hidden_size must be > 0, got ", hidden_size);
    TTT_CHECK(num_heads > 0, where, ": num_heads must be > 0, got ", num_heads);
    TTT_CHECK(hidden_size % num_heads == 0, where, ": hidden_size ", hidden_size, " is not a multiple of num_heads ",
              num_heads);
    head_dim = hidden_size / num_heads;
    TTT_CHECK(head_dim % 2 == 0, where, ": head_dim ", head_dim, " must be even (RoPE rotates pairs)");
    TTT_CHECK(mini_batch_size > 0, where, ": mini_batch_size must be > 0, got ", mini_batch_size);
    TTT_CHECK(mlp_expansion > 0, where, ": mlp_expansion must be > 0, got ", mlp_expansion);
    TTT_CHECK(conv_kernel > 0, where, ": conv_kernel must be > 0, got ", conv_kernel);
    TTT_CHECK(ttt_norm_eps >= 0.f && post_norm_eps >= 0.f, where, ": eps must be >= 0");
    TTT_CHECK(rope_theta > 0.f, where, ": rope_theta must be > 0, got ", rope_theta);
  }

  // The fixtures' config.json format: kind, hidden_size, num_heads, mini_batch_size,
  // ttt_base_lr, use_gate, rope_theta, eps / post_norm_eps / ttt_norm_eps; also share_qk,
  // conv_kernel, mlp_expansion and the video options. Unknown keys (seq_len, prefill_len,
  // batch, ...) are ignored so a test-case config can carry its own metadata.
  static TttConfig from_json(const io::JsonView& j) {
    TttConfig c;
    const std::string kind = j.get<std::string>("kind", "linear");
    if (kind == "linear") c.kind = Kind::linear;
    else if (kind == "mlp") c.kind = Kind::mlp;
    else fail(j.where(), ": key 'kind' must be \"linear\" or \"mlp\", got \"", kind, "\"");
    c.hidden_size = j.get<int64_t>("hidden_size");
    if (j.has("num_heads")) c.num_heads = j.get<int64_t>("num_heads");
    else if (j.has("num_attention_heads")) c.num_heads = j.get<int64_t>("num_attention_heads");
    else fail(j.where(), ": missing key 'num_heads'");
    c.mini_batch_size = j.get<int64_t>("mini_batch_size", 16);
    c.mlp_expansion = j.get<int64_t>("mlp_expansion", 4);
    c.base_lr = default_base_lr(c.kind);
    if (j.has("ttt_base_lr")) c.base_lr = j.get<float>("ttt_base_lr");
    else if (j.has("base_lr")) c.base_lr = j.get<float>("base_lr");
    c.rope_theta = j.get<float>("rope_theta", 10000.f);
    const float eps = j.get<float>("eps", 1e-6f);
    c.ttt_norm_eps = j.get<float>("ttt_norm_eps", eps);
    c.post_norm_eps = j.get<float>("post_norm_eps", eps);
    c.use_gate = j.get<bool>("use_gate", false);
    c.share_qk = j.get<bool>("share_qk", false);
    c.conv_kernel = j.get<int64_t>("conv_kernel", 4);
    c.l2_norm_qk = j.get<bool>("l2_norm_qk", false);
    c.ln_target = j.get<bool>("ln_target", false);
    c.proj_bias = j.get<bool>("proj_bias", false);
    c.finalize(j.where());
    return c;
  }
};

}  // namespace ttt::layers
