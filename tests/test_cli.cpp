// The command-line tools end to end: `ttt-moshi forward/generate/info` on the fixtures,
// live text through a SentencePiece model trained here, and error exits.
#include <cmath>
#include <cstdio>
#include <fstream>
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
