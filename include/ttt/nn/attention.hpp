#pragma once
// Kyutai's StreamingMultiheadAttention: fused in-projection (q | k | v, "(p h d)" rows, one
// weight set per step for per-step-weight transformers such as Moshi's depformer),
// interleaved RoPE at absolute positions, a ring KV cache of `capacity` slots and a causal
// window of `context` steps. A layer may add keys of its own in front of the ring's
// (ExtraKeys: KV-memory's virtual keys) without writing attention again.
#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/nn/linear.hpp"
#include "ttt/nn/module.hpp"
#include "ttt/nn/norm.hpp"
#include "ttt/nn/transformer_config.hpp"

namespace ttt::nn {

// The ring KV cache of one attention layer. Keys are stored after RoPE. Each slot records
// the absolute position it holds (-1: empty), which is all the mask needs, so a per-item
// reset only clears positions. The keys and values are stored as T (dense) or, with
// --kv-dtype fp8|int8, quantised with one scale per (item, head, slot) row (core/quant.hpp
// QuantKv): half the bytes of bf16, which is what bounds conversations per GPU.
template <class T, class B>
struct KvRing {
  Tensor<T, B> k, v;       // [B, Hk, C, hd] (dense)
  Tensor<int64_t, B> pos;  // [B, C]
  WeightFormat format = WeightFormat::dense;
  QuantKv<Int8, B> k_int8, v_int8;     // format int8
  QuantKv<Fp8E4M3, B> k_fp8, v_fp8;    // format fp8_e4m3

  static KvRing make(int64_t batch, int64_t heads, int64_t capacity, int64_t head_dim,
                     WeightFormat format = WeightFormat::dense) {
    NoArenaScope<B> persistent;  // outlives the step that may create it
    KvRing r;
    r.format = format;
    switch (format) {
      case WeightFormat::dense:
        r.k = Tensor<T, B>::zeros({batch, heads, capacity, head_dim});
        r.v = Tensor<T, B>::zeros({batch, heads, capacity, head_dim});
        break;
      case WeightFormat::int8:
        r.k_int8 = QuantKv<Int8, B>::zeros(batch, heads, capacity, head_dim);
        r.v_int8 = QuantKv<Int8, B>::zeros(batch, heads, capacity, head_dim);
        break;
      case WeightFormat::fp8_e4m3:
        r.k_fp8 = QuantKv<Fp8E4M3, B>::zeros(batch, heads, capacity, head_dim);
        r.v_fp8 = QuantKv<Fp8E4M3, B>::zeros(batch, heads, capacity, head_dim);
        break;
    }
    r.pos = Tensor<int64_t, B>::empty({batch, capacity});
    ops::fill(r.pos, -1.0);
    return r;
  }
  bool defined() const { return pos.defined(); }
  int64_t capacity() const { return pos.size(1); }
  bool quantised() const { return format != WeightFormat::dense; }
  // [B, Hk, C, hd] of the keys, whatever the storage.
  Shape shape() const {
    return visit([](const auto& kk, const auto&) { return kk.shape(); });
  }
  // fn(keys, values) with the storage's own types: Tensor<T, B>, QuantKv<Int8, B> or
  // QuantKv<Fp8E4M3, B> (the ops take each form; see ops::attention and ops::kv_write).
  template <class Fn>
  decltype(auto) visit(Fn&& fn) const {
    switch (format) {
      case WeightFormat::int8: return fn(k_int8, v_int8);
      case WeightFormat::fp8_e4m3: return fn(k_fp8, v_fp8);
      case WeightFormat::dense: break;
    }
    return fn(k, v);
  }
  // The keys and values as T: the dense buffers themselves, or decoded copies [B, Hk, C, hd].
  std::pair<Tensor<T, B>, Tensor<T, B>> dense() const {
    if (!quantised()) return {k, v};
    auto kd = Tensor<T, B>::empty(shape()), vd = Tensor<T, B>::empty(shape());
    visit([&](const auto& kk, const auto& vv) {
      if constexpr (!std::is_same_v<std::decay_t<decltype(kk)>, Tensor<T, B>>) {
        ops::dequantize(kd, kk);
        ops::dequantize(vd, vv);
      }
    });
    return {kd, vd};
  }
  // Writes this call's keys and values (ops::kv_write on the storage).
  void write(const Tensor<T, B>& kn, const Tensor<T, B>& vn, const Tensor<int64_t, B>& positions,
             const Tensor<uint8_t, B>& exec_mask) const {
    visit([&](const auto& kk, const auto& vv) { ops::kv_write(kk, vv, pos, kn, vn, positions, exec_mask); });
  }
  // out [B, T, H, hd] = attention of q over the ring (ops::attention on the storage).
  void attend(const Tensor<T, B>& out, const Tensor<T, B>& q, const Tensor<int64_t, B>& q_pos,
              const AttentionParams& ap) const {
    visit([&](const auto& kk, const auto& vv) { ops::attention(out, q, kk, vv, q_pos, pos, ap); });
  }

  void reset(const std::vector<uint8_t>& mask) {
    bool all = true;
    for (size_t b = 0; b < mask.size(); ++b) all = all && mask[b];
    if (all) {
      ops::fill(pos, -1.0);
      return;
    }
    for (int64_t b = 0; b < pos.size(0); ++b)
      if (mask[size_t(b)]) ops::fill(pos.slice(0, b, b + 1), -1.0);
  }
  // The ring as `frames` one-step calls of every item (positions 0 .. frames - 1) leave it:
  // slot s holds the latest position p < frames with p = s (mod capacity), or none (-1);
  // keys and values are random normal draws (`seed`), stored as the ring stores them.
  // Benchmarks time a frame deep into a conversation this way without running the
  // conversation: which keys a query attends to, and so the work, depends only on the positions.
  void fill_as_after(int64_t frames, uint64_t seed) {
    TTT_CHECK(frames >= 0, "KvRing::fill_as_after: frames must be >= 0, got ", frames);
    const int64_t Bn = pos.size(0), C = capacity();
    std::vector<int64_t> p(size_t(Bn * C));
    for (int64_t s = 0; s < C; ++s) {
      const int64_t back = ((frames - 1 - s) % C + C) % C;  // frames - 1 - p, in [0, C)
      const int64_t q = frames - 1 - back;
      for (int64_t b = 0; b < Bn; ++b) p[size_t(b * C + s)] = q >= 0 ? q : -1;
    }
    pos.copy_from(to_backend<B>(Tensor<int64_t, Cpu>::from_vector({Bn, C}, p)));
    auto fill = [&](const auto& dst, uint64_t key) {
      using D = std::decay_t<decltype(dst)>;
      if constexpr (std::is_same_v<D, Tensor<T, B>>) {
        ops::random_normal(dst, 1.f, seed, key);
      } else {  // item by item: a batch's worth of T would not fit beside a full cache
        auto x = Tensor<T, B>::empty(dst.codes.select(0, 0).shape());
        for (int64_t b = 0; b < Bn; ++b) {
          ops::random_normal(x, 1.f, seed, key + 2 * uint64_t(b));
          const D item{dst.codes.slice(0, b, b + 1), dst.scale.slice(0, b, b + 1)};
          ops::quantize_rows(item.as_rows(), x.reshape(item.as_rows().shape()));
        }
      }
    };
    visit([&](const auto& kk, const auto& vv) {
      fill(kk, 1);
      fill(vv, 2);
    });
  }
  // fn(suffix, tensor) over the tensors that hold the keys and values, named as the session
  // file names them: ".k", ".v" (T), or the codes ".k", ".v" (u8) with ".k_scale", ".v_scale"
  // (f32). Self is KvRing or const KvRing; clone, copy_item, save and load are loops over it.
  template <class Self, class Fn>
  static void for_each_part(Self& r, Fn&& fn) {
    auto codes = [&](auto& kk, auto& vv) {
      fn(".k", kk.codes), fn(".k_scale", kk.scale), fn(".v", vv.codes), fn(".v_scale", vv.scale);
    };
    switch (r.format) {
      case WeightFormat::dense: fn(".k", r.k), fn(".v", r.v); break;
      case WeightFormat::int8: codes(r.k_int8, r.v_int8); break;
      case WeightFormat::fp8_e4m3: codes(r.k_fp8, r.v_fp8); break;
    }
    fn(".pos", r.pos);
  }
  KvRing clone() const {
    NoArenaScope<B> persistent;
    KvRing r = *this;
    for_each_part(r, [](const char*, auto& t) { t = t.clone(); });
    return r;
  }
  // Item src_b of `src` (a ring of the same layer, any batch) into item dst_b of this one.
  void copy_item(int64_t dst_b, const KvRing& src, int64_t src_b) {
    TTT_CHECK(src.format == format, "KvRing::copy_item: a ", weight_format_name(src.format), " ring into a ",
              weight_format_name(format), " one");
    const Shape a = src.shape(), b = shape();
    TTT_CHECK(a.d[1] == b.d[1] && src.capacity() == capacity() && a.d[3] == b.d[3],
              "KvRing::copy_item: rings of different layers (", a.str(), " vs ", b.str(), ")");
    // The same format has the same parts in the same order: pair them by position.
    int i = 0;
    for_each_part(*this, [&](const char*, const auto& dst) {
      int j = 0;
      for_each_part(src, [&](const char*, const auto& from) {
        if constexpr (std::is_same_v<decltype(&dst), decltype(&from)>)
          if (j == i) dst.select(0, dst_b).copy_from(from.select(0, src_b));
        ++j;
      });
      ++i;
    });
  }
  // Saved as <prefix> + each part's suffix; the format is recorded by which tensors exist, so a
  // session saved with one --kv-dtype does not load into an engine running another.
  void save(io::SafeTensorsWriter& w, const std::string& prefix) const {
    for_each_part(*this, [&](const char* suffix, const auto& t) { w.add(prefix + suffix, t); });
  }
  void load(const io::SafeTensors& st, const std::string& prefix) {
    const bool saved_quantised = st.contains(prefix + ".k_scale");
    TTT_CHECK(saved_quantised == quantised(), st.path(), ": the session's KV cache '", prefix, "' was saved ",
              saved_quantised ? "quantised" : "dense", ", this engine stores it as ", weight_format_name(format),
              " (start it with the --kv-dtype the session was saved with)");
    for_each_part(*this, [&](const char* suffix, const auto& dst) {
      const std::string name = prefix + suffix;
      auto h = st.load<typename std::decay_t<decltype(dst)>::value_type>(name);
      TTT_CHECK(h.shape() == dst.shape(), st.path(), ": state tensor '", name, "' has shape ", h.shape().str(),
                ", this session expects ", dst.shape().str());
      dst.copy_from(to_backend<B>(h));
    });
  }
};

// Keys a layer adds in front of the attention's own: a ring of earlier ones (optional) and
// this call's k, v [B, T, Hk, hd] at `positions` [B, T]. They are visible to a query while
// pos_q - pos_k < window, with bias[h] added to their logits; after the call this call's
// keys go into the ring (masked by the exec mask), like the layer's own.
template <class T, class B>
struct ExtraKeys {
  KvRing<T, B>* ring = nullptr;
  Tensor<T, B> k, v;
  Tensor<int64_t, B> positions;
  int64_t window = 0;
  Tensor<float, B> bias;  // [H]
};

template <class T, class B>
struct Mha {
  int64_t dim = 0, num_heads = 0, kv_heads = 0, head_dim = 0;
  bool rope = false;
  float max_period = 10000.f;
  int64_t context = 0;
  TransformerConfig cfg;
  std::vector<LinearWeight<T, B>> in_proj;   // per weight set [D + 2 * kv_dim, D]
  std::vector<LinearWeight<T, B>> out_proj;  // per weight set [D, D]

  int64_t qkv_dim() const { return dim + 2 * kv_heads * head_dim; }
  int64_t num_params() const {
    int64_t n = 0;
    for (auto& w : in_proj) n += w.numel();
    for (auto& w : out_proj) n += w.numel();
    return n;
  }

  static Mha load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& c) {
    Mha m;
    m.cfg = c;
    m.dim = c.d_model;
    m.num_heads = c.num_heads;
    m.kv_heads = c.num_heads / c.kv_repeat;
    m.head_dim = c.head_dim();
    m.rope = uses_rope(c.pos_emb);
    m.max_period = c.max_period;
    m.context = c.context;
    const int64_t sets = c.num_weight_sets(), D = m.dim, Q = m.qkv_dim();
    const io::Init init = io::Init::normal(1.f / std::sqrt(float(D)));
    // Release checkpoints fuse the per-step weights step-major (the load hook's
    // weight.view(mult, -1, in)); fine-tuned ones keep in_projs.{i}.
    for (const char* fused : {".in_proj_weight", ".in_proj.weight"}) {
      if (!ws.has(prefix + fused) || !m.in_proj.empty()) continue;
      auto w = linear_weight<T, B>(ws, prefix + fused, {sets * Q, D});
      for (int64_t i = 0; i < sets; ++i) m.in_proj.push_back(w.rows(i * Q, (i + 1) * Q));
    }
    if (m.in_proj.empty())
      for (int64_t i = 0; i < sets; ++i)
        m.in_proj.push_back(linear_weight<T, B>(ws, prefix + ".in_projs." + std::to_string(i) + ".weight", {Q, D}, init));
    if (ws.has(prefix + ".out_proj.weight")) {
      auto w = linear_weight<T, B>(ws, prefix + ".out_proj.weight", {sets * D, D});
      for (int64_t i = 0; i < sets; ++i) m.out_proj.push_back(w.rows(i * D, (i + 1) * D));
    } else {
      for (int64_t i = 0; i < sets; ++i)
        m.out_proj.push_back(linear_weight<T, B>(ws, prefix + ".out_projs." + std::to_string(i) + ".weight", {D, D}, init));
    }
    return m;
  }

  KvRing<T, B> make_ring(int64_t batch) const {
    const int64_t cap = cfg.cache_capacity();
    TTT_CHECK(cap > 0, "streaming attention needs a context or weights_per_step to size its KV cache");
    return KvRing<T, B>::make(batch, kv_heads, cap, head_dim, cfg.kv_format);
  }

  // y [B, T, D] (+)= out_proj(attention(norm(x))); `norm` null: x is already normalised.
  // `ring` null: keys are this call's only (teacher forcing). `step` is the per-step weight
  // index base (moshi's offset_cpu). `extra`: keys attended before the layer's own.
  void forward(const Tensor<T, B>& y, const Tensor<T, B>& x, const Norm<T, B>* norm, KvRing<T, B>* ring,
               const Tensor<int64_t, B>& positions, const Tensor<uint8_t, B>& exec_mask, int64_t step, float beta,
               const ExtraKeys<T, B>* extra = nullptr) const {
    const int64_t Bn = x.size(0), Tn = x.size(1), H = num_heads, Hk = kv_heads, hd = head_dim;
    auto qkv = Tensor<T, B>::empty({Bn, Tn, qkv_dim()});
    if (norm && (in_proj.size() == 1 || Tn == 1)) {
      // Norm and projection in one pass (one kernel per step when decoding on CUDA).
      nn::fused_linear(qkv, x, in_proj[size_t(cfg.weight_index(in_proj.size() == 1 ? 0 : step))], norm->as_prologue());
    } else {
      project(qkv, norm ? (*norm)(x) : x, in_proj, step);
    }
    auto heads = qkv.reshape({Bn, Tn, H + 2 * Hk, hd});
    auto q = heads.slice(2, 0, H), k = heads.slice(2, H, H + Hk), v = heads.slice(2, H + Hk, H + 2 * Hk);
    if (rope) {
      auto qk = heads.slice(2, 0, H + Hk);  // q and k are adjacent: one rotation for both
      ops::rope(qk, qk, positions, max_period);
    }
    auto o = Tensor<T, B>::empty({Bn, Tn, H, hd});
    AttentionParams ap{context, 1.f / std::sqrt(float(hd))};
    // The code path depends only on (ring?, extra?, T): a frame captured in a CUDA graph
    // stays valid across resets, which only rewrite slot positions on the device.
    if (!ring && !extra) {
      ops::attention(o, q, k.transpose(1, 2), v.transpose(1, 2), positions, positions, ap);
    } else if (!extra && (Tn == 1 || cfg.ring_write_first)) {
      // One new step cannot evict a key it still needs (capacity >= context); several can,
      // which is Kyutai's streaming semantics when the config asks for it.
      ring->write(k, v, positions, exec_mask);
      ring->attend(o, q, positions, ap);
    } else {
      // Attend over [extra ring | extra keys | ring | this call's keys], so that no key is
      // evicted before the queries of this call have seen it; then write the new keys.
      KvRing<T, B>* xring = extra ? extra->ring : nullptr;
      const int64_t N = xring ? xring->capacity() : 0, nx = extra ? N + Tn : 0, C = ring ? ring->capacity() : 0;
      const int64_t S = nx + C + Tn;
      auto kc = Tensor<T, B>::empty({Bn, Hk, S, hd}), vc = Tensor<T, B>::empty({Bn, Hk, S, hd});
      auto pc = Tensor<int64_t, B>::empty({Bn, S});
      auto put = [&](int64_t at, const Tensor<T, B>& kk, const Tensor<T, B>& vv, const Tensor<int64_t, B>& pp) {
        const int64_t n = kk.size(2);
        kc.slice(2, at, at + n).copy_from(kk);
        vc.slice(2, at, at + n).copy_from(vv);
        pc.slice(1, at, at + n).copy_from(pp);
      };
      // A quantised ring is decoded to T here (prefill and KV-memory layers; decoding
      // steps take the branch above, which reads the codes directly).
      if (xring) {
        auto [xk, xv] = xring->dense();
        put(0, xk, xv, xring->pos);
      }
      if (extra) {
        put(N, extra->k.transpose(1, 2), extra->v.transpose(1, 2), extra->positions);
        ap.prefix = nx;
        ap.prefix_context = extra->window;
        ap.prefix_bias = extra->bias.data();
      }
      if (ring) {
        auto [rk, rv] = ring->dense();
        put(nx, rk, rv, ring->pos);
      }
      put(nx + C, k.transpose(1, 2), v.transpose(1, 2), positions);
      ops::attention(o, q, kc, vc, positions, pc, ap);
      if (ring) ring->write(k, v, positions, exec_mask);
      if (xring) xring->write(extra->k, extra->v, extra->positions, exec_mask);
    }
    project_into(y, o.reshape({Bn, Tn, dim}), out_proj, step, beta);
  }

  // out [B, T, N] = x [B, T, K] @ W^T with per-step weights (weights_per_step).
  void project(const Tensor<T, B>& out, const Tensor<T, B>& x, const std::vector<LinearWeight<T, B>>& w,
               int64_t step) const {
    project_into(out, x, w, step, 0.f);
  }
  void project_into(const Tensor<T, B>& out, const Tensor<T, B>& x, const std::vector<LinearWeight<T, B>>& w,
                    int64_t step, float beta) const {
    const int64_t Tn = x.size(1);
    if (w.size() == 1) {
      nn::linear(out, x, w[0], beta);
      return;
    }
    for (int64_t t = 0; t < Tn; ++t) {
      const auto& wt = w[size_t(cfg.weight_index(step + t))];
      if (Tn == 1) {
        nn::linear(out, x, wt, beta);
      } else {
        auto xt = x.slice(1, t, t + 1).contiguous();
        auto ot = out.slice(1, t, t + 1).contiguous();
        nn::linear(ot, xt, wt, beta);
        out.slice(1, t, t + 1).copy_from(ot);
      }
    }
  }
};

}  // namespace ttt::nn
