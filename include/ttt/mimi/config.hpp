#pragma once
// Kyutai's Mimi codec configuration, in moshi's `_mimi_config` layout (moshi 0.2.13,
// models/loaders.py): {"sample_rate", "channels", "frame_rate", "seanet": {...},
// "quantizer": {...}, "transformer": {...}} plus "num_codebooks" (what set_num_codebooks is
// given; Moshi uses 8). Missing keys take Kyutai's values, so `MimiConfig::kyutai()` is the
// released Mimi (24 kHz, 12.5 Hz frames of 1920 samples, 512-wide latent, 8 of 32 codebooks
// of 2048 x 256).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <vector>

#include "ttt/io/json.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::mimi {

// SEANet encoder / decoder (moshi/modules/seanet.py).
struct SeanetConfig {
  int64_t channels = 1;
  int64_t dimension = 512;  // latent width
  int64_t n_filters = 64;
  int64_t n_residual_layers = 1;
  std::vector<int64_t> ratios = {8, 6, 5, 4};  // decoder order; the encoder runs them reversed
  int64_t kernel_size = 7, residual_kernel_size = 3, last_kernel_size = 3;
  int64_t dilation_base = 2, compress = 2;
  bool weight_norm = false;  // "norm": "weight_norm" (weight_g / weight_v pairs), else "none"
  bool replicate = false;    // "pad_mode": "replicate", else "constant" (zeros)

  int64_t hop() const {
    int64_t h = 1;
    for (auto r : ratios) h *= r;
    return h;
  }
};

// The split residual vector quantizer (moshi/quantization/vq.py).
struct QuantizerConfig {
  int64_t dimension = 256;  // codebook vector width
  int64_t n_q = 32;         // codebooks: 1 semantic + n_q - 1 acoustic
  int64_t bins = 2048;      // entries per codebook
  int64_t input_dimension = 512, output_dimension = 512;
  int64_t n_q_semantic = 1;
};

struct MimiConfig {
  int64_t sample_rate = 24000;
  int64_t channels = 1;
  double frame_rate = 12.5;
  SeanetConfig seanet;
  QuantizerConfig quantizer;
  nn::TransformerConfig transformer;  // both transformers (encoder, decoder)
  int64_t transformer_input_dim = 512, transformer_output_dim = 512;  // projections when != d_model
  int64_t num_codebooks = 8;

  int64_t frame_size() const { return int64_t(std::llround(double(sample_rate) / frame_rate)); }
  double encoder_frame_rate() const { return double(sample_rate) / double(seanet.hop()); }
  // Encoder steps per frame: the stride of the downsample (and upsample) convs.
  int64_t downsample_stride() const { return int64_t(std::llround(encoder_frame_rate() / frame_rate)); }
  int64_t latent_dim() const { return seanet.dimension; }

  static MimiConfig kyutai() { return from_json(io::Json::object(), "Mimi defaults"); }
  static MimiConfig load(const std::string& path) { return from_json(io::read_json_file(path), path); }

  // Unknown keys only warn (newer configs add keys); unsupported settings and inconsistent
  // values are errors naming the key.
  static MimiConfig from_json(const io::Json& j, const std::string& where, bool warn_unknown = true) {
    if (!j.is_object()) fail(where, ": a Mimi config must be a JSON object");
    io::JsonView v(j, where);
    MimiConfig c;
    warn_keys(j, where, {"sample_rate", "channels", "frame_rate", "seanet", "quantizer", "transformer", "num_codebooks"},
              warn_unknown);
    c.sample_rate = v.get<int64_t>("sample_rate", 24000);
    c.channels = v.get<int64_t>("channels", 1);
    c.frame_rate = v.get<double>("frame_rate", 12.5);
    c.num_codebooks = v.get<int64_t>("num_codebooks", 8);

    {
      const std::string w = where + ": seanet";
      const io::Json sj = v.has("seanet") ? v.raw()["seanet"] : io::Json::object();
      if (!sj.is_object()) fail(w, " must be an object");
      io::JsonView s(sj, w);
      warn_keys(sj, w,
                {"channels", "dimension", "causal", "n_filters", "n_residual_layers", "activation", "compress",
                 "dilation_base", "disable_norm_outer_blocks", "kernel_size", "residual_kernel_size", "last_kernel_size",
                 "norm", "pad_mode", "ratios", "true_skip", "activation_params", "norm_params", "final_activation",
                 "final_activation_params", "trim_right_ratio", "mask_fn", "mask_position"},
                warn_unknown);
      SeanetConfig& e = c.seanet;
      e.channels = s.get<int64_t>("channels", c.channels);
      e.dimension = s.get<int64_t>("dimension", 512);
      e.n_filters = s.get<int64_t>("n_filters", 64);
      e.n_residual_layers = s.get<int64_t>("n_residual_layers", 1);
      e.ratios = s.get<std::vector<int64_t>>("ratios", e.ratios);
      e.kernel_size = s.get<int64_t>("kernel_size", 7);
      e.residual_kernel_size = s.get<int64_t>("residual_kernel_size", 3);
      e.last_kernel_size = s.get<int64_t>("last_kernel_size", 3);
      e.dilation_base = s.get<int64_t>("dilation_base", 2);
      e.compress = s.get<int64_t>("compress", 2);
      if (!s.get<bool>("causal", true)) fail(w, ": key 'causal' must be true (only the causal, streaming Mimi is supported)");
      if (!s.get<bool>("true_skip", true)) fail(w, ": key 'true_skip' must be true (conv shortcuts are not supported)");
      if (s.get<std::string>("activation", "ELU") != "ELU") fail(w, ": key 'activation' must be \"ELU\"");
      if (s.has("activation_params")) {
        const io::Json& ap = s.raw()["activation_params"];
        if (!ap.is_object() || (ap.contains("alpha") && (!ap["alpha"].is_number() || ap["alpha"].get<double>() != 1.0)))
          fail(w, ": key 'activation_params' must be {\"alpha\": 1.0}");
      }
      if (s.has("final_activation")) fail(w, ": key 'final_activation' is not supported");
      if (s.get<double>("trim_right_ratio", 1.0) != 1.0) fail(w, ": key 'trim_right_ratio' must be 1.0");
      if (s.get<int64_t>("disable_norm_outer_blocks", 0) != 0)
        fail(w, ": key 'disable_norm_outer_blocks' must be 0 (weights are read as stored)");
      const std::string norm = s.get<std::string>("norm", "none");
      if (norm != "none" && norm != "weight_norm") fail(w, ": key 'norm' must be \"none\" or \"weight_norm\", got \"", norm, "\"");
      e.weight_norm = norm == "weight_norm";
      const std::string pad = s.get<std::string>("pad_mode", "constant");
      if (pad != "constant" && pad != "replicate") fail(w, ": key 'pad_mode' must be \"constant\" or \"replicate\", got \"", pad, "\"");
      e.replicate = pad == "replicate";
    }
    {
      const std::string w = where + ": quantizer";
      const io::Json qj = v.has("quantizer") ? v.raw()["quantizer"] : io::Json::object();
      if (!qj.is_object()) fail(w, " must be an object");
      io::JsonView q(qj, w);
      warn_keys(qj, w, {"dimension", "n_q", "bins", "input_dimension", "output_dimension", "n_q_semantic", "q_dropout",
                        "no_quantization_rate", "decay", "threshold_usage_ratio", "replaced_usage_ratio"},
                warn_unknown);
      QuantizerConfig& r = c.quantizer;
      r.dimension = q.get<int64_t>("dimension", 256);
      r.n_q = q.get<int64_t>("n_q", 32);
      r.bins = q.get<int64_t>("bins", 2048);
      r.input_dimension = q.get<int64_t>("input_dimension", c.seanet.dimension);
      r.output_dimension = q.get<int64_t>("output_dimension", c.seanet.dimension);
      r.n_q_semantic = q.get<int64_t>("n_q_semantic", 1);
    }
    {
      const std::string w = where + ": transformer";
      const io::Json tj = v.has("transformer") ? v.raw()["transformer"] : io::Json::object();
      if (!tj.is_object()) fail(w, " must be an object");
      io::JsonView t(tj, w);
      warn_keys(tj, w, {"d_model", "num_heads", "num_layers", "causal", "layer_scale", "context", "conv_layout",
                        "max_period", "gating", "norm", "positional_embedding", "dim_feedforward", "input_dimension",
                        "output_dimensions", "kv_repeat", "positional_scale", "bias_ff", "bias_attn"},
                warn_unknown);
      nn::TransformerConfig& tc = c.transformer;
      tc.d_model = t.get<int64_t>("d_model", c.seanet.dimension);
      tc.num_heads = t.get<int64_t>("num_heads", 8);
      tc.num_layers = t.get<int64_t>("num_layers", 8);
      tc.causal = t.get<bool>("causal", true);
      if (!tc.causal) fail(w, ": key 'causal' must be true");
      tc.layer_scale = t.has("layer_scale") ? t.get_optional<float>("layer_scale") : std::optional<float>(0.01f);
      tc.context = t.get<int64_t>("context", 250);
      if (!t.get<bool>("conv_layout", true)) fail(w, ": key 'conv_layout' must be true");
      tc.max_period = t.get<float>("max_period", 10000.f);
      tc.positional_scale = t.get<float>("positional_scale", 1.f);
      tc.gated = nn::parse_gating(t.get<std::string>("gating", "none"), tc.activation, w + ": gating");
      tc.norm = nn::parse_norm(t.get<std::string>("norm", "layer_norm"), w + ": norm");
      tc.pos_emb = nn::parse_pos_emb(t.get<std::string>("positional_embedding", "rope"), w + ": positional_embedding");
      tc.dim_feedforward = {t.get<int64_t>("dim_feedforward", 2048)};
      tc.kv_repeat = t.get<int64_t>("kv_repeat", 1);
      // Kyutai's RingKVCache: a streaming call's keys enter the ring before its queries attend
      // (Mimi steps several transformer steps per frame).
      tc.ring_write_first = true;
      if (t.get<bool>("bias_ff", false) || t.get<bool>("bias_attn", false))
        fail(w, ": biases on the transformer's linears are not supported (Mimi has none)");
      c.transformer_input_dim = t.get<int64_t>("input_dimension", c.seanet.dimension);
      const auto outs = t.get<std::vector<int64_t>>("output_dimensions", std::vector<int64_t>{c.seanet.dimension});
      if (outs.size() != 1) fail(w, ": key 'output_dimensions' must hold one dimension, got ", outs.size());
      c.transformer_output_dim = outs[0];
    }
    c.validate(where);
    return c;
  }

  void validate(const std::string& where) const {
    auto range = [&](const char* key, int64_t val, int64_t lo, int64_t hi) {
      if (val < lo || val > hi) fail(where, ": key '", key, "' = ", val, " is out of range [", lo, ", ", hi, "]");
    };
    range("sample_rate", sample_rate, 1000, 384000);
    if (channels != 1) fail(where, ": key 'channels' must be 1 (mono Mimi), got ", channels);
    if (seanet.channels != channels) fail(where, ": seanet channels ", seanet.channels, " differ from channels ", channels);
    if (!(frame_rate > 0.0) || !std::isfinite(frame_rate)) fail(where, ": key 'frame_rate' must be positive");
    range("seanet.dimension", seanet.dimension, 1, 8192);
    range("seanet.n_filters", seanet.n_filters, 1, 4096);
    range("seanet.n_residual_layers", seanet.n_residual_layers, 0, 16);
    if (seanet.ratios.empty() || seanet.ratios.size() > 8) fail(where, ": seanet ratios must hold 1 to 8 values");
    for (auto r : seanet.ratios) range("seanet.ratios[]", r, 1, 64);
    range("seanet.kernel_size", seanet.kernel_size, 1, 64);
    range("seanet.residual_kernel_size", seanet.residual_kernel_size, 1, 64);
    range("seanet.last_kernel_size", seanet.last_kernel_size, 1, 64);
    range("seanet.dilation_base", seanet.dilation_base, 1, 16);
    range("seanet.compress", seanet.compress, 1, 64);
    if (seanet.n_filters % seanet.compress) fail(where, ": seanet n_filters must be a multiple of compress");
    // The widest SEANet layer is n_filters * 2^len(ratios).
    if (seanet.n_filters << seanet.ratios.size() > 65536) fail(where, ": seanet is too wide");
    if (sample_rate % seanet.hop() != 0)
      fail(where, ": sample_rate ", sample_rate, " is not a multiple of the SEANet hop ", seanet.hop());
    const double stride = encoder_frame_rate() / frame_rate;
    if (stride < 1.0 || std::abs(stride - std::round(stride)) > 1e-9)
      fail(where, ": frame_rate ", frame_rate, " must divide the encoder frame rate ", encoder_frame_rate());
    if (std::abs(double(frame_size()) * frame_rate - double(sample_rate)) > 1e-6)
      fail(where, ": frame_rate ", frame_rate, " does not give a whole number of samples per frame");
    range("quantizer.dimension", quantizer.dimension, 1, 8192);
    range("quantizer.bins", quantizer.bins, 1, 1 << 20);
    range("quantizer.n_q", quantizer.n_q, 2, 256);
    if (quantizer.n_q_semantic != 1) fail(where, ": quantizer n_q_semantic must be 1");
    if (quantizer.input_dimension != seanet.dimension || quantizer.output_dimension != seanet.dimension)
      fail(where, ": quantizer input/output dimension must equal the latent dimension ", seanet.dimension);
    range("num_codebooks", num_codebooks, 1, quantizer.n_q);
    if (transformer_input_dim != seanet.dimension || transformer_output_dim != seanet.dimension ||
        transformer.d_model != seanet.dimension)
      fail(where, ": transformer d_model and input/output dimensions must equal the latent dimension ", seanet.dimension,
           " (projections around the transformer are not supported)");
    if (!nn::uses_rope(transformer.pos_emb) && transformer.pos_emb != nn::PosEmb::none && !nn::uses_sin(transformer.pos_emb))
      fail(where, ": unsupported transformer positional embedding");
    if (transformer.context <= 0) fail(where, ": transformer context must be positive (streaming needs a ring size)");
    transformer.validate(where, "transformer");
  }

 private:
  static void warn_keys(const io::Json& j, const std::string& where, const std::set<std::string>& known, bool warn) {
    if (!warn || !j.is_object()) return;
    for (auto it = j.begin(); it != j.end(); ++it)
      if (!known.count(it.key()))
        std::fprintf(stderr, "warning: %s: unknown key '%s' ignored\n", where.c_str(), it.key().c_str());
  }
};

}  // namespace ttt::mimi
