#pragma once
// Moshi's LMModel configuration, read from Kyutai's config.json (the LMModel keyword
// arguments plus loader keys). Every setting of the released models is driven from here
// and from tensor shapes; the 7B values are only the defaults for a missing config. The two
// transformers (temporal, depformer) are nn::TransformerConfig values filled from the
// LMModel keys with LMModel's own override rules.
#include <cmath>
#include <cstdio>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/io/json.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::moshi {

// LMGen sampling settings (lm_gen_config in config.json can override the defaults).
struct GenConfig {
  bool use_sampling = true;
  float temp = 0.8f, temp_text = 0.7f;
  int top_k = 250, top_k_text = 25;
};

struct LmConfig {
  std::vector<int64_t> delays;
  int64_t n_q = 8, dep_q = 8, card = 1024, text_card = 32000, text_card_out = 32000;
  int64_t dim = 128;
  bool norm_emb = false, bias_proj = false;
  bool depformer_multi_linear = false, depformer_weights_per_step = false;
  std::optional<int64_t> depformer_low_rank_embeddings;
  std::optional<nn::NormKind> depformer_norm;
  int64_t existing_text_padding_id = 3, existing_text_end_padding_id = 0;
  int64_t extra_heads_num_heads = 0, extra_heads_dim = 6;
  nn::TransformerConfig transformer, depformer;
  GenConfig gen;
  // Loader keys kept for `info`.
  std::string moshi_name, mimi_name, tokenizer_name, model_type;
  float lora_scaling = 2.f;
  io::Json ttt;  // the "ttt" list (validated by the TTT designs), null when absent

  int64_t num_codebooks() const { return n_q + 1; }
  int64_t max_delay() const {
    int64_t m = 0;
    for (auto d : delays) m = std::max(m, d);
    return m;
  }
  int64_t num_depformer_in() const {
    if (!depformer_multi_linear) return 1;
    if (!depformer.weights_schedule.empty()) return depformer.num_weight_sets();
    return dep_q;
  }

  // Moshi 7B (moshiko/moshika 2024-09), loaders._lm_kwargs: used when no config is given.
  static io::Json moshi_7b_json() {
    return io::Json{{"dim", 4096},
                    {"text_card", 32000},
                    {"existing_text_padding_id", 3},
                    {"n_q", 16},
                    {"dep_q", 8},
                    {"card", 2048},
                    {"num_heads", 32},
                    {"num_layers", 32},
                    {"hidden_scale", 4.125},
                    {"causal", true},
                    {"layer_scale", nullptr},
                    {"context", 3000},
                    {"max_period", 10000},
                    {"gating", "silu"},
                    {"norm", "rms_norm_f32"},
                    {"positional_embedding", "rope"},
                    {"depformer_dim", 1024},
                    {"depformer_dim_feedforward", int(4.125 * 1024)},
                    {"depformer_num_heads", 16},
                    {"depformer_num_layers", 6},
                    {"depformer_layer_scale", nullptr},
                    {"depformer_multi_linear", true},
                    {"depformer_context", 8},
                    {"depformer_max_period", 10000},
                    {"depformer_gating", "silu"},
                    {"depformer_pos_emb", "none"},
                    {"depformer_weights_per_step", true},
                    {"delays", {0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1}}};
  }

  // Parses Kyutai's config.json. Unknown keys only warn (newer checkpoints add keys);
  // wrong types, unsupported features and inconsistent values are errors naming the key.
  static LmConfig from_json(const io::Json& j, const std::string& where, bool warn_unknown = true) {
    io::JsonView v(j, where);
    LmConfig c;
    static const std::set<std::string> known = {
        // LMModel
        "delays", "n_q", "dep_q", "card", "text_card", "text_card_out", "demux_second_text_stream", "dim", "num_heads",
        "hidden_scale", "norm", "norm_emb", "bias_proj", "depformer_dim", "depformer_dim_feedforward",
        "depformer_multi_linear", "depformer_weights_per_step", "depformer_weights_per_step_schedule",
        "depformer_low_rank_embeddings", "depformer_pos_emb", "depformer_norm", "existing_text_padding_id",
        "existing_text_end_padding_id", "extra_heads_num_heads", "extra_heads_dim", "context", "causal",
        "quantize", "gradient_checkpointing",
        // StreamingTransformer / layer kwargs (the depformer_ prefixed ones override for the depformer)
        "num_layers", "gating", "positional_embedding", "max_period", "positional_scale", "layer_scale", "kv_repeat",
        "weights_per_step", "weights_per_step_schedule", "skip_self_attn", "cross_attention", "betas",
        "depformer_num_heads", "depformer_num_layers", "depformer_gating", "depformer_layer_scale",
        "depformer_max_period", "depformer_context", "depformer_causal", "depformer_kv_repeat",
        "depformer_positional_scale", "depformer_norm_emb",
        // loader keys
        "moshi_name", "mimi_name", "mimi_config_name", "tokenizer_name", "lora_name", "model_type", "lm_gen_config",
        "tts_config", "stt_config", "model_id", "lora", "lora_rank", "lora_scaling", "conditioners", "fuser",
        "demux_second_stream", "ttt"};
    if (warn_unknown)
      for (auto it = j.begin(); it != j.end(); ++it)
        if (!known.count(it.key()))
          std::fprintf(stderr, "warning: %s: unknown key '%s' ignored\n", where.c_str(), it.key().c_str());

    auto unsupported = [&](const char* key, const char* why) {
      if (v.has(key) && !(v.raw()[key].is_boolean() && !v.raw()[key].get<bool>()) &&
          !(v.raw()[key].is_number() && v.raw()[key].get<double>() == 0))
        fail(where, ": key '", key, "' is not supported: ", why);
    };
    unsupported("demux_second_text_stream", "two muxed text streams (Hibiki-style) are not implemented");
    unsupported("demux_second_stream", "two muxed text streams (Hibiki-style) are not implemented");
    unsupported("cross_attention", "cross-attention conditioning is not implemented");
    unsupported("conditioners", "conditioners / fusers are not implemented");
    unsupported("fuser", "conditioners / fusers are not implemented");
    unsupported("quantize", "load a bf16/f16/f32 checkpoint (int8 q8 checkpoints are not supported)");
    unsupported("skip_self_attn", "layers without self-attention are not implemented");

    c.n_q = v.get<int64_t>("n_q", 8);
    c.dep_q = v.get<int64_t>("dep_q", 8);
    c.card = v.get<int64_t>("card", 1024);
    c.text_card = v.get<int64_t>("text_card", 32000);
    c.text_card_out = v.get<int64_t>("text_card_out", c.text_card);
    c.dim = v.get<int64_t>("dim", 128);
    c.delays = v.get<std::vector<int64_t>>("delays", std::vector<int64_t>{0});
    c.norm_emb = v.get<bool>("norm_emb", false);
    c.bias_proj = v.get<bool>("bias_proj", false);
    c.depformer_multi_linear = v.get<bool>("depformer_multi_linear", false);
    c.depformer_weights_per_step = v.get<bool>("depformer_weights_per_step", false);
    c.depformer_low_rank_embeddings = v.get_optional<int64_t>("depformer_low_rank_embeddings");
    if (auto dn = v.get_optional<std::string>("depformer_norm")) c.depformer_norm = nn::parse_norm(*dn, where + ": depformer_norm");
    c.existing_text_padding_id = v.get<int64_t>("existing_text_padding_id", 3);
    c.existing_text_end_padding_id = v.get<int64_t>("existing_text_end_padding_id", 0);
    c.extra_heads_num_heads = v.get<int64_t>("extra_heads_num_heads", 0);
    c.extra_heads_dim = v.get<int64_t>("extra_heads_dim", 6);
    c.moshi_name = v.get<std::string>("moshi_name", "");
    c.mimi_name = v.get<std::string>("mimi_name", "");
    c.tokenizer_name = v.get<std::string>("tokenizer_name", "");
    c.model_type = v.get<std::string>("model_type", "moshi");
    c.lora_scaling = v.get<float>("lora_scaling", 2.f);
    if (v.has("ttt")) c.ttt = v.raw()["ttt"];

    auto pos = [&](const char* key, int64_t val) {
      if (val <= 0) fail(where, ": key '", key, "' must be positive, got ", val);
    };
    pos("n_q", c.n_q);
    pos("card", c.card);
    // Bounds that keep a hostile config from asking for absurd allocations.
    auto cap = [&](const char* key, int64_t val, int64_t hi) {
      if (val > hi) fail(where, ": key '", key, "' = ", val, " exceeds the supported maximum ", hi);
    };
    cap("n_q", c.n_q, 256);
    cap("card", c.card, int64_t(1) << 20);
    cap("text_card", c.text_card, int64_t(1) << 22);
    cap("text_card_out", c.text_card_out, int64_t(1) << 22);
    cap("dim", c.dim, 65536);
    if (c.text_card_out <= 0) fail(where, ": key 'text_card_out' must be positive");
    pos("text_card", c.text_card);
    pos("dim", c.dim);
    if (c.dep_q < 0 || c.dep_q > c.n_q) fail(where, ": key 'dep_q' must be in [0, n_q], got ", c.dep_q);
    if (int64_t(c.delays.size()) != c.num_codebooks())
      fail(where, ": key 'delays' has ", c.delays.size(), " entries, expected n_q + 1 = ", c.num_codebooks());
    for (auto d : c.delays)
      if (d < 0) fail(where, ": key 'delays' has a negative delay ", d);

    const float hidden_scale = v.get<float>("hidden_scale", 4.f);
    // Checked before any float-to-int conversion (inf or 1e30 would be undefined behaviour).
    if (!(hidden_scale > 0.f && hidden_scale <= 64.f)) fail(where, ": key 'hidden_scale' must be in (0, 64], got ", hidden_scale);
    const std::string norm = v.get<std::string>("norm", "layer_norm");

    // Main transformer: LMModel passes the non-depformer kwargs.
    nn::TransformerConfig& t = c.transformer;
    t.d_model = c.dim;
    t.num_heads = v.get<int64_t>("num_heads", 8);
    t.num_layers = v.get<int64_t>("num_layers", 2);  // no LMModel default: required in practice
    if (!v.has("num_layers")) fail(where, ": missing key 'num_layers'");
    t.dim_feedforward = {int64_t(hidden_scale * float(c.dim))};
    t.norm = nn::parse_norm(norm, where + ": norm");
    const std::string gating = v.get<std::string>("gating", "none");
    t.gated = nn::parse_gating(gating, t.activation, where + ": gating");
    t.pos_emb = nn::parse_pos_emb(v.get<std::string>("positional_embedding", "sin"), where + ": positional_embedding");
    t.max_period = v.get<float>("max_period", 10000.f);
    t.positional_scale = v.get<float>("positional_scale", 1.f);
    t.layer_scale = v.get_optional<float>("layer_scale");
    t.kv_repeat = v.get<int64_t>("kv_repeat", 1);
    t.context = v.get<int64_t>("context", 0);
    t.causal = v.get<bool>("causal", true);
    if (v.has("weights_per_step") && v.get<int64_t>("weights_per_step") != 0)
      fail(where, ": key 'weights_per_step' is only supported for the depformer");

    // Depformer: main kwargs overridden by the depformer_ ones, with LMModel's own rules.
    nn::TransformerConfig& d = c.depformer;
    d = t;
    d.d_model = v.get<int64_t>("depformer_dim", 256);
    d.num_heads = v.get<int64_t>("depformer_num_heads", t.num_heads);
    d.num_layers = v.get<int64_t>("depformer_num_layers", t.num_layers);
    d.kv_repeat = v.get<int64_t>("depformer_kv_repeat", t.kv_repeat);
    if (v.has("depformer_gating")) {
      d.gated = nn::parse_gating(v.get<std::string>("depformer_gating"), d.activation, where + ": depformer_gating");
    }
    if (v.raw().contains("depformer_layer_scale")) d.layer_scale = v.get_optional<float>("depformer_layer_scale");
    d.max_period = v.get<float>("depformer_max_period", t.max_period);
    d.positional_scale = v.get<float>("depformer_positional_scale", t.positional_scale);
    d.pos_emb = nn::parse_pos_emb(v.get<std::string>("depformer_pos_emb", "sin"), where + ": depformer_pos_emb");
    d.context = 0;  // LMModel forces context=None: the depformer sees every earlier codebook
    d.weights_per_step = c.depformer_weights_per_step ? c.dep_q : 0;
    d.weights_schedule = v.get<std::vector<int64_t>>("depformer_weights_per_step_schedule", std::vector<int64_t>{});
    if (!d.weights_schedule.empty()) {
      if (int64_t(d.weights_schedule.size()) != c.dep_q)
        fail(where, ": key 'depformer_weights_per_step_schedule' has ", d.weights_schedule.size(),
             " entries, expected dep_q = ", c.dep_q);
      for (auto s : d.weights_schedule)
        if (s < 0) fail(where, ": key 'depformer_weights_per_step_schedule' has a negative entry");
      if (!d.weights_per_step) fail(where, ": 'depformer_weights_per_step_schedule' needs depformer_weights_per_step");
    }
    const int64_t nsets = d.num_weight_sets();
    if (v.has("depformer_dim_feedforward") && v.raw()["depformer_dim_feedforward"].is_array()) {
      d.dim_feedforward = v.get<std::vector<int64_t>>("depformer_dim_feedforward");
      if (int64_t(d.dim_feedforward.size()) != nsets)
        fail(where, ": key 'depformer_dim_feedforward' has ", d.dim_feedforward.size(), " entries, expected ", nsets);
    } else {
      d.dim_feedforward = {v.get<int64_t>("depformer_dim_feedforward", int64_t(hidden_scale * float(d.d_model)))};
    }
    if (!d.gated && d.weights_per_step) fail(where, ": depformer weights_per_step without gating is not supported (as in moshi)");

    if (c.transformer.context < 0 || c.transformer.context > (int64_t(1) << 24))
      fail(where, ": key 'context' must be in [0, 2^24]");
    c.transformer.validate(where, "transformer");
    c.depformer.validate(where, "depformer");
    for (auto d : c.delays)
      if (d > 1024) fail(where, ": key 'delays' has a delay ", d, " above 1024");
    if (!std::isfinite(c.transformer.max_period) || c.transformer.max_period <= 1.f)
      fail(where, ": key 'max_period' must be > 1");

    if (v.has("lm_gen_config")) {
      io::JsonView g = v.child("lm_gen_config");
      c.gen.temp = g.get<float>("temp", c.gen.temp);
      c.gen.temp_text = g.get<float>("temp_text", c.gen.temp_text);
      c.gen.top_k = g.get<int>("top_k", c.gen.top_k);
      c.gen.top_k_text = g.get<int>("top_k_text", c.gen.top_k_text);
      c.gen.use_sampling = g.get<bool>("use_sampling", c.gen.use_sampling);
    }
    return c;
  }

  static LmConfig load(const std::string& path) { return from_json(io::read_json_file(path), path); }
  static LmConfig moshi_7b() { return from_json(moshi_7b_json(), "moshi 7B defaults"); }
};

}  // namespace ttt::moshi
