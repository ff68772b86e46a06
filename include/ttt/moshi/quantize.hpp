#pragma once
// Writing a Moshi checkpoint with its linear weights already quantised (docs/weights.md,
// "Quantised checkpoints"): each linear weight the loader reads through nn::linear_weight
// becomes `<name>` U8 [N, K] codes + `<name>_scale` F32 [N], the file's metadata says the
// format ("ttt.weight_format": "int8" | "fp8_e4m3"); every other tensor is copied as stored.
// Per-row quantisation does not depend on how rows are grouped, so a fused per-step weight
// (the depformer's in_proj) quantised whole equals its per-step slices quantised one by one.
#include <cmath>
#include <cstdio>
#include <string>
#include <string_view>

#include "ttt/backend/cpu/kernels.hpp"
#include "ttt/backend/ops.hpp"
#include "ttt/core/quant.hpp"
#include "ttt/io/safetensors.hpp"

namespace ttt::moshi {

// The linear weights of the temporal transformer, the depformer and the heads, by their
// checkpoint names (moshi's LMModel state dict).
inline bool is_quantizable_linear(std::string_view name) {
  auto starts = [&](std::string_view p) { return name.substr(0, p.size()) == p; };
  auto ends = [&](std::string_view s) { return name.size() >= s.size() && name.substr(name.size() - s.size()) == s; };
  auto per_index = [&](std::string_view head) {  // "<head>.<digits>.weight"
    if (!starts(head) || !ends(".weight")) return false;
    const std::string_view mid = name.substr(head.size(), name.size() - head.size() - 7);
    if (mid.empty()) return false;
    for (char ch : mid)
      if (ch < '0' || ch > '9') return false;
    return true;
  };
  if (name == "text_linear.weight" || per_index("depformer_in.") || per_index("linears.")) return true;
  if (!starts("transformer.layers.") && !starts("depformer.layers.")) return false;
  for (std::string_view s : {".self_attn.in_proj_weight", ".self_attn.in_proj.weight", ".self_attn.out_proj.weight",
                             ".gating.linear_in.weight", ".gating.linear_out.weight", ".linear1.weight",
                             ".linear2.weight"})
    if (ends(s)) return true;
  // Per-step variants: self_attn.in_projs.{i}.weight, out_projs.{i}, gating.{i}.linear_in/out.
  const size_t at = name.find(".self_attn.in_projs."), ao = name.find(".self_attn.out_projs."),
               ag = name.find(".gating.");
  if (at != std::string_view::npos || ao != std::string_view::npos) return ends(".weight");
  if (ag != std::string_view::npos) return ends(".linear_in.weight") || ends(".linear_out.weight");
  return false;
}

struct QuantizeReport {
  int64_t quantized = 0, copied = 0;
  double bytes_in = 0, bytes_out = 0;
};

namespace detail {
template <class F>
void add_quantized(io::SafeTensorsWriter& w, const std::string& name, const Tensor<float, Cpu>& t) {
  auto q = ops::quantize_rows<F>(t.contiguous());
  w.add(name, q.data);
  w.add(name + "_scale", q.scale);
}
}  // namespace detail

// Reads `in`, writes `out` with the linear weights in format f (int8 or fp8_e4m3).
inline QuantizeReport write_quantized(const std::string& in, const std::string& out, WeightFormat f) {
  TTT_CHECK(f != WeightFormat::dense, "quantize: the format must be int8 or fp8_e4m3");
  const auto st = io::SafeTensors::open(in);
  io::SafeTensorsWriter w;
  for (const auto& [k, v] : st.metadata()) w.add_metadata(k, v);
  w.add_metadata("ttt.weight_format", std::string(weight_format_name(f)));
  QuantizeReport rep;
  for (const auto& name : st.names()) {
    const auto& info = st.info(name);
    rep.bytes_in += double(info.end - info.begin);
    const bool floating = info.dtype == DType::f32 || info.dtype == DType::f64 || info.dtype == DType::bf16 ||
                          info.dtype == DType::f16;
    if (st.contains(name + "_scale") || (name.size() > 6 && name.substr(name.size() - 6) == "_scale"))
      fail(in, ": tensor '", name, "' looks already quantised (a '_scale' tensor): quantise the float checkpoint");
    if (floating && info.shape.rank == 2 && is_quantizable_linear(name)) {
      auto t = st.load<float>(name).contiguous();
      for (int64_t i = 0; i < t.numel(); ++i)
        if (!std::isfinite(t.data()[i])) fail(in, ": tensor '", name, "' holds a non-finite value (flat index ", i, ")");
      if (f == WeightFormat::int8) detail::add_quantized<Int8>(w, name, t);
      else detail::add_quantized<Fp8E4M3>(w, name, t);
      rep.bytes_out += double(t.numel() + 4 * t.size(0));
      ++rep.quantized;
      continue;
    }
    switch (info.dtype) {
      case DType::f32: w.add(name, st.load<float>(name)); break;
      case DType::f64: w.add(name, st.load<double>(name)); break;
      case DType::bf16: w.add(name, st.load<bf16>(name)); break;
      case DType::f16: w.add(name, st.load<f16>(name)); break;
      case DType::i32: w.add(name, st.load<int32_t>(name)); break;
      case DType::i64: w.add(name, st.load<int64_t>(name)); break;
      case DType::u8: case DType::boolean: w.add(name, st.load<uint8_t>(name)); break;
    }
    rep.bytes_out += double(info.end - info.begin);
    ++rep.copied;
  }
  w.write(out);
  return rep;
}

}  // namespace ttt::moshi
