#pragma once
// LmGen: moshi's LMGen.step, one frame per call. The token ring with the codebook
// delays lives on the host (a frame's inputs are 17 integers); the transformer state,
// the sampling and the depformer run on the backend, and one copy back per frame brings
// the new tokens. The whole session (KV rings, layer states, token ring, offsets, RNG
// counter) is a value: snapshot() forks it, save()/load() move it across processes, and
// copy_item() moves one item between sessions of any batch size (ttt::serve's conversations).
//
// Sampling is per item: item b has its own GenOptions (temperatures, top-k, seed) and draws
// from Philox(seed_b, frames_b * 64 + salt, token), frames_b being its own frame counter
// (offsets[b]), so an item's tokens never depend on its slot, the batch size or the other
// items. With one GenOptions for the whole batch, item b gets seed + b: item b of a batch
// run draws exactly as a batch-1 run with seed + b.
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "ttt/core/arena.hpp"
#include "ttt/core/graph.hpp"
#include "ttt/core/workspace.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/moshi/lm.hpp"

namespace ttt::moshi {

struct GenOptions {
  bool use_sampling = true;
  float temp = 0.8f, temp_text = 0.7f;
  int top_k = 250, top_k_text = 25;
  uint64_t seed = 0;

  static GenOptions from(const GenConfig& g) {
    GenOptions o;
    o.use_sampling = g.use_sampling;
    o.temp = g.temp;
    o.temp_text = g.temp_text;
    o.top_k = g.top_k;
    o.top_k_text = g.top_k_text;
    return o;
  }
};

template <class T, class B, class Policies>
class LmGen {
 public:
  using Model = LmModel<T, B, Policies>;
  using TemporalT = typename Model::TemporalT;
  using DepformerT = typename Model::DepformerT;

  static constexpr int64_t kUngenerated = -2;

  // Per-session device plumbing of a frame: staging buffers (pinned on CUDA), the arena
  // that makes a frame's allocations replayable, and the captured graph. Never shared
  // between sessions: a graph bakes in the addresses of one session's state.
  struct FrameRuntime {
    Arena<B> arena{size_t(16) << 20};
    Workspace<B> workspace;  // persistent scratch of the layers (not state: never saved)
    FrameGraph<B> graph;
    std::shared_ptr<void> host_in, host_out;  // staging
    std::shared_ptr<void> dev_in, dev_out;
    Tensor<int64_t, B> dep_positions;  // [dep_q, B, 1]: the depformer's step k is position k
    size_t in_bytes = 0, out_bytes = 0;
  };

  struct Session {
    std::shared_ptr<FrameRuntime> rt;
    typename TemporalT::State temporal;
    typename DepformerT::State depformer;  // scratch: reset every frame
    std::vector<int64_t> cache;            // [B, K, CT] token ring, -2 = not generated yet
    std::vector<int64_t> offsets;          // [B] frames done per item
    std::vector<uint8_t> exec;             // [B] exec mask
    std::vector<GenOptions> sampling;      // [B] each item's sampling (its RNG: seed and offsets[b])
    int64_t offset_cpu = 0;                // calls since the last full reset
    int64_t frame = 0;                     // calls since start (not the RNG counter: that is per item)
    int64_t batch() const { return int64_t(offsets.size()); }
  };

  LmGen(const Model& model, GenOptions opt) : m_(model), opt_(opt) {}

  const Model& model() const { return m_; }
  const GenOptions& options() const { return opt_; }
  int64_t ring_size() const { return m_.cfg.max_delay() + 2; }
  int64_t num_user_codebooks() const { return m_.cfg.num_codebooks() - m_.cfg.dep_q - 1; }

  Session start(int64_t batch) const {
    TTT_CHECK(batch > 0, "generate: batch must be positive, got ", batch);
    Session s;
    s.temporal = TemporalT::init_state(m_.transformer, batch, true);
    if (m_.cfg.dep_q > 0) s.depformer = DepformerT::init_state(m_.depformer, batch, true);
    s.cache.assign(size_t(batch * m_.cfg.num_codebooks() * ring_size()), kUngenerated);
    s.offsets.assign(size_t(batch), 0);
    s.exec.assign(size_t(batch), 1);
    for (int64_t b = 0; b < batch; ++b) {
      s.sampling.push_back(opt_);
      s.sampling.back().seed = opt_.seed + uint64_t(b);
    }
    s.rt = make_runtime(batch);
    return s;
  }

  // Item b's sampling from the next frame on (a conversation's own options).
  void set_item_options(Session& s, int64_t b, const GenOptions& o) const {
    TTT_CHECK(0 <= b && b < s.batch(), "generate: item ", b, " out of range for batch ", s.batch());
    check_options(o, "generate: item options");
    s.sampling[size_t(b)] = o;
  }
  static void check_options(const GenOptions& o, const std::string& where) {
    TTT_CHECK(std::isfinite(o.temp) && o.temp >= 0.f && std::isfinite(o.temp_text) && o.temp_text >= 0.f, where,
              ": temperatures must be finite and >= 0, got temp ", o.temp, ", temp_text ", o.temp_text);
    TTT_CHECK(o.top_k >= 0 && o.top_k_text >= 0, where, ": top_k must be >= 0, got top_k ", o.top_k,
              ", top_k_text ", o.top_k_text);
  }

  // Capturing frames into CUDA graphs is on by default where the layers allow it.
  void set_graphs(bool on) { graphs_ = on; }

  // user [B, Ki >= n_q - dep_q] host codes for this frame (extra codebooks are ignored).
  // Returns [B, 1 + dep_q] = [text, audio 0..dep_q-1] of frame o - max_delay, or nothing
  // while the delays are filling (items not executing get -2).
  std::optional<Tensor<int64_t, Cpu>> step(Session& s, const Tensor<int64_t, Cpu>& user) const {
    auto out = step_items(s, user);
    if (s.offset_cpu <= m_.cfg.max_delay()) return std::nullopt;
    return out;
  }

  // step() without moshi's session-wide gate: always [B, 1 + dep_q], each item's tokens of its
  // own frame offsets[b] - max_delay, -2 where its delays are still filling or it did not
  // execute. What a batch of conversations that join at different times steps with.
  Tensor<int64_t, Cpu> step_items(Session& s, const Tensor<int64_t, Cpu>& user) const {
    const auto& c = m_.cfg;
    const int64_t Bn = s.batch(), K = c.num_codebooks(), CT = ring_size(), nu = num_user_codebooks();
    TTT_CHECK(user.rank() == 2 && user.size(0) == Bn, "generate: user codes ", user.shape().str(), " for batch ", Bn);
    TTT_CHECK(user.size(1) >= nu, "generate: expected ", nu, " user codebooks, got ", user.size(1));
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t i = 0; i < nu; ++i) {
        const int64_t v = user(b, i);
        if (v < -1 || v >= c.card)
          fail("generate: user code ", v, " (item ", b, ", codebook ", i, ") is out of range [-1, ", c.card, ")");
      }
    auto at = [&](int64_t b, int64_t k, int64_t slot) -> int64_t& {
      return s.cache[size_t((b * K + k) * CT + ((slot % CT) + CT) % CT)];
    };
    // 1. user codes enter the ring at their delay; 2. read this frame's inputs.
    auto tokens = Tensor<int64_t, Cpu>::empty({K, Bn, 1});
    for (int64_t b = 0; b < Bn; ++b) {
      const int64_t o = s.offsets[size_t(b)];
      if (s.exec[size_t(b)])
        for (int64_t k = c.dep_q + 1; k < K; ++k) at(b, k, o + c.delays[size_t(k)]) = user(b, k - c.dep_q - 1);
      for (int64_t k = 0; k < K; ++k) {
        const bool init = o <= c.delays[size_t(k)] || !s.exec[size_t(b)];
        const int64_t v = init ? (k == 0 ? c.text_card : c.card) : at(b, k, o);
        TTT_CHECK(v != kUngenerated, "generate: internal error: ungenerated token fed at item ", b, " codebook ", k);
        tokens(k, b, 0) = v;
      }
    }
    auto gen = run_frame(s, tokens);  // [B, 1 + dep_q]
    TemporalT::advance(s.temporal, 1, s.exec);
    // 3. commit this frame's tokens.
    for (int64_t b = 0; b < Bn; ++b) {
      if (!s.exec[size_t(b)]) continue;
      const int64_t o = ++s.offsets[size_t(b)];
      for (int64_t k = 0; k <= c.dep_q; ++k) at(b, k, o) = gen(b, k);
    }
    ++s.offset_cpu;
    ++s.frame;
    auto out = Tensor<int64_t, Cpu>::empty({Bn, 1 + c.dep_q});
    for (int64_t b = 0; b < Bn; ++b) {
      const int64_t o = s.offsets[size_t(b)];
      const bool masked = o <= c.max_delay() || !s.exec[size_t(b)];
      for (int64_t k = 0; k <= c.dep_q; ++k)
        out(b, k) = masked ? kUngenerated : at(b, k, o - c.max_delay() + c.delays[size_t(k)]);
    }
    return out;
  }

  // Per-item reset: the item starts a new conversation; the others continue.
  void reset(Session& s, const std::vector<uint8_t>& mask) const {
    TTT_CHECK(int64_t(mask.size()) == s.batch(), "reset: mask has ", mask.size(), " entries for batch ", s.batch());
    bool all = true;
    for (int64_t b = 0; b < s.batch(); ++b) {
      if (!mask[size_t(b)]) {
        all = false;
        continue;
      }
      s.offsets[size_t(b)] = 0;
      const int64_t K = m_.cfg.num_codebooks(), CT = ring_size();
      std::fill(s.cache.begin() + b * K * CT, s.cache.begin() + (b + 1) * K * CT, kUngenerated);
    }
    const int64_t keep_step = s.temporal.step;
    TemporalT::reset(m_.transformer, s.temporal, mask);
    // moshi resets offset_cpu whatever the mask (it only gates the first returns).
    s.offset_cpu = 0;
    if (!all) s.temporal.step = keep_step;
  }

  // A fresh session (from start) as after `frames` frames of every item, for benchmarks of a
  // frame deep into a conversation (`ttt-moshi bench --max-streams`: every KV ring full)
  // without running the conversation: the temporal state by TemporalT::fill_as_after (KV rings
  // at the positions those frames leave, random keys and values; counters advanced), the
  // token ring filled with random tokens, the item and call counters at `frames`. The next
  // step does the work of frame `frames` of a real conversation: the same code path, the same
  // keys attended, the same graph key; its tokens are meaningless.
  void fill_as_after(Session& s, int64_t frames, uint64_t seed) const {
    TTT_CHECK(frames >= 0, "fill_as_after: frames must be >= 0, got ", frames);
    TTT_CHECK(s.frame == 0 && s.offset_cpu == 0, "fill_as_after: needs a fresh session (this one has run ", s.frame,
              " frames)");
    const auto& c = m_.cfg;
    const int64_t K = c.num_codebooks(), CT = ring_size();
    uint64_t x = seed;
    for (int64_t b = 0; b < s.batch(); ++b)
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < CT; ++i)
          s.cache[size_t((b * K + k) * CT + i)] =
              int64_t(io::detail::splitmix64(x) % uint64_t(k == 0 ? c.text_card : c.card));
    std::fill(s.offsets.begin(), s.offsets.end(), frames);
    s.offset_cpu = frames;
    s.frame = frames;
    TemporalT::fill_as_after(s.temporal, frames, io::detail::splitmix64(x));
  }

  // Items with mask 0 still compute but change nothing (asynchronous batching).
  void set_exec_mask(Session& s, const std::vector<uint8_t>& mask) const {
    TTT_CHECK(int64_t(mask.size()) == s.batch(), "set_exec_mask: mask has ", mask.size(), " entries for batch ",
              s.batch());
    s.exec = mask;
  }

  Session snapshot(const Session& s) const {
    Session c = s;
    c.rt = make_runtime(s.batch());
    c.temporal = TemporalT::clone(s.temporal);
    if (m_.cfg.dep_q > 0) c.depformer = DepformerT::clone(s.depformer);
    return c;
  }

  // Item src_b of `src` into item dst_b of `dst` (sessions of this model, any batch sizes):
  // its token ring, offsets, exec flag, sampling options and every temporal layer's state
  // (KV rings, TTT states), by copies of that item only. The depformer's state is scratch.
  void copy_item(Session& dst, int64_t dst_b, const Session& src, int64_t src_b) const {
    TTT_CHECK(0 <= dst_b && dst_b < dst.batch() && 0 <= src_b && src_b < src.batch(), "generate: copy_item: item ",
              src_b, " of ", src.batch(), " into ", dst_b, " of ", dst.batch());
    const int64_t n = m_.cfg.num_codebooks() * ring_size();
    std::copy(src.cache.begin() + src_b * n, src.cache.begin() + (src_b + 1) * n, dst.cache.begin() + dst_b * n);
    dst.offsets[size_t(dst_b)] = src.offsets[size_t(src_b)];
    dst.exec[size_t(dst_b)] = src.exec[size_t(src_b)];
    dst.sampling[size_t(dst_b)] = src.sampling[size_t(src_b)];
    TemporalT::copy_item(dst.temporal, dst_b, src.temporal, src_b);
  }

  void save(const Session& s, const std::string& path) const {
    io::SafeTensorsWriter w;
    w.add_metadata("format", "ttt-moshi-session");
    w.add_metadata("version", "1");
    save(s, w);
    w.write(path);
  }
  // The session's tensors into `w` (a caller's file: ttt::serve's conversation files).
  void save(const Session& s, io::SafeTensorsWriter& w) const {
    w.add("lmgen.cache", Tensor<int64_t, Cpu>::from_vector({s.batch(), m_.cfg.num_codebooks(), ring_size()}, s.cache));
    w.add("lmgen.offsets", Tensor<int64_t, Cpu>::from_vector({s.batch()}, s.offsets));
    w.add("lmgen.exec", Tensor<uint8_t, Cpu>::from_vector({s.batch()}, s.exec));
    w.add("lmgen.counters", Tensor<int64_t, Cpu>::from_vector({2}, {s.offset_cpu, s.frame}));
    // Per item: [temp, temp_text] and [use_sampling, top_k, top_k_text, seed].
    std::vector<float> temps;
    std::vector<int64_t> ints;
    for (const auto& o : s.sampling) {
      temps.insert(temps.end(), {o.temp, o.temp_text});
      ints.insert(ints.end(), {int64_t(o.use_sampling), int64_t(o.top_k), int64_t(o.top_k_text), int64_t(o.seed)});
    }
    w.add("lmgen.sampling_temps", Tensor<float, Cpu>::from_vector({s.batch(), 2}, temps));
    w.add("lmgen.sampling", Tensor<int64_t, Cpu>::from_vector({s.batch(), 4}, ints));
    TemporalT::save(s.temporal, w, "temporal");
  }

  // Loads a session saved by save() for the same model and batch size.
  Session load(const std::string& path) const { return load(io::SafeTensors::open(path)); }
  Session load(const io::SafeTensors& st) const {
    auto meta = st.metadata();
    if (meta["format"] != "ttt-moshi-session") fail(st.path(), ": not a ttt-moshi session file");
    return load_tensors(st);
  }
  // The tensors save(s, w) wrote, from any file (its format is the caller's to check).
  // Files without per-item sampling (before it existed) get this LmGen's options.
  Session load_tensors(const io::SafeTensors& st) const {
    const std::string& path = st.path();
    for (const char* key : {"lmgen.offsets", "lmgen.cache", "lmgen.exec", "lmgen.counters"})
      if (!st.contains(key)) fail(path, ": missing tensor '", key, "'");
    const Shape off_shape = st.info("lmgen.offsets").shape;
    TTT_CHECK(off_shape.rank == 1 && off_shape.numel() > 0 && off_shape.numel() <= 4096, path,
              ": bad 'lmgen.offsets' ", off_shape.str());
    const auto off = st.load_counters("lmgen.offsets");
    Session s = start(int64_t(off.size()));
    auto cache = st.load<int64_t>("lmgen.cache");
    TTT_CHECK(cache.shape() == Shape({s.batch(), m_.cfg.num_codebooks(), ring_size()}), path, ": 'lmgen.cache' has shape ",
              cache.shape().str(), ", this model needs ", Shape({s.batch(), m_.cfg.num_codebooks(), ring_size()}).str());
    s.cache = cache.to_vector();
    s.offsets = off;
    auto ex = st.load<uint8_t>("lmgen.exec");
    TTT_CHECK(ex.numel() == s.batch(), path, ": 'lmgen.exec' does not match the batch");
    s.exec = ex.to_vector();
    const auto ctr = st.load_counters("lmgen.counters");
    TTT_CHECK(ctr.size() == 2, path, ": bad 'lmgen.counters'");
    for (int64_t v : s.cache)
      TTT_CHECK(v >= kUngenerated && v <= std::max(m_.cfg.card, m_.cfg.text_card), path,
                ": token ", v, " in 'lmgen.cache' is out of range");
    s.offset_cpu = ctr[0];
    s.frame = ctr[1];
    for (int64_t b = 0; b < s.batch(); ++b)
      TTT_CHECK(s.offsets[size_t(b)] >= 0 && (s.exec[size_t(b)] == 0 || s.exec[size_t(b)] == 1), path,
                ": bad offset or exec flag of item ", b, " in 'lmgen.offsets' / 'lmgen.exec'");
    TTT_CHECK(s.offset_cpu >= 0 && s.frame >= 0, path, ": negative counters in 'lmgen.counters'");
    if (st.contains("lmgen.sampling") || st.contains("lmgen.sampling_temps")) {
      const auto temps = st.load<float>("lmgen.sampling_temps");
      const auto ints = st.load<int64_t>("lmgen.sampling");
      TTT_CHECK(temps.shape() == Shape({s.batch(), 2}) && ints.shape() == Shape({s.batch(), 4}), path,
                ": 'lmgen.sampling' / 'lmgen.sampling_temps' have shapes ", ints.shape().str(), " / ",
                temps.shape().str(), " for batch ", s.batch());
      for (int64_t b = 0; b < s.batch(); ++b) {
        GenOptions o;
        o.temp = temps(b, 0), o.temp_text = temps(b, 1);
        TTT_CHECK(ints(b, 0) == 0 || ints(b, 0) == 1, path, ": bad use_sampling flag ", ints(b, 0), " of item ", b);
        TTT_CHECK(ints(b, 1) >= 0 && ints(b, 1) <= (int64_t(1) << 30) && ints(b, 2) >= 0 &&
                      ints(b, 2) <= (int64_t(1) << 30),
                  path, ": bad top_k of item ", b, " in 'lmgen.sampling'");
        o.use_sampling = ints(b, 0) != 0;
        o.top_k = int(ints(b, 1)), o.top_k_text = int(ints(b, 2));
        o.seed = uint64_t(ints(b, 3));
        check_options(o, path + ": item " + std::to_string(b));
        s.sampling[size_t(b)] = o;
      }
    }
    TemporalT::load_state(s.temporal, st, "temporal");
    return s;
  }

 private:
  std::shared_ptr<FrameRuntime> make_runtime(int64_t batch) const {
    const auto& c = m_.cfg;
    NoArenaScope<B> persistent;
    auto rt = std::make_shared<FrameRuntime>();
    const int64_t K = c.num_codebooks();
    // in: tokens [K, B] | positions [B] | counter [1] | sampling [5, B] (int64), then exec [B]
    // (u8); out: [B, 1 + dep_q]. sampling: temps [2, B] (f32: audio, text) in the first B
    // int64 slots, then top_k, top_k_text, seed, RNG counter [B] each.
    rt->in_bytes = size_t(K * batch + batch + 1 + 5 * batch) * 8 + size_t(batch);
    rt->out_bytes = size_t(batch * (1 + c.dep_q)) * 8;
    rt->host_in = Memory<B>::allocate_pinned(rt->in_bytes);
    rt->host_out = Memory<B>::allocate_pinned(rt->out_bytes);
    rt->dev_in = Memory<B>::allocate(rt->in_bytes);
    rt->dev_out = Memory<B>::allocate(rt->out_bytes);
    if (c.dep_q > 0) {
      std::vector<int64_t> pos(size_t(c.dep_q * batch));
      for (int64_t k = 0; k < c.dep_q; ++k)
        for (int64_t b = 0; b < batch; ++b) pos[size_t(k * batch + b)] = k;
      rt->dep_positions = Tensor<int64_t, B>::from_vector({c.dep_q, batch, 1}, pos);
    }
    rt->graph.set_enabled(graphs_ && TemporalT::graph_safe(m_.transformer));
    return rt;
  }

  // One frame: stage the inputs, run the device work (captured and replayed as a graph on
  // CUDA), one synchronisation, read the new tokens. tokens [K, B, 1] host.
  Tensor<int64_t, Cpu> run_frame(Session& s, const Tensor<int64_t, Cpu>& tokens) const {
    const auto& c = m_.cfg;
    const int64_t Bn = s.batch(), K = c.num_codebooks();
    FrameRuntime& rt = *s.rt;
    int64_t* hin = static_cast<int64_t*>(rt.host_in.get());
    std::copy(tokens.data(), tokens.data() + K * Bn, hin);
    std::copy(s.temporal.offsets.begin(), s.temporal.offsets.end(), hin + K * Bn);
    hin[K * Bn + Bn] = s.frame;
    int64_t* samp = hin + K * Bn + Bn + 1;  // [5, B]
    float* temps = reinterpret_cast<float*>(samp);
    for (int64_t b = 0; b < Bn; ++b) {
      const GenOptions& o = s.sampling[size_t(b)];
      temps[b] = o.use_sampling ? o.temp : 0.f;
      temps[Bn + b] = o.use_sampling ? o.temp_text : 0.f;
      samp[Bn + b] = o.top_k;
      samp[2 * Bn + b] = o.top_k_text;
      samp[3 * Bn + b] = int64_t(o.seed);
      samp[4 * Bn + b] = s.offsets[size_t(b)];  // the item's own frame counter
    }
    std::copy(s.exec.begin(), s.exec.end(), reinterpret_cast<uint8_t*>(hin + K * Bn + Bn + 1 + 5 * Bn));
    rt.graph.run(TemporalT::graph_key(m_.transformer, s.temporal, s.exec), [&] { frame_work(s); });
    Memory<B>::synchronize();
    auto out = Tensor<int64_t, Cpu>::empty({Bn, 1 + c.dep_q});
    const int64_t* hout = static_cast<const int64_t*>(rt.host_out.get());
    std::copy(hout, hout + out.numel(), out.data());
    return out;
  }

  // The device work of a frame (see FrameGraph for the rules it follows).
  void frame_work(Session& s) const {
    const auto& c = m_.cfg;
    const int64_t Bn = s.batch(), K = c.num_codebooks();
    FrameRuntime& rt = *s.rt;
    ArenaScope<B> scope(rt.arena);
    Memory<B>::from_host_async(rt.dev_in.get(), rt.host_in.get(), rt.in_bytes);
    int64_t* din = static_cast<int64_t*>(rt.dev_in.get());
    auto tokens = Tensor<int64_t, B>::borrow(din, {K, Bn, 1});
    nn::LayerInput<T, B> in;
    in.workspace = &rt.workspace;
    in.positions = Tensor<int64_t, B>::borrow(din + K * Bn, {Bn, 1});
    int64_t* samp = din + K * Bn + Bn + 1;
    SampleRows<B> text_rows, audio_rows;
    audio_rows.temperature = Tensor<float, B>::borrow(reinterpret_cast<float*>(samp), {Bn});
    text_rows.temperature = Tensor<float, B>::borrow(reinterpret_cast<float*>(samp) + Bn, {Bn});
    audio_rows.top_k = Tensor<int64_t, B>::borrow(samp + Bn, {Bn});
    text_rows.top_k = Tensor<int64_t, B>::borrow(samp + 2 * Bn, {Bn});
    text_rows.seed = audio_rows.seed = Tensor<int64_t, B>::borrow(samp + 3 * Bn, {Bn});
    text_rows.counter = audio_rows.counter = Tensor<int64_t, B>::borrow(samp + 4 * Bn, {Bn});
    in.exec_mask = Tensor<uint8_t, B>::borrow(reinterpret_cast<uint8_t*>(samp + 5 * Bn), {Bn});
    in.exec_host = s.exec;
    in.step = s.temporal.step;
    auto out = Tensor<int64_t, B>::borrow(static_cast<int64_t*>(rt.dev_out.get()), {Bn, 1 + c.dep_q});

    auto x = m_.embed(tokens);
    if (TemporalT::needs_embeddings(m_.transformer)) in.embeddings = x.clone();
    TemporalT::run(m_.transformer, s.temporal, x, in);
    auto h = m_.out_norm(x).reshape({Bn, c.dim});
    auto text_logits = m_.text_head(h);
    auto text_tok = Tensor<int64_t, B>::empty({Bn});
    text_rows.salt = 0;
    ops::sample_rows(text_tok, text_logits, text_rows);
    out.select(1, 0).copy_from(text_tok);
    if (c.dep_q > 0) {
      DepformerT::reset(m_.depformer, s.depformer, std::vector<uint8_t>(size_t(Bn), 1));
      Tensor<int64_t, B> prev = text_tok;
      nn::LayerInput<T, B> din_k;
      for (int64_t k = 0; k < c.dep_q; ++k) {
        auto xk = m_.depformer_input(k, h, prev).reshape({Bn, 1, c.depformer.d_model});
        din_k.positions = rt.dep_positions.select(0, k);
        din_k.step = k;
        DepformerT::run(m_.depformer, s.depformer, xk, din_k);
        auto logits = m_.audio_logits(k, xk.reshape({Bn, c.depformer.d_model}));
        auto tok = Tensor<int64_t, B>::empty({Bn});
        audio_rows.salt = uint32_t(1 + k);
        ops::sample_rows(tok, logits, audio_rows);
        out.select(1, 1 + k).copy_from(tok);
        prev = tok;
      }
    }
    Memory<B>::to_host_async(rt.host_out.get(), rt.dev_out.get(), rt.out_bytes);
  }

  const Model& m_;
  GenOptions opt_;
  bool graphs_ = true;
};

}  // namespace ttt::moshi
