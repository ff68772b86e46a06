// ttt-moshi serve: real-time conversations over WebSocket with Kyutai's protocol (their web and
// Python clients work), many conversations stepped as one batch per 80 ms frame, one batch per
// entry of --devices. This file reads the options, loads the models (once per engine, on its
// device) and adapts ttt::serve::ConversationBatch<T, B> to the server's Engine interface; the
// network is serve_server.cpp, the engine threads serve_engines.cpp, the protocol
// serve_protocol.hpp, a connection's audio buffers serve_session.hpp. See docs/serving.md.
//
// With no arguments it serves the bundled small LM and small Mimi with seeded random weights on
// the CPU (the reply is noise, but every stage runs), on 127.0.0.1:8998.
#include "commands.hpp"
#include "common.hpp"
// The engine (ttt/serve/conversation_batch.hpp) lands separately from the server: until it is in
// the tree, `serve` says so instead of breaking the build.
#if TTT_WITH_SERVE && __has_include("ttt/serve/conversation_batch.hpp")
#define TTT_SERVE_ENGINE 1
#else
#define TTT_SERVE_ENGINE 0
#endif
#if TTT_SERVE_ENGINE
#include <algorithm>
#include <memory>
#include <random>
#include <thread>

#include "bundled_configs.hpp"
#include "serve_server.hpp"
#include "ttt/io/opus_stream.hpp"
#include "ttt/serve/conversation_batch.hpp"
#if TTT_HAVE_SENTENCEPIECE
#include <sentencepiece_processor.h>
#endif
#endif

namespace ttt_moshi {
#if TTT_SERVE_ENGINE
namespace {

using serve::ClientParams;

// A text token as the protocol's kind-2 piece.
struct TextPieces {
  int64_t pad = 3, epad = 0;
#if TTT_HAVE_SENTENCEPIECE
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
#endif
  void open(const std::string& path) {
#if TTT_HAVE_SENTENCEPIECE
    sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
    const auto st = sp->Load(path);
    if (!st.ok()) fail(path, ": cannot load SentencePiece model (", st.ToString(), ")");
#else
    fail("--tokenizer ", path, ": this build has no SentencePiece support (install libsentencepiece-dev and rebuild)");
#endif
  }
  // Padding is silence (Kyutai's server skips it); "▁" (U+2581) starts a word: a space. Without
  // a tokenizer the id itself, "<123>".
  std::string piece(int64_t tok) const {
    if (tok < 0 || tok == pad || tok == epad) return {};
#if TTT_HAVE_SENTENCEPIECE
    if (sp) {
      if (tok >= sp->GetPieceSize()) return {};
      std::string p = sp->IdToPiece(int(tok));
      for (size_t i; (i = p.find("\xe2\x96\x81")) != std::string::npos;) p.replace(i, 3, " ");
      return p;
    }
#endif
    return "<" + std::to_string(tok) + ">";
  }
};

// --devices: "0", "0,1", "0,0" (two engines on device 0). Empty string when fine, else the error.
std::string parse_devices(const std::string& s, std::vector<int>& out) {
  out.clear();
  size_t i = 0;
  while (true) {
    const size_t j = s.find(',', i);
    const std::string item = s.substr(i, j == std::string::npos ? std::string::npos : j - i);
    if (item.empty() || item.size() > 4 || item.find_first_not_of("0123456789") != std::string::npos)
      return "--devices '" + s + "': want device indices separated by commas (e.g. 0,1), got '" + item + "'";
    out.push_back(std::stoi(item));
    if (j == std::string::npos) break;
    i = j + 1;
  }
  if (out.size() > 64) return "--devices: at most 64 engines, got " + std::to_string(out.size());
  return {};
}

// One engine: its own copy of the LM and Mimi (on its device) and its conversation batch.
template <class T, class B>
class BatchEngine final : public serve::Engine {
 public:
  using Batch = ttt::serve::ConversationBatch<T, B, moshi::DefaultPolicies>;
  BatchEngine(std::unique_ptr<Model<T, B>> lm, std::unique_ptr<mimi::Mimi<T, B>> m, int64_t slots,
              ttt::serve::ConversationOptions defaults, std::shared_ptr<const TextPieces> text, std::string name)
      : lm_(std::move(lm)), mimi_(std::move(m)), batch_(*lm_, *mimi_, slots, defaults), defaults_(defaults),
        text_(std::move(text)), name_(std::move(name)),
        pcm_(Tensor<float, Cpu>::empty({slots, batch_.frame_size()})),
        out_(Tensor<float, Cpu>::empty({slots, batch_.frame_size()})) {}

  int64_t slots() const override { return batch_.slots(); }
  int64_t frame_size() const override { return batch_.frame_size(); }
  int64_t sample_rate() const override { return batch_.sample_rate(); }
  int64_t join(const ClientParams& p) override { return batch_.join(options(p)); }
  int64_t resume(const std::string& path) override { return batch_.resume(path); }
  std::function<void()> snapshot(int64_t slot, const std::string& path) override {
    auto w = std::make_shared<io::SafeTensorsWriter>(batch_.snapshot(slot));
    return [w, path] { w->write(path); };
  }
  void leave(int64_t slot) override { batch_.leave(slot); }
  std::vector<serve::StepOut> step(const float* pcm, const std::vector<uint8_t>& ready, float* reply) override {
    const int64_t n = slots() * frame_size();
    std::copy(pcm, pcm + n, pcm_.data());
    const auto outs = batch_.step(pcm_, ready, out_);
    std::copy(out_.data(), out_.data() + n, reply);
    std::vector<serve::StepOut> r(outs.size());
    for (size_t i = 0; i < outs.size(); ++i) r[i] = {outs[i].text, outs[i].has_audio, outs[i].audio};
    return r;
  }
  std::string text_piece(int64_t token) const override { return text_->piece(token); }
  int64_t frames(int64_t slot) const override { return batch_.frames(slot); }
  std::string options_json(int64_t slot) const override {
    const auto o = batch_.options(slot);
    io::Json j;
    j["text_temperature"] = o.temp_text;
    j["audio_temperature"] = o.temp;
    j["text_topk"] = o.top_k_text;
    j["audio_topk"] = o.top_k;
    j["seed"] = std::to_string(o.seed);  // a string: JSON numbers lose 64-bit integers in JavaScript
    j["greedy"] = !o.use_sampling;
    return j.dump();
  }
  std::string model_name() const override { return name_; }

 private:
  ttt::serve::ConversationOptions options(const ClientParams& p) const {
    ttt::serve::ConversationOptions o = defaults_;
    if (p.text_temperature) o.temp_text = *p.text_temperature;
    if (p.audio_temperature) o.temp = *p.audio_temperature;
    if (p.text_topk) o.top_k_text = *p.text_topk;
    if (p.audio_topk) o.top_k = *p.audio_topk;
    o.seed = p.seed ? *p.seed : serve::mix_seed(std::random_device{}(), std::random_device{}());
    // Temperature 0 is argmax (greedy), as Kyutai's sampler treats it.
    if ((p.greedy && *p.greedy) || (p.text_temperature && *p.text_temperature == 0.f) ||
        (p.audio_temperature && *p.audio_temperature == 0.f))
      o.use_sampling = false;
    return o;
  }

  std::unique_ptr<Model<T, B>> lm_;          // the batch holds references: built first,
  std::unique_ptr<mimi::Mimi<T, B>> mimi_;  // destroyed last
  Batch batch_;
  ttt::serve::ConversationOptions defaults_;
  std::shared_ptr<const TextPieces> text_;  // shared by the engines (SentencePiece lookups are const)
  std::string name_;
  Tensor<float, Cpu> pcm_, out_;  // [slots, frame_size]
};

template <class T, class B>
struct Serve {
  static int run(const Common& c, const cxxopts::ParseResult& r) {
    serve::ServerOptions opt;
    opt.host = r["host"].as<std::string>();
    const int port = r["port"].as<int>();
    if (port < 0 || port > 65535) fail("--port must be in [0, 65535] (0: any free port), got ", port);
    opt.port = port;
    opt.max_sessions = r["max-sessions"].as<int64_t>();
    if (opt.max_sessions < 1 || opt.max_sessions > 4096) fail("--max-sessions must be in [1, 4096], got ", opt.max_sessions);
    if (r.count("session-dir")) opt.session_dir = r["session-dir"].as<std::string>();
    if (r.count("auth-token")) opt.auth_token = r["auth-token"].as<std::string>();
    if (r.count("ssl-cert")) opt.ssl_cert = r["ssl-cert"].as<std::string>();
    if (r.count("ssl-key")) opt.ssl_key = r["ssl-key"].as<std::string>();
    opt.static_dir = r.count("static-dir") ? r["static-dir"].as<std::string>() : std::string(bundled::kExamplesDir) + "/ttt_moshi/web";
    opt.limits.max_message_bytes = r["max-message-bytes"].as<int64_t>();
    if (opt.limits.max_message_bytes < 1024 || opt.limits.max_message_bytes > (64 << 20))
      fail("--max-message-bytes must be in [1024, 64 MiB], got ", opt.limits.max_message_bytes);
    opt.limits.max_queue_frames = r["max-queue-frames"].as<int64_t>();
    if (opt.limits.max_queue_frames < 1 || opt.limits.max_queue_frames > 100000)
      fail("--max-queue-frames must be in [1, 100000], got ", opt.limits.max_queue_frames);
    opt.limits.idle_seconds = r["idle-timeout"].as<double>();
    if (!(opt.limits.idle_seconds > 0 && opt.limits.idle_seconds <= 86400))
      fail("--idle-timeout must be in (0, 86400] seconds, got ", opt.limits.idle_seconds);
    opt.status_seconds = r["status-every"].as<double>();
    if (!(opt.status_seconds >= 0)) fail("--status-every must be >= 0 seconds");
    opt.io_threads = r["io-threads"].as<int>();
    // 0: half the cores (2 to 16). The network threads do every conversation's Opus work: with
    // 64 conversations two threads made the tick's p99 late on the H200 host (docs/perf.md).
    if (opt.io_threads == 0) opt.io_threads = std::clamp(int(std::thread::hardware_concurrency()) / 2, 2, 16);
    if (opt.io_threads < 1 || opt.io_threads > 256) fail("--io-threads must be in [0, 256], got ", opt.io_threads);

    opt.save_every = r["save-every"].as<double>();
    if (!(opt.save_every >= 0 && opt.save_every <= 86400))
      fail("--save-every must be in [0, 86400] seconds (0: no periodic saves), got ", opt.save_every);
    opt.send_buffer = r["send-buffer"].as<int>();
    if (opt.send_buffer != 0 && (opt.send_buffer < 1024 || opt.send_buffer > (64 << 20)))
      fail("--send-buffer must be 0 (the system's) or in [1024, 64 MiB] bytes, got ", opt.send_buffer);
    const std::string devices = r["devices"].as<std::string>();
    if (const std::string e = parse_devices(devices, opt.devices); !e.empty()) fail(e);
#if TTT_WITH_CUDA
    if constexpr (std::is_same_v<B, Cuda>) {
      const int n = cuda::device_count();
      for (int d : opt.devices)
        if (d >= n)
          fail("--devices ", devices, ": CUDA device ", d, " does not exist (", n, n == 1 ? " device is" : " devices are",
               " visible, numbered from 0; CUDA_VISIBLE_DEVICES renumbers them)");
    }
#endif

    // The LM: --config / --weights as for converse, with neither the bundled small config.
    const LmConfig cfg = load_conversation_config(c, "serving");
    const std::string name = !c.weights.empty() ? c.weights
                             : !c.config.empty() ? c.config + " (random weights)"
                                                 : "bundled small config (random weights)";
    const std::string mimi_cfg = r.count("mimi-config") ? r["mimi-config"].as<std::string>() : "";
    const std::string mimi_w = r.count("mimi-weights") ? r["mimi-weights"].as<std::string>() : "";
    const auto mcfg = load_mimi_config(mimi_cfg, !mimi_w.empty());
    if (mcfg.sample_rate != io::kOpusStreamRate)
      fail("serve: Mimi runs at ", mcfg.sample_rate, " Hz; the protocol's Opus streams are 24 kHz");

    auto text = std::make_shared<TextPieces>();
    text->pad = cfg.existing_text_padding_id, text->epad = cfg.existing_text_end_padding_id;
    if (r.count("tokenizer")) text->open(r["tokenizer"].as<std::string>());

    const auto defaults = ttt::serve::ConversationOptions::from(cfg.gen);
    // One engine per entry of --devices, each built on its own engine thread: the device is
    // selected there before anything is allocated, and every engine loads the same weights
    // (random ones from the same seeds), so a conversation's reply does not depend on its engine.
    const serve::EngineFactory make = [&](int device) -> std::unique_ptr<serve::Engine> {
#if TTT_WITH_CUDA
      if constexpr (std::is_same_v<B, Cuda>) cuda::set_device(device);
#endif
      (void)device;  // the CPU backend: every engine is a thread of this host
      auto ws = load_weights(c, cfg);
      auto model = std::make_unique<Model<T, B>>(build_model<T, B>(c, cfg, ws));
      auto mws = load_mimi_weights(mimi_w, c.init_seed + 1);
      auto mimi = std::make_unique<mimi::Mimi<T, B>>(build_mimi<T, B>(c, mcfg, mws));
      return std::make_unique<BatchEngine<T, B>>(std::move(model), std::move(mimi), opt.max_sessions, defaults, text,
                                                 name);
    };
    return serve::run_server(make, opt);
  }
};

}  // namespace

int cmd_serve(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi serve",
                     "real-time conversations over WebSocket (Kyutai's protocol, GET /api/chat); docs/serving.md");
  add_common(o);
  o.add_options()("mimi-config", "Mimi config (moshi's _mimi_config layout)", cxxopts::value<std::string>())(
      "mimi-weights", "Mimi checkpoint (tokenizer-e351c8d8-checkpoint125.safetensors)", cxxopts::value<std::string>())(
      "tokenizer", "SentencePiece model: text as words (else token ids, \"<123>\")", cxxopts::value<std::string>())(
      "host", "address to bind (not loopback: --auth-token required)",
      cxxopts::value<std::string>()->default_value("127.0.0.1"))(
      "port", "TCP port (0: any free port; the chosen one is printed)", cxxopts::value<int>()->default_value("8998"))(
      "max-sessions", "conversations at once per engine (its batch size); one more than all engines hold gets an "
                      "error and a clean close",
      cxxopts::value<int64_t>()->default_value("4"))(
      "devices", "one engine (thread, model copy, batch) per entry, e.g. 0,1; a new or resumed conversation goes to "
                 "the engine with the fewest; an index may repeat (0,0: two engines on device 0); on the CPU each "
                 "entry is an engine thread",
      cxxopts::value<std::string>()->default_value("0"))(
      "session-dir", "save each conversation's state here when it ends (resume with ?session_id=)",
      cxxopts::value<std::string>())(
      "save-every", "with --session-dir: seconds between saves of each live conversation, so a crash loses at most "
                    "that (0: save only when it ends)",
      cxxopts::value<double>()->default_value("30"))("auth-token", "clients must pass ?auth_token= (or Authorization: Bearer)",
                                     cxxopts::value<std::string>())(
      "static-dir", "files served on GET / (default: examples/ttt_moshi/web)", cxxopts::value<std::string>())(
      "ssl-cert", "TLS certificate chain (PEM): serve https / wss", cxxopts::value<std::string>())(
      "ssl-key", "TLS private key (PEM)", cxxopts::value<std::string>())(
      "max-message-bytes", "largest client message; past it: error and close",
      cxxopts::value<int64_t>()->default_value("262144"))(
      "max-queue-frames", "reply frames (80 ms) queued unsent before a slow client is dropped",
      cxxopts::value<int64_t>()->default_value("50"))(
      "send-buffer", "kernel send buffer of each connection in bytes (0: the system's, which grows to megabytes: a "
                     "client that stops reading is then noticed only after that much)",
      cxxopts::value<int>()->default_value("0"))(
      "idle-timeout", "seconds without a client message before it is dropped",
      cxxopts::value<double>()->default_value("30"))(
      "status-every", "seconds between status lines (0: none)", cxxopts::value<double>()->default_value("10"))(
      "io-threads", "network threads (Opus work); 0: half the cores, 2 to 16", cxxopts::value<int>()->default_value("0"));
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<Serve>(read_common(*r), *r);
}
#else
int cmd_serve(int, char**) {
#if TTT_WITH_SERVE
  fail("serve: this build has no conversation engine (ttt/serve/conversation_batch.hpp)");
#else
  fail("serve: this build has no server (install libboost-dev, libopus-dev and libogg-dev, then rebuild)");
#endif
}
#endif

}  // namespace ttt_moshi
