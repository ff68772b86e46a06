// Kyutai's Mimi codec against its float64 reference (tests/data/fixtures/mimi): codes equal,
// latent and audio within 1e-5 of the largest reference value, whole-sequence and streaming
// (one frame per call, as the fixture made them); then the streaming session's contract:
// any chunking of the input gives the frame-by-frame codes, snapshot / save / load resume
// exactly, and a per-item reset restarts that item only.
#include <cstdio>
#include <filesystem>
#include <string>
#include <random>

#include "catch.hpp"
#include "mimi_helpers.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using mimi_test::Case;

TEST_CASE("Mimi reproduces Kyutai's float64 reference on the CPU", "[mimi]") {
  mimi_test::check_fixtures<Cpu>("cpu");
}

TEST_CASE("the tiny case's streaming and whole-sequence paths differ, as in Kyutai's code", "[mimi]") {
  // Its transformer context (12) is shorter than the stream with 4 steps per frame: Kyutai's
  // ring drops keys before a frame's first queries see them. The fixture shows it; so must we.
  const Case c("mimi_tiny");
  CHECK(mimi_test::mismatches(c.codes, c.codes_stream) + (mimi_test::rel_err(c.decoded, c.decoded_stream) > 1e-4) > 0);
}

TEST_CASE("Mimi streaming: any chunking, snapshot, save / load, per-item reset", "[mimi]") {
  for (const char* name : {"mimi_tiny", "mimi_real_strides"}) {
  INFO(name);
  const Case c(name);
  const auto m = c.model<float, Cpu>();
  const int64_t Bn = c.pcm.size(0), S = c.pcm.size(2), fs = m.frame_size(), F = S / fs;
  const auto pcm = c.pcm.reshape({Bn, S});

  // Ragged chunks (including empty ones and ones spanning several frames) give the codes of
  // one frame per call.
  std::mt19937 g(3);
  auto s = m.start(Bn);
  std::vector<Tensor<int64_t, Cpu>> got;
  int64_t at = 0, frames = 0;
  while (at < S) {
    const int64_t n = std::min<int64_t>(S - at, std::uniform_int_distribution<int64_t>(0, 3 * fs)(g));
    auto codes = m.encode_step(s, pcm.slice(1, at, at + n).contiguous());
    CHECK(codes.size(2) == (at + n) / fs - at / fs);
    frames += codes.size(2);
    got.push_back(codes);
    at += n;
  }
  REQUIRE(frames == F);
  auto all = Tensor<int64_t, Cpu>::empty(c.codes_stream.shape());
  int64_t f = 0;
  for (auto& t : got) {
    if (t.size(2)) all.slice(2, f, f + t.size(2)).copy_from(t);
    f += t.size(2);
  }
  CHECK(mimi_test::mismatches(all, c.codes_stream) == 0);

  // Snapshot and save / load mid-stream: both continuations equal the uninterrupted one.
  const int64_t half = F / 2;
  auto a = m.start(Bn);
  (void)m.encode_step(a, pcm.slice(1, 0, half * fs + fs / 3).contiguous());  // a partial frame pending
  auto snap = m.snapshot(a);
  io::SafeTensorsWriter w;
  m.save(a, w);
  // In the temp directory (ctest runs suites in parallel from the build tree).
  const std::string path = (std::filesystem::temp_directory_path() /
                            ("ttt_test_mimi_session_" + std::to_string(std::random_device{}()) + ".safetensors"))
                               .string();
  w.write(path);
  auto loaded = m.start(Bn);
  m.load(loaded, io::SafeTensors::open(path));
  std::filesystem::remove(path);
  const auto rest = pcm.slice(1, half * fs + fs / 3, S).contiguous();
  const auto c1 = m.encode_step(a, rest), c2 = m.encode_step(snap, rest), c3 = m.encode_step(loaded, rest);
  const auto ref = c.codes_stream.slice(2, half, F).contiguous();
  CHECK(mimi_test::mismatches(c1, ref) == 0);
  CHECK(mimi_test::mismatches(c2, ref) == 0);
  CHECK(mimi_test::mismatches(c3, ref) == 0);

  // Per-item reset: item 1 restarts and then equals a fresh batch-1 stream of the same audio;
  // item 0 goes on as if nothing happened (mimi_tiny has two items).
  if (Bn >= 2) {
  auto r = m.start(Bn);
  (void)m.encode_step(r, pcm.slice(1, 0, half * fs).contiguous());
  m.reset(r, {0, 1});
  const auto tail = pcm.slice(1, half * fs, S).contiguous();
  const auto cr = m.encode_step(r, tail);
  CHECK(mimi_test::mismatches(cr.slice(0, 0, 1).contiguous(), c.codes_stream.slice(0, 0, 1).slice(2, half, F).contiguous()) == 0);
  auto fresh = m.start(1);
  const auto cf = m.encode_step(fresh, tail.slice(0, 1, 2).contiguous());
  CHECK(mimi_test::mismatches(cr.slice(0, 1, 2).contiguous(), cf) == 0);
  }

  // The decoder streams the same way: a snapshot continues exactly.
  auto d = m.start(Bn);
  (void)m.decode_step(d, c.codes.slice(2, 0, half).contiguous());
  auto dsnap = m.snapshot(d);
  const auto y1 = m.decode_step(d, c.codes.slice(2, half, F).contiguous());
  const auto y2 = m.decode_step(dsnap, c.codes.slice(2, half, F).contiguous());
  CHECK(mimi_test::rel_err(y1, y2) == 0.0);
  }
}

TEST_CASE("Mimi refuses bad codes and configs with one clear error", "[mimi]") {
  const Case c("mimi_tiny");
  const auto m = c.model<float, Cpu>();
  auto bad = c.codes.clone();
  bad(1, 2, 3) = m.cardinality();
  CHECK_THROWS_WITH(m.check_codes(bad), TTT_CONTAINS("code 64 at [1, 2, 3] is out of range [0, 64)"));
  auto s = m.start(2);
  CHECK_THROWS_WITH(m.decode_step(s, bad), TTT_CONTAINS("out of range"));
  CHECK_THROWS_WITH(m.decode_step(s, c.codes.slice(1, 0, 2).contiguous()), TTT_CONTAINS("must be [B, 4, F]"));
  io::Json j = io::read_json_file(mimi_test::fixture_dir("mimi_tiny") + "/config.json");
  j["seanet"]["pad_mode"] = "reflect";
  CHECK_THROWS_WITH(mimi::MimiConfig::from_json(j, "cfg.json"), TTT_CONTAINS("cfg.json: seanet: key 'pad_mode'"));
  j = io::read_json_file(mimi_test::fixture_dir("mimi_tiny") + "/config.json");
  j["frame_rate"] = 7.0;
  CHECK_THROWS_WITH(mimi::MimiConfig::from_json(j, "cfg.json"), TTT_CONTAINS("frame_rate"));
  j = io::read_json_file(mimi_test::fixture_dir("mimi_tiny") + "/config.json");
  j["num_codebooks"] = 9;
  CHECK_THROWS_WITH(mimi::MimiConfig::from_json(j, "cfg.json"), TTT_CONTAINS("num_codebooks"));
}
