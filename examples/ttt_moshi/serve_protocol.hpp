#pragma once
// Kyutai's conversation protocol (moshi/moshi/server.py, rust/protocol.md and the web client's
// client/src/protocol/*.ts in kyutai-labs/moshi), the parts that need no network: message kinds
// and framing, the query string of GET /api/chat and its validation, session ids and static file
// paths. Every function here is pure (no sockets, no engine), so the fuzz target
// tests/fuzz/fuzz_ws_message.cpp and the server share it. See docs/serving.md.
//
// A WebSocket message is binary; its first byte is the kind, the rest the payload:
//   0 handshake  server -> client first: 0x00, u32 protocol version 0, u32 model version 0
//                (little endian; Kyutai's Rust server; their Python server sends the lone 0x00
//                and both clients look at the kind byte only)
//   1 audio      Ogg Opus, mono 24 kHz, both ways (any split of the stream into messages)
//   2 text       server -> client: a UTF-8 piece of the text stream
//   3 control    one byte: 0 start, 1 end turn, 2 pause, 3 restart (unused in full streaming)
//   4 metadata   server -> client: JSON
//   5 error      server -> client: a UTF-8 description
//   6 ping       no payload
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

namespace ttt_moshi::serve {

enum class Kind : uint8_t { handshake = 0, audio = 1, text = 2, control = 3, metadata = 4, error = 5, ping = 6 };

// Kind byte + payload.
inline std::string message(Kind k, std::string_view payload = {}) {
  std::string m(1, char(k));
  m.append(payload);
  return m;
}

// The handshake as Kyutai's Rust server sends it: kind 0, protocol version 0, model version 0.
inline std::string handshake_message() { return std::string("\0\0\0\0\0\0\0\0\0", 9); }

// ---- limits -------------------------------------------------------------------------------------

struct Limits {
  // A client message larger than this gets an error and the connection is closed. Our Opus pages
  // are ~100-300 bytes per 20 ms; Kyutai's clients send a few pages per message.
  int64_t max_message_bytes = 256 * 1024;
  // Reply frames (80 ms each) queued for a client and not yet written to its socket: past this the
  // client is too slow (or gone) and is dropped, with its state saved. 50 frames = 4 s.
  int64_t max_queue_frames = 50;
  // No message from the client for this long: dropped, state saved.
  double idle_seconds = 30.0;
  // Decoded user audio waiting for the tick: past this the server stops reading the socket until
  // the tick catches up (TCP back-pressure; a fast client is slowed, never dropped). 2 s.
  double max_buffer_seconds = 2.0;
};

// ---- query string -------------------------------------------------------------------------------

// Percent-decoding ("+" is a space, as HTML forms and URLSearchParams write it). nullopt on a
// malformed escape or a NUL byte.
inline std::optional<std::string> url_decode(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  auto hex = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
  };
  for (size_t i = 0; i < s.size(); ++i) {
    char c = s[i];
    if (c == '+') {
      c = ' ';
    } else if (c == '%') {
      if (i + 2 >= s.size()) return std::nullopt;
      const int h = hex(s[i + 1]), l = hex(s[i + 2]);
      if (h < 0 || l < 0) return std::nullopt;
      c = char(h * 16 + l);
      i += 2;
    }
    if (c == '\0') return std::nullopt;
    out.push_back(c);
  }
  return out;
}

struct Target {
  std::string path;                          // decoded
  std::map<std::string, std::string> query;  // decoded; a repeated name keeps its last value
  std::string error;                         // non-empty: the target could not be parsed
};

inline Target parse_target(std::string_view target) {
  Target t;
  const size_t q = target.find('?');
  auto path = url_decode(target.substr(0, q));
  if (!path) return t.error = "malformed percent-escape in the path", t;
  t.path = *path;
  if (q == std::string_view::npos) return t;
  std::string_view rest = target.substr(q + 1);
  while (!rest.empty()) {
    const size_t amp = rest.find('&');
    const std::string_view kv = rest.substr(0, amp);
    rest = amp == std::string_view::npos ? std::string_view{} : rest.substr(amp + 1);
    if (kv.empty()) continue;
    const size_t eq = kv.find('=');
    auto k = url_decode(kv.substr(0, eq));
    auto v = url_decode(eq == std::string_view::npos ? std::string_view{} : kv.substr(eq + 1));
    if (!k || !v) return t.error = "malformed percent-escape in the query string", t;
    t.query[*k] = *v;
  }
  return t;
}

// ---- conversation parameters --------------------------------------------------------------------

// What a client may set, from the query string of GET /api/chat. Unset fields keep the server's
// defaults (the LM config's lm_gen_config). Names as Kyutai's web client and Rust server use them.
struct ClientParams {
  std::optional<float> text_temperature, audio_temperature;
  std::optional<int> text_topk, audio_topk;
  std::optional<uint64_t> seed;  // seed, else text_seed / audio_seed mixed (one RNG per conversation)
  std::optional<bool> greedy;    // greedy=1: argmax instead of sampling (ours; temperature 0 too)
  std::string session_id;        // resume a saved conversation
  std::string auth_token;
  std::vector<std::string> ignored;  // names we accept and do not use (listed in the metadata)
};

// Parameters Kyutai's clients send that this engine does not implement; accepted, reported back.
inline bool ignored_param(const std::string& k) {
  static const char* names[] = {"pad_mult", "repetition_penalty_context", "repetition_penalty", "email",
                                "worker_auth_id", "image_url", "image_resolution", "max_steps"};
  for (const char* n : names)
    if (k == n) return true;
  return false;
}

inline bool is_session_id(std::string_view s) {
  if (s.size() != 32) return false;
  for (char c : s)
    if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f'))) return false;
  return true;
}

// 128 random bits from the OS (std::random_device reads /dev/urandom on Linux), 32 hex digits.
inline std::string new_session_id() {
  std::random_device rd;
  static const char* hexd = "0123456789abcdef";
  std::string id;
  for (int i = 0; i < 4; ++i) {
    uint32_t w = rd();
    for (int j = 0; j < 8; ++j, w >>= 4) id.push_back(hexd[w & 15]);
  }
  return id;
}

// SplitMix64 finaliser: mixes Kyutai's two seeds into one.
inline uint64_t mix_seed(uint64_t a, uint64_t b) {
  uint64_t z = a + 0x9e3779b97f4a7c15ull * (b + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// Parses and validates the query. Returns the error text (empty when all is well): the first
// invalid value, named. Unknown names are an error (a typo should not silently change nothing),
// except Kyutai's own parameters this engine does not implement (ignored_param).
inline std::string parse_params(const std::map<std::string, std::string>& q, ClientParams& p) {
  auto as_float = [&](const std::string& k, const std::string& v, float lo, float hi) -> std::optional<float> {
    char* end = nullptr;
    errno = 0;
    const double x = std::strtod(v.c_str(), &end);
    if (v.empty() || end != v.c_str() + v.size() || errno == ERANGE || !std::isfinite(x) || x < lo || x > hi)
      return std::nullopt;
    (void)k;
    return float(x);
  };
  auto as_u64 = [](const std::string& v) -> std::optional<uint64_t> {
    if (v.empty() || v.size() > 20) return std::nullopt;
    for (char c : v)
      if (c < '0' || c > '9') return std::nullopt;
    char* end = nullptr;
    errno = 0;
    const unsigned long long x = std::strtoull(v.c_str(), &end, 10);
    if (errno == ERANGE) return std::nullopt;
    return uint64_t(x);
  };
  std::optional<uint64_t> text_seed, audio_seed;
  for (const auto& [k, v] : q) {
    auto bad = [&, &k = k, &v = v](const char* want) {
      std::string shown = v.size() > 40 ? v.substr(0, 40) + "..." : v;
      return "invalid query parameter " + k + "='" + shown + "': " + want;
    };
    if (k == "text_temperature" || k == "audio_temperature") {
      auto x = as_float(k, v, 0.f, 100.f);
      if (!x) return bad("a number in [0, 100]");
      (k == "text_temperature" ? p.text_temperature : p.audio_temperature) = *x;
    } else if (k == "text_topk" || k == "audio_topk") {
      auto x = as_u64(v);
      if (!x || *x < 1 || *x > 1000000) return bad("an integer in [1, 1000000]");
      (k == "text_topk" ? p.text_topk : p.audio_topk) = int(*x);
    } else if (k == "seed" || k == "text_seed" || k == "audio_seed") {
      auto x = as_u64(v);
      if (!x) return bad("an unsigned 64-bit integer");
      (k == "seed" ? p.seed : k == "text_seed" ? text_seed : audio_seed) = *x;
    } else if (k == "greedy") {
      if (v != "0" && v != "1" && v != "true" && v != "false") return bad("0, 1, true or false");
      p.greedy = v == "1" || v == "true";
    } else if (k == "session_id") {
      if (!is_session_id(v)) return bad("32 lowercase hex digits (the id this server sent in its metadata)");
      p.session_id = v;
    } else if (k == "auth_token") {
      p.auth_token = v;
    } else if (ignored_param(k)) {
      p.ignored.push_back(k);
    } else {
      std::string shown = k.size() > 40 ? k.substr(0, 40) + "..." : k;
      return "unknown query parameter '" + shown + "'";
    }
  }
  if (!p.seed && (text_seed || audio_seed)) p.seed = mix_seed(text_seed.value_or(0), audio_seed.value_or(0));
  return {};
}

// ---- client messages ----------------------------------------------------------------------------

// What to do with one client message, before any audio decoding. The policy (docs/serving.md):
// errors that leave the conversation intact are reported and the connection stays open; a message
// the server cannot afford to hold (oversize) or an audio stream it can no longer follow (broken
// Ogg/Opus, decided by the session) closes it.
struct Classified {
  enum Action { audio, ignore, reject, reject_close } action = ignore;
  std::string error;  // for reject / reject_close
};

inline Classified classify(const uint8_t* data, size_t n, bool binary, const Limits& lim) {
  if (int64_t(n) > lim.max_message_bytes)
    return {Classified::reject_close, "message of " + std::to_string(n) + " bytes exceeds the limit of " +
                                          std::to_string(lim.max_message_bytes) + " bytes"};
  if (!binary) return {Classified::reject, "text WebSocket frame: this protocol sends binary messages only"};
  if (n == 0) return {Classified::reject, "empty message (no kind byte)"};
  const unsigned kind = data[0];
  switch (kind) {
    case unsigned(Kind::audio):
      return {Classified::audio, {}};
    case unsigned(Kind::handshake):
    case unsigned(Kind::ping):
      return {Classified::ignore, {}};
    case unsigned(Kind::control):
      if (n != 2 || data[1] > 3)
        return {Classified::reject, "control message: want one byte 0..3 (start, end turn, pause, restart)"};
      return {Classified::ignore, {}};  // turn control is not used in full-duplex streaming
    case unsigned(Kind::text):
      return {Classified::reject, "text message from the client: this server takes audio (kind 1) only"};
    case unsigned(Kind::metadata):
      return {Classified::reject, "metadata message from the client: not accepted"};
    case unsigned(Kind::error):
      return {Classified::ignore, {}};  // the client's error: logged by the caller
    default:
      return {Classified::reject, "unknown message kind " + std::to_string(kind)};
  }
}

// ---- static files -------------------------------------------------------------------------------

// The file under `root` a GET path names, or nullopt: only plain names (no "..", no hidden or
// empty segments, no backslash), only a regular file whose canonical path stays inside root (a
// symlink pointing out is refused). "/" is index.html.
inline std::optional<std::filesystem::path> static_file(const std::filesystem::path& root, std::string_view path) {
  namespace fs = std::filesystem;
  if (path.empty() || path[0] != '/' || path.size() > 1024) return std::nullopt;
  std::string rel(path.substr(1));
  if (rel.empty()) rel = "index.html";
  size_t start = 0;
  while (start <= rel.size()) {
    const size_t slash = rel.find('/', start);
    const std::string seg = rel.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (seg.empty() || seg[0] == '.' || seg.find('\\') != std::string::npos) return std::nullopt;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  std::error_code ec;
  const fs::path base = fs::canonical(root, ec);
  if (ec) return std::nullopt;
  const fs::path file = fs::canonical(base / rel, ec);
  if (ec || !fs::is_regular_file(file, ec)) return std::nullopt;
  const std::string b = base.string() + "/", f = file.string();
  if (f.compare(0, b.size(), b) != 0) return std::nullopt;
  return file;
}

inline const char* content_type(const std::filesystem::path& p) {
  const std::string e = p.extension().string();
  if (e == ".html" || e == ".htm") return "text/html; charset=utf-8";
  if (e == ".js" || e == ".mjs") return "text/javascript; charset=utf-8";
  if (e == ".css") return "text/css; charset=utf-8";
  if (e == ".png") return "image/png";
  if (e == ".ico") return "image/x-icon";
  if (e == ".svg") return "image/svg+xml";
  if (e == ".json") return "application/json";
  if (e == ".wav") return "audio/wav";
  return "application/octet-stream";
}

}  // namespace ttt_moshi::serve
