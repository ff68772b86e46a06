#pragma once
// The configuration of one Kyutai StreamingTransformer (moshi/modules/transformer.py): what
// the norms, attention, feed-forward blocks and the policy-based transformer of nn/ are built
// from. It holds the transformer's own settings only, so any of Kyutai's streaming
// transformers is this struct filled in by its owner's config reader:
//   Moshi's temporal transformer  rms_norm_f32, RoPE, SiLU gating, context 3000
//   Moshi's depformer             per-step weights (weights_per_step = dep_q), no positions
//   Mimi's encoder / decoder      layer_norm, RoPE, plain GELU FFN, LayerScale, context 250
// The parse_* helpers read the string settings under Kyutai's names.
#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/core/error.hpp"
#include "ttt/core/quant.hpp"

namespace ttt::nn {

// layer_norm: nn.LayerNorm (weight, bias), eps 1e-5. rms_norm: alpha [1, 1, D], eps 1e-5.
// The _f32 kinds compute in float32 with eps 1e-8 (every engine dtype computes the
// statistics in float anyway; only eps differs).
enum class NormKind { layer_norm, layer_norm_f32, rms_norm, rms_norm_f32 };
enum class PosEmb { none, sin, rope, sin_rope };

inline NormKind parse_norm(const std::string& s, const std::string& where) {
  if (s == "layer_norm") return NormKind::layer_norm;
  if (s == "layer_norm_f32") return NormKind::layer_norm_f32;
  if (s == "rms_norm") return NormKind::rms_norm;
  if (s == "rms_norm_f32") return NormKind::rms_norm_f32;
  fail(where, ": unknown norm '", s, "' (layer_norm, layer_norm_f32, rms_norm, rms_norm_f32)");
}
inline float norm_eps(NormKind k) {
  return (k == NormKind::layer_norm || k == NormKind::rms_norm) ? 1e-5f : 1e-8f;
}
inline bool is_rms(NormKind k) { return k == NormKind::rms_norm || k == NormKind::rms_norm_f32; }

inline PosEmb parse_pos_emb(const std::string& s, const std::string& where) {
  if (s == "none") return PosEmb::none;
  if (s == "sin") return PosEmb::sin;
  if (s == "rope") return PosEmb::rope;
  if (s == "sin_rope") return PosEmb::sin_rope;
  if (s == "rope_concat") fail(where, ": positional_embedding 'rope_concat' is not supported (no released model uses it)");
  fail(where, ": unknown positional_embedding '", s, "' (none, sin, rope, sin_rope)");
}
inline bool uses_rope(PosEmb p) { return p == PosEmb::rope || p == PosEmb::sin_rope; }
inline bool uses_sin(PosEmb p) { return p == PosEmb::sin || p == PosEmb::sin_rope; }

// Kyutai's `gating` setting: the activation of a gated FFN ("silu" = SwiGLU), or "none" for
// the plain FFN (linear1, exact GELU, linear2). Returns whether the FFN is gated.
inline bool parse_gating(const std::string& s, Unary& act, const std::string& where) {
  if (s == "none") {
    act = Unary::gelu;
    return false;
  }
  if (s == "silu") act = Unary::silu;
  else if (s == "gelu") act = Unary::gelu;
  else if (s == "sigmoid") act = Unary::sigmoid;
  else if (s == "tanh") act = Unary::tanh;
  else if (s == "relu") act = Unary::relu;
  else if (s == "identity") act = Unary::identity;
  else fail(where, ": unsupported gating '", s, "' (none, silu, gelu, sigmoid, tanh, relu, identity)");
  return true;
}

struct TransformerConfig {
  int64_t d_model = 0, num_heads = 0, num_layers = 0, kv_repeat = 1;
  std::vector<int64_t> dim_feedforward;  // one per weight set (the per-step FFNs may differ)
  NormKind norm = NormKind::layer_norm;
  bool gated = false;
  Unary activation = Unary::gelu;
  PosEmb pos_emb = PosEmb::sin;
  float max_period = 10000.f, positional_scale = 1.f;
  std::optional<float> layer_scale;  // LayerScale's initial value; nullopt: no LayerScale
  int64_t context = 0;               // attention window in steps; 0: unlimited (the depformer)
  // How the streaming KV cache stores keys and values: as the engine's T, or quantised per
  // (item, head, slot) row (fp8 e4m3 / int8; nn/attention.hpp KvRing). A runtime choice of
  // the engine (--kv-dtype), not part of Kyutai's config.
  WeightFormat kv_format = WeightFormat::dense;
  bool causal = true;
  // How a streaming call of several steps meets the KV ring. false: it attends over the ring
  // plus its own keys, then writes them (every query sees its whole window: the same numbers
  // as one whole-sequence call). true: Kyutai's RingKVCache, which writes the call's keys
  // first and attends over the ring only, so with T > 1 steps per call the oldest keys of the
  // window are gone before the call's first queries see them (Mimi's streaming transformers,
  // which run 2 steps per frame). One-step calls are the same either way.
  bool ring_write_first = false;
  int64_t weights_per_step = 0;           // 0: one weight set; else a set per step of a call
  std::vector<int64_t> weights_schedule;  // step -> weight index (empty: identity)

  int64_t head_dim() const { return d_model / num_heads; }
  int64_t num_weight_sets() const {
    if (!weights_per_step) return 1;
    if (!weights_schedule.empty()) return *std::max_element(weights_schedule.begin(), weights_schedule.end()) + 1;
    return weights_per_step;
  }
  int64_t weight_index(int64_t step) const {
    if (!weights_per_step) return 0;
    TTT_CHECK(step >= 0 && step < weights_per_step, "weights_per_step: step ", step, " out of range [0, ",
              weights_per_step, ")");
    return weights_schedule.empty() ? step : weights_schedule[size_t(step)];
  }
  int64_t feedforward(int64_t set) const {
    return dim_feedforward.size() > 1 ? dim_feedforward[size_t(set)] : dim_feedforward[0];
  }
  // ActivationGating's hidden size rule (used only when no checkpoint gives the shape).
  int64_t gated_hidden(int64_t dff) const { return dff == 4 * d_model ? (21 * d_model) / 8 : (2 * dff) / 3; }
  // KV-cache slots a streaming attention layer needs: the window, or one per step of a
  // per-step-weight transformer (the depformer restarts every frame).
  int64_t cache_capacity() const { return context > 0 ? context : weights_per_step; }

  // Range checks that keep a hostile config from asking for absurd allocations or from
  // shapes the layers cannot run; `which` names the transformer in messages.
  void validate(const std::string& where, const std::string& which) const {
    if (d_model <= 0 || d_model > 65536) fail(where, ": ", which, " dim ", d_model, " out of range [1, 65536]");
    if (num_layers < 0) fail(where, ": ", which, " num_layers must be >= 0");
    if (num_layers > 4096) fail(where, ": ", which, " num_layers ", num_layers, " exceeds 4096");
    if (dim_feedforward.empty()) fail(where, ": ", which, " has no feed-forward size");
    for (auto f : dim_feedforward)
      if (f <= 0 || f > (int64_t(1) << 20)) fail(where, ": ", which, " feed-forward size ", f, " out of range");
    if (num_heads <= 0 || d_model % num_heads != 0)
      fail(where, ": ", which, " dim ", d_model, " is not divisible by num_heads ", num_heads);
    if (kv_repeat <= 0 || num_heads % kv_repeat != 0)
      fail(where, ": ", which, " num_heads ", num_heads, " is not divisible by kv_repeat ", kv_repeat);
    if (uses_rope(pos_emb) && head_dim() % 2)
      fail(where, ": ", which, " RoPE needs an even head dimension, got ", head_dim());
    if (context < 0 || context > (int64_t(1) << 24)) fail(where, ": ", which, " context must be in [0, 2^24]");
    for (auto s : weights_schedule)
      if (s < 0) fail(where, ": ", which, " weights_per_step_schedule has a negative entry");
  }
};

}  // namespace ttt::nn
