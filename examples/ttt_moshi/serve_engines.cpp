// The engine side of `ttt-moshi serve`: the engine threads (one Ticker per entry of --devices),
// the pool that places conversations on them, and the saver thread. See serve_engines.hpp and
// docs/serving.md.
#include "serve_engines.hpp"

#include <algorithm>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "ttt/core/error.hpp"

namespace ttt_moshi::serve {

using Json = nlohmann::json;

// ---- Saver --------------------------------------------------------------------------------------

Saver::Saver() : thread_([this] { loop(); }) {}

void Saver::push(const std::string& id, std::function<void()> write,
                 std::function<void(bool, const std::string&)> done) {
  {
    std::lock_guard<std::mutex> g(mu_);
    queue_.push_back({id, std::move(write), std::move(done)});
    pending_.insert(id);
  }
  cv_.notify_all();
}

void Saver::wait_for(const std::string& id) {
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return !pending_.count(id); });
}

bool Saver::pending(const std::string& id) {
  std::lock_guard<std::mutex> g(mu_);
  return pending_.count(id) > 0;
}

void Saver::drain_and_stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) return;
    stop_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

void Saver::loop() {
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
    j.write = nullptr;  // the snapshot's host memory goes now, not at the next job
    {
      std::lock_guard<std::mutex> g(mu_);
      pending_.erase(pending_.find(j.id));
    }
    cv_.notify_all();
  }
}

// ---- Ticker: requests from other threads -------------------------------------------------------

void Ticker::request_join(JoinRequest r) {
  {
    std::lock_guard<std::mutex> g(mu_);
    joins_.push_back(std::move(r));
    kick_ = true;
  }
  cv_.notify_one();
}

void Ticker::wake() {
  {
    std::lock_guard<std::mutex> g(mu_);
    kick_ = true;
  }
  cv_.notify_one();
}

void Ticker::stop() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  cv_.notify_one();
}

// ---- Ticker: the engine thread ------------------------------------------------------------------

// A conversation's file: its id is 32 hex digits (checked when it comes from a client), so the
// name cannot leave the session directory.
std::string Ticker::path_of(const std::string& id) const {
  return (std::filesystem::path(opt_.session_dir) / (id + ".conversation")).string();
}

std::string Ticker::tag() const {
  if (opt_.devices.size() < 2) return {};
  return "engine " + std::to_string(index_) + " (device " + std::to_string(device_) + "): ";
}

void Ticker::handle_join(JoinRequest& r) {
  auto refuse = [&](const std::string& e) {
    ++refused_;
    --load_;
    log("serve: refused a conversation: %s", e);
    r.conn->close(e, CloseCode::try_again_later, "refused");
  };
  const ClientParams& p = r.params;
  const int64_t cap = std::min(opt_.max_sessions, engine_->slots());
  if (int64_t(live_.size()) >= cap)
    return refuse("server full: " + std::to_string(live_.size()) + " conversations are live" +
                  (pool_.size() > 1 ? " on each of the " + std::to_string(pool_.size()) + " engines" : std::string()) +
                  " (--max-sessions)");
  std::string id;
  int64_t slot = -1;
  bool resumed = false;
  if (!p.session_id.empty()) {
    if (opt_.session_dir.empty()) return refuse("session_id: this server keeps no sessions (no --session-dir)");
    if (!pool_.claim(p.session_id, index_)) return refuse("session_id " + p.session_id + " is live on another connection");
    const std::string path = path_of(p.session_id);
    pool_.saver().wait_for(p.session_id);  // its file may still be being written
    std::string error;
    if (!std::filesystem::exists(path)) {
      error = "unknown session_id " + p.session_id;
    } else {
      try {
        slot = engine_->resume(path);
        if (slot < 0) error = "server full";
      } catch (const std::exception& e) {
        error = std::string("cannot resume session ") + p.session_id + ": " + e.what();
      }
    }
    if (!error.empty()) {
      pool_.release(p.session_id);
      return refuse(error);
    }
    id = p.session_id;
    resumed = true;
  } else {
    try {
      slot = engine_->join(p);
    } catch (const std::exception& e) {
      return refuse(std::string("cannot start a conversation: ") + e.what());
    }
    if (slot < 0) return refuse("server full");
    id = new_session_id();
    if (!pool_.claim(id, index_)) {  // 128 random bits: never, but a duplicate must not be live twice
      engine_->leave(slot);
      return refuse("session id collision");
    }
  }
  const int64_t frames = engine_->frames(slot);
  const Json options = Json::parse(engine_->options_json(slot));
  auto s = std::make_shared<Session>(engine_->sample_rate(), engine_->frame_size(), opt_.limits);
  s->id = id;
  Json md = options;
  md["session_id"] = id;
  md["resumed"] = resumed;
  md["frame"] = frames;
  md["session_saved"] = !opt_.session_dir.empty();
  md["ignored_parameters"] = p.ignored;
  md["lm_model_file"] = engine_->model_name();
  md["instance_name"] = "ttt-moshi serve";
  md["engine"] = index_;   // which of --devices' engines holds the conversation
  md["device"] = device_;  // and its device
  md["pad_mult"] = 0.0;
  md["repetition_penalty_context"] = 0;
  md["repetition_penalty"] = 1.0;
  Live l;
  l.session = s;
  l.conn = r.conn;
  l.id = id;
  l.slot = slot;
  l.saved_frame = resumed ? frames : -1;  // -1: no file yet
  l.on_disk = std::make_shared<std::atomic<int64_t>>(l.saved_frame);
  l.next_save = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt_.save_every));
  live_[slot] = std::move(l);
  std::fprintf(stderr, "serve: %ssession %s %s in slot %lld at frame %lld (%zu live)\n", tag().c_str(),
               short_id(id).c_str(), resumed ? "resumed" : "joined", (long long)slot, (long long)frames, live_.size());
  r.conn->joined(s, md.dump(), *this);
}

void Ticker::finish(Live& l, const char* why, bool close_client, const std::string& error) {
  const int64_t frames = engine_->frames(l.slot);
  std::fprintf(stderr, "serve: session %s tokens %016llx over %lld frames\n", short_id(l.id).c_str(),
               (unsigned long long)l.token_digest, (long long)l.digest_frames);
  std::function<void()> write;
  if (!opt_.session_dir.empty()) {
    if (l.on_disk->load() == frames) {
      // Its file (a periodic save, or the one it resumed from) already holds this state: the
      // state changes only when the conversation steps. The empty job keeps the log line
      // behind the saves queued before it.
      write = [] {};
    } else {
      try {
        write = engine_->snapshot(l.slot, path_of(l.id));
      } catch (const std::exception& e) {
        std::fprintf(stderr, "serve: session %s: saving failed: %s\n", short_id(l.id).c_str(), e.what());
      }
    }
  }
  engine_->leave(l.slot);
  // The client is told the conversation ended (its connection closed) only once the state is on
  // disk: a client that reconnects at once, through a load balancer to another instance (a
  // separate process, which cannot wait on this one's saver), then finds the file. Closing first
  // let such a resume race the write and be refused as an unknown session (test_serve_failover
  // under load, 2026-12-05).
  std::function<void()> close_it;
  if (close_client)
    if (auto c = l.conn) {
      const bool abort = l.session->queued_frames() > opt_.limits.max_queue_frames;
      const std::string reason = why;
      close_it = [c, abort, error, reason] {
        if (abort) c->abort();
        else c->close(error, error.empty() ? CloseCode::going_away : CloseCode::policy_error, reason);
      };
    }
  if (write) {
    const std::string sid = short_id(l.id), reason = why;
    pool_.saver().push(l.id, std::move(write), [sid, reason, frames, close_it](bool ok, const std::string& e) {
      if (ok)
        std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld, state saved\n", sid.c_str(), reason.c_str(),
                     (long long)frames);
      else
        std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld; saving failed: %s\n", sid.c_str(),
                     reason.c_str(), (long long)frames, e.c_str());
      if (close_it) close_it();  // Conn::close / abort post to the connection's executor: any thread
    });
  } else {
    std::fprintf(stderr, "serve: session %s ended (%s) at frame %lld\n", short_id(l.id).c_str(), why, (long long)frames);
    if (close_it) close_it();
  }
  // After the save is queued: a resume of this id (on any engine) now waits for the file.
  pool_.release(l.id);
  --load_;
}

// Conversations whose connection ended, or that must be dropped.
void Ticker::drop_ended() {
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
      char secs[32];
      std::snprintf(secs, sizeof secs, "%g", opt_.limits.idle_seconds);
      error = std::string("dropped: no message for ") + secs + " s";
      ++dropped_clients_, close = true;
    }
    if (!why) {
      ++it;
      continue;
    }
    finish(l, why, close, error);
    it = live_.erase(it);
  }
}

// --save-every: at most one conversation per tick period (so a batch's snapshots are spread over
// ticks, not taken in one), the one whose save is most overdue, only when it has stepped since
// its last save and no earlier save of it is still being written. The engine thread takes the
// host snapshot; the saver writes it (atomically, as every save).
void Ticker::periodic_save() {
  if (opt_.session_dir.empty() || opt_.save_every <= 0 || live_.empty()) return;
  const auto now = Clock::now();
  if (now < next_periodic_) return;
  const auto every = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opt_.save_every));
  Live* pick = nullptr;
  for (auto& [slot, l] : live_) {
    if (l.next_save > now) continue;
    const int64_t f = engine_->frames(slot);
    if (f == l.saved_frame || f == 0) {  // nothing new to save: look again later
      l.next_save = now + every;
      continue;
    }
    if (pool_.saver().pending(l.id)) continue;
    if (!pick || l.next_save < pick->next_save) pick = &l;
  }
  if (!pick) return;
  next_periodic_ = now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(opt_.tick_ms));
  pick->next_save = now + every;
  const int64_t frame = engine_->frames(pick->slot);
  std::function<void()> write;
  try {
    write = engine_->snapshot(pick->slot, path_of(pick->id));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve: session %s: periodic save failed: %s\n", short_id(pick->id).c_str(), e.what());
    return;
  }
  pick->saved_frame = frame;
  ++saves_;
  const std::string sid = short_id(pick->id);
  pool_.saver().push(pick->id, std::move(write), [sid, frame, on_disk = pick->on_disk](bool ok, const std::string& e) {
    if (ok) {
      on_disk->store(frame);
      std::fprintf(stderr, "serve: session %s saved at frame %lld (periodic)\n", sid.c_str(), (long long)frame);
    } else
      std::fprintf(stderr, "serve: session %s: periodic save at frame %lld failed: %s\n", sid.c_str(),
                   (long long)frame, e.c_str());
  });
}

namespace {
// One FNV-1a step per byte of v (little-endian).
uint64_t fnv1a(uint64_t h, int64_t v) {
  for (int byte = 0; byte < 8; ++byte) h = (h ^ uint64_t((uint64_t(v) >> (8 * byte)) & 0xff)) * 1099511628211ull;
  return h;
}
}  // namespace

void Ticker::tick(std::vector<float>& pcm, std::vector<float>& reply, std::vector<uint8_t>& ready) {
  const int64_t fs = engine_->frame_size();
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
  const auto outs = engine_->step(pcm.data(), ready, reply.data());
  const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
  tick_ms_.push_back(ms);
  ++ticks_;
  if (ms > opt_.tick_ms) ++late_ticks_;
  for (auto& [slot, l] : live_) {
    if (!ready[size_t(slot)]) continue;
    OutFrame f;
    const StepOut& o = outs[size_t(slot)];
    if (o.has_audio) f.pcm.assign(reply.begin() + slot * fs, reply.begin() + (slot + 1) * fs);
    l.token_digest = fnv1a(l.token_digest, o.text);
    l.token_digest = fnv1a(l.token_digest, o.has_audio ? int64_t(o.audio.size()) : -1);
    for (const int64_t a : o.audio) l.token_digest = fnv1a(l.token_digest, a);
    ++l.digest_frames;
    if (o.text >= 0) f.text = engine_->text_piece(o.text);
    l.session->push_out(std::move(f));
    if (auto c = l.conn) c->drain();
  }
}

void Ticker::status_line() {
  std::vector<double> t = tick_ms_;
  std::sort(t.begin(), t.end());
  auto pct = [&](double q) { return t.empty() ? 0.0 : t[std::min(t.size() - 1, size_t(q * double(t.size())))]; };
  std::fprintf(stderr,
               "serve: status: %s%zu live, %lld ticks (%zu in the last window: p50 %.2f ms, p99 %.2f ms), %lld late "
               "(> %.0f ms), %lld dropped frames, %lld clients dropped, %lld refused, %lld periodic saves\n",
               tag().c_str(), live_.size(), (long long)ticks_, t.size(), pct(0.5), pct(0.99), (long long)late_ticks_,
               opt_.tick_ms, (long long)dropped_frames_, (long long)dropped_clients_, (long long)refused_,
               (long long)saves_);
  tick_ms_.clear();
  last_status_ = Clock::now();
}

void Ticker::run(Engine& engine) {
  engine_ = &engine;
  const int64_t S = engine.slots(), fs = engine.frame_size();
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
    drop_ended();
    if (stopping) {
      for (auto& [slot, l] : live_) finish(l, "server shutting down", true, "");
      live_.clear();
      for (auto& j : joins) {
        --load_;
        j.conn->close("server shutting down", CloseCode::going_away, "shutdown");
      }
      status_line();
      engine_ = nullptr;
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
    periodic_save();
    if (opt_.status_seconds > 0 &&
        std::chrono::duration<double>(Clock::now() - last_status_).count() >= opt_.status_seconds)
      status_line();
  }
}

// ---- EnginePool ---------------------------------------------------------------------------------

EnginePool::EnginePool(const EngineFactory& make, const ServerOptions& opt) : opt_(opt) {
  const int n = int(opt.devices.size());
  TTT_CHECK(n > 0, "serve: no engine (--devices is empty)");
  slots_.assign(size_t(n), 0);
  for (int i = 0; i < n; ++i) tickers_.push_back(std::make_unique<Ticker>(i, opt.devices[size_t(i)], *this, opt));
  for (int i = 0; i < n; ++i)
    threads_.emplace_back([this, i, n, &make] {
      Ticker& t = *tickers_[size_t(i)];
      std::unique_ptr<Engine> engine;
      std::string error;
      try {
        engine = make(t.device());
      } catch (const std::exception& e) {
        error = e.what();
      }
      {
        std::lock_guard<std::mutex> g(mu_);
        ++built_;
        if (engine) slots_[size_t(i)] = engine->slots();
        if (!error.empty() && build_error_.empty())
          build_error_ = n > 1 ? "engine " + std::to_string(i) + " (device " + std::to_string(t.device()) + "): " + error
                               : error;
      }
      built_cv_.notify_all();
      if (!engine) return;
      t.run(*engine);
      engine.reset();  // on the thread (and device) that built it
    });
  std::string error;
  {
    std::unique_lock<std::mutex> lk(mu_);
    built_cv_.wait(lk, [&] { return built_ == n; });
    error = build_error_;
  }
  if (!error.empty()) {
    stop();
    ttt::fail(error);
  }
}

EnginePool::~EnginePool() { stop(); }

void EnginePool::request_stop() {
  for (auto& t : tickers_) t->stop();
}

void EnginePool::wait() {
  for (auto& th : threads_)
    if (th.joinable()) th.join();
  saver_.drain_and_stop();  // every file in place before the process may exit
}

int64_t EnginePool::max_sessions() const {
  int64_t n = 0;
  for (int64_t s : slots_) n += std::min(opt_.max_sessions, s);
  return n;
}

void EnginePool::request_join(JoinRequest r) {
  Ticker* to = nullptr;
  {
    std::lock_guard<std::mutex> g(mu_);
    // A resume of an id still live goes to its engine: that engine sees the old connection end
    // before it handles the new one (a client reconnecting at once is not refused), or refuses it.
    const auto live = r.params.session_id.empty() ? live_ids_.end() : live_ids_.find(r.params.session_id);
    if (live != live_ids_.end()) {
      to = tickers_[size_t(live->second)].get();
    } else {
      for (auto& t : tickers_)
        if (!to || t->load() < to->load()) to = t.get();
    }
    ++to->load_;
  }
  to->request_join(std::move(r));
}

bool EnginePool::claim(const std::string& id, int engine) {
  std::lock_guard<std::mutex> g(mu_);
  return live_ids_.emplace(id, engine).second;
}

void EnginePool::release(const std::string& id) {
  std::lock_guard<std::mutex> g(mu_);
  live_ids_.erase(id);
}

}  // namespace ttt_moshi::serve
