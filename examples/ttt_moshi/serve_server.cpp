// The network half of `ttt-moshi serve`: Boost.Asio threads accept connections, speak HTTP
// (static files) and WebSocket (GET /api/chat, Kyutai's protocol: serve_protocol.hpp), decode
// the users' Opus and encode the replies (serve_session.hpp); one engine thread (Ticker) steps
// the whole conversation batch once per frame tick. The two sides meet only in each Session's
// buffers and a few queues under short locks: a slow client never delays the tick (its replies
// queue up to a limit, then it is dropped with its state saved), and the tick never waits on a
// socket. See docs/serving.md.
#include "serve_server.hpp"

#include <algorithm>
#include <atomic>
#include <utility>  // before Boost 1.74's asio/awaitable.hpp, which uses std::exchange without it
#include <boost/asio.hpp>
#include <boost/beast.hpp>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>
#include <type_traits>

#include "serve_session.hpp"
#include "ttt/core/error.hpp"
#if TTT_SERVE_TLS
#include <boost/asio/ssl.hpp>
#include <boost/beast/ssl.hpp>
#endif

namespace ttt_moshi::serve {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace websocket = beast::websocket;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using Clock = std::chrono::steady_clock;
using Json = nlohmann::json;

void log(const char* fmt, const std::string& a = {}, const std::string& b = {}) {
  std::fprintf(stderr, fmt, a.c_str(), b.c_str());
  std::fputc('\n', stderr);
  std::fflush(stderr);
}

std::string short_id(const std::string& id) { return id.substr(0, 8); }

bool same_token(const std::string& a, const std::string& b) {  // constant time in the content
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

// A WebSocket conversation as the engine thread sees it (over TCP or TLS: WsConn<Stream>).
class Conn {
 public:
  virtual ~Conn() = default;
  // Joined as `s`: send the metadata and start reading.
  virtual void joined(std::shared_ptr<Session> s, std::string metadata) = 0;
  // Reply frames are waiting in the session: encode and send them.
  virtual void drain() = 0;
  // The tick took frames: read again if reading was paused.
  virtual void resume_read() = 0;
  // A client too slow to take its replies: its queue will not drain, so nothing more is sent
  // (not even an error); the socket is closed at once.
  virtual void abort() = 0;
  // Sends kind 5 (when error is not empty), then closes once the queue is written.
  virtual void close(std::string error, websocket::close_code code, std::string reason) = 0;
};

// ---- the engine thread --------------------------------------------------------------------------

struct JoinRequest {
  std::shared_ptr<Conn> conn;
  ClientParams params;
};

// A live conversation, as the engine thread keeps it.
struct Live {
  std::shared_ptr<Session> session;
  // Held while the conversation is live: a connection whose reading is paused (back-pressure)
  // and that has nothing to write has no pending operation to keep it alive.
  std::shared_ptr<Conn> conn;
  std::string id;
  int64_t slot = -1;
};

// Writes saved conversations on a thread of its own: a 7B conversation's file is gigabytes (its
// KV ring), and writing it on the engine thread would stall every other conversation's tick.
// The engine thread only takes the snapshot (a device-to-host copy); the log line "ended ...,
// state saved" appears once the file is in place, and a resume of an id whose file is still
// being written waits for it.
class Saver {
 public:
  Saver() : thread_([this] { loop(); }) {}
  ~Saver() { drain_and_stop(); }
  // `write` writes the file; `done(ok, error)` runs after it, on this thread.
  void push(const std::string& id, std::function<void()> write, std::function<void(bool, const std::string&)> done) {
    {
      std::lock_guard<std::mutex> g(mu_);
      queue_.push_back({id, std::move(write), std::move(done)});
      pending_.insert(id);
    }
    cv_.notify_all();
  }
  void wait_for(const std::string& id) {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return !pending_.count(id); });
  }
  void drain_and_stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stop_) return;
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  struct Job {
    std::string id;
    std::function<void()> write;
    std::function<void(bool, const std::string&)> done;
  };
  void loop() {
    for (;;) {
      Job j;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and everything is written
        j = std::move(queue_.front());
        queue_.pop_front();
      }
      bool ok = true;
      std::string error;
      try {
        j.write();
      } catch (const std::exception& e) {
        ok = false, error = e.what();
      }
      j.done(ok, error);
      {
        std::lock_guard<std::mutex> g(mu_);
        // Another save of the same id may be queued behind this one.
        bool again = false;
        for (const auto& q : queue_) again = again || q.id == j.id;
        if (!again) pending_.erase(j.id);
      }
      cv_.notify_all();
    }
  }
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  std::set<std::string> pending_;
  bool stop_ = false;
  std::thread thread_;
};

class Ticker {
 public:
  Ticker(Engine& engine, const ServerOptions& opt) : engine_(engine), opt_(opt) {}
  void request_join(JoinRequest r) {
    {
      std::lock_guard<std::mutex> g(mu_);
      joins_.push_back(std::move(r));
      kick_ = true;
    }
    cv_.notify_one();
  }
  void wake() {
    {
      std::lock_guard<std::mutex> g(mu_);
      kick_ = true;
    }
    cv_.notify_one();
  }
  void stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stop_ = true;
    }
    cv_.notify_one();
  }
  void run();

 private:
  void handle_join(JoinRequest& r);
  void finish(Live& l, const char* why, bool close_client, const std::string& error);
  void tick(std::vector<float>& pcm, std::vector<float>& reply, std::vector<uint8_t>& ready);
  void status_line();
  // A conversation's file: its id is 32 hex digits (checked when it comes from a client), so the
  // name cannot leave the session directory.
  std::string path_of(const std::string& id) const {
    return (std::filesystem::path(opt_.session_dir) / (id + ".conversation")).string();
  }

  Engine& engine_;
  const ServerOptions& opt_;
  Saver saver_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<JoinRequest> joins_;
  bool kick_ = false, stop_ = false;
  std::map<int64_t, Live> live_;  // by slot

  // statistics since the last status line, and in total
  std::vector<double> tick_ms_;
  int64_t ticks_ = 0, late_ticks_ = 0, dropped_frames_ = 0, dropped_clients_ = 0, refused_ = 0;
  Clock::time_point last_status_ = Clock::now();
};

// ---- a WebSocket conversation -------------------------------------------------------------------

template <class Stream>  // beast::tcp_stream, or beast::ssl_stream<beast::tcp_stream> for TLS
class WsConn final : public Conn, public std::enable_shared_from_this<WsConn<Stream>> {
 public:
  WsConn(Stream&& s, Ticker& ticker, const ServerOptions& opt, std::atomic<int>& open)
      : ws_(std::move(s)), ticker_(ticker), opt_(opt), open_(open) {
    ++open_;
  }
  ~WsConn() { --open_; }

  void start(http::request<http::string_body> req, ClientParams params, std::string refuse) {
    params_ = std::move(params);
    refuse_ = std::move(refuse);
    ws_.set_option(websocket::stream_base::timeout::suggested(beast::role_type::server));
    // Beast's own cap (it closes with 1009 past it); up to it, our limit answers with kind 5.
    ws_.read_message_max(uint64_t(opt_.limits.max_message_bytes) * 4 + 16);
    ws_.binary(true);
    ws_.async_accept(req, beast::bind_front_handler(&WsConn::on_accept, this->shared_from_this()));
  }

  // From the engine thread.
  void joined(std::shared_ptr<Session> s, std::string metadata) override {
    net::post(ws_.get_executor(), [self = this->shared_from_this(), s = std::move(s), m = std::move(metadata)]() mutable {
      self->session_ = std::move(s);
      self->send(message(Kind::metadata, m), 0);
      self->do_read();
    });
  }
  void drain() override {
    net::post(ws_.get_executor(), [self = this->shared_from_this()] { self->on_drain(); });
  }
  void resume_read() override {
    net::post(ws_.get_executor(), [self = this->shared_from_this()] {
      if (self->read_paused_ && !self->closing_) {
        self->read_paused_ = false;
        self->do_read();
      }
    });
  }
  void abort() override {
    net::post(ws_.get_executor(), [self = this->shared_from_this()] {
      self->closing_ = self->closed_ = true;
      beast::error_code ec;
      beast::get_lowest_layer(self->ws_).socket().close(ec);
      self->gone();
    });
  }
  void close(std::string error, websocket::close_code code, std::string reason) override {
    net::post(ws_.get_executor(), [self = this->shared_from_this(), e = std::move(error), code, r = std::move(reason)] {
      self->close_now(e, code, r);
    });
  }

 private:
  struct Out {
    std::string data;
    int64_t frames;  // reply frames complete once this message is written
  };

  void on_accept(beast::error_code ec) {
    if (ec) return;
    send(handshake_message(), 0);
    if (!refuse_.empty()) return close_now(refuse_, websocket::close_code::policy_error, "refused");
    ticker_.request_join({this->shared_from_this(), params_});
  }

  void do_read() {
    if (closing_ || reading_) return;
    reading_ = true;
    ws_.async_read(buf_, beast::bind_front_handler(&WsConn::on_read, this->shared_from_this()));
  }

  void on_read(beast::error_code ec, size_t) {
    reading_ = false;
    if (ec) {
      if (ec == websocket::error::message_too_big)
        log("serve: session %s: message over the hard limit, closed by the WebSocket layer", short_id(id()));
      return gone();
    }
    const auto data = buf_.cdata();
    const Ingested r = session_->ingest(static_cast<const uint8_t*>(data.data()), data.size(), ws_.got_binary());
    const bool client_error = ws_.got_binary() && data.size() > 0 && static_cast<const uint8_t*>(data.data())[0] == 5;
    if (client_error)
      log("serve: session %s: client error: %s", short_id(id()),
          std::string(static_cast<const char*>(data.data()) + 1, std::min<size_t>(data.size() - 1, 200)));
    buf_.consume(buf_.size());
    for (const auto& e : r.errors) log("serve: session %s: %s", short_id(id()), e);
    if (r.close) {
      const std::string e = r.errors.empty() ? std::string("closed") : r.errors.front();
      return close_now(e, websocket::close_code::policy_error, "protocol error");
    }
    for (const auto& e : r.errors) send(message(Kind::error, e), 0);
    if (r.samples && session_->frame_ready()) ticker_.wake();
    if (session_->input_full()) {
      read_paused_ = true;  // the tick resumes us once it has taken frames
      session_->read_paused = true;
      return;
    }
    do_read();
  }

  void on_drain() {
    if (!session_) return;
    int64_t frames = 0;
    auto msgs = session_->encode_out(frames);
    if (closing_) {  // nothing more goes out; the frames count as written
      session_->frames_done(frames);
      return;
    }
    if (msgs.empty()) {
      session_->frames_done(frames);
      return;
    }
    for (size_t i = 0; i < msgs.size(); ++i) send(std::move(msgs[i]), i + 1 == msgs.size() ? frames : 0);
  }

  void send(std::string data, int64_t frames) {
    outq_.push_back({std::move(data), frames});
    if (!writing_) write_next();
  }

  void write_next() {
    if (outq_.empty()) {
      writing_ = false;
      if (closing_ && !closed_) do_close();
      return;
    }
    writing_ = true;
    ws_.async_write(net::buffer(outq_.front().data), beast::bind_front_handler(&WsConn::on_write, this->shared_from_this()));
  }

  void on_write(beast::error_code ec, size_t) {
    const int64_t frames = outq_.front().frames;
    outq_.pop_front();
    if (session_ && frames) session_->frames_done(frames);
    if (ec) {
      writing_ = false;
      for (const auto& o : outq_)
        if (session_ && o.frames) session_->frames_done(o.frames);
      outq_.clear();
      return gone();
    }
    write_next();
  }

  void close_now(const std::string& error, websocket::close_code code, const std::string& reason) {
    if (closing_) return;
    if (!error.empty()) send(message(Kind::error, error), 0);
    closing_ = true;
    close_code_ = code;
    close_reason_ = reason;
    if (!writing_) do_close();
  }

  void do_close() {
    closed_ = true;
    ws_.async_close(websocket::close_reason(close_code_, close_reason_),
                    [self = this->shared_from_this()](beast::error_code) { self->gone(); });
  }

  // The connection is over (closed by either side or failed): the engine saves and releases it.
  void gone() {
    if (session_ && !session_->gone.exchange(true)) ticker_.wake();
    if (!closing_) {
      closing_ = true;
      beast::error_code ec;
      beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ec);
    }
  }

  std::string id() const { return session_ ? session_->id : std::string("-"); }

  websocket::stream<Stream> ws_;
  Ticker& ticker_;
  const ServerOptions& opt_;
  std::atomic<int>& open_;
  beast::flat_buffer buf_;
  ClientParams params_;
  std::string refuse_;
  std::shared_ptr<Session> session_;
  std::deque<Out> outq_;
  bool writing_ = false, reading_ = false, read_paused_ = false, closing_ = false, closed_ = false;
  websocket::close_code close_code_ = websocket::close_code::normal;
  std::string close_reason_;
};

// ---- the engine thread, continued ---------------------------------------------------------------

void Ticker::handle_join(JoinRequest& r) {
  auto refuse = [&](const std::string& e) {
    ++refused_;
    log("serve: refused a conversation: %s", e);
    r.conn->close(e, websocket::close_code::try_again_later, "refused");
  };
  const ClientParams& p = r.params;
  if (int64_t(live_.size()) >= std::min(opt_.max_sessions, engine_.slots()))
    return refuse("server full: " + std::to_string(live_.size()) + " conversations are live (--max-sessions)");
  std::string id;
  int64_t slot = -1;
  bool resumed = false;
  if (!p.session_id.empty()) {
    if (opt_.session_dir.empty()) return refuse("session_id: this server keeps no sessions (no --session-dir)");
    for (const auto& [s, l] : live_)
      if (l.id == p.session_id) return refuse("session_id " + p.session_id + " is live on another connection");
    const std::string path = path_of(p.session_id);
    saver_.wait_for(p.session_id);  // its file may still be being written
    if (!std::filesystem::exists(path)) return refuse("unknown session_id " + p.session_id);
    try {
      slot = engine_.resume(path);
    } catch (const std::exception& e) {
      return refuse(std::string("cannot resume session ") + p.session_id + ": " + e.what());
    }
    id = p.session_id;
    resumed = true;
  } else {
    try {
      slot = engine_.join(p);
    } catch (const std::exception& e) {
      return refuse(std::string("cannot start a conversation: ") + e.what());
    }
    id = new_session_id();
  }
  if (slot < 0) return refuse("server full");
  const int64_t frames = engine_.frames(slot);
  const Json options = Json::parse(engine_.options_json(slot));
  auto s = std::make_shared<Session>(engine_.sample_rate(), engine_.frame_size(), opt_.limits);
  s->id = id;
  Json md = options;
  md["session_id"] = id;
  md["resumed"] = resumed;
  md["frame"] = frames;
  md["session_saved"] = !opt_.session_dir.empty();
  md["ignored_parameters"] = p.ignored;
  md["lm_model_file"] = engine_.model_name();
  md["instance_name"] = "ttt-moshi serve";
  md["pad_mult"] = 0.0;
  md["repetition_penalty_context"] = 0;
  md["repetition_penalty"] = 1.0;
  Live l;
  l.session = s;
  l.conn = r.conn;
  l.id = id;
  l.slot = slot;
  live_[slot] = std::move(l);
  std::fprintf(stderr, "serve: session %s %s in slot %lld at frame %lld (%zu live)\n", short_id(id).c_str(),
               resumed ? "resumed" : "joined", (long long)slot, (long long)frames, live_.size());
  r.conn->joined(s, md.dump());
}

void Ticker::finish(Live& l, const char* why, bool close_client, const std::string& error) {
  const int64_t frames = engine_.frames(l.slot);
  std::function<void()> write;
  if (!opt_.session_dir.empty()) {
    try {
      write = engine_.snapshot(l.slot, path_of(l.id));
    } catch (const std::exception& e) {
      std::fprintf(stderr, "serve: session %s: saving failed: %s\n", short_id(l.id).c_str(), e.what());
    }
  }
  engine_.leave(l.slot);
  if (write) {
    const std::string sid = short_id(l.id), reason = why;
    saver_.push(l.id, std::move(write), [sid, reason, frames](bool ok, const std::string& e) {
      if (ok)
        std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld, state saved\n", sid.c_str(), reason.c_str(),
                     (long long)frames);
      else
        std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld; saving failed: %s\n", sid.c_str(),
                     reason.c_str(), (long long)frames, e.c_str());
    });
  } else {
    std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld\n", short_id(l.id).c_str(), why, (long long)frames);
  }
  if (close_client)
    if (auto c = l.conn) {
      if (l.session->queued_frames() > opt_.limits.max_queue_frames)
        c->abort();
      else
        c->close(error, error.empty() ? websocket::close_code::going_away : websocket::close_code::policy_error, why);
    }
}

void Ticker::tick(std::vector<float>& pcm, std::vector<float>& reply, std::vector<uint8_t>& ready) {
  const int64_t fs = engine_.frame_size();
  std::fill(ready.begin(), ready.end(), uint8_t(0));
  int n = 0;
  for (auto& [slot, l] : live_) {
    if (l.session->take_frame(pcm.data() + slot * fs)) {
      ready[size_t(slot)] = 1;
      ++n;
      if (l.session->read_paused.exchange(false))
        if (auto c = l.conn) c->resume_read();
    }
  }
  if (!n) return;
  const auto t0 = Clock::now();
  const auto outs = engine_.step(pcm.data(), ready, reply.data());
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  tick_ms_.push_back(ms);
  ++ticks_;
  if (ms > opt_.tick_ms) ++late_ticks_;
  for (auto& [slot, l] : live_) {
    if (!ready[size_t(slot)]) continue;
    OutFrame f;
    const StepOut& o = outs[size_t(slot)];
    if (o.has_audio) f.pcm.assign(reply.begin() + slot * fs, reply.begin() + (slot + 1) * fs);
    if (o.text >= 0) f.text = engine_.text_piece(o.text);
    l.session->push_out(std::move(f));
    if (auto c = l.conn) c->drain();
  }
}

void Ticker::status_line() {
  std::vector<double> t = tick_ms_;
  std::sort(t.begin(), t.end());
  auto pct = [&](double q) { return t.empty() ? 0.0 : t[std::min(t.size() - 1, size_t(q * double(t.size())))]; };
  std::fprintf(stderr,
               "serve: status: %zu live, %lld ticks (%zu in the last window: p50 %.2f ms, p99 %.2f ms), %lld late "
               "(> %.0f ms), %lld dropped frames, %lld clients dropped, %lld refused\n",
               live_.size(), (long long)ticks_, t.size(), pct(0.5), pct(0.99), (long long)late_ticks_, opt_.tick_ms,
               (long long)dropped_frames_, (long long)dropped_clients_, (long long)refused_);
  tick_ms_.clear();
  last_status_ = Clock::now();
}

void Ticker::run() {
  const int64_t S = engine_.slots(), fs = engine_.frame_size();
  std::vector<float> pcm(size_t(S * fs), 0.f), reply(size_t(S * fs), 0.f);
  std::vector<uint8_t> ready(size_t(S), 0);
  const auto period = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(opt_.tick_ms));
  auto deadline = Clock::now();
  for (;;) {
    std::deque<JoinRequest> joins;
    bool stopping;
    {
      std::unique_lock<std::mutex> lk(mu_);
      const auto wake_at = std::min(deadline > Clock::now() ? deadline : Clock::now() + period,
                                    Clock::now() + std::chrono::milliseconds(100));
      cv_.wait_until(lk, wake_at, [&] { return kick_ || stop_; });
      kick_ = false;
      joins.swap(joins_);
      stopping = stop_;
    }
    // Conversations whose connection ended, or that must be dropped.
    for (auto it = live_.begin(); it != live_.end();) {
      Live& l = it->second;
      const char* why = nullptr;
      std::string error;
      bool close = false;
      if (l.session->gone) {
        why = "client disconnected";
      } else if (l.session->queued_frames() > opt_.limits.max_queue_frames) {
        why = "client too slow";
        error = "dropped: " + std::to_string(l.session->queued_frames()) + " reply frames queued unsent (limit " +
                std::to_string(opt_.limits.max_queue_frames) + ")";
        dropped_frames_ += l.session->queued_frames();
        ++dropped_clients_, close = true;
      } else if (l.session->idle_seconds() > opt_.limits.idle_seconds) {
        why = "client idle";
        error = "dropped: no message for " + std::to_string(int(opt_.limits.idle_seconds)) + " s";
        ++dropped_clients_, close = true;
      }
      if (!why) {
        ++it;
        continue;
      }
      finish(l, why, close, error);
      it = live_.erase(it);
    }
    if (stopping) {
      for (auto& [slot, l] : live_) finish(l, "server shutting down", true, "");
      live_.clear();
      for (auto& j : joins) j.conn->close("server shutting down", websocket::close_code::going_away, "shutdown");
      saver_.drain_and_stop();  // every file in place before the process may exit
      status_line();
      return;
    }
    for (auto& j : joins) handle_join(j);
    // Tick when every live conversation has its frame, or at the deadline with whatever is ready.
    int n_ready = 0;
    for (auto& [slot, l] : live_) n_ready += l.session->frame_ready() ? 1 : 0;
    const auto now = Clock::now();
    if (n_ready > 0 && (n_ready == int(live_.size()) || now >= deadline)) {
      tick(pcm, reply, ready);
      deadline = now + period;
    }
    if (opt_.status_seconds > 0 &&
        std::chrono::duration<double>(Clock::now() - last_status_).count() >= opt_.status_seconds)
      status_line();
  }
}

// ---- HTTP: static files and the WebSocket upgrade -----------------------------------------------

template <class Stream>  // beast::tcp_stream, or beast::ssl_stream<beast::tcp_stream> for TLS
class HttpConn : public std::enable_shared_from_this<HttpConn<Stream>> {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  template <class... Ctx>  // the TLS context, for TLS
  HttpConn(tcp::socket&& s, Ticker& ticker, const ServerOptions& opt, std::atomic<int>& open, Ctx&... ctx)
      : stream_(std::move(s), ctx...), ticker_(ticker), opt_(opt), open_(open) {}
  void run() {
    if constexpr (kTls) {
      beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
      stream_.async_handshake(net::ssl::stream_base::server, [self = this->shared_from_this()](beast::error_code ec) {
        if (ec) return self->shutdown();  // not TLS, or a bad handshake: nothing to answer
        self->do_read();
      });
    } else {
      do_read();
    }
  }

 private:
  void do_read() {
    parser_.emplace();
    parser_->header_limit(16 * 1024);
    parser_->body_limit(16 * 1024);
    beast::get_lowest_layer(stream_).expires_after(std::chrono::seconds(30));
    http::async_read(stream_, buf_, *parser_, beast::bind_front_handler(&HttpConn::on_read, this->shared_from_this()));
  }

  void on_read(beast::error_code ec, size_t) {
    if (ec) return shutdown();
    auto req = parser_->release();
    const Target t = parse_target(std::string(req.target()));
    if (websocket::is_upgrade(req)) {
      if (!t.error.empty() || t.path != "/api/chat") return respond(req, http::status::not_found, "no WebSocket here\n");
      ClientParams p;
      std::string refuse = t.error.empty() ? parse_params(t.query, p) : t.error;
      if (refuse.empty() && !opt_.auth_token.empty()) {
        std::string given = p.auth_token;
        const auto h = req.find(http::field::authorization);
        if (given.empty() && h != req.end() && h->value().starts_with("Bearer "))
          given = std::string(h->value().substr(7));
        if (!same_token(given, opt_.auth_token)) refuse = "unauthorized: a valid auth_token is required";
      }
      beast::get_lowest_layer(stream_).expires_never();
      std::make_shared<WsConn<Stream>>(std::move(stream_), ticker_, opt_, open_)
          ->start(std::move(req), std::move(p), std::move(refuse));
      return;
    }
    if (req.method() != http::verb::get && req.method() != http::verb::head)
      return respond(req, http::status::method_not_allowed, "GET only\n");
    if (!t.error.empty()) return respond(req, http::status::bad_request, t.error + "\n");
    if (t.path.rfind("/api/", 0) == 0) return respond(req, http::status::not_found, "not found\n");
    const auto file = opt_.static_dir.empty() ? std::nullopt : static_file(opt_.static_dir, t.path);
    if (!file) return respond(req, http::status::not_found, "not found\n");
    http::file_body::value_type body;
    beast::error_code fec;
    body.open(file->c_str(), beast::file_mode::scan, fec);
    if (fec) return respond(req, http::status::not_found, "not found\n");
    const auto size = body.size();
    auto res = std::make_shared<http::response<http::file_body>>(std::piecewise_construct,
                                                                 std::make_tuple(std::move(body)),
                                                                 std::make_tuple(http::status::ok, req.version()));
    res->set(http::field::content_type, content_type(*file));
    res->set(http::field::cache_control, "no-cache");
    res->content_length(size);
    res->keep_alive(req.keep_alive());
    if (req.method() == http::verb::head) res->body().close();
    write(res, req.method() == http::verb::head);
  }

  template <class Req>
  void respond(const Req& req, http::status st, const std::string& text) {
    auto res = std::make_shared<http::response<http::string_body>>(st, req.version());
    res->set(http::field::content_type, "text/plain; charset=utf-8");
    res->keep_alive(req.keep_alive());
    res->body() = text;
    res->prepare_payload();
    write(res, false);
  }

  template <class Res>
  void write(std::shared_ptr<Res> res, bool header_only) {
    auto done = [self = this->shared_from_this(), res](beast::error_code ec, size_t) {
      if (ec || !res->keep_alive()) return self->shutdown();
      self->do_read();
    };
    if (header_only) {
      auto sr = std::make_shared<http::response_serializer<typename Res::body_type>>(*res);
      http::async_write_header(stream_, *sr, [sr, done](beast::error_code ec, size_t n) mutable { done(ec, n); });
    } else {
      http::async_write(stream_, *res, done);
    }
  }

  void shutdown() {
    beast::error_code ec;
    beast::get_lowest_layer(stream_).socket().shutdown(tcp::socket::shutdown_send, ec);
  }

  Stream stream_;
  Ticker& ticker_;
  const ServerOptions& opt_;
  std::atomic<int>& open_;
  beast::flat_buffer buf_;
  std::optional<http::request_parser<http::string_body>> parser_;
};

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& ioc, tcp::endpoint ep, Ticker& ticker, const ServerOptions& opt, std::atomic<int>& open)
      : ioc_(ioc), acceptor_(net::make_strand(ioc)), ticker_(ticker), opt_(opt), open_(open) {
    acceptor_.open(ep.protocol());
    acceptor_.set_option(net::socket_base::reuse_address(true));
    acceptor_.bind(ep);
    acceptor_.listen(net::socket_base::max_listen_connections);
  }
  int port() const { return acceptor_.local_endpoint().port(); }
#if TTT_SERVE_TLS
  void use_tls(std::shared_ptr<net::ssl::context> ctx) { tls_ = std::move(ctx); }
#endif
  void run() { do_accept(); }
  void stop() {
    net::post(acceptor_.get_executor(), [self = shared_from_this()] {
      beast::error_code ec;
      self->acceptor_.close(ec);
    });
  }

 private:
  void do_accept() {
    acceptor_.async_accept(net::make_strand(ioc_), [self = shared_from_this()](beast::error_code ec, tcp::socket s) {
      if (ec == net::error::operation_aborted || !self->acceptor_.is_open()) return;
      if (!ec) {
#if TTT_SERVE_TLS
        if (self->tls_) {
          std::make_shared<HttpConn<beast::ssl_stream<beast::tcp_stream>>>(std::move(s), self->ticker_, self->opt_,
                                                                           self->open_, *self->tls_)
              ->run();
        } else
#endif
          std::make_shared<HttpConn<beast::tcp_stream>>(std::move(s), self->ticker_, self->opt_, self->open_)->run();
      }
      self->do_accept();
    });
  }

  net::io_context& ioc_;
  tcp::acceptor acceptor_;
  Ticker& ticker_;
  const ServerOptions& opt_;
  std::atomic<int>& open_;
#if TTT_SERVE_TLS
  std::shared_ptr<net::ssl::context> tls_;  // null: plain TCP
#endif
};

bool is_loopback(const net::ip::address& a) { return a.is_loopback(); }

}  // namespace

int run_server(Engine& engine, const ServerOptions& opt) {
  const bool tls = !opt.ssl_cert.empty() || !opt.ssl_key.empty();
  if (tls && (opt.ssl_cert.empty() || opt.ssl_key.empty())) ttt::fail("TLS needs both --ssl-cert and --ssl-key");
#if TTT_SERVE_TLS
  std::shared_ptr<net::ssl::context> tls_ctx;
  if (tls) {
    tls_ctx = std::make_shared<net::ssl::context>(net::ssl::context::tls_server);
    tls_ctx->set_options(net::ssl::context::default_workarounds | net::ssl::context::no_sslv2 |
                         net::ssl::context::no_sslv3 | net::ssl::context::no_tlsv1 | net::ssl::context::no_tlsv1_1);
    try {
      tls_ctx->use_certificate_chain_file(opt.ssl_cert);
    } catch (const boost::system::system_error& e) {
      ttt::fail("--ssl-cert ", opt.ssl_cert, ": cannot load a PEM certificate chain (", e.what(), ")");
    }
    try {
      tls_ctx->use_private_key_file(opt.ssl_key, net::ssl::context::pem);
    } catch (const boost::system::system_error& e) {
      ttt::fail("--ssl-key ", opt.ssl_key, ": cannot load a PEM private key matching the certificate (", e.what(), ")");
    }
  }
#else
  if (tls)
    ttt::fail("--ssl-cert / --ssl-key: this build has no TLS (install libssl-dev and rebuild), or terminate TLS in a "
              "proxy such as HAProxy");
#endif
  beast::error_code ec;
  const auto addr = net::ip::make_address(opt.host == "localhost" ? "127.0.0.1" : opt.host, ec);
  if (ec) ttt::fail("--host ", opt.host, ": not an IP address (", ec.message(), ")");
  if (!is_loopback(addr) && opt.auth_token.empty())
    ttt::fail("--host ", opt.host, " is not a loopback address: --auth-token is required");
  if (!opt.session_dir.empty()) {
    std::filesystem::create_directories(opt.session_dir);
    if (!std::filesystem::is_directory(opt.session_dir)) ttt::fail("--session-dir ", opt.session_dir, ": not a directory");
  }

  net::io_context ioc(opt.io_threads);
  Ticker ticker(engine, opt);
  std::atomic<int> open{0};
  std::shared_ptr<Listener> listener;
  try {
    listener = std::make_shared<Listener>(ioc, tcp::endpoint(addr, uint16_t(opt.port)), ticker, opt, open);
  } catch (const boost::system::system_error& e) {
    ttt::fail("cannot listen on ", opt.host, ":", opt.port, ": ", e.what());
  }
#if TTT_SERVE_TLS
  if (tls_ctx) listener->use_tls(tls_ctx);
#endif
  listener->run();
  std::fprintf(stderr, "serve: listening on %s://%s:%d (WebSocket /api/chat), %lld sessions at most%s%s\n",
               tls ? "https" : "http", addr.to_string().c_str(), listener->port(), (long long)std::min(opt.max_sessions, engine.slots()),
               opt.session_dir.empty() ? "" : ", sessions saved in ", opt.session_dir.c_str());
  std::fflush(stderr);

  std::thread engine_thread([&] { ticker.run(); });
  std::atomic<bool> stop{false};
  net::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&](beast::error_code e, int sig) {
    if (e) return;
    std::fprintf(stderr, "serve: %s: saving the live conversations and closing\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    listener->stop();
    ticker.stop();
    stop = true;
  });
  std::vector<std::thread> io;
  for (int i = 0; i < std::max(1, opt.io_threads); ++i) io.emplace_back([&] { ioc.run(); });
  engine_thread.join();  // returns once stopped, every conversation saved and its close posted
  // Let the closes go out (at most 3 s), then stop the I/O threads.
  const auto until = Clock::now() + std::chrono::seconds(3);
  while (open.load() > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ioc.stop();
  for (auto& t : io) t.join();
  std::fprintf(stderr, "serve: stopped\n");
  return 0;
}

}  // namespace ttt_moshi::serve
