#pragma once
// The network half of `ttt-moshi serve` (serve_server.cpp, Boost.Beast / Asio): the listener,
// the WebSocket connections, static files; and the engine threads that tick the conversation
// batches (serve_engines.cpp), one per entry of --devices. It sees a batch through `Engine`
// (virtual calls), so this code is compiled once, whatever the model's dtype and backend
// (serve.cpp adapts ttt::serve::ConversationBatch<T, B>).
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "serve_protocol.hpp"

namespace ttt_moshi::serve {

struct StepOut {
  int64_t text = -1;          // the text token of the frame, -1 for none
  bool has_audio = false;     // the reply row holds a frame of audio
  std::vector<int64_t> audio;  // with has_audio: the frame's audio tokens (the session's token digest)
};

// The conversation batch, as the server uses it. Built, called and destroyed on its engine
// thread only.
class Engine {
 public:
  virtual ~Engine() = default;
  virtual int64_t slots() const = 0;
  virtual int64_t frame_size() const = 0;
  virtual int64_t sample_rate() const = 0;
  virtual int64_t join(const ClientParams& p) = 0;              // slot or -1 when full; throws ttt::Error
  virtual int64_t resume(const std::string& path) = 0;          // slot or -1; throws ttt::Error
  // Copies one conversation's whole state now (the engine thread); the returned call writes it
  // to `path` atomically and may run on any thread.
  virtual std::function<void()> snapshot(int64_t slot, const std::string& path) = 0;
  virtual void leave(int64_t slot) = 0;
  // pcm [slots, frame_size], ready [slots] -> reply [slots, frame_size] and one StepOut per slot.
  virtual std::vector<StepOut> step(const float* pcm, const std::vector<uint8_t>& ready, float* reply) = 0;
  // The text piece of a token ("" for padding): SentencePiece with "▁" as a space, or "<id>".
  virtual std::string text_piece(int64_t token) const = 0;
  // A live conversation's position (frames stepped, kept across save / resume) and its sampling
  // options as JSON (for the metadata message).
  virtual int64_t frames(int64_t slot) const = 0;
  virtual std::string options_json(int64_t slot) const = 0;
  virtual std::string model_name() const = 0;
};

// Builds the engine of one entry of --devices, on the thread that will tick it: selects the
// device (CUDA: before anything is allocated), then loads the models there.
using EngineFactory = std::function<std::unique_ptr<Engine>(int device)>;

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8998;
  int64_t max_sessions = 4;  // per engine
  std::vector<int> devices = {0};  // one engine (thread, model copy, batch) per entry
  std::string session_dir;  // empty: conversations are not saved
  double save_every = 30.0;  // seconds between periodic saves of a live conversation (0: none)
  int send_buffer = 0;       // SO_SNDBUF of a conversation's socket in bytes (0: the system's)
  std::string auth_token;   // empty: none required (only allowed on loopback)
  std::string static_dir;   // GET / and other non-/api paths
  std::string ssl_cert, ssl_key;
  Limits limits;
  double tick_ms = 80.0;        // one frame at 12.5 Hz
  double status_seconds = 10.0; // the status line's period (0: never)
  int io_threads = 2;
};

// Builds the engines (make, once per entry of opt.devices, each on its engine thread), then
// serves until SIGINT / SIGTERM; then saves every live conversation (with a session dir),
// closes the clients and returns 0.
int run_server(const EngineFactory& make, const ServerOptions& opt);

}  // namespace ttt_moshi::serve
