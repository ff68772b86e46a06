// The network half of `ttt-moshi serve`: Boost.Asio threads accept connections, speak HTTP
// (static files) and WebSocket (GET /api/chat, Kyutai's protocol: serve_protocol.hpp), decode
// the users' Opus and encode the replies (serve_session.hpp); the engine threads
// (serve_engines.cpp, one per entry of --devices) each step their conversation batch once per
// frame tick. The two sides meet only in each Session's buffers and a few queues under short
// locks: a slow client never delays the tick (its replies queue up to a limit, then it is
// dropped with its state saved), and the tick never waits on a socket. See docs/serving.md.
#include "serve_server.hpp"

#include <algorithm>
#include <atomic>
#include <utility>  // before Boost 1.74's asio/awaitable.hpp, which uses std::exchange without it
#include <boost/asio.hpp>
#include <boost/beast.hpp>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <memory>
#include <thread>
#include <type_traits>

#include "serve_engines.hpp"
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

bool same_token(const std::string& a, const std::string& b) {  // constant time in the content
  if (a.size() != b.size()) return false;
  unsigned char d = 0;
  for (size_t i = 0; i < a.size(); ++i) d |= static_cast<unsigned char>(a[i] ^ b[i]);
  return d == 0;
}

// ---- a WebSocket conversation -------------------------------------------------------------------

template <class Stream>  // beast::tcp_stream, or beast::ssl_stream<beast::tcp_stream> for TLS
class WsConn final : public Conn, public std::enable_shared_from_this<WsConn<Stream>> {
 public:
  WsConn(Stream&& s, EnginePool& pool, const ServerOptions& opt, std::atomic<int>& open)
      : ws_(std::move(s)), pool_(pool), opt_(opt), open_(open) {
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

  // From an engine thread.
  void joined(std::shared_ptr<Session> s, std::string metadata, Ticker& engine) override {
    net::post(ws_.get_executor(),
              [self = this->shared_from_this(), s = std::move(s), m = std::move(metadata), t = &engine]() mutable {
                self->session_ = std::move(s);
                self->ticker_ = t;
                if (self->closing_) {  // the client left while its join waited: end the conversation now
                  self->session_->gone = true;
                  t->wake();
                  return;
                }
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
  void close(std::string error, CloseCode code, std::string reason) override {
    net::post(ws_.get_executor(), [self = this->shared_from_this(), e = std::move(error), code, r = std::move(reason)] {
      self->close_now(e, websocket::close_code(uint16_t(code)), r);
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
    pool_.request_join({this->shared_from_this(), params_});
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
    if (r.samples && session_->frame_ready()) ticker_->wake();
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
    if (session_ && !session_->gone.exchange(true)) ticker_->wake();
    if (!closing_) {
      closing_ = true;
      beast::error_code ec;
      beast::get_lowest_layer(ws_).socket().shutdown(tcp::socket::shutdown_both, ec);
    }
  }

  std::string id() const { return session_ ? session_->id : std::string("-"); }

  websocket::stream<Stream> ws_;
  EnginePool& pool_;
  Ticker* ticker_ = nullptr;  // the engine holding the conversation, once joined
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

// ---- HTTP: static files and the WebSocket upgrade -----------------------------------------------

template <class Stream>  // beast::tcp_stream, or beast::ssl_stream<beast::tcp_stream> for TLS
class HttpConn : public std::enable_shared_from_this<HttpConn<Stream>> {
 public:
  static constexpr bool kTls = !std::is_same_v<Stream, beast::tcp_stream>;
  template <class... Ctx>  // the TLS context, for TLS
  HttpConn(tcp::socket&& s, EnginePool& pool, const ServerOptions& opt, std::atomic<int>& open, Ctx&... ctx)
      : stream_(std::move(s), ctx...), pool_(pool), opt_(opt), open_(open) {}
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
      std::make_shared<WsConn<Stream>>(std::move(stream_), pool_, opt_, open_)
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
  EnginePool& pool_;
  const ServerOptions& opt_;
  std::atomic<int>& open_;
  beast::flat_buffer buf_;
  std::optional<http::request_parser<http::string_body>> parser_;
};

class Listener : public std::enable_shared_from_this<Listener> {
 public:
  Listener(net::io_context& ioc, tcp::endpoint ep, EnginePool& pool, const ServerOptions& opt, std::atomic<int>& open)
      : ioc_(ioc), acceptor_(net::make_strand(ioc)), pool_(pool), opt_(opt), open_(open) {
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
        // --send-buffer: a small kernel send buffer makes a client that stops reading show up
        // in its reply queue (and be dropped) after seconds, not after megabytes.
        if (self->opt_.send_buffer > 0) {
          beast::error_code sec;
          s.set_option(net::socket_base::send_buffer_size(self->opt_.send_buffer), sec);
        }
#if TTT_SERVE_TLS
        if (self->tls_) {
          std::make_shared<HttpConn<beast::ssl_stream<beast::tcp_stream>>>(std::move(s), self->pool_, self->opt_,
                                                                           self->open_, *self->tls_)
              ->run();
        } else
#endif
          std::make_shared<HttpConn<beast::tcp_stream>>(std::move(s), self->pool_, self->opt_, self->open_)->run();
      }
      self->do_accept();
    });
  }

  net::io_context& ioc_;
  tcp::acceptor acceptor_;
  EnginePool& pool_;
  const ServerOptions& opt_;
  std::atomic<int>& open_;
#if TTT_SERVE_TLS
  std::shared_ptr<net::ssl::context> tls_;  // null: plain TCP
#endif
};

bool is_loopback(const net::ip::address& a) { return a.is_loopback(); }

}  // namespace

int run_server(const EngineFactory& make, const ServerOptions& opt) {
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

  // Every engine built (and ticking) before the port opens; a failure stops the others.
  EnginePool pool(make, opt);
  net::io_context ioc(opt.io_threads);
  std::atomic<int> open{0};
  std::shared_ptr<Listener> listener;
  try {
    listener = std::make_shared<Listener>(ioc, tcp::endpoint(addr, uint16_t(opt.port)), pool, opt, open);
  } catch (const boost::system::system_error& e) {
    ttt::fail("cannot listen on ", opt.host, ":", opt.port, ": ", e.what());
  }
#if TTT_SERVE_TLS
  if (tls_ctx) listener->use_tls(tls_ctx);
#endif
  listener->run();
  std::string engines;
  if (pool.size() > 1) {
    engines = " on " + std::to_string(pool.size()) + " engines (devices";
    for (size_t i = 0; i < opt.devices.size(); ++i) engines += (i ? "," : " ") + std::to_string(opt.devices[i]);
    engines += ")";
  }
  std::fprintf(stderr, "serve: listening on %s://%s:%d (WebSocket /api/chat), %lld sessions at most%s%s%s\n",
               tls ? "https" : "http", addr.to_string().c_str(), listener->port(), (long long)pool.max_sessions(),
               engines.c_str(), opt.session_dir.empty() ? "" : ", sessions saved in ", opt.session_dir.c_str());
  std::fflush(stderr);

  net::signal_set signals(ioc, SIGINT, SIGTERM);
  signals.async_wait([&](beast::error_code e, int sig) {
    if (e) return;
    std::fprintf(stderr, "serve: %s: saving the live conversations and closing\n", sig == SIGTERM ? "SIGTERM" : "SIGINT");
    listener->stop();
    pool.request_stop();
  });
  std::vector<std::thread> io;
  for (int i = 0; i < std::max(1, opt.io_threads); ++i) io.emplace_back([&] { ioc.run(); });
  pool.wait();  // returns once stopped, every conversation saved and its close posted
  // Let the closes go out (at most 3 s), then stop the I/O threads.
  const auto until = Clock::now() + std::chrono::seconds(3);
  while (open.load() > 0 && Clock::now() < until) std::this_thread::sleep_for(std::chrono::milliseconds(20));
  ioc.stop();
  for (auto& t : io) t.join();
  std::fprintf(stderr, "serve: stopped\n");
  return 0;
}

}  // namespace ttt_moshi::serve
