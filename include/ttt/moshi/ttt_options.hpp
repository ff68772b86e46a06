#pragma once
// The options of each TTT-in-Moshi design, read from its entry of the config's "ttt" list
// (docs/designs.md has the math, docs/config.md the schema). One struct per design, each
// stating only its own keys; the three designs that embed a TTT-Linear / TTT-MLP module
// share TttModuleOptions. Our keys are strict: an unknown key, a key that belongs to another
// design, or a bad value is an error naming the entry and the key.
#include <cmath>
#include <cstdint>
#include <set>
#include <string>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/layers/ttt_config.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::moshi {

// The TTT module inside a design (ttt-lm-pytorch's TTTLinear / TTTMLP over the model width).
struct TttModuleOptions {
  std::string kind = "linear";
  int64_t num_heads = 0;  // 0: the model's num_heads
  int64_t mini_batch_size = 16;
  float base_lr = 1.f;  // default by kind: 1.0 linear, 0.1 mlp
  int64_t mlp_expansion = 4;
  bool use_gate = false;
  float rope_theta = 10000.f;

  static std::set<std::string> keys() {
    return {"kind", "num_heads", "mini_batch_size", "base_lr", "mlp_expansion", "use_gate", "rope_theta"};
  }
  static TttModuleOptions parse(const io::JsonView& v, const std::string& where, const nn::TransformerConfig& model) {
    TttModuleOptions o;
    o.kind = v.get<std::string>("kind", "linear");
    if (o.kind != "linear" && o.kind != "mlp") fail(where, ": key 'kind' must be \"linear\" or \"mlp\", got \"", o.kind, "\"");
    const int64_t dim = model.d_model;
    o.num_heads = v.get<int64_t>("num_heads", model.num_heads);
    if (o.num_heads <= 0 || dim % o.num_heads != 0)
      fail(where, ": key 'num_heads' = ", o.num_heads, " must divide the model dim ", dim);
    if ((dim / o.num_heads) % 2) fail(where, ": key 'num_heads' gives an odd head dimension ", dim / o.num_heads, " (RoPE needs it even)");
    o.mini_batch_size = v.get<int64_t>("mini_batch_size", 16);
    if (o.mini_batch_size <= 0 || o.mini_batch_size > 4096) fail(where, ": key 'mini_batch_size' must be in [1, 4096]");
    o.base_lr = v.get<float>("base_lr", o.kind == "mlp" ? 0.1f : 1.f);
    if (!(o.base_lr > 0.f) || !std::isfinite(o.base_lr)) fail(where, ": key 'base_lr' must be positive and finite");
    o.mlp_expansion = v.get<int64_t>("mlp_expansion", 4);
    if (o.mlp_expansion <= 0 || o.mlp_expansion > 64) fail(where, ": key 'mlp_expansion' must be in [1, 64]");
    o.use_gate = v.get<bool>("use_gate", false);
    o.rope_theta = v.get<float>("rope_theta", 10000.f);
    if (!(o.rope_theta > 1.f) || !std::isfinite(o.rope_theta)) fail(where, ": key 'rope_theta' must be > 1");
    return o;
  }
  // The layer config of the module over a model of width `dim`.
  layers::TttConfig layer_config(int64_t dim, const std::string& where) const {
    layers::TttConfig c;
    c.kind = kind == "mlp" ? layers::TttConfig::Kind::mlp : layers::TttConfig::Kind::linear;
    c.hidden_size = dim;
    c.num_heads = num_heads;
    c.mini_batch_size = mini_batch_size;
    c.mlp_expansion = mlp_expansion;
    c.base_lr = base_lr;
    c.rope_theta = rope_theta;
    c.use_gate = use_gate;
    c.finalize(where);
    return c;
  }
};

namespace options_detail {

// Every key of every built-in design, so that a key used with the wrong design gets a
// message saying so (not "unknown key").
inline const std::set<std::string>& all_design_keys();

// Refuses keys of `entry` outside `allowed` (besides "layers" and "design").
inline void check_keys(const io::Json& entry, const std::string& where, const std::string& design,
                       const std::set<std::string>& allowed) {
  for (auto k = entry.begin(); k != entry.end(); ++k) {
    if (k.key() == "layers" || k.key() == "design" || allowed.count(k.key())) continue;
    if (all_design_keys().count(k.key())) fail(where, ": key '", k.key(), "' does not apply to design '", design, "'");
    fail(where, ": unknown key '", k.key(), "'");
  }
}

}  // namespace options_detail

// A. TTT instead of attention: x += tanh(α) ⊙ TTT(N1(x)).
struct ReplaceOptions {
  static constexpr const char* design = "replace";
  TttModuleOptions ttt;
  float gate_alpha_init = 0.1f;

  static std::set<std::string> keys() {
    auto k = TttModuleOptions::keys();
    k.insert("gate_alpha_init");
    return k;
  }
  static ReplaceOptions parse(const io::Json& entry, const std::string& where, const nn::TransformerConfig& model) {
    options_detail::check_keys(entry, where, design, keys());
    io::JsonView v(entry, where);
    ReplaceOptions o;
    o.ttt = TttModuleOptions::parse(v, where, model);
    o.gate_alpha_init = v.get<float>("gate_alpha_init", 0.1f);
    if (!std::isfinite(o.gate_alpha_init)) fail(where, ": key 'gate_alpha_init' must be finite");
    return o;
  }
};

// B. Attention, then a gated TTT branch with its own pre-norm: the gate opens more slowly.
struct AfterAttentionOptions {
  static constexpr const char* design = "after_attention";
  TttModuleOptions ttt;
  float gate_alpha_init = 0.05f;

  static std::set<std::string> keys() { return ReplaceOptions::keys(); }
  static AfterAttentionOptions parse(const io::Json& entry, const std::string& where, const nn::TransformerConfig& model) {
    options_detail::check_keys(entry, where, design, keys());
    io::JsonView v(entry, where);
    AfterAttentionOptions o;
    o.ttt = TttModuleOptions::parse(v, where, model);
    o.gate_alpha_init = v.get<float>("gate_alpha_init", 0.05f);
    if (!std::isfinite(o.gate_alpha_init)) fail(where, ": key 'gate_alpha_init' must be finite");
    return o;
  }
};

// C. In-Place TTT: the gated FFN's linear_out is a fast weight updated once per chunk.
struct InplaceFfnOptions {
  static constexpr const char* design = "inplace_ffn";
  int64_t chunk_size = 256;
  float lr = 0.001f;
  int64_t conv_kernel = 5;
  bool target_proj = true;

  static std::set<std::string> keys() { return {"chunk_size", "lr", "conv_kernel", "target_proj"}; }
  static InplaceFfnOptions parse(const io::Json& entry, const std::string& where, const nn::TransformerConfig& model) {
    options_detail::check_keys(entry, where, design, keys());
    io::JsonView v(entry, where);
    InplaceFfnOptions o;
    if (!model.gated) fail(where, ": design 'inplace_ffn' needs a gated FFN (config 'gating' is \"none\")");
    o.chunk_size = v.get<int64_t>("chunk_size", 256);
    if (o.chunk_size <= 0 || o.chunk_size > 65536) fail(where, ": key 'chunk_size' must be in [1, 65536]");
    o.lr = v.get<float>("lr", 0.001f);
    if (!std::isfinite(o.lr)) fail(where, ": key 'lr' must be finite");
    o.conv_kernel = v.get<int64_t>("conv_kernel", 5);
    if (o.conv_kernel <= 0 || o.conv_kernel % 2 == 0 || o.conv_kernel > 63)
      fail(where, ": key 'conv_kernel' must be odd and in [1, 63], got ", o.conv_kernel);
    o.target_proj = v.get<bool>("target_proj", true);
    return o;
  }
};

// D. A TTT memory feeding N virtual keys/values to an attention window of R frames.
struct KvMemoryOptions {
  static constexpr const char* design = "kv_memory";
  TttModuleOptions ttt;
  int64_t recent = 100;
  int64_t num_virtual = 10;
  float virtual_bias_init = -30.f;

  static std::set<std::string> keys() {
    auto k = TttModuleOptions::keys();
    k.insert({"recent", "num_virtual", "virtual_bias_init"});
    return k;
  }
  static KvMemoryOptions parse(const io::Json& entry, const std::string& where, const nn::TransformerConfig& model) {
    options_detail::check_keys(entry, where, design, keys());
    io::JsonView v(entry, where);
    KvMemoryOptions o;
    o.ttt = TttModuleOptions::parse(v, where, model);
    o.recent = v.get<int64_t>("recent", 100);
    if (o.recent <= 0) fail(where, ": key 'recent' must be positive");
    o.num_virtual = v.get<int64_t>("num_virtual", 10);
    if (o.num_virtual < 0 || o.num_virtual > 4096) fail(where, ": key 'num_virtual' must be in [0, 4096]");
    o.virtual_bias_init = v.get<float>("virtual_bias_init", -30.f);
    if (!std::isfinite(o.virtual_bias_init)) fail(where, ": key 'virtual_bias_init' must be finite");
    if (model.kv_repeat != 1) fail(where, ": design 'kv_memory' needs kv_repeat = 1");
    return o;
  }
};

namespace options_detail {

inline const std::set<std::string>& all_design_keys() {
  static const std::set<std::string> all = [] {
    std::set<std::string> k;
    for (const auto& s : {ReplaceOptions::keys(), AfterAttentionOptions::keys(), InplaceFfnOptions::keys(),
                          KvMemoryOptions::keys()})
      k.insert(s.begin(), s.end());
    return k;
  }();
  return all;
}

}  // namespace options_detail

// Validates a built-in design's entry; false when `design` is not built in.
inline bool check_builtin_entry(const std::string& design, const io::Json& entry, const std::string& where,
                                const nn::TransformerConfig& model) {
  if (design == ReplaceOptions::design) ReplaceOptions::parse(entry, where, model);
  else if (design == AfterAttentionOptions::design) AfterAttentionOptions::parse(entry, where, model);
  else if (design == InplaceFfnOptions::design) InplaceFfnOptions::parse(entry, where, model);
  else if (design == KvMemoryOptions::design) KvMemoryOptions::parse(entry, where, model);
  else return false;
  return true;
}

}  // namespace ttt::moshi
