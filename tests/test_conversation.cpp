// serve::ConversationBatch (issue 14's engine) on the CPU: a conversation gives the same text
// and audio tokens whether it runs alone or in any slot of a batch where others join, leave
// and idle around it (the audio to float rounding across batch shapes, see check_same); saved
// after N frames and resumed it continues exactly (bitwise in the same batch shape); per-
// conversation sampling options; the TTT designs' states travel too; bad inputs get clear
// errors and leave the other slots alone. The bundled small configs (context, text vocabulary
// and TTT mini-batches shortened so that a few frames reach every code path) with seeded
// random weights, as `ttt-moshi converse` runs them.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "conversation_helpers.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using namespace conversation_test;
using Gen = moshi::LmGen<float, Cpu, moshi::DefaultPolicies>;
using CpuBatch = Batch<Cpu>;
using CpuDriver = Driver<Cpu>;

TEST_CASE("a conversation is independent of its slot and resumes exactly (plain attention)", "[conversation]") {
  auto e = engine<Cpu>("small.json");
  slot_and_resume(*e, "attention");
}

TEST_CASE("a conversation is independent of its slot and resumes exactly (TTT designs)", "[conversation][ttt]") {
  auto e = engine<Cpu>("small_ttt.json");
  slot_and_resume(*e, "ttt");
}

TEST_CASE("per-conversation sampling options", "[conversation]") {
  auto e = engine<Cpu>("small.json");
  const int64_t N = 6;
  auto greedy = opts(5);
  greedy.use_sampling = false;
  // The same input (conversation 3's audio) in five slots with options: seed 5, seed 5 again,
  // seed 6, greedy, greedy text only.
  auto run = [&](std::vector<serve::ConversationOptions> os) {
    CpuBatch bb(e->lm, e->mimi, int64_t(os.size()), serve::ConversationOptions::from(e->cfg.gen));
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
  auto e = engine<Cpu>("small.json");
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
  auto e = engine<Cpu>("small.json");
  const int64_t N = 6;
  const auto o_a = opts(22);
  const Track ref_a = alone(*e, 1, o_a, N);
  CpuBatch b(e->lm, e->mimi, 2, serve::ConversationOptions::from(e->cfg.gen));
  CpuDriver d{b, {}, {}, {}};
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
  auto other = engine<Cpu>("small_ttt.json");
  CpuBatch bo(other->lm, other->mimi, 2, serve::ConversationOptions::from(other->cfg.gen));
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

TEST_CASE("sample_rows: a row's token depends on its own logits and parameters only", "[conversation][sample]") {
  // 6 rows of V logits; row r: temperature, top-k, seed and counter of its own (row 0 greedy,
  // row 1 top-k 1). Sampled as a batch, reversed, and one by one: every row gets the same token.
  const int64_t N = 6, V = 300;
  std::mt19937 g(7);
  std::uniform_real_distribution<float> d(-3.f, 3.f);
  auto logits = Tensor<float, Cpu>::empty({N, V});
  for (int64_t i = 0; i < logits.numel(); ++i) logits.data()[i] = d(g);
  const std::vector<float> temp = {0.f, 1.f, 0.7f, 1.3f, 0.9f, 0.9f};
  const std::vector<int64_t> topk = {0, 1, 0, 5, 50, 50};
  const std::vector<int64_t> seed = {1, 2, 3, 4, 5, 6};
  const std::vector<int64_t> ctr = {0, 9, 17, 123456789012, 3, 3};
  auto rows_of = [&](const std::vector<int64_t>& order) {
    auto pick = [&](const auto& v) {
      std::vector<std::decay_t<decltype(v[0])>> o;
      for (int64_t r : order) o.push_back(v[size_t(r)]);
      return o;
    };
    const int64_t n = int64_t(order.size());
    SampleRows<Cpu> rows;
    rows.temperature = Tensor<float, Cpu>::from_vector({n}, pick(temp));
    rows.top_k = Tensor<int64_t, Cpu>::from_vector({n}, pick(topk));
    rows.seed = Tensor<int64_t, Cpu>::from_vector({n}, pick(seed));
    rows.counter = Tensor<int64_t, Cpu>::from_vector({n}, pick(ctr));
    rows.salt = 2;
    auto l = Tensor<float, Cpu>::empty({n, V});
    for (int64_t i = 0; i < n; ++i) l.select(0, i).copy_from(logits.select(0, order[size_t(i)]));
    auto out = Tensor<int64_t, Cpu>::empty({n});
    ops::sample_rows(out, l, rows);
    return out.to_vector();
  };
  const auto all = rows_of({0, 1, 2, 3, 4, 5});
  const auto rev = rows_of({5, 4, 3, 2, 1, 0});
  for (int64_t r = 0; r < N; ++r) {
    INFO("row " << r);
    CHECK(rev[size_t(N - 1 - r)] == all[size_t(r)]);
    CHECK(rows_of({r})[0] == all[size_t(r)]);
  }
  // Greedy and top-k 1 rows are the argmax.
  for (int64_t r : {0, 1}) {
    int64_t best = 0;
    for (int64_t i = 1; i < V; ++i)
      if (logits(r, i) > logits(r, best)) best = i;
    CHECK(all[size_t(r)] == best);
  }
  // Draws differ with the seed (rows 4 and 5 differ only in it) somewhere over 20 counters.
  bool differs = false;
  for (int64_t k = 0; k < 20 && !differs; ++k) {
    SampleRows<Cpu> rows;
    rows.temperature = Tensor<float, Cpu>::from_vector({2}, {0.9f, 0.9f});
    rows.top_k = Tensor<int64_t, Cpu>::from_vector({2}, {50, 50});
    rows.seed = Tensor<int64_t, Cpu>::from_vector({2}, {5, 6});
    rows.counter = Tensor<int64_t, Cpu>::from_vector({2}, {k, k});
    auto l = Tensor<float, Cpu>::empty({2, V});
    l.select(0, 0).copy_from(logits.select(0, 4));
    l.select(0, 1).copy_from(logits.select(0, 4));
    auto out = Tensor<int64_t, Cpu>::empty({2});
    ops::sample_rows(out, l, rows);
    differs = out(0) != out(1);
  }
  CHECK(differs);
}
