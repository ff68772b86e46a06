// safetensors and JSON I/O: round trips, and every kind of broken file gives a ttt::Error
// naming the file, the tensor and the problem.
#include <cstdio>
#include <cstring>
#include <functional>
#include <fstream>
#include <random>

#include "catch.hpp"
#include "reference.hpp"
#include "ttt/io/json.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;

namespace {

// Writes a raw safetensors file from a header string and a data section.
void write_raw(const std::string& path, const std::string& header, const std::string& data, int64_t len_override = -1) {
  std::ofstream f(path, std::ios::binary);
  uint64_t n = len_override >= 0 ? uint64_t(len_override) : header.size();
  for (int i = 0; i < 8; ++i) f.put(char(n >> (8 * i)));
  f << header << data;
}

std::string error_of(const std::string& path) {
  try {
    auto st = io::SafeTensors::open(path);
    for (auto& t : st.tensors()) (void)st.load<float>(t.name);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype, zero-copy on load", "[io]") {
  std::mt19937 g(1);
  io::SafeTensorsWriter w;
  auto f32 = ref::random<float>({3, 5}, g);
  auto b16 = ref::random<bf16>({7}, g);
  auto h16 = ref::random<f16>({2, 2, 2}, g);
  auto i64 = Tensor<int64_t, Cpu>::from_vector({4}, {1, -2, 3, 1ll << 40});
  auto i32 = Tensor<int32_t, Cpu>::from_vector({2}, {7, -7});
  auto u8 = Tensor<uint8_t, Cpu>::from_vector({3}, {0, 1, 255});
  w.add("f32", f32);
  w.add("sub/b16", b16);
  w.add("h16", h16);
  w.add("i64", i64);
  w.add("i32", i32);
  w.add("u8", u8);
  w.add("empty", Tensor<float, Cpu>::empty({0, 3}));
  w.add_metadata("format", "pt");
  w.write("io_roundtrip.safetensors");
  auto st = io::SafeTensors::open("io_roundtrip.safetensors");
  REQUIRE(st.tensors().size() == 7);
  REQUIRE(st.metadata().at("format") == "pt");
  auto rf = st.load<float>("f32");
  REQUIRE(rf.to_vector() == f32.to_vector());
  REQUIRE(rf.owner() != nullptr);  // a view of the mapping
  REQUIRE(st.load<bf16>("sub/b16").to_vector().size() == 7);
  for (int i = 0; i < 7; ++i) REQUIRE(st.load<bf16>("sub/b16").data()[i].bits == b16.data()[i].bits);
  // Conversions at load: bf16 -> f32 is exact, f32 -> bf16 rounds.
  auto widened = st.load<float>("sub/b16");
  for (int i = 0; i < 7; ++i) REQUIRE(widened.data()[i] == float(b16.data()[i]));
  REQUIRE(st.load<int64_t>("i64").to_vector() == i64.to_vector());
  REQUIRE(st.load<int64_t>("i32").to_vector() == std::vector<int64_t>{7, -7});
  REQUIRE(st.load<uint8_t>("u8").to_vector() == u8.to_vector());
  REQUIRE(st.load<float>("empty").shape() == Shape{0, 3});
  REQUIRE_THROWS_WITH(st.load<float>("i64"), TTT_CONTAINS("has dtype I64, expected a floating type"));
  REQUIRE_THROWS_WITH(st.load<float>("nope"), TTT_CONTAINS("no tensor named 'nope'"));
  std::remove("io_roundtrip.safetensors");
}

TEST_CASE("broken safetensors files give clear errors", "[io][errors]") {
  const std::string p = "io_broken.safetensors";
  const std::string ok_header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  struct Case {
    const char* what;
    std::function<void()> make;
    const char* needle;
  };
  std::vector<Case> cases = {
      {"empty file", [&] { std::ofstream(p, std::ios::binary); }, "truncated"},
      {"4 bytes", [&] { std::ofstream(p, std::ios::binary) << "abcd"; }, "truncated"},
      {"header length past EOF", [&] { write_raw(p, ok_header, std::string(8, '\0'), 1000); }, "runs past the end"},
      {"huge header length", [&] { write_raw(p, ok_header, std::string(8, '\0'), int64_t(1) << 62); }, "runs past the end"},
      {"malformed JSON", [&] { write_raw(p, "{\"a\": [1, 2", std::string(8, '\0')); }, "malformed JSON"},
      {"JSON not an object", [&] { write_raw(p, "[1, 2, 3]", ""); }, "not a JSON object"},
      {"JSON number overflow (found by fuzzing)",
       [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[1E6384],"data_offsets":[0,4]}})", std::string(4, '\0')); },
       "malformed JSON header"},
      {"unknown dtype", [&] { write_raw(p, R"({"a":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", "ab"); },
       "unsupported dtype 'F8_E4M3'"},
      {"shape/size mismatch",
       [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')); },
       "needs 12 bytes but data_offsets span 8"},
      {"truncated data",
       [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", std::string(8, '\0')); },
       "run past the data section"},
      {"overlapping tensors",
       [&] {
         write_raw(p,
                   R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                   std::string(12, '\0'));
       },
       "overlap"},
      {"reversed offsets",
       [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", std::string(8, '\0')); },
       "reversed"},
      {"negative shape",
       [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, '\0')); },
       "not a non-negative integer"},
      {"missing offsets", [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[2]}})", std::string(8, '\0')); },
       "missing 'data_offsets'"},
      {"rank 5", [&] { write_raw(p, R"({"a":{"dtype":"F32","shape":[1,1,1,1,2],"data_offsets":[0,8]}})", std::string(8, '\0')); },
       "rank 5"},
      {"bad metadata", [&] { write_raw(p, R"({"__metadata__":{"k":3}})", ""); }, "not a string"},
      {"not a file", [&] { std::remove(p.c_str()); }, "cannot open"},
  };
  for (auto& c : cases) {
    INFO(c.what);
    std::remove(p.c_str());
    c.make();
    const std::string e = error_of(p);
    INFO("error: " << e);
    REQUIRE(e.find(c.needle) != std::string::npos);
    REQUIRE(e.find(p) != std::string::npos);  // names the file
  }
  std::remove(p.c_str());
}

TEST_CASE("the writer is atomic: a failed write leaves nothing behind", "[io]") {
  io::SafeTensorsWriter w;
  w.add("x", Tensor<float, Cpu>::zeros({4}));
  REQUIRE_THROWS_WITH(w.write("/nonexistent-dir/out.safetensors"), TTT_CONTAINS("cannot write"));
  REQUIRE_THROWS_AS(w.add("x", Tensor<float, Cpu>::zeros({1})), Error);  // duplicate name
}

TEST_CASE("weight source: shapes, missing keys and seeded init", "[io]") {
  io::SafeTensorsWriter w;
  w.add("a.weight", Tensor<float, Cpu>::zeros({2, 3}));
  w.write("io_ws.safetensors");
  io::WeightSource ws("io_ws.safetensors");
  REQUIRE(ws.unused() == std::vector<std::string>{"a.weight"});
  REQUIRE_THROWS_WITH(ws.get<float>("a.weight", {3, 2}),
                      TTT_CONTAINS("io_ws.safetensors: tensor 'a.weight' has shape [2, 3], expected [3, 2]"));
  REQUIRE_THROWS_WITH(ws.get<float>("b.weight", {3, 2}), TTT_CONTAINS("missing tensor 'b.weight'"));
  REQUIRE(ws.get<float>("a.weight", {-1, 3}).shape() == Shape{2, 3});
  REQUIRE(ws.unused().empty());
  // Seeded init is deterministic per (seed, name) and has the requested std.
  io::WeightSource r1, r2;
  r1.enable_random_init(5);
  r2.enable_random_init(5);
  auto x = r1.get_or_init<float>("w", {100, 100}, io::Init::normal(0.5f));
  auto y = r2.get_or_init<float>("w", {100, 100}, io::Init::normal(0.5f));
  REQUIRE(x.to_vector() == y.to_vector());
  double s2 = 0;
  for (float v : x.to_vector()) s2 += double(v) * v;
  const double std = std::sqrt(s2 / 1e4);
  REQUIRE(std > 0.42);  // truncated at 3 std: 0.493
  REQUIRE(std < 0.52);
  REQUIRE(r1.initialised() == std::vector<std::string>{"w"});
  std::remove("io_ws.safetensors");
}

TEST_CASE("JSON access names the file and key", "[io]") {
  {
    std::ofstream("io_bad.json") << "{\"a\": 1,";
  }
  REQUIRE_THROWS_WITH(io::read_json_file("io_bad.json"), TTT_CONTAINS("io_bad.json: malformed JSON"));
  REQUIRE_THROWS_WITH(io::read_json_file("io_missing.json"), TTT_CONTAINS("io_missing.json: cannot open"));
  io::Json j = {{"n", 3}, {"s", "x"}, {"f", 2.5}, {"l", {1, 2}}};
  io::JsonView v(j, "cfg.json");
  REQUIRE(v.get<int>("n") == 3);
  REQUIRE(v.get<float>("f") == 2.5f);
  REQUIRE(v.get<int>("absent", 7) == 7);
  REQUIRE_THROWS_WITH(v.get<int>("s"), TTT_CONTAINS("cfg.json: key 's' must be an integer"));
  REQUIRE_THROWS_WITH(v.get<int>("f"), TTT_CONTAINS("key 'f' must be an integer"));
  REQUIRE_THROWS_WITH(v.get<std::string>("n"), TTT_CONTAINS("key 'n' must be a string"));
  REQUIRE_THROWS_WITH(v.get<int>("absent"), TTT_CONTAINS("missing key 'absent'"));
  std::remove("io_bad.json");
}
