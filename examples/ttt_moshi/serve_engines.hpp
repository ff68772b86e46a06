#pragma once
// The engine side of `ttt-moshi serve` (serve_engines.cpp): one engine thread per entry of
// --devices (a Ticker, stepping its own conversation batch once per frame tick), the pool that
// places each new or resumed conversation on the least loaded engine, and the saver thread that
// writes session files for all of them. The network side (serve_server.cpp) reaches a
// conversation only through `Conn` and the Session's buffers, so nothing here knows Beast.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "serve_server.hpp"
#include "serve_session.hpp"

namespace ttt_moshi::serve {

using Clock = std::chrono::steady_clock;

// One line on stderr: `fmt` with up to two %s.
inline void log(const char* fmt, const std::string& a = {}, const std::string& b = {}) {
  std::fprintf(stderr, fmt, a.c_str(), b.c_str());
  std::fputc('\n', stderr);
  std::fflush(stderr);
}
inline std::string short_id(const std::string& id) { return id.substr(0, 8); }

// WebSocket close codes the engine side asks for (RFC 6455).
enum class CloseCode : uint16_t { going_away = 1001, policy_error = 1008, try_again_later = 1013 };

class Ticker;

// A WebSocket conversation as an engine thread sees it (over TCP or TLS: serve_server.cpp).
class Conn {
 public:
  virtual ~Conn() = default;
  // Joined as `s` on `engine`: send the metadata and start reading.
  virtual void joined(std::shared_ptr<Session> s, std::string metadata, Ticker& engine) = 0;
  // Reply frames are waiting in the session: encode and send them.
  virtual void drain() = 0;
  // The tick took frames: read again if reading was paused.
  virtual void resume_read() = 0;
  // A client too slow to take its replies: its queue will not drain, so nothing more is sent
  // (not even an error); the socket is closed at once.
  virtual void abort() = 0;
  // Sends kind 5 (when error is not empty), then closes once the queue is written.
  virtual void close(std::string error, CloseCode code, std::string reason) = 0;
};

struct JoinRequest {
  std::shared_ptr<Conn> conn;
  ClientParams params;
};

// Writes saved conversations on a thread of its own: a 7B conversation's file is gigabytes (its
// KV ring), and writing it on an engine thread would stall every other conversation's tick.
// The engine thread only takes the snapshot (a device-to-host copy). One saver serves every
// engine: a conversation saved on one engine may be resumed on another, which waits for it.
class Saver {
 public:
  Saver();
  ~Saver() { drain_and_stop(); }
  // `write` writes the file; `done(ok, error)` runs after it, on this thread.
  void push(const std::string& id, std::function<void()> write, std::function<void(bool, const std::string&)> done);
  // Returns once no save of `id` is queued or being written.
  void wait_for(const std::string& id);
  bool pending(const std::string& id);
  // Writes what is queued, then ends the thread.
  void drain_and_stop();

 private:
  struct Job {
    std::string id;
    std::function<void()> write;
    std::function<void(bool, const std::string&)> done;
  };
  void loop();
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::multiset<std::string> pending_;  // one entry per queued or running save
  bool stop_ = false;
  std::thread thread_;
};

class EnginePool;

// One engine thread: its conversation batch, stepped once per frame tick for every live
// conversation with a frame buffered. Everything but request_join / wake / stop / load runs on
// the engine thread.
class Ticker {
 public:
  Ticker(int index, int device, EnginePool& pool, const ServerOptions& opt)
      : index_(index), device_(device), pool_(pool), opt_(opt) {}
  int index() const { return index_; }
  int device() const { return device_; }
  // Live conversations plus joins on their way (the pool's placement measure).
  int64_t load() const { return load_.load(); }

  void request_join(JoinRequest r);
  void wake();
  void stop();
  // The engine thread: `engine` was built on it; returns once stopped, every conversation saved
  // (queued on the saver) and its close posted.
  void run(Engine& engine);

 private:
  friend class EnginePool;
  // A live conversation, as the engine thread keeps it.
  struct Live {
    std::shared_ptr<Session> session;
    // Held while the conversation is live: a connection whose reading is paused (back-pressure)
    // and that has nothing to write has no pending operation to keep it alive.
    std::shared_ptr<Conn> conn;
    std::string id;
    int64_t slot = -1;
    int64_t saved_frame = -1;     // the frame of its last save queued (periodic, or resumed from); -1: none
    // The frame its file holds once written (the saver thread sets it): a conversation that
    // ends there needs no second copy of the same state.
    std::shared_ptr<std::atomic<int64_t>> on_disk;
    Clock::time_point next_save;  // when --save-every next saves it
    // FNV-1a over every frame's text token and audio tokens since it joined (or resumed), logged
    // when it ends: what a conversation said, independent of how Opus coded its audio (tests
    // compare a conversation beside others with the same one alone by it).
    uint64_t token_digest = 1469598103934665603ull;
    int64_t digest_frames = 0;
  };
  void handle_join(JoinRequest& r);
  void finish(Live& l, const char* why, bool close_client, const std::string& error);
  void drop_ended();
  void periodic_save();
  void tick(std::vector<float>& pcm, std::vector<float>& reply, std::vector<uint8_t>& ready);
  void status_line();
  std::string path_of(const std::string& id) const;
  std::string tag() const;  // "" with one engine, else "engine 1 (device 0): "

  const int index_, device_;
  EnginePool& pool_;
  const ServerOptions& opt_;
  Engine* engine_ = nullptr;
  std::atomic<int64_t> load_{0};
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<JoinRequest> joins_;
  bool kick_ = false, stop_ = false;
  std::map<int64_t, Live> live_;  // by slot
  Clock::time_point next_periodic_ = Clock::now();

  // statistics since the last status line, and in total
  std::vector<double> tick_ms_;
  int64_t ticks_ = 0, late_ticks_ = 0, dropped_frames_ = 0, dropped_clients_ = 0, refused_ = 0, saves_ = 0;
  Clock::time_point last_status_ = Clock::now();
};

// The engines of --devices, each on its own thread, and what they share: the saver and the set
// of live session ids (an id is live at most once, whichever engine holds it).
class EnginePool {
 public:
  // Starts one thread per entry of opt.devices; each builds its engine there (make(device): the
  // factory selects the device first) and starts ticking. Returns once every engine is built;
  // when one fails, stops the others and throws ttt::Error with its message.
  EnginePool(const EngineFactory& make, const ServerOptions& opt);
  ~EnginePool();

  // A new or resumed conversation, onto the engine with the fewest live conversations (and
  // joins on their way); ties to the lowest index.
  void request_join(JoinRequest r);
  // Every engine saves and releases its conversations and stops (from any thread; returns at once).
  void request_stop();
  // Returns once every engine has stopped (after request_stop) and every file is written.
  void wait();
  void stop() {
    request_stop();
    wait();
  }

  int size() const { return int(tickers_.size()); }
  int64_t max_sessions() const;  // in all engines together
  Saver& saver() { return saver_; }
  // Marks `id` live on engine `engine`; false when it already is live (on any engine).
  bool claim(const std::string& id, int engine);
  void release(const std::string& id);

 private:
  const ServerOptions& opt_;
  Saver saver_;
  std::vector<std::unique_ptr<Ticker>> tickers_;
  std::vector<std::thread> threads_;
  std::vector<int64_t> slots_;  // each engine's batch size, once built
  std::mutex mu_;               // placement, live ids, the build handshake
  std::condition_variable built_cv_;
  int built_ = 0;
  std::string build_error_;
  std::map<std::string, int> live_ids_;  // live session id -> its engine
};

}  // namespace ttt_moshi::serve
