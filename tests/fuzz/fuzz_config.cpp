// libFuzzer target: Kyutai config.json parsing (LmConfig), the "ttt" list and Mimi's config
// (moshi's _mimi_config layout) on arbitrary text. Malformed JSON is nlohmann's parse_error; everything past parsing must be a
// ttt::Error with a message, never a crash.
#include <cstddef>
#include <cstdint>
#include <string>

#include "ttt/mimi/config.hpp"
#include "ttt/moshi/config.hpp"
#include "ttt/moshi/ttt_plan.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ttt::io::Json j;
  try {
    j = ttt::io::Json::parse(reinterpret_cast<const char*>(data), reinterpret_cast<const char*>(data) + size);
  } catch (const ttt::io::Json::exception&) {
    return 0;
  }
  try {
    auto cfg = ttt::moshi::LmConfig::from_json(j, "fuzz.json", /*warn_unknown=*/false);
    (void)ttt::moshi::parse_ttt_plan(cfg, "fuzz.json");
  } catch (const ttt::Error&) {
  }
  try {
    (void)ttt::mimi::MimiConfig::from_json(j, "fuzz.json", /*warn_unknown=*/false);
  } catch (const ttt::Error&) {
  }
  return 0;
}
