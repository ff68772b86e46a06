#pragma once
// ConversationBatch: the engine a conversation server ticks (issue 14). One instance per
// device holds `slots` conversations as ONE batch: every 80 ms frame tick runs Mimi encode ->
// LmGen step -> Mimi decode once for all conversations that have a frame ready, and
// conversations join, leave, save and resume between ticks without disturbing the others.
//
// What makes a conversation independent of its slot and of its neighbours:
//  - state: each slot is one batch item of the LM session (token ring, offsets, KV rings,
//    every TTT design's state) and of two Mimi sessions (encoder side, decoder side); items
//    never mix in any op, and the CPU GEMMs give a row the same bits whatever the batch;
//  - sampling: each conversation has its own options and draws from Philox(seed, its own
//    frame counter, token) (moshi::LmGen, SampleParams), never from its slot index;
//  - ticks: a slot that is not ready does not advance. The LM masks it (exec mask: its state
//    is untouched); Mimi's streaming state has no mask, so that slot's Mimi state on the side
//    being run (one item's conv histories and KV rings: ~8 MB in fp32 for Kyutai's Mimi, its
//    8-layer 250-step rings) is copied aside before the batched call and back after it: two
//    device copies of one item, only for slots that are busy and not ready, against a whole
//    batched encode or decode for every slot.
// So a conversation run alone, in any slot of any batch, or saved and resumed elsewhere, gives
// the same text and audio tokens; its audio is bitwise the same in the same batch shape and
// within float rounding otherwise (Mimi's convolutions batch items into one GEMM whose
// summation order depends on the batch: <= 8.5e-7 of the peak measured on the CPU), see
// tests/test_conversation.cpp and docs/conversation_batch.md.
//
// Conversation files (save / resume): one safetensors file, metadata format
// "ttt-conversation" and the engine's fingerprint (LM and Mimi configs and the dtype), the
// LM item (moshi::LmGen::save of a batch-1 session: its sampling options and RNG position
// included), the two Mimi items ("mimi_enc.*", "mimi_dec.*") and the frame counter. Written
// atomically (temporary file + rename).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "ttt/core/error.hpp"
#include "ttt/core/tensor.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/mimi/mimi.hpp"
#include "ttt/moshi/generator.hpp"
#include "ttt/moshi/lm.hpp"
#include "ttt/moshi/policies.hpp"

namespace ttt::serve {

// Per conversation; a server takes the defaults from the LM config's lm_gen_config and
// overrides them from the client's query.
struct ConversationOptions {
  bool use_sampling = true;
  float temp = 0.8f, temp_text = 0.7f;
  int top_k = 250, top_k_text = 25;
  uint64_t seed = 0;

  static ConversationOptions from(const moshi::GenConfig& g) {
    ConversationOptions o;
    o.use_sampling = g.use_sampling;
    o.temp = g.temp, o.temp_text = g.temp_text;
    o.top_k = g.top_k, o.top_k_text = g.top_k_text;
    return o;
  }
  moshi::GenOptions gen() const {
    moshi::GenOptions g;
    g.use_sampling = use_sampling;
    g.temp = temp, g.temp_text = temp_text;
    g.top_k = top_k, g.top_k_text = top_k_text;
    g.seed = seed;
    return g;
  }
  static ConversationOptions of(const moshi::GenOptions& g) {
    ConversationOptions o;
    o.use_sampling = g.use_sampling;
    o.temp = g.temp, o.temp_text = g.temp_text;
    o.top_k = g.top_k, o.top_k_text = g.top_k_text;
    o.seed = g.seed;
    return o;
  }
};

// One slot's result of a tick.
struct FrameOut {
  int64_t text = -1;       // the text token of this tick, or -1 (delays filling, not ready, idle)
  bool has_audio = false;  // out_pcm's row is Moshi's audio (else zeros)
  std::vector<int64_t> audio;  // with has_audio: the dep_q audio tokens Mimi decoded
};

template <class T, class B, class Policies = moshi::DefaultPolicies>
class ConversationBatch {
 public:
  using Lm = moshi::LmModel<T, B, Policies>;
  using Gen = moshi::LmGen<T, B, Policies>;
  using MimiT = mimi::Mimi<T, B>;

  static constexpr const char* kFormat = "ttt-conversation";

  // The models must outlive the batch. Throws when Mimi and the LM do not fit together.
  ConversationBatch(const Lm& lm, const MimiT& mimi, int64_t slots, ConversationOptions defaults)
      : lm_(lm), mimi_(mimi), gen_(lm, defaults.gen()), defaults_(defaults) {
    TTT_CHECK(slots > 0 && slots <= 4096, "ConversationBatch: slots must be in [1, 4096], got ", slots);
    Gen::check_options(defaults.gen(), "ConversationBatch: default options");
    const int64_t nu = gen_.num_user_codebooks(), K = mimi.num_codebooks();
    TTT_CHECK(nu <= K && lm.cfg.dep_q <= K && lm.cfg.dep_q > 0, "ConversationBatch: Mimi gives ", K,
              " codebooks but the LM takes ", nu, " user codebooks and makes ", lm.cfg.dep_q);
    TTT_CHECK(lm.cfg.card == mimi.cardinality(), "ConversationBatch: the LM's audio vocabulary (card ", lm.cfg.card,
              ") differs from Mimi's codebook size ", mimi.cardinality());
    lm_s_ = gen_.start(slots);
    std::fill(lm_s_.exec.begin(), lm_s_.exec.end(), uint8_t(0));
    enc_ = mimi.start(slots);
    dec_ = mimi.start(slots);
    busy_.assign(size_t(slots), 0);
    frames_.assign(size_t(slots), 0);
    fingerprint_ = make_fingerprint();
  }

  int64_t slots() const { return int64_t(busy_.size()); }
  int64_t active() const {
    int64_t n = 0;
    for (auto b : busy_) n += b;
    return n;
  }
  int64_t frame_size() const { return mimi_.frame_size(); }
  int64_t sample_rate() const { return mimi_.cfg.sample_rate; }
  ConversationOptions defaults() const { return defaults_; }
  // The engine's identity in conversation files (configs and dtype).
  const std::string& fingerprint() const { return fingerprint_; }
  // Capturing frames into CUDA graphs (on by default where the layers allow it).
  void set_graphs(bool on) {
    gen_.set_graphs(on);
    lm_s_ = rebuilt(lm_s_);
  }

  bool busy(int64_t slot) const {
    check_slot(slot, "busy");
    return busy_[size_t(slot)] != 0;
  }
  // Ticks this conversation has stepped (its position; kept across save / resume).
  int64_t frames(int64_t slot) const {
    check_busy(slot, "frames");
    return frames_[size_t(slot)];
  }
  ConversationOptions options(int64_t slot) const {
    check_busy(slot, "options");
    return ConversationOptions::of(lm_s_.sampling[size_t(slot)]);
  }

  // A new conversation in a free slot: returns the slot, or -1 when all are busy.
  int64_t join(const ConversationOptions& o) {
    Gen::check_options(o.gen(), "join: conversation options");
    const int64_t slot = free_slot();
    if (slot < 0) return -1;
    std::vector<uint8_t> mask(busy_.size(), 0);
    mask[size_t(slot)] = 1;
    reset_lm(mask);
    mimi_.reset(enc_, mask);
    mimi_.reset(dec_, mask);
    gen_.set_item_options(lm_s_, slot, o.gen());
    frames_[size_t(slot)] = 0;
    busy_[size_t(slot)] = 1;
    return slot;
  }

  // Resume a conversation saved by save(): into a free slot (any slot, any batch size); -1
  // when full. Errors (bad/foreign file, other model) throw ttt::Error naming the file and
  // the problem; the live batch is untouched then (the file is loaded aside first).
  int64_t resume(const std::string& path) {
    const int64_t slot = free_slot();
    if (slot < 0) return -1;
    const auto st = io::SafeTensors::open(path);
    auto meta = st.metadata();
    if (meta["format"] != kFormat)
      fail(path, ": not a conversation file (format '", meta["format"], "', expected '", kFormat, "')");
    if (meta["version"] != "1") fail(path, ": conversation file version '", meta["version"], "' is not supported");
    if (meta["engine"] != fingerprint_)
      fail(path, ": saved by another model or dtype (", meta["engine"], "); this engine is ", fingerprint_);
    auto lm1 = gen_.load_tensors(st);
    TTT_CHECK(lm1.batch() == 1, path, ": holds ", lm1.batch(), " LM items, a conversation file holds one");
    auto enc1 = mimi_.start(1), dec1 = mimi_.start(1);
    mimi_.load(enc1, st, "mimi_enc");
    mimi_.load(dec1, st, "mimi_dec");
    TTT_CHECK(enc1.pending[0].empty() && dec1.pending[0].empty(), path,
              ": Mimi holds buffered samples, which a conversation (whole frames per tick) never has");
    const auto fr = st.load_counters("conversation.frames");
    TTT_CHECK(fr.size() == 1 && fr[0] >= 0, path, ": bad 'conversation.frames'");
    TTT_CHECK(lm1.offsets[0] == fr[0], path, ": the LM item is at frame ", lm1.offsets[0], " but the file says ", fr[0]);
    // Everything loaded and checked: now into the live batch.
    gen_.copy_item(lm_s_, slot, lm1, 0);
    lm_s_.exec[size_t(slot)] = 0;
    mimi_.copy_item(enc_, slot, enc1, 0);
    mimi_.copy_item(dec_, slot, dec1, 0);
    frames_[size_t(slot)] = fr[0];
    busy_[size_t(slot)] = 1;
    return slot;
  }

  // The whole state of one conversation to a file, atomically (write temp + rename). Does
  // not leave.
  void save(int64_t slot, const std::string& path) const { snapshot(slot).write(path); }

  // The same state, copied to host memory now: a server takes it on its engine thread (the
  // device-to-host copy is all the tick waits for) and writes it on another thread.
  io::SafeTensorsWriter snapshot(int64_t slot) const {
    check_busy(slot, "save");
    auto lm1 = gen_.start(1);
    gen_.copy_item(lm1, 0, lm_s_, slot);
    lm1.exec[0] = 1;
    lm1.offset_cpu = lm1.frame = frames_[size_t(slot)];
    auto enc1 = mimi_.start(1), dec1 = mimi_.start(1);
    mimi_.copy_item(enc1, 0, enc_, slot);
    mimi_.copy_item(dec1, 0, dec_, slot);
    io::SafeTensorsWriter w;
    w.add_metadata("format", kFormat);
    w.add_metadata("version", "1");
    w.add_metadata("engine", fingerprint_);
    gen_.save(lm1, w);
    mimi_.save(enc1, w, "mimi_enc");
    mimi_.save(dec1, w, "mimi_dec");
    w.add("conversation.frames", Tensor<int64_t, Cpu>::from_vector({1}, {frames_[size_t(slot)]}));
    return w;
  }

  void leave(int64_t slot) {
    check_busy(slot, "leave");
    busy_[size_t(slot)] = 0;
    lm_s_.exec[size_t(slot)] = 0;
  }

  // One tick for every busy slot whose `ready[slot]` is 1: pcm [slots, frame_size] (host, f32,
  // rows of idle or not-ready slots ignored) -> Mimi encode -> LmGen step -> Mimi decode.
  // Slots not ready this tick do not advance at all (their state is untouched). out_pcm
  // [slots, frame_size] (reallocated when it has another shape) gets each ready slot's reply
  // frame (zeros while the codebook delays fill, and for the other slots). One FrameOut per slot.
  std::vector<FrameOut> step(const Tensor<float, Cpu>& pcm, const std::vector<uint8_t>& ready,
                             Tensor<float, Cpu>& out_pcm) {
    const int64_t S = slots(), fs = frame_size(), K = mimi_.num_codebooks(), nu = gen_.num_user_codebooks();
    const int64_t dq = lm_.cfg.dep_q;
    TTT_CHECK(pcm.rank() == 2 && pcm.size(0) == S && pcm.size(1) == fs, "ConversationBatch::step: pcm must be [", S,
              ", ", fs, "], got ", pcm.shape().str());
    TTT_CHECK(int64_t(ready.size()) == S, "ConversationBatch::step: ready has ", ready.size(), " entries for ", S,
              " slots");
    if (out_pcm.shape() != Shape({S, fs})) out_pcm = Tensor<float, Cpu>::empty({S, fs});
    std::fill(out_pcm.data(), out_pcm.data() + S * fs, 0.f);
    std::vector<FrameOut> res(static_cast<size_t>(S));
    std::vector<uint8_t> run(static_cast<size_t>(S));
    bool any = false;
    for (int64_t b = 0; b < S; ++b) any |= (run[size_t(b)] = uint8_t(busy_[size_t(b)] && ready[size_t(b)])) != 0;
    if (!any) return res;

    // 1. Mimi encode of the running slots (non-finite samples would poison only their own
    //    conversation, but they are a client's error: refuse them by name).
    const auto p = pcm.contiguous();
    auto in = Tensor<float, Cpu>::zeros({S, fs});
    for (int64_t b = 0; b < S; ++b) {
      if (!run[size_t(b)]) continue;
      const float* src = p.data() + b * fs;
      for (int64_t i = 0; i < fs; ++i)
        TTT_CHECK(std::isfinite(src[i]), "ConversationBatch::step: slot ", b, ": sample ", i, " is not finite");
      std::copy(src, src + fs, in.data() + b * fs);
    }
    Tensor<int64_t, Cpu> codes;
    masked(enc_, enc_keep_, run, MimiT::Side::encoder, [&] { codes = mimi_.encode_step(enc_, in); });  // [S, K, 1]
    TTT_CHECK(codes.size(2) == 1, "ConversationBatch::step: internal error: Mimi gave ", codes.size(2), " frames");

    // 2. the LM step (its exec mask freezes the other slots).
    auto user = Tensor<int64_t, Cpu>::zeros({S, nu});
    for (int64_t b = 0; b < S; ++b)
      for (int64_t k = 0; k < nu; ++k) user(b, k) = run[size_t(b)] ? codes(b, k, 0) : 0;
    gen_.set_exec_mask(lm_s_, run);
    const auto tok = gen_.step_items(lm_s_, user);  // [S, 1 + dep_q]

    // 3. Mimi decode of the slots with audio tokens (the others keep their decoder state).
    std::vector<uint8_t> speak(size_t(S), 0);
    bool any_audio = false;
    auto audio = Tensor<int64_t, Cpu>::zeros({S, K, 1});
    for (int64_t b = 0; b < S; ++b) {
      if (!run[size_t(b)]) continue;
      ++frames_[size_t(b)];
      res[size_t(b)].text = tok(b, 0) >= 0 ? tok(b, 0) : -1;
      bool ok = true;
      for (int64_t k = 0; k < dq; ++k) ok = ok && tok(b, 1 + k) >= 0;
      if (!ok) continue;
      speak[size_t(b)] = 1;
      any_audio = true;
      for (int64_t k = 0; k < dq; ++k) audio(b, k, 0) = tok(b, 1 + k);
      res[size_t(b)].audio.assign(tok.data() + b * (1 + dq) + 1, tok.data() + (b + 1) * (1 + dq));
    }
    if (any_audio) {
      Tensor<float, Cpu> y;
      masked(dec_, dec_keep_, speak, MimiT::Side::decoder, [&] { y = mimi_.decode_step(dec_, audio); });  // [S, fs]
      for (int64_t b = 0; b < S; ++b) {
        if (!speak[size_t(b)]) continue;
        res[size_t(b)].has_audio = true;
        std::copy(y.data() + b * fs, y.data() + (b + 1) * fs, out_pcm.data() + b * fs);
      }
    }
    return res;
  }

 private:
  using MimiSession = typename MimiT::Session;

  void check_slot(int64_t slot, const char* what) const {
    TTT_CHECK(0 <= slot && slot < slots(), "ConversationBatch::", what, ": slot ", slot, " out of range [0, ", slots(),
              ")");
  }
  void check_busy(int64_t slot, const char* what) const {
    check_slot(slot, what);
    TTT_CHECK(busy_[size_t(slot)], "ConversationBatch::", what, ": slot ", slot, " holds no conversation");
  }
  int64_t free_slot() const {
    for (size_t b = 0; b < busy_.size(); ++b)
      if (!busy_[b]) return int64_t(b);
    return -1;
  }

  // A per-item LM reset that keeps the session-wide counters (moshi's reset zeroes
  // offset_cpu, which gates outputs of the whole batch; step_items does not read it).
  void reset_lm(const std::vector<uint8_t>& mask) {
    const int64_t keep_cpu = lm_s_.offset_cpu;
    gen_.reset(lm_s_, mask);
    lm_s_.offset_cpu = keep_cpu;
  }

  // Runs fn (one batched Mimi call on `s`) so that busy slots with run[b] == 0 come out
  // unchanged: their item is copied into `keep` before and back after. Idle slots are left
  // to drift: join resets them.
  template <class F>
  void masked(MimiSession& s, MimiSession& keep, const std::vector<uint8_t>& run, typename MimiT::Side side, F&& fn) {
    std::vector<int64_t> frozen;
    for (size_t b = 0; b < run.size(); ++b)
      if (busy_[b] && !run[b]) frozen.push_back(int64_t(b));
    if (!frozen.empty() && keep.batch() != s.batch()) keep = mimi_.start(s.batch());
    for (int64_t b : frozen) mimi_.copy_item(keep, b, s, b, side);
    fn();
    for (int64_t b : frozen) mimi_.copy_item(s, b, keep, b, side);
  }

  // A session with a fresh runtime (its graph setting re-read), the same state.
  typename Gen::Session rebuilt(const typename Gen::Session& s) const {
    auto c = gen_.start(s.batch());
    for (int64_t b = 0; b < s.batch(); ++b) gen_.copy_item(c, b, s, b);
    c.offset_cpu = s.offset_cpu, c.frame = s.frame;
    return c;
  }

  // FNV-1a of the facts a saved conversation depends on: the LM's and Mimi's configs (every
  // shape of the state, the delays, the TTT plan) and the element type.
  std::string make_fingerprint() const {
    std::string d = "T=" + std::string(dtype_name(dtype_v<T>));
    auto add = [&](const char* k, const auto& v) { d += std::string(";") + k + "=" + std::to_string(v); };
    auto add_tr = [&](const char* k, const nn::TransformerConfig& t) {
      d += std::string(";") + k;
      add("d", t.d_model), add("h", t.num_heads), add("l", t.num_layers), add("kv", t.kv_repeat), add("ctx", t.context);
      for (auto f : t.dim_feedforward) add("ff", f);
    };
    const auto& c = lm_.cfg;
    add("dim", c.dim), add("n_q", c.n_q), add("dep_q", c.dep_q), add("card", c.card), add("text_card", c.text_card);
    for (auto v : c.delays) add("delay", v);
    add_tr("temporal", c.transformer);
    add_tr("depformer", c.depformer);
    d += ";ttt=" + c.ttt.dump();
    for (const auto& lp : lm_.transformer.layers) d += std::string(";") + Lm::TemporalT::design_of(lp);
    const auto& m = mimi_.cfg;
    add("sr", m.sample_rate), add("fr", m.frame_rate), add("K", m.num_codebooks), add("bins", m.quantizer.bins);
    add("latent", m.seanet.dimension), add("filters", m.seanet.n_filters);
    for (auto r : m.seanet.ratios) add("ratio", r);
    add_tr("mimi", m.transformer);
    uint64_t h = 1469598103934665603ull;
    for (unsigned char ch : d) h = (h ^ ch) * 1099511628211ull;
    char hex[24];
    std::snprintf(hex, sizeof hex, "%016llx", (unsigned long long)h);
    return std::string(dtype_name(dtype_v<T>)) + "-" + hex;
  }

  const Lm& lm_;
  const MimiT& mimi_;
  Gen gen_;
  ConversationOptions defaults_;
  typename Gen::Session lm_s_;
  MimiSession enc_, dec_;           // encoder side, decoder side (as converse: one direction each)
  MimiSession enc_keep_, dec_keep_;  // the items of not-ready slots during a batched call
  std::vector<uint8_t> busy_;
  std::vector<int64_t> frames_;
  std::string fingerprint_;
};

}  // namespace ttt::serve
