#pragma once
// The layer plan of Moshi's temporal transformer: which layers use which TTT design, read
// from the config's "ttt" list (docs/config.md has the schema, docs/designs.md the designs).
// Layers not listed stay plain attention layers.
#include <algorithm>
#include <string>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/moshi/config.hpp"
#include "ttt/moshi/ttt_options.hpp"

namespace ttt::moshi {

// Per temporal layer: its "ttt" entry (null = plain) and design name.
struct LayerPlan {
  std::vector<io::Json> entries;
  std::vector<std::string> designs;
};

// Validates the config's "ttt" list. Built-in designs have their options checked here;
// `extra_designs` are the design names of user policies in the engine's policy list
// (LmModel passes its list), whose load() checks their own entries.
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
    const bool user_design =
        design != "attention" && std::find(extra_designs.begin(), extra_designs.end(), design) != extra_designs.end();
    if (!check_builtin_entry(design, entry, w, cfg.transformer) && !user_design)
      fail(w, ": unknown design '", design, "' (replace, after_attention, inplace_ffn, kv_memory)");
    const auto layers = io::JsonView(entry, w).get<std::vector<int64_t>>("layers");
    if (layers.empty()) fail(w, ": key 'layers' is empty");
    for (int64_t l : layers) {
      if (l < 0 || l >= L) fail(w, ": layer ", l, " is out of range [0, ", L, ")");
      if (owner[size_t(l)] >= 0) fail(w, ": layer ", l, " is already listed in ttt[", owner[size_t(l)], "]");
      owner[size_t(l)] = int64_t(e);
      plan.entries[size_t(l)] = entry;
      plan.designs[size_t(l)] = design;
    }
  }
  return plan;
}

}  // namespace ttt::moshi
