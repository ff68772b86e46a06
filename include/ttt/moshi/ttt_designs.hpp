#pragma once
// The "ttt" list of a config.json: which temporal layers use which TTT design, with what
// options (docs/config.md has the schema). Our own keys are strict: an unknown key, a key
// that does not belong to the entry's design, or a bad value is an error naming the entry
// and the key (Kyutai's own keys only warn, since newer checkpoints add some).
#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/moshi/config.hpp"

namespace ttt::moshi {

// Options of one "ttt" entry, defaults filled in (docs/ttt_moshi_designs.md).
struct TttOptions {
  std::string design;       // replace | after_attention | inplace_ffn | kv_memory
  std::string kind = "linear";
  int64_t num_heads = 0;    // 0: the model's num_heads
  int64_t mini_batch_size = 16;
  float base_lr = 1.f;
  int64_t mlp_expansion = 4;
  bool use_gate = false;
  float rope_theta = 10000.f;
  float gate_alpha_init = 0.1f;
  int64_t chunk_size = 256;
  float lr = 0.001f;
  int64_t conv_kernel = 5;
  bool target_proj = true;
  int64_t recent = 100;
  int64_t num_virtual = 10;
  float virtual_bias_init = -30.f;

  static TttOptions parse(const io::Json& entry, const std::string& where, int64_t model_heads, int64_t dim) {
    io::JsonView v(entry, where);
    TttOptions o;
    o.design = v.get<std::string>("design");
    static const std::map<std::string, std::set<std::string>> keys = {
        {"replace", {"kind", "num_heads", "mini_batch_size", "base_lr", "mlp_expansion", "use_gate", "rope_theta",
                     "gate_alpha_init"}},
        {"after_attention", {"kind", "num_heads", "mini_batch_size", "base_lr", "mlp_expansion", "use_gate",
                             "rope_theta", "gate_alpha_init"}},
        {"inplace_ffn", {"chunk_size", "lr", "conv_kernel", "target_proj"}},
        {"kv_memory", {"kind", "num_heads", "mini_batch_size", "base_lr", "mlp_expansion", "use_gate", "rope_theta",
                       "recent", "num_virtual", "virtual_bias_init"}},
    };
    auto it = keys.find(o.design);
    if (it == keys.end())
      fail(where, ": unknown design '", o.design, "' (replace, after_attention, inplace_ffn, kv_memory)");
    for (auto k = entry.begin(); k != entry.end(); ++k) {
      if (k.key() == "layers" || k.key() == "design") continue;
      if (!it->second.count(k.key())) {
        bool elsewhere = false;
        for (auto& [d, ks] : keys) elsewhere = elsewhere || ks.count(k.key());
        if (elsewhere) fail(where, ": key '", k.key(), "' does not apply to design '", o.design, "'");
        fail(where, ": unknown key '", k.key(), "'");
      }
    }
    o.kind = v.get<std::string>("kind", "linear");
    if (o.kind != "linear" && o.kind != "mlp") fail(where, ": key 'kind' must be \"linear\" or \"mlp\", got \"", o.kind, "\"");
    o.num_heads = v.get<int64_t>("num_heads", model_heads);
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
    o.gate_alpha_init = v.get<float>("gate_alpha_init", o.design == "after_attention" ? 0.05f : 0.1f);
    if (!std::isfinite(o.gate_alpha_init)) fail(where, ": key 'gate_alpha_init' must be finite");
    o.chunk_size = v.get<int64_t>("chunk_size", 256);
    if (o.chunk_size <= 0 || o.chunk_size > 65536) fail(where, ": key 'chunk_size' must be in [1, 65536]");
    o.lr = v.get<float>("lr", 0.001f);
    if (!std::isfinite(o.lr)) fail(where, ": key 'lr' must be finite");
    o.conv_kernel = v.get<int64_t>("conv_kernel", 5);
    if (o.conv_kernel <= 0 || o.conv_kernel % 2 == 0 || o.conv_kernel > 63)
      fail(where, ": key 'conv_kernel' must be odd and in [1, 63], got ", o.conv_kernel);
    o.target_proj = v.get<bool>("target_proj", true);
    o.recent = v.get<int64_t>("recent", 100);
    if (o.recent <= 0) fail(where, ": key 'recent' must be positive");
    o.num_virtual = v.get<int64_t>("num_virtual", 10);
    if (o.num_virtual < 0 || o.num_virtual > 4096) fail(where, ": key 'num_virtual' must be in [0, 4096]");
    o.virtual_bias_init = v.get<float>("virtual_bias_init", -30.f);
    if (!std::isfinite(o.virtual_bias_init)) fail(where, ": key 'virtual_bias_init' must be finite");
    return o;
  }
};

// Which temporal layers use which policy: "ttt" list entries by layer (null = plain).
struct LayerPlan {
  std::vector<io::Json> entries;
  std::vector<std::string> designs;
};

// The four designs this page validates; any other design must be one of the engine's own
// policies (user-defined), whose load() checks its entry's keys.
inline bool is_builtin_design(const std::string& d) {
  return d == "replace" || d == "after_attention" || d == "inplace_ffn" || d == "kv_memory";
}

// Validates the config's "ttt" list and says, per temporal layer, which design (and entry)
// it uses. Layers not listed stay plain attention layers. `extra_designs`: the design names
// of user policies in the engine's policy list (LmModel passes its list).
inline LayerPlan parse_ttt_plan(const LmConfig& cfg, const std::string& where,
                                const std::vector<std::string>& extra_designs = {}) {
  LayerPlan plan;
  const int64_t L = cfg.transformer.num_layers;
  plan.entries.assign(size_t(L), io::Json());
  plan.designs.assign(size_t(L), "attention");
  if (cfg.ttt.is_null()) return plan;
  if (!cfg.ttt.is_array()) fail(where, ": key 'ttt' must be a list of entries");
  std::vector<int64_t> owner(size_t(L), -1);
  for (size_t e = 0; e < cfg.ttt.size(); ++e) {
    const std::string w = where + ": ttt[" + std::to_string(e) + "]";
    const io::Json& entry = cfg.ttt[e];
    if (!entry.is_object()) fail(w, ": entry must be an object");
    if (!entry.contains("layers")) fail(w, ": missing key 'layers'");
    if (!entry.contains("design")) fail(w, ": missing key 'design'");
    const std::string design = io::JsonView(entry, w).get<std::string>("design");
    const bool user_design = !is_builtin_design(design) && design != "attention" &&
                             std::find(extra_designs.begin(), extra_designs.end(), design) != extra_designs.end();
    TttOptions opts;
    if (user_design) opts.design = design;
    else opts = TttOptions::parse(entry, w, cfg.transformer.num_heads, cfg.dim);
    if (opts.design == "inplace_ffn" && !cfg.transformer.gated)
      fail(w, ": design 'inplace_ffn' needs a gated FFN (config 'gating' is \"none\")");
    const auto layers = io::JsonView(entry, w).get<std::vector<int64_t>>("layers");
    if (layers.empty()) fail(w, ": key 'layers' is empty");
    for (int64_t l : layers) {
      if (l < 0 || l >= L) fail(w, ": layer ", l, " is out of range [0, ", L, ")");
      if (owner[size_t(l)] >= 0) fail(w, ": layer ", l, " is already listed in ttt[", owner[size_t(l)], "]");
      owner[size_t(l)] = int64_t(e);
      plan.entries[size_t(l)] = entry;
      plan.designs[size_t(l)] = opts.design;
    }
  }
  return plan;
}

}  // namespace ttt::moshi
