// serve::ConversationBatch (issue 14's engine): a conversation gives the same text tokens and
// the same audio, bitwise, whether it runs alone or in any slot of a batch where others join,
// leave and idle around it; saved after N frames and resumed in another slot of another batch
// it continues exactly as the uninterrupted run; per-conversation sampling options; the TTT
// designs' states travel too; bad inputs get clear errors and leave the other slots alone.
// CPU, the bundled small configs (context and TTT chunk shortened so that a few dozen frames
// reach every code path) with seeded random weights, as `ttt-moshi converse` runs them.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "ttt/io/json.hpp"
#include "ttt/serve/conversation_batch.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using Model = moshi::LmModel<float, Cpu, moshi::DefaultPolicies>;
using Mimi = mimi::Mimi<float, Cpu>;
using Batch = serve::ConversationBatch<float, Cpu>;
using Gen = moshi::LmGen<float, Cpu, moshi::DefaultPolicies>;

namespace {

std::string config_path(const std::string& name) { return std::string(TTT_TEST_DATA) + "/../../examples/configs/" + name; }

std::string temp_path(const std::string& name) {
  static const std::string tag = std::to_string(std::random_device{}());
  return (std::filesystem::temp_directory_path() / ("ttt_test_conversation_" + tag + "_" + name)).string();
}

struct Engine {
  moshi::LmConfig cfg;
  io::WeightSource ws, mws;
  Model lm;
  Mimi mimi;
};

// The small LM (plain attention or the TTT one) and the small Mimi, seeded random weights.
std::unique_ptr<Engine> engine(const std::string& lm_config, uint64_t seed = 1) {
  auto e = std::make_unique<Engine>();
  auto j = io::read_json_file(config_path(lm_config));
  j["context"] = 64;  // the ring wraps within the test's frames
  if (j.contains("ttt"))
    for (auto& entry : j["ttt"])
      if (entry["design"] == "inplace_ffn") entry["chunk_size"] = 4;  // In-Place updates every 4 frames
      else if (entry.contains("mini_batch_size")) entry["mini_batch_size"] = 4;  // TTT updates every 4
  e->cfg = moshi::LmConfig::from_json(j, lm_config);
  e->ws.enable_random_init(seed);
  e->ws.set_seed(seed);
  e->lm = Model::load(e->cfg, e->ws);
  e->mws.enable_random_init(seed + 1);
  e->mimi = Mimi::load(mimi::MimiConfig::load(config_path("mimi_small.json")), e->mws);
  return e;
}

// Conversation `id`'s user audio at its own frame f: a tone and noise, a function of (id, f)
// only, so any run of the conversation feeds the same samples.
std::vector<float> user_frame(int id, int64_t f, int64_t fs) {
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

serve::ConversationOptions opts(uint64_t seed, float temp = 0.8f, float temp_text = 0.7f) {
  serve::ConversationOptions o;
  o.seed = seed, o.temp = temp, o.temp_text = temp_text;
  return o;
}

// Drives a batch tick by tick: each live conversation (by id) has its slot and its own frame
// count; `ready` decides per tick which of them step.
struct Driver {
  Batch& batch;
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
Track alone(const Engine& e, int id, const serve::ConversationOptions& o, int64_t frames, int64_t save_at = -1,
            const std::string& path = "") {
  Batch b(e.lm, e.mimi, 1, serve::ConversationOptions::from(e.cfg.gen));
  Driver d{b, {}, {}, {}};
  d.join(id, o);
  for (int64_t f = 0; f < frames; ++f) {
    if (f == save_at) b.save(d.slot_of[id], path);
    d.tick();
  }
  return d.track[id];
}

// The largest pcm difference seen between runs of different batch shapes, relative to the
// reference frame's peak (printed at the end of each test case that measures it).
double g_worst_rel = 0;

// Frame-by-frame: text and audio tokens equal; the pcm bitwise equal when `exact` (the same
// batch shape), else within 1e-5 of the frame's peak: the CPU Mimi's convolutions put the
// batch items side by side in one GEMM whose blocking (so the summation order) depends on
// the batch size, which moves the decoded audio by float rounding (a few 1e-9 measured on
// audio of peak ~1e-2); the tokens, and so the conversation, do not change.
void check_same(const Track& got, const Track& want, size_t from, const char* what, bool exact) {
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
      CHECK(d <= 1e-5 * peak);
      if (peak > 0) g_worst_rel = std::max(g_worst_rel, d / peak);
    }
  }
}

int64_t frames_with_audio(const Track& t) {
  int64_t n = 0;
  for (auto& f : t) n += f.has_audio;
  return n;
}

bool throws_with(const std::function<void()>& fn, const std::string& needle) {
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
void slot_and_resume(const Engine& e, const char* tag) {
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
  Batch b4(e.lm, e.mimi, 4, serve::ConversationOptions::from(e.cfg.gen));
  Driver d{b4, {}, {}, {}};
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
  check_same(d.track[7], ref_x, 0, "X in a busy batch vs alone", false);
  check_same(d.track[1], ref_a, 0, "A (not ready on some ticks) vs alone", false);

  // Resume, saved alone at frame S, into a batch of one: bitwise the uninterrupted run.
  {
    Batch b1(e.lm, e.mimi, 1, serve::ConversationOptions::from(e.cfg.gen));
    Driver r1{b1, {}, {}, {}};
    r1.resume(7, saved_alone);
    CHECK(b1.frames(0) == S);
    while (r1.frame_of[7] < N) r1.tick();
    check_same(r1.track[7], ref_x, size_t(S), "X saved alone, resumed alone vs uninterrupted", true);
  }
  // The same file into slot 1 of a 3-slot batch (slot 0 busy); the file saved from slot 2 of
  // the 4-slot batch likewise: the tokens continue exactly, the audio to float rounding.
  for (const std::string& file : {saved_alone, saved}) {
    Batch b3(e.lm, e.mimi, 3, serve::ConversationOptions::from(e.cfg.gen));
    Driver r{b3, {}, {}, {}};
    r.join(5, opts(66));
    r.tick();
    r.resume(7, file);
    REQUIRE(r.slot_of[7] == 1);
    CHECK(b3.frames(1) == S);
    CHECK(b3.options(1).seed == o_x.seed);
    CHECK(b3.options(1).temp == o_x.temp);
    while (r.frame_of[7] < N) r.tick();
    check_same(r.track[7], ref_x, size_t(S), "X resumed in slot 1 of 3 vs uninterrupted", false);
  }
  std::printf("[%s] resumed at frame %lld: batch of one bitwise; other batch shapes: tokens equal, pcm within %.2e of "
              "the peak (worst over all comparisons of different batch shapes)\n",
              tag, (long long)S, g_worst_rel);
  std::filesystem::remove(saved);
  std::filesystem::remove(saved_alone);
}

}  // namespace

TEST_CASE("a conversation is independent of its slot and resumes exactly (plain attention)", "[conversation]") {
  auto e = engine("small.json");
  slot_and_resume(*e, "attention");
}

TEST_CASE("a conversation is independent of its slot and resumes exactly (TTT designs)", "[conversation][ttt]") {
  auto e = engine("small_ttt.json");
  slot_and_resume(*e, "ttt");
}

TEST_CASE("per-conversation sampling options", "[conversation]") {
  auto e = engine("small.json");
  const int64_t N = 6;
  auto greedy = opts(5);
  greedy.use_sampling = false;
  // The same input (conversation 3's audio) in five slots with options: seed 5, seed 5 again,
  // seed 6, greedy, greedy text only.
  auto run = [&](std::vector<serve::ConversationOptions> os) {
    Batch bb(e->lm, e->mimi, int64_t(os.size()), serve::ConversationOptions::from(e->cfg.gen));
    for (auto& o : os) REQUIRE(bb.join(o) >= 0);
    std::vector<Track> t(os.size());
    const int64_t fs = bb.frame_size();
    auto pcm = Tensor<float, Cpu>::zeros({int64_t(os.size()), fs});
    Tensor<float, Cpu> out;
    for (int64_t f = 0; f < N; ++f) {
      const auto x = user_frame(3, f, fs);
      for (size_t s = 0; s < os.size(); ++s) std::copy(x.begin(), x.end(), pcm.data() + int64_t(s) * fs);
      const auto res = bb.step(pcm, std::vector<uint8_t>(os.size(), 1), out);
      for (size_t s = 0; s < os.size(); ++s)
        t[s].push_back({res[s].text, res[s].has_audio, res[s].audio, std::vector<float>(out.data() + int64_t(s) * fs, out.data() + int64_t(s + 1) * fs)});
    }
    return t;
  };
  const auto t = run({opts(5), opts(5), opts(6), greedy, opts(5, 0.8f, 0.f)});
  auto differs = [](const Track& a, const Track& b) {
    bool text = false, audio = false;
    for (size_t f = 0; f < a.size(); ++f) text |= a[f].text != b[f].text, audio |= a[f].pcm != b[f].pcm;
    return std::make_pair(text, audio);
  };
  check_same(t[1], t[0], 0, "same options, same input (slots 0 and 1): same output", false);
  const auto [text_seed, audio_seed] = differs(t[0], t[2]);
  const auto [text_greedy, audio_greedy] = differs(t[0], t[3]);
  const auto [text_t0, audio_t0] = differs(t[0], t[4]);
  std::printf("seed 5 vs seed 6: text %s, audio %s; vs greedy: text %s, audio %s; vs temp_text 0: text %s\n",
              text_seed ? "differs" : "same", audio_seed ? "differs" : "same", text_greedy ? "differs" : "same",
              audio_greedy ? "differs" : "same", text_t0 ? "differs" : "same");
  CHECK(text_seed);
  CHECK(audio_seed);
  CHECK(text_greedy);
  CHECK(audio_greedy);
  CHECK(text_t0);
  // temp_text 0 makes the text greedy: its text equals the fully greedy conversation's first
  // text token (same logits before any sampled token feeds back).
  CHECK(t[4][0].text == t[3][0].text);
  // An option set is this conversation's own: a batch-1 run with seed 6 matches slot 2.
  check_same(alone(*e, 3, opts(6), N), t[2], 0, "seed 6 alone vs in slot 2 of 5", false);
}

TEST_CASE("LmGen with one GenOptions: item b draws as a batch-1 run with seed + b", "[conversation][generator]") {
  auto e = engine("small.json");
  moshi::GenOptions o = moshi::GenOptions::from(e->cfg.gen);
  o.seed = 100;
  Gen g(e->lm, o);
  auto s = g.start(3);
  const int64_t nu = g.num_user_codebooks();
  auto user = Tensor<int64_t, Cpu>::empty({3, nu});
  std::vector<Tensor<int64_t, Cpu>> outs;
  for (int64_t f = 0; f < 6; ++f) {
    for (int64_t b = 0; b < 3; ++b)
      for (int64_t k = 0; k < nu; ++k) user(b, k) = (f * 131 + k * 17) % e->cfg.card;  // the same input for all
    outs.push_back(g.step_items(s, user));
  }
  for (int64_t b = 0; b < 3; ++b) {
    moshi::GenOptions ob = o;
    ob.seed = o.seed + uint64_t(b);
    Gen g1(e->lm, ob);
    auto s1 = g1.start(1);
    auto u1 = Tensor<int64_t, Cpu>::empty({1, nu});
    bool distinct = false;
    for (int64_t f = 0; f < 6; ++f) {
      for (int64_t k = 0; k < nu; ++k) u1(0, k) = (f * 131 + k * 17) % e->cfg.card;
      const auto t = g1.step_items(s1, u1);
      for (int64_t k = 0; k <= e->cfg.dep_q; ++k) {
        INFO("item " << b << " frame " << f << " token " << k);
        CHECK(t(0, k) == outs[size_t(f)](b, k));
        if (b > 0) distinct |= outs[size_t(f)](b, k) != outs[size_t(f)](0, k);
      }
    }
    if (b > 0) CHECK(distinct);  // the items do not all draw the same
  }
}

TEST_CASE("bad inputs: clear errors, other conversations undisturbed", "[conversation][bad]") {
  auto e = engine("small.json");
  const int64_t N = 6;
  const auto o_a = opts(22);
  const Track ref_a = alone(*e, 1, o_a, N);
  Batch b(e->lm, e->mimi, 2, serve::ConversationOptions::from(e->cfg.gen));
  Driver d{b, {}, {}, {}};
  d.join(1, o_a);
  d.tick(), d.tick();
  const int64_t fs = b.frame_size();
  Tensor<float, Cpu> out;

  // Wrong pcm shape, wrong ready size, non-finite samples.
  CHECK(throws_with([&] { b.step(Tensor<float, Cpu>::zeros({2, fs - 1}), {1, 0}, out); }, "pcm must be [2, "));
  CHECK(throws_with([&] { b.step(Tensor<float, Cpu>::zeros({3, fs}), {1, 0, 0}, out); }, "pcm must be [2, "));
  CHECK(throws_with([&] { b.step(Tensor<float, Cpu>::zeros({2, fs}), {1}, out); }, "ready has 1 entries"));
  auto nan_pcm = Tensor<float, Cpu>::zeros({2, fs});
  nan_pcm(0, 5) = NAN;
  CHECK(throws_with([&] { b.step(nan_pcm, {1, 0}, out); }, "slot 0: sample 5 is not finite"));
  // Slots: leave of an idle slot, out of range, save of an idle slot.
  CHECK(throws_with([&] { b.leave(1); }, "slot 1 holds no conversation"));
  CHECK(throws_with([&] { b.leave(7); }, "slot 7 out of range"));
  CHECK(throws_with([&] { b.save(1, temp_path("idle.safetensors")); }, "slot 1 holds no conversation"));
  CHECK(throws_with([&] { b.join([] { auto o = opts(1); o.temp = -1; return o; }()); }, "temperatures"));

  // A saved conversation, then broken copies of it.
  const std::string good = temp_path("good.safetensors");
  b.save(d.slot_of[1], good);
  const auto size = std::filesystem::file_size(good);
  std::string bytes(size, '\0');
  {
    std::ifstream f(good, std::ios::binary);
    f.read(bytes.data(), std::streamsize(size));
  }
  auto write = [&](const std::string& name, const std::string& content) {
    const std::string p = temp_path(name);
    std::ofstream(p, std::ios::binary).write(content.data(), std::streamsize(content.size()));
    return p;
  };
  const std::string truncated = write("truncated.safetensors", bytes.substr(0, size / 2));
  const std::string garbage = write("garbage.safetensors", std::string(1000, 'x'));
  CHECK(throws_with([&] { b.resume(truncated); }, truncated));
  CHECK(throws_with([&] { b.resume(garbage); }, garbage));
  CHECK(throws_with([&] { b.resume(temp_path("missing.safetensors")); }, "missing.safetensors"));
  // A file of another model (the TTT config) and a plain LmGen session file.
  auto other = engine("small_ttt.json");
  Batch bo(other->lm, other->mimi, 2, serve::ConversationOptions::from(other->cfg.gen));
  REQUIRE(bo.join(opts(3)) == 0);
  const std::string foreign = temp_path("foreign.safetensors");
  bo.save(0, foreign);
  CHECK(throws_with([&] { b.resume(foreign); }, "saved by another model"));
  CHECK(throws_with([&] { bo.resume(good); }, "saved by another model"));
  Gen g(e->lm, moshi::GenOptions::from(e->cfg.gen));
  const std::string session = temp_path("lmgen.safetensors");
  g.save(g.start(1), session);
  CHECK(throws_with([&] { b.resume(session); }, "not a conversation file"));
  // A file that claims our engine but holds a tensor of the wrong shape.
  {
    io::SafeTensorsWriter w;
    w.add_metadata("format", "ttt-conversation");
    w.add_metadata("version", "1");
    w.add_metadata("engine", b.fingerprint());
    auto st = io::SafeTensors::open(good);
    auto lm1 = g.load_tensors(st);
    g.save(lm1, w);
    w.add("mimi_enc.pending_lengths", Tensor<int64_t, Cpu>::from_vector({1}, {0}));
    w.write(temp_path("partial.safetensors"));
  }
  CHECK(throws_with([&] { b.resume(temp_path("partial.safetensors")); }, "partial.safetensors"));
  CHECK_FALSE(b.busy(1));  // the failed resumes took no slot

  // Full batch: join and resume give -1.
  REQUIRE(b.join(opts(9)) == 1);
  CHECK(b.join(opts(10)) == -1);
  CHECK(b.resume(good) == -1);
  b.leave(1);
  // A continues exactly as alone after all of that.
  while (d.frame_of[1] < N) d.tick();
  check_same(d.track[1], ref_a, 0, "A after the errors vs alone", false);
  for (const auto& p : {good, truncated, garbage, foreign, session, temp_path("partial.safetensors")})
    std::filesystem::remove(p);
}
