#pragma once
// Moshi's StreamingMultiheadAttention: fused in-projection (q | k | v, "(p h d)" rows,
// one weight set per step for the depformer), interleaved RoPE at absolute positions,
// a ring KV cache of `capacity` slots and a causal window of `context` steps.
#include <cmath>
#include <string>
#include <vector>

#include "ttt/backend/ops.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/moshi/config.hpp"
#include "ttt/nn/module.hpp"
#include "ttt/nn/norm.hpp"

namespace ttt::nn {

// The ring KV cache of one attention layer. Keys are stored after RoPE. Each slot records
// the absolute position it holds (-1: empty), which is all the mask needs, so a per-item
// reset only clears positions.
template <class T, class B>
struct KvRing {
  Tensor<T, B> k, v;       // [B, Hk, C, hd]
  Tensor<int64_t, B> pos;  // [B, C]

  static KvRing make(int64_t batch, int64_t heads, int64_t capacity, int64_t head_dim) {
    NoArenaScope<B> persistent;  // outlives the step that may create it
    KvRing r;
    r.k = Tensor<T, B>::zeros({batch, heads, capacity, head_dim});
    r.v = Tensor<T, B>::zeros({batch, heads, capacity, head_dim});
    r.pos = Tensor<int64_t, B>::empty({batch, capacity});
    ops::fill(r.pos, -1.0);
    return r;
  }
  bool defined() const { return k.defined(); }
  int64_t capacity() const { return k.size(2); }

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
  KvRing clone() const {
    NoArenaScope<B> persistent;
    KvRing r;
    r.k = k.clone();
    r.v = v.clone();
    r.pos = pos.clone();
    return r;
  }
  void save(io::SafeTensorsWriter& w, const std::string& prefix) const {
    w.add(prefix + ".k", k);
    w.add(prefix + ".v", v);
    w.add(prefix + ".pos", pos);
  }
  void load(const io::SafeTensors& st, const std::string& prefix) {
    auto get = [&](auto& dst, const std::string& name) {
      using D = typename std::decay_t<decltype(dst)>::value_type;
      auto h = st.load<D>(name);
      TTT_CHECK(h.shape() == dst.shape(), st.path(), ": state tensor '", name, "' has shape ", h.shape().str(),
                ", this session expects ", dst.shape().str());
      dst.copy_from(to_backend<B>(h));
    };
    get(k, prefix + ".k");
    get(v, prefix + ".v");
    get(pos, prefix + ".pos");
  }
};

template <class T, class B>
struct Mha {
  int64_t dim = 0, num_heads = 0, kv_heads = 0, head_dim = 0;
  bool rope = false;
  float max_period = 10000.f;
  int64_t context = 0;
  moshi::TransformerConfig cfg;
  std::vector<Tensor<T, B>> in_proj;   // per weight set [D + 2 * kv_dim, D]
  std::vector<Tensor<T, B>> out_proj;  // per weight set [D, D]

  int64_t qkv_dim() const { return dim + 2 * kv_heads * head_dim; }

  static Mha load(io::WeightSource& ws, const std::string& prefix, const moshi::TransformerConfig& c) {
    Mha m;
    m.cfg = c;
    m.dim = c.d_model;
    m.num_heads = c.num_heads;
    m.kv_heads = c.num_heads / c.kv_repeat;
    m.head_dim = c.head_dim();
    m.rope = c.pos_emb == moshi::PosEmb::rope || c.pos_emb == moshi::PosEmb::sin_rope;
    m.max_period = c.max_period;
    m.context = c.context;
    const int64_t sets = c.num_weight_sets(), D = m.dim, Q = m.qkv_dim();
    const io::Init init = io::Init::normal(1.f / std::sqrt(float(D)));
    // Release checkpoints fuse the per-step weights step-major (the load hook's
    // weight.view(mult, -1, in)); fine-tuned ones keep in_projs.{i}.
    for (const char* fused : {".in_proj_weight", ".in_proj.weight"}) {
      if (!ws.has(prefix + fused) || !m.in_proj.empty()) continue;
      auto w = ws.get<T>(prefix + fused, {sets * Q, D});
      for (int64_t i = 0; i < sets; ++i) m.in_proj.push_back(to_backend<B>(w.slice(0, i * Q, (i + 1) * Q)));
    }
    if (m.in_proj.empty())
      for (int64_t i = 0; i < sets; ++i)
        m.in_proj.push_back(nn::weight<T, B>(ws, prefix + ".in_projs." + std::to_string(i) + ".weight", {Q, D}, init));
    if (ws.has(prefix + ".out_proj.weight")) {
      auto w = ws.get<T>(prefix + ".out_proj.weight", {sets * D, D});
      for (int64_t i = 0; i < sets; ++i) m.out_proj.push_back(to_backend<B>(w.slice(0, i * D, (i + 1) * D)));
    } else {
      for (int64_t i = 0; i < sets; ++i)
        m.out_proj.push_back(nn::weight<T, B>(ws, prefix + ".out_projs." + std::to_string(i) + ".weight", {D, D}, init));
    }
    return m;
  }

  KvRing<T, B> make_ring(int64_t batch) const {
    int64_t cap = context > 0 ? context : cfg.weights_per_step;
    TTT_CHECK(cap > 0, "streaming attention needs a context or weights_per_step to size its KV cache");
    return KvRing<T, B>::make(batch, kv_heads, cap, head_dim);
  }

  // y [B, T, D] (+)= out_proj(attention(norm(x))); `norm` null: x is already normalised.
  // `ring` null: keys are this call's only (teacher forcing). `step` is the per-step weight
  // index base (moshi's offset_cpu).
  void forward(const Tensor<T, B>& y, const Tensor<T, B>& x, const Norm<T, B>* norm, KvRing<T, B>* ring,
               const Tensor<int64_t, B>& positions, const Tensor<uint8_t, B>& exec_mask, int64_t step,
               float beta) const {
    const int64_t Bn = x.size(0), Tn = x.size(1), H = num_heads, Hk = kv_heads, hd = head_dim;
    auto qkv = Tensor<T, B>::empty({Bn, Tn, qkv_dim()});
    if (norm && (in_proj.size() == 1 || Tn == 1)) {
      // Norm and projection in one pass (one kernel per step when decoding on CUDA).
      ops::fused_linear(qkv, x, in_proj[size_t(cfg.weight_index(in_proj.size() == 1 ? 0 : step))], norm->as_prologue());
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
    const AttentionParams ap{context, 1.f / std::sqrt(float(hd))};
    // The code path depends only on (ring?, T): a frame captured in a CUDA graph stays valid
    // across resets, which only rewrite slot positions on the device.
    if (!ring) {
      ops::attention(o, q, k.transpose(1, 2), v.transpose(1, 2), positions, positions, ap);
    } else if (Tn == 1) {
      // One new step cannot evict a key it still needs (capacity >= context).
      ops::kv_write(ring->k, ring->v, ring->pos, k, v, positions, exec_mask);
      ops::attention(o, q, ring->k, ring->v, positions, ring->pos, ap);
    } else {
      // Several steps: attend over the ring plus this call's keys, so no key is evicted
      // before the queries of this call have seen it.
      const int64_t C = ring->capacity();
      auto kc = Tensor<T, B>::empty({Bn, Hk, C + Tn, hd}), vc = Tensor<T, B>::empty({Bn, Hk, C + Tn, hd});
      auto pc = Tensor<int64_t, B>::empty({Bn, C + Tn});
      kc.slice(2, 0, C).copy_from(ring->k);
      vc.slice(2, 0, C).copy_from(ring->v);
      pc.slice(1, 0, C).copy_from(ring->pos);
      kc.slice(2, C, C + Tn).copy_from(k.transpose(1, 2));
      vc.slice(2, C, C + Tn).copy_from(v.transpose(1, 2));
      pc.slice(1, C, C + Tn).copy_from(positions);
      ops::attention(o, q, kc, vc, positions, pc, ap);
      ops::kv_write(ring->k, ring->v, ring->pos, k, v, positions, exec_mask);
    }
    project_into(y, o.reshape({Bn, Tn, dim}), out_proj, step, beta);
  }

  // out [B, T, N] = x [B, T, K] @ W^T with per-step weights (weights_per_step).
  void project(const Tensor<T, B>& out, const Tensor<T, B>& x, const std::vector<Tensor<T, B>>& w, int64_t step) const {
    project_into(out, x, w, step, 0.f);
  }
  void project_into(const Tensor<T, B>& out, const Tensor<T, B>& x, const std::vector<Tensor<T, B>>& w, int64_t step,
                    float beta) const {
    const int64_t Tn = x.size(1);
    if (w.size() == 1) {
      ops::linear(out, x, w[0], beta);
      return;
    }
    for (int64_t t = 0; t < Tn; ++t) {
      const auto& wt = w[size_t(cfg.weight_index(step + t))];
      if (Tn == 1) {
        ops::linear(out, x, wt, beta);
      } else {
        auto xt = x.slice(1, t, t + 1).contiguous();
        auto ot = out.slice(1, t, t + 1).contiguous();
        ops::linear(ot, xt, wt, beta);
        out.slice(1, t, t + 1).copy_from(ot);
      }
    }
  }
};

}  // namespace ttt::nn
