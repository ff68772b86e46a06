#pragma once
// Shared pieces of the ConversationBatch tests (CPU: test_conversation.cpp, CUDA:
// test_cuda_conversation.cpp): the small engines with seeded random weights, conversations'
// user audio as a function of (conversation, frame), a driver that ticks a batch and records
// each conversation's frames, and the slot-independence / resume scenario.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "ttt/io/json.hpp"
#include "ttt/serve/conversation_batch.hpp"

namespace conversation_test {

using namespace ttt;
inline std::string config_path(const std::string& name) { return std::string(TTT_TEST_DATA) + "/../../examples/configs/" + name; }

inline std::string temp_path(const std::string& name) {
  static const std::string tag = std::to_string(std::random_device{}());
  return (std::filesystem::temp_directory_path() / ("ttt_test_conversation_" + tag + "_" + name)).string();
}

template <class B>
struct Engine {
  moshi::LmConfig cfg;
  io::WeightSource ws, mws;
  moshi::LmModel<float, B, moshi::DefaultPolicies> lm;
  mimi::Mimi<float, B> mimi;
};
template <class B>
using Batch = serve::ConversationBatch<float, B>;

// The small LM (plain attention or the TTT one) and the small Mimi, seeded random weights.
template <class B>
std::unique_ptr<Engine<B>> engine(const std::string& lm_config, uint64_t seed = 1) {
  auto e = std::make_unique<Engine<B>>();
  auto j = io::read_json_file(config_path(lm_config));
  j["context"] = 8;       // the KV rings wrap within the tests' frames
  j["text_card"] = 2000;  // a smaller text head: the tests' time goes to the code under test
  if (j.contains("ttt")) {
    for (auto& entry : j["ttt"]) {
      if (entry["design"] == "inplace_ffn") entry["chunk_size"] = 4;  // In-Place updates every 4 frames
      else if (entry.contains("mini_batch_size")) entry["mini_batch_size"] = 4;  // TTT updates every 4
    }
  }
  e->cfg = moshi::LmConfig::from_json(j, lm_config);
  e->ws.enable_random_init(seed);
  e->ws.set_seed(seed);
  e->lm = moshi::LmModel<float, B, moshi::DefaultPolicies>::load(e->cfg, e->ws);
  e->mws.enable_random_init(seed + 1);
  e->mimi = mimi::Mimi<float, B>::load(mimi::MimiConfig::load(config_path("mimi_small.json")), e->mws);
  return e;
}

// Conversation `id`'s user audio at its own frame f: a tone and noise, a function of (id, f)
// only, so any run of the conversation feeds the same samples.
inline std::vector<float> user_frame(int id, int64_t f, int64_t fs) {
  std::vector<float> x(static_cast<size_t>(fs));
  uint64_t s = uint64_t(id) * 0x9e3779b97f4a7c15ull + uint64_t(f) * 0xbf58476d1ce4e5b9ull + 1;
  for (int64_t i = 0; i < fs; ++i) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    const double t = double(f * fs + i) / 24000.0;
    x[size_t(i)] = float(0.3 * std::sin(2 * M_PI * (180.0 + 40.0 * id) * t) + 0.05 * (double(s % 2001) / 1000.0 - 1.0));
  }
  return x;
}

// One frame of one conversation's output.
struct Frame {
  int64_t text = -1;
  bool has_audio = false;
  std::vector<int64_t> audio;  // Moshi's audio tokens
  std::vector<float> pcm;
};
using Track = std::vector<Frame>;

inline serve::ConversationOptions opts(uint64_t seed, float temp = 0.8f, float temp_text = 0.7f) {
  serve::ConversationOptions o;
  o.seed = seed, o.temp = temp, o.temp_text = temp_text;
  return o;
}

// Drives a batch tick by tick: each live conversation (by id) has its slot and its own frame
// count; `ready` decides per tick which of them step.
template <class B>
struct Driver {
  Batch<B>& batch;
  std::map<int, int64_t> slot_of;  // id -> slot
  std::map<int, int64_t> frame_of;  // id -> frames fed
  std::map<int, Track> track;       // id -> frames out

  void join(int id, const serve::ConversationOptions& o) {
    const int64_t s = batch.join(o);
    REQUIRE(s >= 0);
    slot_of[id] = s;
    frame_of[id] = 0;
  }
  void resume(int id, const std::string& path) {
    const int64_t s = batch.resume(path);
    REQUIRE(s >= 0);
    slot_of[id] = s;
    frame_of[id] = batch.frames(s);
  }
  void leave(int id) {
    batch.leave(slot_of.at(id));
    slot_of.erase(id);
  }
  // One tick; ids not in `paused` step.
  void tick(const std::vector<int>& paused = {}) {
    const int64_t S = batch.slots(), fs = batch.frame_size();
    auto pcm = Tensor<float, Cpu>::zeros({S, fs});
    std::vector<uint8_t> ready(size_t(S), 0);
    for (auto& [id, s] : slot_of) {
      if (std::find(paused.begin(), paused.end(), id) != paused.end()) {
        // A not-ready slot's row is ignored: fill it with junk to prove it.
        for (int64_t i = 0; i < fs; ++i) pcm(s, i) = 0.9f;
        continue;
      }
      ready[size_t(s)] = 1;
      const auto x = user_frame(id, frame_of[id], fs);
      std::copy(x.begin(), x.end(), pcm.data() + s * fs);
    }
    Tensor<float, Cpu> out;
    const auto res = batch.step(pcm, ready, out);
    REQUIRE(int64_t(res.size()) == S);
    REQUIRE(out.shape() == Shape({S, fs}));
    for (int64_t s = 0; s < S; ++s) {
      int id = -1;
      for (auto& [i, si] : slot_of)
        if (si == s) id = i;
      if (id < 0 || !ready[size_t(s)]) {
        CHECK(res[size_t(s)].text == -1);
        CHECK_FALSE(res[size_t(s)].has_audio);
        continue;
      }
      Frame f{res[size_t(s)].text, res[size_t(s)].has_audio, res[size_t(s)].audio,
              std::vector<float>(out.data() + s * fs, out.data() + (s + 1) * fs)};
      if (!f.has_audio)
        for (float v : f.pcm) REQUIRE(v == 0.f);
      track[id].push_back(std::move(f));
      ++frame_of[id];
    }
  }
};

// Conversation `id` alone in a batch of one for `frames` frames (saved after `save_at`
// frames to `path` when given).
template <class B>
Track alone(const Engine<B>& e, int id, const serve::ConversationOptions& o, int64_t frames, int64_t save_at = -1,
            const std::string& path = "") {
  Batch<B> b(e.lm, e.mimi, 1, serve::ConversationOptions::from(e.cfg.gen));
  Driver<B> d{b, {}, {}, {}};
  d.join(id, o);
  for (int64_t f = 0; f < frames; ++f) {
    if (f == save_at) b.save(d.slot_of[id], path);
    d.tick();
  }
  return d.track[id];
}

// The largest pcm difference seen between runs of different batch shapes, relative to the
// reference frame's peak (printed at the end of each test case that measures it).
inline double g_worst_rel = 0;

// Frame-by-frame: text and audio tokens equal; the pcm bitwise equal when `exact` (the same
// batch shape), else within `tol` of the frame's peak: Mimi's convolutions put the batch
// items side by side in one GEMM whose blocking (so the summation order) depends on the batch
// size and on the item's column in it (CPU: Eigen; CUDA: the tiled / cuBLAS paths), which moves
// the decoded audio by float rounding (CPU: <= 8e-7 of the peak measured); the tokens, and
// so the conversation, do not change.
inline void check_same(const Track& got, const Track& want, size_t from, const char* what, bool exact,
                       double tol = 1e-5) {
  INFO(what);
  REQUIRE(got.size() + from <= want.size());
  for (size_t f = 0; f < got.size(); ++f) {
    INFO("frame " << f + from);
    CHECK(got[f].text == want[f + from].text);
    CHECK(got[f].has_audio == want[f + from].has_audio);
    CHECK(got[f].audio == want[f + from].audio);
    REQUIRE(got[f].pcm.size() == want[f + from].pcm.size());
    double d = 0, peak = 0;
    int64_t differ = 0;
    for (size_t i = 0; i < got[f].pcm.size(); ++i) {
      d = std::max(d, double(std::abs(got[f].pcm[i] - want[f + from].pcm[i])));
      peak = std::max(peak, double(std::abs(want[f + from].pcm[i])));
      differ += got[f].pcm[i] != want[f + from].pcm[i];
    }
    INFO("max |pcm difference| " << d << ", peak " << peak << ", " << differ << " samples differ");
    if (exact) {
      CHECK(differ == 0);
    } else {
      CHECK(d <= tol * peak);
      if (peak > 0) g_worst_rel = std::max(g_worst_rel, d / peak);
    }
  }
}

inline int64_t frames_with_audio(const Track& t) {
  int64_t n = 0;
  for (auto& f : t) n += f.has_audio;
  return n;
}

inline bool throws_with(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string m = e.what();
    INFO("message: " << m);
    CHECK(m.find(needle) != std::string::npos);
    std::printf("  error as expected: %s\n", m.c_str());
    return true;
  }
  return false;
}

// Slot independence and resume exactness on one engine (plain attention or TTT).
template <class B>
void slot_and_resume(const Engine<B>& e, const char* tag, double tol = 1e-5) {
  const auto o_x = opts(11), o_a = opts(22), o_b = opts(33, 1.0f, 0.9f), o_c = opts(44);
  const int64_t N = 14, S = 6;  // frames, the save point
  g_worst_rel = 0;
  const std::string saved_alone = temp_path(std::string(tag) + "_alone.safetensors");
  const std::string saved = temp_path(std::string(tag) + "_x.safetensors");
  const Track ref_x = alone(e, 7, o_x, N, S, saved_alone);
  const Track ref_a = alone(e, 1, o_a, N);
  REQUIRE(frames_with_audio(ref_x) >= N - 3);  // audio once the delays fill

  // X in slot 2 of a 4-slot batch: A idles on some ticks, B leaves, C leaves early so X reuses
  // its slot, D joins later, X itself misses ticks.
  Batch<B> b4(e.lm, e.mimi, 4, serve::ConversationOptions::from(e.cfg.gen));
  Driver<B> d{b4, {}, {}, {}};
  d.join(1, o_a), d.join(2, o_b), d.join(3, o_c);
  d.tick(), d.tick({1}), d.tick();
  d.leave(3);  // slot 2 free again, its state dirty
  d.join(7, o_x);
  REQUIRE(d.slot_of[7] == 2);
  int64_t paused_ticks = 0;
  for (int t = 0; d.frame_of[7] < N; ++t) {
    std::vector<int> paused;
    if (t % 3 == 1) paused.push_back(1);
    if (t == 3 || t == 4) paused.push_back(7);
    if (t == 2) d.leave(2);
    if (t == 5) d.join(4, opts(55));
    paused_ticks += int64_t(paused.size());
    if (d.frame_of[7] == S) b4.save(d.slot_of[7], saved);
    d.tick(paused);
  }
  while (d.frame_of[1] < N) d.tick({7});
  std::printf("[%s] X in slot 2 of 4 (A idle every 3rd tick, X idle 2 ticks, B leaving, D joining): %lld frames, "
              "%lld with audio, %lld paused slot-ticks\n",
              tag, (long long)d.track[7].size(), (long long)frames_with_audio(d.track[7]), (long long)paused_ticks);
  check_same(d.track[7], ref_x, 0, "X in a busy batch vs alone", false, tol);
  check_same(d.track[1], ref_a, 0, "A (not ready on some ticks) vs alone", false, tol);

  // Resume, saved alone at frame S, into a batch of one: bitwise the uninterrupted run.
  {
    Batch<B> b1(e.lm, e.mimi, 1, serve::ConversationOptions::from(e.cfg.gen));
    Driver<B> r1{b1, {}, {}, {}};
    r1.resume(7, saved_alone);
    CHECK(b1.frames(0) == S);
    while (r1.frame_of[7] < N) r1.tick();
    check_same(r1.track[7], ref_x, size_t(S), "X saved alone, resumed alone vs uninterrupted", true);
  }
  // The same file into slot 1 of a 3-slot batch (slot 0 busy); the file saved from slot 2 of
  // the 4-slot batch likewise: the tokens continue exactly, the audio to float rounding.
  for (const std::string& file : {saved_alone, saved}) {
    Batch<B> b3(e.lm, e.mimi, 3, serve::ConversationOptions::from(e.cfg.gen));
    Driver<B> r{b3, {}, {}, {}};
    r.join(5, opts(66));
    r.tick();
    r.resume(7, file);
    REQUIRE(r.slot_of[7] == 1);
    CHECK(b3.frames(1) == S);
    CHECK(b3.options(1).seed == o_x.seed);
    CHECK(b3.options(1).temp == o_x.temp);
    while (r.frame_of[7] < N) r.tick();
    check_same(r.track[7], ref_x, size_t(S), "X resumed in slot 1 of 3 vs uninterrupted", false, tol);
  }
  std::printf("[%s] resumed at frame %lld: batch of one bitwise; other batch shapes: tokens equal, pcm within %.2e of "
              "the peak (worst over all comparisons of different batch shapes)\n",
              tag, (long long)S, g_worst_rel);
  std::filesystem::remove(saved);
  std::filesystem::remove(saved_alone);
}

}  // namespace conversation_test
