// libFuzzer target: what `ttt-moshi serve` does with a client's bytes, without the network
// (examples/ttt_moshi/serve_protocol.hpp and serve_session.hpp): the request target and its
// query (percent-decoding, parameter validation, session ids, static file paths), then a
// sequence of WebSocket messages through Session::ingest (kind dispatch, size limit, Ogg page
// sync, Opus decoding into the tick's PCM buffer), the tick's frames taken out, and reply
// frames encoded back. Every input must be handled without a crash or an exception escaping:
// a bad message is an error text (and perhaps a close), never anything else.
//
// Input layout: [n][n bytes of request target][messages...], each message
// [flags][len lo][len hi][len bytes] (flags bit 0: binary; a short last message takes what is
// left). Seeds (corpus/ws_message): real Opus streams (ours, sphn's) cut into messages, the
// malformed messages of tests/serve/test_serve.py, query strings.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "../../examples/ttt_moshi/serve_protocol.hpp"
#include "../../examples/ttt_moshi/serve_session.hpp"

namespace {

using namespace ttt_moshi::serve;

const std::filesystem::path& web_root() {
  static const std::filesystem::path root = [] {
    auto p = std::filesystem::temp_directory_path() / "fuzz_ws_message_web";
    std::filesystem::create_directories(p / "sub");
    std::FILE* f = std::fopen((p / "index.html").c_str(), "w");
    if (f) std::fclose(f);
    return p;
  }();
  return root;
}

void check_target(const std::string& target) {
  const Target t = parse_target(target);
  if (!t.error.empty()) return;
  ClientParams p;
  const std::string err = parse_params(t.query, p);
  if (err.empty() && !p.session_id.empty() && !is_session_id(p.session_id)) std::abort();
  if (err.empty() && p.text_topk && (*p.text_topk < 1)) std::abort();
  if (err.empty() && p.text_temperature && !std::isfinite(*p.text_temperature)) std::abort();
  if (const auto f = static_file(web_root(), t.path)) {
    const std::string root = std::filesystem::canonical(web_root()).string() + "/";
    if (f->string().compare(0, root.size(), root) != 0) std::abort();  // escaped the web root
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  size_t at = 1;
  const size_t tn = std::min<size_t>(data[0], size - 1);
  check_target(std::string(reinterpret_cast<const char*>(data + at), tn));
  at += tn;

  Limits lim;
  lim.max_message_bytes = 4096;  // small, so the fuzzer reaches it
  lim.max_buffer_seconds = 0.5;
  constexpr int64_t kRate = 24000, kFrame = 1920;
  Session s(kRate, kFrame, lim);
  std::vector<float> frame(kFrame);
  bool closed = false;
  int64_t frames = 0;
  while (at < size && !closed) {
    const bool binary = data[at] & 1;
    size_t len = at + 2 < size ? size_t(data[at + 1]) | (size_t(data[at + 2]) << 8) : 0;
    at = std::min(size, at + 3);
    len = std::min(len, size - at);
    Ingested r;
    try {
      r = s.ingest(data + at, len, binary);
    } catch (...) {
      std::abort();  // ingest reports every problem as an error text
    }
    at += len;
    if (r.close && r.errors.empty()) std::abort();  // a close always says why
    for (const auto& e : r.errors)
      if (e.empty() || e.size() > 4096) std::abort();
    closed = r.close;
    // The tick takes every whole frame; the samples must be finite.
    while (s.take_frame(frame.data())) {
      for (float v : frame)
        if (!std::isfinite(v)) std::abort();
      ++frames;
    }
    if (s.input_full()) std::abort();  // the tick just took everything whole
  }
  // Reply frames (the engine's side): encoded to audio messages, the queue count back to 0.
  for (int64_t i = 0; i < std::min<int64_t>(frames, 3); ++i) {
    OutFrame f;
    f.pcm.assign(frame.begin(), frame.end());
    f.text = "<" + std::to_string(i) + ">";
    s.push_out(std::move(f));
  }
  int64_t n = 0;
  const auto msgs = s.encode_out(n);
  for (const auto& m : msgs)
    if (m.empty() || (m[0] != char(Kind::audio) && m[0] != char(Kind::text))) std::abort();
  s.frames_done(n);
  if (s.queued_frames() != 0) std::abort();
  return 0;
}
