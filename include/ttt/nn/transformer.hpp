#pragma once
// Kyutai's StreamingTransformer over a compile-time list of layer policies (nn/layer.hpp).
// Each layer is a std::variant over the policies' Params; the owner's layer plan picks the
// policy per layer by its design name (plain attention when a layer is not listed). Moshi's
// temporal transformer and depformer and Mimi's encoder and decoder transformers are all
// this class with different configs (and, for Moshi's temporal one, the TTT policies).
#include <string>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "ttt/nn/layer.hpp"

namespace ttt::nn {

template <class T, class B, class List>
class Transformer;

template <class T, class B, template <class, class> class... Ps>
class Transformer<T, B, PolicyList<Ps...>> {
 public:
  using LayerParams = std::variant<typename Ps<T, B>::Params...>;
  using LayerState = std::variant<typename Ps<T, B>::State...>;

  // The design names this transformer was built with (a layer plan may name any of them).
  static std::vector<std::string> designs() { return {std::string(Ps<T, B>::design)...}; }

  struct Params {
    TransformerConfig cfg;
    std::vector<LayerParams> layers;
  };

  struct State {
    std::vector<LayerState> layers;
    std::vector<int64_t> offsets;  // [B] steps since reset (positions), host side
    int64_t step = 0;              // calls' total length (moshi's offset_cpu)
    bool streaming = false;
    int64_t batch() const { return int64_t(offsets.size()); }
  };

  // `entries[i]` is layer i's plan entry (null for plain attention) and `designs[i]` its
  // design name (empty or missing: "attention").
  static Params load(io::WeightSource& ws, const std::string& prefix, const TransformerConfig& cfg,
                     const std::vector<io::Json>& entries = {}, const std::vector<std::string>& designs = {},
                     const std::string& where = "config") {
    Params p;
    p.cfg = cfg;
    for (int64_t i = 0; i < cfg.num_layers; ++i) {
      LayerSpec spec{cfg, i, size_t(i) < entries.size() ? entries[size_t(i)] : io::Json(), where};
      const std::string design = size_t(i) < designs.size() && !designs[size_t(i)].empty() ? designs[size_t(i)] : "attention";
      const std::string lp = prefix + ".layers." + std::to_string(i);
      bool found = false;
      (try_load<Ps>(p, ws, lp, spec, design, found), ...);
      if (!found) fail(where, ": layer ", i, ": design '", design, "' is not in this engine's policy list");
    }
    return p;
  }

  static State init_state(const Params& p, int64_t batch, bool streaming) {
    State s;
    s.streaming = streaming;
    s.offsets.assign(size_t(batch), 0);
    for (const auto& lp : p.layers)
      s.layers.push_back(std::visit(
          [&](const auto& params) -> LayerState { return policy_of(params).init_state(params, batch, streaming); }, lp));
    return s;
  }

  // x [B, T, D] in place. exec_host [B] (empty: all execute) freezes items' state.
  static void forward(const Params& p, State& s, const Tensor<T, B>& x, const std::vector<uint8_t>& exec_host,
                      const Tensor<uint8_t, B>& exec_mask, const Tensor<T, B>& embeddings = {}) {
    const int64_t Bn = x.size(0), Tn = x.size(1);
    TTT_CHECK(Bn == s.batch(), "transformer: batch ", Bn, " but the state was made for ", s.batch());
    LayerInput<T, B> in;
    std::vector<int64_t> pos(size_t(Bn * Tn));
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < Tn; ++t) pos[size_t(b * Tn + t)] = s.offsets[size_t(b)] + t;
    in.positions = Tensor<int64_t, B>::from_vector({Bn, Tn}, pos);
    in.exec_mask = exec_mask;
    in.exec_host = exec_host;
    in.step = s.step;
    in.embeddings = embeddings;
    forward_with(p, s, x, in);
  }

  // Same with caller-made inputs (positions already on the backend).
  static void forward_with(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    run(p, s, x, in);
    advance(s, x.size(1), in.exec_host);
  }

  // The device work of a call, without the host bookkeeping: this is what a CUDA graph
  // captures, so it must not branch on host state that changes from frame to frame.
  static void run(const Params& p, State& s, const Tensor<T, B>& x, const LayerInput<T, B>& in) {
    const auto& c = p.cfg;
    if (uses_sin(c.pos_emb)) ops::add_sin_embedding(x, in.positions, c.max_period, c.positional_scale);
    for (size_t i = 0; i < p.layers.size(); ++i)
      std::visit(
          [&](const auto& params) {
            using P = decltype(policy_of(params));
            P::forward(params, std::get<typename P::State>(s.layers[i]), x, in);
          },
          p.layers[i]);
  }

  // Host bookkeeping after a call of T steps (never inside a captured frame): the
  // transformer's offsets, then each policy's own.
  static void advance(State& s, int64_t Tn, const std::vector<uint8_t>& exec_host) {
    for (size_t b = 0; b < s.offsets.size(); ++b)
      if (exec_host.empty() || exec_host[b]) s.offsets[b] += Tn;
    s.step += Tn;
    for (auto& l : s.layers)
      std::visit(
          [&](auto& st) {
            using P = decltype(policy_of_state(st));
            if constexpr (requires { P::advance(st, Tn, exec_host); }) {
              P::advance(st, Tn, exec_host);
            } else {
              for_each_field(st, [&](const char*, auto& m) {
                if constexpr (requires { m.advance(Tn, exec_host); })
                  if (m.defined()) m.advance(Tn, exec_host);
              });
            }
          },
          l);
  }

  // The state (made by init_state) as after `frames` one-step calls of every item, for
  // benchmarks that time a frame deep into a conversation without running it: each layer
  // state field that can (KvRing::fill_as_after) takes the positions those calls would have
  // left, with random contents, and the host bookkeeping (offsets, step, each policy's
  // counters) advances by `frames` as those calls would. Other state (TTT fast weights, chunk
  // buffers) keeps its values: its per-frame work does not depend on them.
  static void fill_as_after(State& s, int64_t frames, uint64_t seed) {
    TTT_CHECK(frames >= 0, "fill_as_after: frames must be >= 0, got ", frames);
    TTT_CHECK(s.step == 0, "fill_as_after: needs a fresh state (this one has run ", s.step, " steps)");
    for (int64_t o : s.offsets) TTT_CHECK(o == 0, "fill_as_after: needs a fresh state");
    uint64_t field_seed = seed;
    for (auto& l : s.layers)
      std::visit(
          [&](auto& st) {
            for_each_field(st, [&](const char*, auto& m) {
              if constexpr (requires { m.fill_as_after(frames, seed); })
                if (m.defined()) m.fill_as_after(frames, io::detail::splitmix64(field_seed));
            });
          },
          l);
    advance(s, frames, {});
  }

  // What the next one-frame call's device work depends on beyond device memory: a frame
  // graph is captured per distinct key.
  static uint64_t graph_key(const Params& p, const State& s, const std::vector<uint8_t>& exec_host) {
    uint64_t key = 0;
    for (size_t i = 0; i < p.layers.size(); ++i)
      std::visit(
          [&](const auto& params) {
            using P = decltype(policy_of(params));
            if constexpr (requires(const typename P::State& st) { P::graph_key(params, st, exec_host); }) {
              const uint64_t k = P::graph_key(params, std::get<typename P::State>(s.layers[i]), exec_host);
              if (k) key ^= (k + 0x9e3779b97f4a7c15ull + (uint64_t(i) << 6)) * 0xff51afd7ed558ccdull;
            }
          },
          p.layers[i]);
    return key;
  }

  // True when some layer's policy reads the frame's token-embedding sum.
  static bool needs_embeddings(const Params& p) {
    bool any = false;
    for (const auto& lp : p.layers)
      any = any || std::visit(
                       [](const auto& params) {
                         using P = decltype(policy_of(params));
                         if constexpr (requires { P::needs_embeddings; }) return bool(P::needs_embeddings);
                         else return false;
                       },
                       lp);
    return any;
  }
  // False when some layer's forward depends on host state that a replayed graph would not
  // update (the engine then runs frames eagerly).
  static bool graph_safe(const Params& p) {
    bool ok = true;
    for (const auto& lp : p.layers)
      ok = ok && std::visit(
                     [](const auto& params) {
                       using P = decltype(policy_of(params));
                       if constexpr (requires { P::graph_safe; }) return bool(P::graph_safe);
                       else return true;
                     },
                     lp);
    return ok;
  }

  static void reset(const Params& p, State& s, const std::vector<uint8_t>& mask) {
    for (size_t b = 0; b < s.offsets.size(); ++b)
      if (mask[b]) s.offsets[b] = 0;
    s.step = 0;
    for (auto& l : s.layers)
      std::visit(
          [&](auto& st) {
            using P = decltype(policy_of_state(st));
            if constexpr (requires { P::reset(st, mask); }) P::reset(st, mask);
            else for_each_field(st, [&](const char*, auto& m) { if (m.defined()) m.reset(mask); });
          },
          l);
  }

  static State clone(const State& s) {
    State c;
    c.offsets = s.offsets;
    c.step = s.step;
    c.streaming = s.streaming;
    for (const auto& l : s.layers)
      c.layers.push_back(std::visit(
          [](const auto& st) -> LayerState {
            using P = decltype(policy_of_state(st));
            if constexpr (requires { P::clone(st); }) {
              return P::clone(st);
            } else {
              auto copy = st;  // plain members copied; fields deep-copied below
              for_each_field(copy, [](const char*, auto& m) { if (m.defined()) m = m.clone(); });
              return copy;
            }
          },
          l));
    return c;
  }

  // Item src_b of `src` into item dst_b of `dst` (states of this transformer, any batch
  // sizes): the item's rows of every layer's state and its offset, by device copies of that
  // item only; the other items of `dst` are untouched. `step` (the calls' total, shared by
  // all items) is kept: it indexes per-step weights only, which streaming items share.
  static void copy_item(State& dst, int64_t dst_b, const State& src, int64_t src_b) {
    TTT_CHECK(dst.layers.size() == src.layers.size() && 0 <= dst_b && dst_b < dst.batch() && 0 <= src_b &&
                  src_b < src.batch(),
              "Transformer::copy_item: item ", src_b, " of ", src.batch(), " into ", dst_b, " of ", dst.batch());
    dst.offsets[size_t(dst_b)] = src.offsets[size_t(src_b)];
    for (size_t i = 0; i < dst.layers.size(); ++i)
      std::visit(
          [&](auto& d) {
            using St = std::decay_t<decltype(d)>;
            using P = decltype(policy_of_state(d));
            const auto* sp = std::get_if<St>(&src.layers[i]);
            TTT_CHECK(sp, "Transformer::copy_item: layer ", i, " has another design in the source state");
            if constexpr (requires { P::copy_item(d, dst_b, *sp, src_b); }) {
              P::copy_item(d, dst_b, *sp, src_b);
            } else if constexpr (requires { St::fields; }) {
              std::apply([&](const auto&... f) { (copy_field(d.*(f.member), dst_b, (*sp).*(f.member), src_b), ...); },
                         St::fields);
            }
          },
          dst.layers[i]);
  }

  static void save(const State& s, io::SafeTensorsWriter& w, const std::string& prefix) {
    w.add(prefix + ".offsets", Tensor<int64_t, Cpu>::from_vector({int64_t(s.offsets.size())}, s.offsets));
    w.add(prefix + ".step", Tensor<int64_t, Cpu>::from_vector({1}, {s.step}));
    for (size_t i = 0; i < s.layers.size(); ++i) {
      const std::string lp = prefix + ".layers." + std::to_string(i);
      std::visit(
          [&](const auto& st) {
            using P = decltype(policy_of_state(st));
            if constexpr (requires { P::save(st, w, lp); }) P::save(st, w, lp);
            else for_each_field(st, [&](const char* name, const auto& m) { if (m.defined()) m.save(w, lp + "." + name); });
          },
          s.layers[i]);
    }
  }
  static void load_state(State& s, const io::SafeTensors& st, const std::string& prefix) {
    const auto off = st.load_counters(prefix + ".offsets");
    TTT_CHECK(off.size() == s.offsets.size(), st.path(), ": '", prefix, ".offsets' holds ", off.size(),
              " batch items, this session has ", s.offsets.size());
    s.offsets = off;
    const auto step = st.load_counters(prefix + ".step");
    TTT_CHECK(step.size() == 1, st.path(), ": bad '", prefix, ".step'");
    s.step = step[0];
    for (size_t i = 0; i < s.layers.size(); ++i) {
      const std::string lp = prefix + ".layers." + std::to_string(i);
      std::visit(
          [&](auto& ls) {
            using P = decltype(policy_of_state(ls));
            if constexpr (requires { P::load_state(ls, st, lp); }) P::load_state(ls, st, lp);
            else for_each_field(ls, [&](const char* name, auto& m) { if (m.defined()) m.load(st, lp + "." + name); });
          },
          s.layers[i]);
    }
  }

  static int64_t num_params(const Params& p) {
    int64_t n = 0;
    for (const auto& lp : p.layers)
      n += std::visit([](const auto& params) { return decltype(policy_of(params))::num_params(params); }, lp);
    return n;
  }

  // The design a layer uses (for `info`).
  static const char* design_of(const LayerParams& lp) {
    return std::visit([](const auto& params) { return decltype(policy_of(params))::design; }, lp);
  }

 private:
  template <template <class, class> class P>
  static void try_load(Params& p, io::WeightSource& ws, const std::string& prefix, const LayerSpec& spec,
                       const std::string& design, bool& found) {
    if (found || design != P<T, B>::design) return;
    found = true;
    p.layers.emplace_back(std::in_place_type<typename P<T, B>::Params>, P<T, B>::load(ws, prefix, spec));
  }

  template <class M>
  static void copy_field(M& d, int64_t dst_b, const M& s, int64_t src_b) {
    TTT_CHECK(d.defined() == s.defined(), "Transformer::copy_item: a state field is defined in one state only");
    if (d.defined()) d.copy_item(dst_b, s, src_b);
  }

  // fn(name, member) for each entry of S::fields (const S gives const members).
  template <class S, class F>
  static void for_each_field(S& s, F&& fn) {
    using St = std::remove_const_t<S>;
    if constexpr (requires { St::fields; })
      std::apply([&](const auto&... f) { (fn(f.name, s.*(f.member)), ...); }, St::fields);
  }

  // Maps a Params / State type back to its policy (each policy's types are distinct).
  template <class X>
  static auto policy_of(const X&) {
    return find_policy<X, true, Ps...>();
  }
  template <class X>
  static auto policy_of_state(const X&) {
    return find_policy<X, false, Ps...>();
  }
  template <class X, bool ByParams, template <class, class> class P, template <class, class> class... Rest>
  static auto find_policy() {
    using Pol = P<T, B>;
    if constexpr (std::is_same_v<X, std::conditional_t<ByParams, typename Pol::Params, typename Pol::State>>)
      return Pol{};
    else
      return find_policy<X, ByParams, Rest...>();
  }
};

}  // namespace ttt::nn
