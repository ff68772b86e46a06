// ttt-moshi converse: a spoken conversation from a WAV file to a WAV file. The user's audio is
// encoded by Mimi frame by frame (80 ms), Moshi answers (LMGen, with whatever TTT designs the
// config lists), its audio tokens are decoded by Mimi into the reply, and the text stream
// prints live with a progress line (frames/s, real-time factor). The reply has the length of
// the input plus --tail seconds (the user goes quiet, Moshi may go on); the frames before the
// codebook delays fill are silence, so the reply stays aligned with the input.
//
// With no weights it runs on seeded random weights of the bundled small LM config and the
// bundled small Mimi (the README's main job): the audio is then noise, but every stage runs.
#include <cmath>
#include <vector>

#include "bundled_configs.hpp"
#include "commands.hpp"
#include "common.hpp"
#include "text.hpp"

namespace ttt_moshi {
namespace {

template <class T, class B>
struct Converse {
  static int run(const Common& c, const cxxopts::ParseResult& r) {
#if !TTT_WITH_AUDIO
    (void)c, (void)r;
    fail("converse: this build has no audio file support (install libsndfile1-dev libsoxr-dev and rebuild)");
#else
    if (!r.count("out")) fail("converse needs --out REPLY.wav");
    std::string input = r.count("input") ? r["input"].as<std::string>() : "";
    if (input.empty()) {
      input = std::string(bundled::kExamplesDir) + "/audio/user.wav";
      std::fprintf(stderr, "note: no --input, using the bundled %s\n", input.c_str());
    }
    const std::string out = r["out"].as<std::string>();
    const double tail = r["tail"].as<double>();
    if (!(tail >= 0.0 && tail <= 3600.0)) fail("--tail must be in [0, 3600] seconds, got ", tail);

    // The LM: --config / --weights as for generate, but with neither the bundled small config.
    const LmConfig cfg = load_conversation_config(c, "using");
    auto ws = load_weights(c, cfg);
    auto model = build_model<T, B>(c, cfg, ws);
    const std::string mimi_cfg = r.count("mimi-config") ? r["mimi-config"].as<std::string>() : "";
    const std::string mimi_w = r.count("mimi-weights") ? r["mimi-weights"].as<std::string>() : "";
    const auto mcfg = load_mimi_config(mimi_cfg, !mimi_w.empty());
    auto mws = load_mimi_weights(mimi_w, c.init_seed + 1);
    const auto mimi = build_mimi<T, B>(c, mcfg, mws);

    moshi::GenOptions opt = moshi::GenOptions::from(cfg.gen);
    opt.seed = r["seed"].as<uint64_t>();
    if (r.count("greedy")) opt.use_sampling = false;
    moshi::LmGen<T, B, moshi::DefaultPolicies> gen(model, opt);
    const int64_t nu = gen.num_user_codebooks(), K = mimi.num_codebooks();
    if (nu != K || cfg.dep_q != K)
      fail("converse: Mimi gives ", K, " codebooks but the LM takes ", nu, " user codebooks and makes ", cfg.dep_q,
           " (pass a Mimi config with num_codebooks = ", nu, ")");
    if (cfg.card != mimi.cardinality())
      fail("converse: the LM's audio vocabulary (card ", cfg.card, ") differs from Mimi's codebook size ",
           mimi.cardinality());

    const auto clip = io::read_audio(input, mcfg.sample_rate);
    for (const auto& n : clip.notes) std::fprintf(stderr, "note: %s\n", n.c_str());
    const int64_t fs = mimi.frame_size(), S = int64_t(clip.pcm.size());
    const int64_t frames = (S + fs - 1) / fs + int64_t(std::ceil(tail * mcfg.frame_rate));
    std::fprintf(stderr, "conversation: %.2f s of user audio (%s) + %.2f s tail = %lld frames of %lld samples\n",
                 clip.seconds(), input.c_str(), tail, (long long)frames, (long long)fs);

    TextPrinter text;
    text.pad = cfg.existing_text_padding_id, text.epad = cfg.existing_text_end_padding_id;
    if (r.count("tokenizer")) text.open(r["tokenizer"].as<std::string>(), cfg);
    else text.ids = true;

    auto lm = gen.start(1);
    auto enc = mimi.start(1), dec = mimi.start(1);
    std::vector<float> reply(size_t(frames * fs), 0.f);
    auto chunk = Tensor<float, Cpu>::empty({1, fs});
    auto user = Tensor<int64_t, Cpu>::empty({1, nu});
    auto audio = Tensor<int64_t, Cpu>::empty({1, K, 1});
    const int64_t every = r.count("progress-every") ? r["progress-every"].as<int64_t>() : 25;
    auto t_start = std::chrono::steady_clock::now();
    double ms_enc = 0, ms_lm = 0, ms_dec = 0;
    auto ms_since = [](std::chrono::steady_clock::time_point t) {
      return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
    };
    int64_t spoken = 0;  // frames of reply audio decoded
    for (int64_t f = 0; f < frames; ++f) {
      for (int64_t i = 0; i < fs; ++i) {
        const int64_t at = f * fs + i;
        chunk.data()[i] = at < S ? clip.pcm[size_t(at)] : 0.f;
      }
      auto t0 = std::chrono::steady_clock::now();
      const auto codes = mimi.encode_step(enc, chunk);  // [1, K, 1]
      ms_enc += ms_since(t0);
      for (int64_t k = 0; k < nu; ++k) user(0, k) = codes(0, k, 0);
      t0 = std::chrono::steady_clock::now();
      const auto tokens = gen.step(lm, user);
      ms_lm += ms_since(t0);
      if (tokens) {
        text.print((*tokens)(0, 0));
        for (int64_t k = 0; k < K; ++k) audio(0, k, 0) = (*tokens)(0, 1 + k);
        t0 = std::chrono::steady_clock::now();
        const auto y = mimi.decode_step(dec, audio);  // [1, fs]
        ms_dec += ms_since(t0);
        // Moshi's frame f - max_delay: placed at its own time in the reply.
        const int64_t at = (f - cfg.max_delay()) * fs;
        std::copy(y.data(), y.data() + fs, reply.begin() + at);
        ++spoken;
      }
      if ((f + 1) % every == 0 || f + 1 == frames) {
        const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
        const double audio_s = double(f + 1) / mcfg.frame_rate;
        std::fprintf(stderr,
                     "%sframe %lld/%lld  %.1f frames/s  real-time factor %.2f (%s)  per frame: mimi encode %.2f ms, "
                     "lm %.2f ms, mimi decode %.2f ms\n",
                     text.enabled || text.ids ? "\n" : "", (long long)(f + 1), (long long)frames, double(f + 1) / wall,
                     wall / audio_s, wall <= audio_s ? "faster than real time" : "slower than real time",
                     ms_enc / double(f + 1), ms_lm / double(f + 1), ms_dec / double(std::max<int64_t>(spoken, 1)));
      }
    }
    std::fputc('\n', stdout);
    const auto rep = io::write_wav(out, reply.data(), int64_t(reply.size()), mcfg.sample_rate);
    const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
    std::fprintf(stderr,
                 "reply: %.2f s of audio at %lld Hz (peak %.3f, %lld of %lld samples clipped) written to %s; "
                 "%lld frames in %.2f s (%.1f frames/s, real time needs %.1f)\n",
                 double(reply.size()) / double(mcfg.sample_rate), (long long)mcfg.sample_rate, double(rep.peak),
                 (long long)rep.clipped, (long long)rep.samples, out.c_str(), (long long)frames, wall,
                 double(frames) / wall, mcfg.frame_rate);
    return 0;
#endif
  }
};

}  // namespace

int cmd_converse(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi converse", "a spoken conversation: user WAV in, Moshi's reply WAV out");
  add_common(o);
  o.add_options()("input", "the user's audio (WAV/FLAC/OGG, any rate; default: examples/audio/user.wav)",
                  cxxopts::value<std::string>())("out", "the reply WAV (24 kHz, 16-bit)", cxxopts::value<std::string>())(
      "mimi-config", "Mimi config (moshi's _mimi_config layout)", cxxopts::value<std::string>())(
      "mimi-weights", "Mimi checkpoint (tokenizer-e351c8d8-checkpoint125.safetensors)", cxxopts::value<std::string>())(
      "tokenizer", "SentencePiece model: print the text stream as words (else token ids)", cxxopts::value<std::string>())(
      "tail", "seconds of silence after the input (Moshi may go on talking)", cxxopts::value<double>()->default_value("1"))(
      "seed", "sampling seed", cxxopts::value<uint64_t>()->default_value("0"))("greedy", "argmax instead of sampling")(
      "progress-every", "progress line every N frames", cxxopts::value<int64_t>());
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<Converse>(read_common(*r), *r);
}

}  // namespace ttt_moshi
