// The command-line tools end to end: `ttt-moshi forward/generate/info` on the fixtures,
// live text through a SentencePiece model trained here, error exits, and the consistency of
// `bench --max-streams`.
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>

#include "catch.hpp"
#include "cli_helpers.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/ttt.hpp"
#if TTT_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#endif

using namespace ttt;


TEST_CASE("ttt-moshi forward and generate reproduce the fixtures", "[cli]") {
  for (const char* name : {"moshi_peer_test", "moshi_small_defaults", "moshi_7b_structure"}) {
    INFO("case " << name);
    const std::string dir = fixture(std::string("moshi/") + name);
    const std::string out = std::string("cli_forward_") + name + ".safetensors";
    auto r = run_tool("ttt-moshi forward --config " + dir + "/config.json --weights " + dir + "/model.safetensors --codes " +
                 dir + "/codes.safetensors --out " + out);
    INFO(r.err);
    REQUIRE(r.code == 0);
    auto got = io::SafeTensors::open(out), ref = io::SafeTensors::open(dir + "/out.safetensors");
    for (const char* key : {"logits", "text_logits"}) {
      auto a = got.load<float>(key).to_vector(), b = ref.load<float>(key).to_vector();
      REQUIRE(a.size() == b.size());
      double m = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        REQUIRE(std::isnan(a[i]) == std::isnan(b[i]));
        if (!std::isnan(b[i])) m = std::max(m, double(std::abs(a[i] - b[i])));
      }
      std::printf("[cli] forward %-22s %-11s max abs err %.2e\n", name, key, m);
      REQUIRE(m <= 1e-4);
    }
    REQUIRE(got.load<uint8_t>("mask").to_vector() == ref.load<uint8_t>("mask").to_vector());
    REQUIRE(got.load<uint8_t>("text_mask").to_vector() == ref.load<uint8_t>("text_mask").to_vector());
    std::remove(out.c_str());
    if (std::string(name) == "moshi_peer_test") continue;  // no gen.safetensors
    const std::string gout = std::string("cli_gen_") + name + ".safetensors";
    r = run_tool("ttt-moshi generate --config " + dir + "/config.json --weights " + dir + "/model.safetensors --user-codes " +
            dir + "/gen.safetensors --greedy --out " + gout);
    INFO(r.err);
    REQUIRE(r.code == 0);
    REQUIRE(r.err.find("frames/s") != std::string::npos);  // progress is printed
    auto g = io::SafeTensors::open(gout), gref = io::SafeTensors::open(dir + "/gen.safetensors");
    REQUIRE(g.load<int64_t>("tokens").shape() == gref.load<int64_t>("tokens").shape());
    REQUIRE(g.load<int64_t>("tokens").to_vector() == gref.load<int64_t>("tokens").to_vector());
    std::remove(gout.c_str());
  }
}

TEST_CASE("ttt-moshi generate --kv-dtype stores the KV cache quantised", "[cli][kv]") {
  const std::string dir = fixture("moshi/moshi_7b_structure");
  for (const char* kv : {"fp8", "int8"}) {
    INFO("--kv-dtype " << kv);
    const std::string out = std::string("cli_kv_") + kv + ".safetensors", ses = std::string("cli_kv_session_") + kv + ".safetensors";
    auto r = run_tool("ttt-moshi generate --config " + dir + "/config.json --weights " + dir + "/model.safetensors --user-codes " +
                      dir + "/gen.safetensors --greedy --kv-dtype " + kv + " --out " + out + " --save-session " + ses);
    INFO(r.err);
    REQUIRE(r.code == 0);
    auto g = io::SafeTensors::open(out), gref = io::SafeTensors::open(dir + "/gen.safetensors");
    REQUIRE(g.load<int64_t>("tokens").shape() == gref.load<int64_t>("tokens").shape());
    // The saved session holds one-byte codes and a scale per row for every temporal layer.
    auto s = io::SafeTensors::open(ses);
    int64_t scales = 0;
    for (const auto& n : s.names())
      if (n.size() > 8 && n.compare(n.size() - 8, 8, ".k_scale") == 0) {
        ++scales;
        const std::string codes = n.substr(0, n.size() - 6);
        REQUIRE(s.info(codes).dtype == DType::u8);
      }
    REQUIRE(scales == 2);  // the fixture's two temporal layers (the depformer's cache stays dense)
    std::remove(out.c_str());
    std::remove(ses.c_str());
  }
}

TEST_CASE("ttt-moshi info checks a checkpoint's keys", "[cli]") {
  const std::string dir = fixture("moshi/moshi_7b_structure");
  auto r = run_tool("ttt-moshi info --config " + dir + "/config.json --weights " + dir + "/model.safetensors");
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(r.out.find("all keys match") != std::string::npos);
  REQUIRE(r.out.find("parameters:") != std::string::npos);
}

TEST_CASE("ttt-moshi errors exit non-zero with one clear message and no output file", "[cli]") {
  const std::string dir = fixture("moshi/moshi_7b_structure");
  struct Bad {
    std::string args, needle;
  };
  const std::string out = "cli_bad_out.safetensors";
  std::remove(out.c_str());
  for (const Bad& b : std::vector<Bad>{
           {"forward --config " + dir + "/config.json --weights missing.safetensors --codes " + dir +
                "/codes.safetensors --out " + out,
            "missing.safetensors: cannot open"},
           {"forward --config " + dir + "/config.json --weights " + dir + "/model.safetensors --codes " + dir +
                "/model.safetensors --out " + out,
            "missing tensor 'codes'"},
           {"forward --config " + fixture("moshi/moshi_small_defaults/config.json") + " --weights " + dir +
                "/model.safetensors --codes " + dir + "/codes.safetensors --out " + out,
            "expected"},
           {"generate --config " + dir + "/config.json --steps=-3 --out " + out, "--steps must be positive"},
           {"generate --config " + dir + "/config.json --backend tpu --out " + out, "--backend must be cpu or cuda"},
           {"generate --config " + dir + "/config.json --steps 3 --out /nonexistent-dir/x.safetensors", "cannot write"},
           {"frobnicate", "unknown command"},
       }) {
    auto r = run_tool("ttt-moshi " + b.args);
    INFO(b.args << "\nstderr: " << r.err);
    REQUIRE(r.code != 0);
    REQUIRE(r.err.find(b.needle) != std::string::npos);
    REQUIRE_FALSE(file_exists(out));
  }
}

// bench --context-frames N: the session starts as after N frames (LmGen::fill_as_after, whose
// state test_ttt_moshi "[fill]" checks), so the frames it times attend to N + the frames before
// them, capped at the config's context; the bytes line says so. A negative N is refused.
TEST_CASE("ttt-moshi bench --context-frames times frames after a filled context", "[cli][streams]") {
  const std::string base = "ttt-moshi bench --config " + test_data("../../examples/configs/small.json") +
                           " --backend cpu --frames 2 --warmup 1";
  for (const auto& [n, want] : std::vector<std::pair<long long, long long>>{{0, 3}, {500, 503}, {5000, 3000}}) {
    const auto r = run_tool(base + " --context-frames " + std::to_string(n));
    INFO("--context-frames " << n << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.code == 0);
    REQUIRE(r.out.find("(" + std::to_string(want) + " frames of context") != std::string::npos);
  }
  const auto bad = run_tool(base + " --context-frames -1");
  REQUIRE(bad.code != 0);
  REQUIRE(bad.err.find("--context-frames must be >= 0") != std::string::npos);
}

// bench --max-streams on the CPU (small config, full 3000-frame context): the limit is set
// from a first run's batch-1 frame so that the search grows past 1 and has to stop; whatever
// the host's speed, the answer must agree with the batches it tried: the reported batch fit
// and met the limit, the next one (always tried: the bisection ends on adjacent batches) did
// not fit or missed it, and every tried batch is on the side of the answer it belongs to.
TEST_CASE("ttt-moshi bench --max-streams gives an answer consistent with what it measured", "[cli][streams]") {
  struct Tried {
    bool fits = false;
    double p50 = 0;
  };
  struct Search {
    std::map<long long, Tried> tried;
    long long streams = -1, next = -1;
    std::string next_state;
    size_t tries = 0;
  };
  auto search = [&](const std::string& args) {
    const auto r = run_tool("ttt-moshi bench --config " + test_data("../../examples/configs/small.json") +
                            " --backend cpu --max-streams --frames 5 --warmup 1 " + args);
    INFO(args << "\nstdout: " << r.out << "\nstderr: " << r.err);
    REQUIRE(r.code == 0);
    Search s;
    std::istringstream lines(r.out);
    for (std::string line; std::getline(lines, line);) {
      long long b = 0;
      double p50 = 0;
      char state[32] = {0};
      if (std::sscanf(line.c_str(), "max-streams try: batch %lld: p50 %lf ms", &b, &p50) == 2) {
        REQUIRE(s.tried.count(b) == 0);  // never the same batch twice
        s.tried[b] = {true, p50};
      } else if (std::sscanf(line.c_str(), "max-streams try: batch %lld: does not fit", &b) == 1) {
        s.tried[b] = {false, 0};
      } else if (std::sscanf(line.c_str(), "max-streams result: label=%*s backend=cpu dtype=f32 streams=%lld p50=%*f "
                                           "p99=%*f gib=%*f limit=%*f next=%lld next_state=%31s tries=%zu",
                             &s.streams, &s.next, state, &s.tries) == 4) {
        s.next_state = state;
      }
    }
    REQUIRE(s.streams >= 0);
    REQUIRE(s.tries == s.tried.size());
    if (s.streams > 0) REQUIRE(r.out.find("floor at batch " + std::to_string(s.streams) + ":") != std::string::npos);
    return s;
  };
  const Search one = search("--max-batch-cap 1 --stream-limit-ms 100000");
  REQUIRE(one.streams == 1);
  REQUIRE(one.next_state == "cap");
  const double limit = 2.5 * one.tried.at(1).p50;
  const Search s = search("--max-batch-cap 64 --stream-limit-ms " + std::to_string(limit));
  std::printf("[cli] bench --max-streams on the CPU: batch 1 %.2f ms, limit %.2f ms: %lld streams, next %lld (%s), "
              "%zu tries\n", one.tried.at(1).p50, limit, s.streams, s.next, s.next_state.c_str(), s.tries);
  auto good = [&](const Tried& t) { return t.fits && t.p50 <= limit * (1 + 1e-6); };
  for (const auto& [b, t] : s.tried) {
    INFO("batch " << b << " p50 " << t.p50 << " fits " << t.fits);
    REQUIRE(good(t) == (b <= s.streams));
  }
  if (s.next_state == "cap") {
    REQUIRE(s.streams == 64);
  } else {
    REQUIRE(s.next == s.streams + 1);
    REQUIRE(s.tried.count(s.next) == 1);
    REQUIRE(s.next_state == (s.tried.at(s.next).fits ? "too-slow" : "does-not-fit"));
  }
}

#if TTT_HAVE_SENTENCEPIECE
TEST_CASE("generate --tokenizer prints the text stream live", "[cli]") {
  // A tiny SentencePiece model trained here, and a config whose text vocabulary is its size.
  {
    std::ofstream corpus("cli_spm_corpus.txt");
    for (int i = 0; i < 200; ++i)
      corpus << "the quick brown fox jumps over the lazy dog " << i % 7 << " hello world moshi speaks\n";
  }
  auto st = sentencepiece::SentencePieceTrainer::Train(
      "--input=cli_spm_corpus.txt --model_prefix=cli_spm --vocab_size=40 --model_type=unigram "
      "--minloglevel=2 --hard_vocab_limit=false");
  REQUIRE(st.ok());
  sentencepiece::SentencePieceProcessor sp;
  REQUIRE(sp.Load("cli_spm.model").ok());
  const int vocab = sp.GetPieceSize();
  io::Json cfg = io::read_json_file(fixture("moshi/moshi_7b_structure/config.json"));
  cfg["text_card"] = vocab;
  std::ofstream("cli_spm_config.json") << cfg.dump();
  auto r = run_tool("ttt-moshi generate --config cli_spm_config.json --steps 30 --seed 3 --tokenizer cli_spm.model "
               "--out cli_spm_tokens.safetensors");
  INFO(r.err);
  REQUIRE(r.code == 0);
  // The printed text is the decoded text stream with PAD (3) and EPAD (0) skipped.
  auto toks = io::SafeTensors::open("cli_spm_tokens.safetensors").load<int64_t>("tokens");
  std::string want;
  for (int64_t t = 0; t < toks.size(2); ++t) {
    const int64_t id = toks(0, 0, t);
    if (id == 0 || id == 3) continue;
    std::string piece = sp.IdToPiece(int(id));
    for (size_t p; (p = piece.find("\xe2\x96\x81")) != std::string::npos;) piece.replace(p, 3, " ");
    want += piece;
  }
  REQUIRE(!want.empty());
  REQUIRE(r.out == want + "\n");
}
#endif
