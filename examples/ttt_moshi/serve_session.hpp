#pragma once
// One conversation's state on the network side of `ttt-moshi serve`: the user's Ogg Opus stream
// decoded into a PCM buffer the engine thread takes 80 ms frames from, and the reply frames the
// engine thread leaves for the connection to encode (Opus) and send. No sockets here: the server
// (serve_server.cpp) and the fuzz target (tests/fuzz/fuzz_ws_message.cpp) both drive it.
//
// Threads: ingest() and encode_out() run on the connection's strand only (they own the Opus
// reader and writer); take_frame() and push_out() run on the engine thread; the buffers between
// them are under `mu`. Nothing here blocks on I/O.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <deque>
#include <mutex>
#include <string>
#include <vector>

#include "serve_protocol.hpp"
#include "ttt/core/error.hpp"
#include "ttt/io/opus_stream.hpp"

namespace ttt_moshi::serve {

// What one client message did.
struct Ingested {
  std::vector<std::string> errors;  // each becomes a kind-5 message
  bool close = false;               // close the connection after sending them
  size_t samples = 0;               // PCM samples added to the buffer
};

// A reply frame from the engine: its audio (empty before the codebook delays fill) and text piece.
struct OutFrame {
  std::vector<float> pcm;
  std::string text;
};

class Session {
 public:
  Session(int64_t sample_rate, int64_t frame_size, const Limits& lim)
      : rate_(sample_rate), frame_(frame_size), lim_(lim), reader_(reader_options(sample_rate, lim)),
        writer_(writer_options(sample_rate)) {
    last_recv_ = std::chrono::steady_clock::now();
  }

  // ---- connection strand ----

  // One WebSocket message (binary or not) from the client.
  Ingested ingest(const uint8_t* data, size_t n, bool binary) {
    Ingested r;
    {
      std::lock_guard<std::mutex> g(mu_);
      last_recv_ = std::chrono::steady_clock::now();
    }
    const Classified c = classify(data, n, binary, lim_);
    if (c.action == Classified::reject || c.action == Classified::reject_close) {
      r.errors.push_back(c.error);
      r.close = c.action == Classified::reject_close;
      return r;
    }
    if (c.action == Classified::ignore) return r;
    if (audio_failed_) {
      r.errors.push_back("audio after a broken Ogg Opus stream");
      r.close = true;
      return r;
    }
    std::vector<float> pcm;
    try {
      reader_.append_bytes(data + 1, n - 1);
      reader_.read_pcm(pcm);
    } catch (const ttt::Error& e) {
      audio_failed_ = true;
      r.errors.push_back(std::string("audio message: ") + e.what());
      r.close = true;  // the stream cannot be followed past a bad page
      return r;
    }
    for (float& x : pcm)
      if (!std::isfinite(x)) x = 0.f;  // libopus decodes to finite floats; belt and braces
    r.samples = pcm.size();
    if (!pcm.empty()) {
      std::lock_guard<std::mutex> g(mu_);
      in_.insert(in_.end(), pcm.begin(), pcm.end());
    }
    return r;
  }

  // True when the PCM waiting for the tick is past the limit: stop reading the socket.
  bool input_full() const {
    std::lock_guard<std::mutex> g(mu_);
    return double(in_.size() - head_) > lim_.max_buffer_seconds * double(rate_);
  }

  // The reply frames waiting, encoded: the messages to send (audio pages, then text) and the
  // number of frames they hold (for frames_done()).
  std::vector<std::string> encode_out(int64_t& frames) {
    std::deque<OutFrame> take;
    {
      std::lock_guard<std::mutex> g(mu_);
      take.swap(out_);
    }
    frames = int64_t(take.size());
    std::vector<std::string> msgs;
    for (auto& f : take) {
      if (!f.pcm.empty()) {
        writer_.append_pcm(f.pcm.data(), f.pcm.size());
        std::vector<unsigned char> bytes = writer_.read_bytes();
        if (!bytes.empty()) msgs.push_back(message(Kind::audio, {reinterpret_cast<const char*>(bytes.data()), bytes.size()}));
      }
      if (!f.text.empty()) msgs.push_back(message(Kind::text, f.text));
    }
    return msgs;
  }
  // The connection wrote `frames` reply frames to its socket.
  void frames_done(int64_t frames) { queued_ -= frames; }

  // ---- engine thread ----

  // Copies the next frame into dst [frame_size] and returns true, if one is buffered.
  bool take_frame(float* dst) {
    std::lock_guard<std::mutex> g(mu_);
    if (int64_t(in_.size() - head_) < frame_) return false;
    std::copy(in_.begin() + std::ptrdiff_t(head_), in_.begin() + std::ptrdiff_t(head_ + size_t(frame_)), dst);
    head_ += size_t(frame_);
    last_take_ = std::chrono::steady_clock::now();
    if (head_ > in_.size() / 2) {  // compact: amortised O(1) per sample
      in_.erase(in_.begin(), in_.begin() + std::ptrdiff_t(head_));
      head_ = 0;
    }
    return true;
  }
  bool frame_ready() const {
    std::lock_guard<std::mutex> g(mu_);
    return int64_t(in_.size() - head_) >= frame_;
  }
  void push_out(OutFrame f) {
    {
      std::lock_guard<std::mutex> g(mu_);
      out_.push_back(std::move(f));
    }
    ++queued_;
  }
  // Reply frames handed to the connection and not yet written to its socket.
  int64_t queued_frames() const { return queued_.load(); }
  // Seconds the client has been idle: since its last message or the tick's last frame of it,
  // whichever is later, and 0 while the server still holds a whole frame of its audio or has
  // stopped reading its socket (back-pressure). A client that sent its audio faster than the
  // tick steps it is waiting for the server, not idle (a slow server, e.g. under a sanitizer,
  // dropped such clients mid-reply). A partial frame left over does not count: only more audio
  // from the client can complete it.
  double idle_seconds() const {
    std::lock_guard<std::mutex> g(mu_);
    if (int64_t(in_.size() - head_) >= frame_ || read_paused) return 0.0;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - std::max(last_recv_, last_take_)).count();
  }

  int64_t frame_size() const { return frame_; }

  std::string id;                       // set by the engine thread before the connection sees it
  std::atomic<bool> gone{false};        // the connection ended: save and release (engine thread)
  std::atomic<bool> read_paused{false}; // the connection stopped reading (input_full)
  const ttt::io::OpusStreamReader& reader() const { return reader_; }

 private:
  static ttt::io::OpusReaderOptions reader_options(int64_t rate, const Limits& lim) {
    ttt::io::OpusReaderOptions o;
    o.sample_rate = rate;
    o.trim = false;  // as sphn's reader and Kyutai's server: every decoded sample, live
    o.max_packet_bytes = std::min<int64_t>(o.max_packet_bytes, lim.max_message_bytes);
    // One message can decode to far more audio than it has bytes (a 1-byte packet is up to
    // 120 ms): bound what a single append may produce, beyond the tick's own buffer limit.
    o.max_pending_seconds = std::max(10.0, 2 * lim.max_buffer_seconds);
    return o;
  }
  static ttt::io::OpusWriterOptions writer_options(int64_t rate) {
    ttt::io::OpusWriterOptions o;
    o.sample_rate = rate;
    return o;
  }

  const int64_t rate_, frame_;
  const Limits lim_;
  ttt::io::OpusStreamReader reader_;  // strand only
  ttt::io::OpusStreamWriter writer_;  // strand only
  bool audio_failed_ = false;    // strand only

  mutable std::mutex mu_;
  std::vector<float> in_;  // decoded user audio; [head_, size) not taken yet
  size_t head_ = 0;
  std::deque<OutFrame> out_;
  std::chrono::steady_clock::time_point last_recv_, last_take_;
  std::atomic<int64_t> queued_{0};
};

}  // namespace ttt_moshi::serve
