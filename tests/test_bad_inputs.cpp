// The bad-input matrix: broken weights, configs, codes files, sessions and arguments given
// to `ttt-moshi`. Each must end the process with a non-zero status and one clear message
// naming the problem, and leave no output file behind.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <limits>

#include "catch.hpp"
#include "cli_helpers.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;

namespace {

const std::string kDir = fixture("moshi/moshi_7b_structure");
const std::string kCfg = kDir + "/config.json", kW = kDir + "/model.safetensors", kCodes = kDir + "/codes.safetensors",
                  kGen = kDir + "/gen.safetensors";

void write_raw(const std::string& path, const std::string& header, const std::string& data, int64_t len = -1) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = len >= 0 ? uint64_t(len) : header.size();
  for (int i = 0; i < 8; ++i) f.put(char(n >> (8 * i)));
  f << header << data;
}

// A copy of the fixture's weights with `edit` applied to the tensor map.
void rewrite_weights(const std::string& path, const std::function<void(std::map<std::string, Tensor<float, Cpu>>&)>& edit) {
  auto st = io::SafeTensors::open(kW);
  std::map<std::string, Tensor<float, Cpu>> m;
  for (auto& n : st.names()) m[n] = st.load<float>(n).clone();
  edit(m);
  io::SafeTensorsWriter w;
  for (auto& [n, t] : m) w.add(n, t);
  w.write(path);
}

void write_json(const std::string& path, const io::Json& j) { std::ofstream(path) << j.dump(); }

struct Case {
  const char* what;
  std::function<void()> prepare;  // makes the broken input
  std::string args;               // ttt-moshi arguments (OUT is the output that must not appear)
  std::string needle;             // the message must contain this
};

}  // namespace

TEST_CASE("bad inputs: one clear error, non-zero exit, no output left", "[errors][cli]") {
  const std::string out = "bad_out.safetensors";
  const std::string fwd = "forward --config " + kCfg + " --codes " + kCodes + " --out " + out + " --weights ";
  const std::string gen = "generate --config " + kCfg + " --weights " + kW + " --out " + out + " ";
  io::Json cfg = io::read_json_file(kCfg);
  std::vector<Case> cases = {
      // --- weights -----------------------------------------------------------------------
      {"truncated weights",
       [] {
         auto all = slurp(kW);
         std::ofstream("bad_w.safetensors", std::ios::binary) << all.substr(0, all.size() / 2);
       },
       fwd + "bad_w.safetensors", "run past the data section"},
      {"header length past EOF", [] { write_raw("bad_w.safetensors", "{}", "", 1 << 20); }, fwd + "bad_w.safetensors",
       "header length 1048576 runs past the end"},
      {"overlapping tensors",
       [] {
         write_raw("bad_w.safetensors",
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                   std::string(12, '\0'));
       },
       fwd + "bad_w.safetensors", "overlap"},
      {"unknown dtype",
       [] { write_raw("bad_w.safetensors", R"({"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]}})", "ab"); },
       fwd + "bad_w.safetensors", "unsupported dtype 'I8'"},
      {"malformed header JSON", [] { write_raw("bad_w.safetensors", "{\"a\": {", ""); }, fwd + "bad_w.safetensors",
       "malformed JSON header"},
      {"NaN weight",
       [] { rewrite_weights("bad_w.safetensors", [](auto& m) { m["out_norm.alpha"].data()[3] = NAN; }); },
       fwd + "bad_w.safetensors", "tensor 'out_norm.alpha' holds a non-finite value"},
      {"Inf weight",
       [] { rewrite_weights("bad_w.safetensors", [](auto& m) { m["text_emb.weight"].data()[7] = -INFINITY; }); },
       fwd + "bad_w.safetensors", "tensor 'text_emb.weight' holds a non-finite value"},
      {"wrong shape",
       [] {
         rewrite_weights("bad_w.safetensors", [](auto& m) { m["text_linear.weight"] = Tensor<float, Cpu>::zeros({56, 47}); });
       },
       fwd + "bad_w.safetensors", "tensor 'text_linear.weight' has shape [56, 47], expected [56, 48]"},
      {"missing key", [] { rewrite_weights("bad_w.safetensors", [](auto& m) { m.erase("out_norm.alpha"); }); },
       fwd + "bad_w.safetensors", "missing tensor 'out_norm.alpha'"},
      {"missing weights file", [] {}, fwd + "no_such_weights.safetensors", "no_such_weights.safetensors: cannot open"},
      // --- config ------------------------------------------------------------------------
      {"malformed config", [] { std::ofstream("bad_cfg.json") << "{\"dim\": 48,"; },
       "forward --config bad_cfg.json --weights " + kW + " --codes " + kCodes + " --out " + out, "malformed JSON"},
      {"missing config file", [] {},
       "forward --config no_such.json --weights " + kW + " --codes " + kCodes + " --out " + out, "no_such.json: cannot open"},
      {"misspelt key in the ttt config",
       [&] {
         io::Json c = cfg;
         c["ttt"] = {{{"layers", {0}}, {"design", "replace"}, {"mini_bath_size", 8}}};
         write_json("bad_cfg.json", c);
       },
       "forward --config bad_cfg.json --weights " + kW + " --codes " + kCodes + " --out " + out,
       "ttt[0]: unknown key 'mini_bath_size'"},
      {"inconsistent config value",
       [&] {
         io::Json c = cfg;
         c["num_heads"] = 5;
         write_json("bad_cfg.json", c);
       },
       "forward --config bad_cfg.json --weights " + kW + " --codes " + kCodes + " --out " + out,
       "not divisible by num_heads 5"},
      {"wrong type in config",
       [&] {
         io::Json c = cfg;
         c["context"] = "long";
         write_json("bad_cfg.json", c);
       },
       "forward --config bad_cfg.json --weights " + kW + " --codes " + kCodes + " --out " + out,
       "key 'context' must be an integer"},
      // --- codes files -------------------------------------------------------------------
      {"out-of-vocabulary token",
       [] {
         auto c = io::SafeTensors::open(kCodes).load<int64_t>("codes").clone();
         c(1, 4, 3) = 4000;
         io::SafeTensorsWriter w;
         w.add("codes", c);
         w.write("bad_codes.safetensors");
       },
       "forward --config " + kCfg + " --weights " + kW + " --codes bad_codes.safetensors --out " + out,
       "token 4000 at [1, 4, 3] is out of range"},
      {"codes of a float dtype",
       [] {
         io::SafeTensorsWriter w;
         w.add("codes", Tensor<float, Cpu>::zeros({1, 17, 4}));
         w.write("bad_codes.safetensors");
       },
       "forward --config " + kCfg + " --weights " + kW + " --codes bad_codes.safetensors --out " + out,
       "has dtype F32, expected a integer type"},
      {"codes of the wrong rank",
       [] {
         io::SafeTensorsWriter w;
         w.add("codes", Tensor<int64_t, Cpu>::zeros({17, 4}));
         w.write("bad_codes.safetensors");
       },
       "forward --config " + kCfg + " --weights " + kW + " --codes bad_codes.safetensors --out " + out,
       "'codes' must be [B, K, T]"},
      {"codes with too few codebooks",
       [] {
         io::SafeTensorsWriter w;
         w.add("codes", Tensor<int64_t, Cpu>::zeros({1, 9, 4}));
         w.write("bad_codes.safetensors");
       },
       "forward --config " + kCfg + " --weights " + kW + " --codes bad_codes.safetensors --out " + out,
       "'codes' has 9 codebooks, the model needs 17"},
      {"user codes with too few codebooks",
       [] {
         io::SafeTensorsWriter w;
         w.add("user_codes", Tensor<int64_t, Cpu>::zeros({1, 3, 4}));
         w.write("bad_codes.safetensors");
       },
       gen + "--user-codes bad_codes.safetensors", "'user_codes' must be [B, 8, S]"},
      {"user code out of range",
       [] {
         auto u = Tensor<int64_t, Cpu>::zeros({1, 8, 4});
         u(0, 2, 1) = 48;
         io::SafeTensorsWriter w;
         w.add("user_codes", u);
         w.write("bad_codes.safetensors");
       },
       gen + "--user-codes bad_codes.safetensors", "user code 48 (item 0, codebook 2) is out of range"},
      // --- arguments ---------------------------------------------------------------------
      {"negative steps", [] {}, gen + "--steps=-5", "--steps must be positive"},
      {"batch mismatch", [] {}, gen + "--user-codes " + kGen + " --batch 3", "--batch 3 does not match the 2 items"},
      {"steps beyond the user codes", [] {}, gen + "--user-codes " + kGen + " --steps 500", "--steps 500 exceeds the 40 frames"},
      {"unwritable output path", [] {},
       "generate --config " + kCfg + " --weights " + kW + " --steps 3 --out /nonexistent-dir/x.safetensors",
       "/nonexistent-dir/x.safetensors: cannot write"},
      {"bad dtype", [] {}, gen + "--dtype f64", "--dtype must be f32, bf16, fp8 or int8"},
      {"bad kv dtype", [] {}, gen + "--kv-dtype bf8", "--kv-dtype must be same, fp8 or int8"},
      {"bad backend", [] {}, gen + "--backend tpu", "--backend must be cpu or cuda"},
      {"negative top-k", [] {}, gen + "--top-k=-2", "--top-k and --top-k-text must be >= 0"},
      {"unknown option", [] {}, gen + "--frobnicate 3", "frobnicate"},
      {"missing --out", [] {}, "generate --config " + kCfg + " --weights " + kW, "generate needs --out OUT"},
      // --- sessions ----------------------------------------------------------------------
      {"truncated session",
       [&] {
         run_tool("ttt-moshi " + gen + "--steps 4 --save-session good_session.safetensors");
         std::remove(out.c_str());
         auto all = slurp("good_session.safetensors");
         std::ofstream("bad_session.safetensors", std::ios::binary) << all.substr(0, all.size() - 100);
       },
       gen + "--resume bad_session.safetensors", "run past the data section"},
      {"session of another batch", [] {}, gen + "--resume good_session.safetensors --batch 2",
       "holds 1 streams, this run has 2"},
      {"not a session file", [] {}, gen + "--resume " + kW, "not a ttt-moshi session file"},
      {"session of another KV storage", [] {}, gen + "--resume good_session.safetensors --kv-dtype fp8",
       "was saved dense, this engine stores it as fp8_e4m3 (start it with the --kv-dtype the session was saved with)"},
      {"session frame counter at the int64 limit",
       [&] {
         // The next frame would overflow it: the loader refuses counters past 2^62.
         auto all = slurp("good_session.safetensors");
         uint64_t header = 0;
         std::memcpy(&header, all.data(), 8);
         const auto st = io::SafeTensors::open("good_session.safetensors");
         const int64_t big = std::numeric_limits<int64_t>::max();
         std::memcpy(&all[8 + header + st.info("lmgen.counters").begin + 8], &big, 8);
         std::ofstream("big_session.safetensors", std::ios::binary) << all;
       },
       gen + "--resume big_session.safetensors", "'lmgen.counters' holds 9223372036854775807, a counter must be in"},
  };
#if TTT_CLI_HAS_AUDIO
  // --- audio and Mimi (converse, mimi encode / decode) -------------------------------------
  const std::string kWav = std::string(TTT_SOURCE_DIR) + "/examples/audio/user.wav";
  const std::string kMimi = fixture("mimi/mimi_real_strides");
  const std::string mimi = "mimi --config " + kMimi + "/config.json --weights " + kMimi + "/model.safetensors ";
  const std::string wav_out = "bad_out.safetensors";  // converse and decode write WAVs there
  const std::vector<Case> audio_cases = {
      {"text file named .wav", [] { std::ofstream("bad.wav") << "this is not audio, just text\n"; },
       mimi + "encode --in bad.wav --out " + out, "bad.wav: not an audio file"},
      {"empty audio file", [] { std::ofstream("bad.wav"); }, mimi + "encode --in bad.wav --out " + out,
       "bad.wav: is empty (0 bytes)"},
      {"truncated WAV",
       [&] {
         auto all = slurp(kWav);
         std::ofstream("bad.wav", std::ios::binary) << all.substr(0, all.size() / 3);
       },
       mimi + "encode --in bad.wav --out " + out, "bad.wav: truncated"},
      {"missing audio file", [] {}, mimi + "encode --in no_such.wav --out " + out, "no_such.wav: cannot open"},
      {"audio input that is a directory", [] {}, mimi + "encode --in . --out " + out, ".: is a directory"},
      {"codes out of Mimi's range",
       [] {
         auto c = Tensor<int64_t, Cpu>::zeros({1, 8, 3});
         c(0, 5, 2) = 5000;
         io::SafeTensorsWriter w;
         w.add("codes", c);
         w.write("bad_codes.safetensors");
       },
       mimi + "decode --in bad_codes.safetensors --out " + wav_out, "code 5000 at [0, 5, 2] is out of range [0, 512)"},
      {"codes with the wrong number of codebooks",
       [] {
         io::SafeTensorsWriter w;
         w.add("codes", Tensor<int64_t, Cpu>::zeros({1, 3, 4}));
         w.write("bad_codes.safetensors");
       },
       mimi + "decode --in bad_codes.safetensors --out " + wav_out, "must be [B, 8, F]"},
      {"Mimi checkpoint missing a key",
       [&] {
         auto st = io::SafeTensors::open(kMimi + "/model.safetensors");
         io::SafeTensorsWriter w;
         for (auto& n : st.names())
           if (n != "decoder.model.2.convtr.convtr.weight") w.add(n, st.load<float>(n).clone());
         w.write("bad_mimi.safetensors");
       },
       "mimi encode --config " + kMimi + "/config.json --weights bad_mimi.safetensors --in " + kWav + " --out " + out,
       "missing tensor 'decoder.model.2.convtr.convtr.weight'"},
      {"Mimi checkpoint with a mis-shaped key",
       [&] {
         auto st = io::SafeTensors::open(kMimi + "/model.safetensors");
         io::SafeTensorsWriter w;
         for (auto& n : st.names())
           w.add(n, n == "encoder.model.0.conv.conv.weight" ? Tensor<float, Cpu>::zeros({8, 1, 5}) : st.load<float>(n).clone());
         w.write("bad_mimi.safetensors");
       },
       "mimi encode --config " + kMimi + "/config.json --weights bad_mimi.safetensors --in " + kWav + " --out " + out,
       "tensor 'encoder.model.0.conv.conv.weight' has shape [8, 1, 5], expected [8, 1, 7]"},
      {"Mimi config with an unsupported setting",
       [&] {
         io::Json j = io::read_json_file(kMimi + "/config.json");
         j["seanet"]["pad_mode"] = "reflect";
         write_json("bad_mimi.json", j);
       },
       "mimi encode --config bad_mimi.json --in " + kWav + " --out " + out,
       "bad_mimi.json: seanet: key 'pad_mode' must be \"constant\" or \"replicate\""},
      {"converse: unreadable input", [] { std::ofstream("bad.wav") << "RIFF garbage"; },
       "converse --input bad.wav --out " + wav_out, "bad.wav:"},
      {"converse: Mimi and LM disagree on codebooks", [] {},
       "converse --config " + kCfg + " --mimi-config " + fixture("mimi/mimi_tiny") + "/config.json --out " + wav_out,
       "Mimi gives 4 codebooks but the LM takes 8"},
  };
  cases.insert(cases.end(), audio_cases.begin(), audio_cases.end());
#endif
  REQUIRE(cases.size() >= 20);
  for (auto& c : cases) {
    INFO("case: " << c.what << "\nargs: " << c.args);
    std::remove(out.c_str());
    c.prepare();
    auto r = run_tool("ttt-moshi " + c.args);
    INFO("stderr: " << r.err);
    REQUIRE(r.code != 0);
    REQUIRE(r.err.find(c.needle) != std::string::npos);
    // One message: a single "error:" line.
    size_t errors = 0;
    for (size_t at = 0; (at = r.err.find("error:", at)) != std::string::npos; ++at) ++errors;
    REQUIRE(errors == 1);
    REQUIRE_FALSE(file_exists(out));
  }
  // Unknown keys in Kyutai's own config only warn.
  io::Json c = cfg;
  c["some_newer_checkpoint_key"] = 42;
  write_json("warn_cfg.json", c);
  auto r = run_tool("ttt-moshi forward --config warn_cfg.json --weights " + kW + " --codes " + kCodes + " --out " + out);
  INFO(r.err);
  REQUIRE(r.code == 0);
  REQUIRE(r.err.find("warning: warn_cfg.json: unknown key 'some_newer_checkpoint_key' ignored") != std::string::npos);
  REQUIRE(file_exists(out));
  std::remove(out.c_str());
}
