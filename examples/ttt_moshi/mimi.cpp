// ttt-moshi mimi: Kyutai's Mimi codec from the command line.
//   mimi --in IN --out OUT      IN holds pcm f32 [B, 1, S] and codes i64 [B, K, F]; OUT gets
//                               codes (encode of pcm, whole), latent [B, D, F], decoded (decode of
//                               IN's codes, whole), codes_stream and decoded_stream (one frame
//                               per call inside a streaming session): the fixtures' format
//   mimi encode --in WAV --out CODES   a WAV (any rate / channels) -> codes [1, K, F]
//   mimi decode --in CODES --out WAV   codes [B, K, F] -> 24 kHz 16-bit WAV (item 0)
// --config is Mimi's (moshi's _mimi_config layout), --weights its checkpoint.
#include <cstring>

#include "commands.hpp"
#include "common.hpp"

namespace ttt_moshi {
namespace {

template <class T, class B>
struct MimiRun {
  static int run(const Common& c, const cxxopts::ParseResult& r) {
    const std::string mode = r.count("mode") ? r["mode"].as<std::string>() : "";
    if (!r.count("in")) fail("mimi needs --in");
    if (!r.count("out")) fail("mimi needs --out");
    const std::string in = r["in"].as<std::string>(), out = r["out"].as<std::string>();
    const auto cfg = load_mimi_config(c.config, !c.weights.empty());
    auto ws = load_mimi_weights(c.weights, c.init_seed);
    const auto m = build_mimi<T, B>(c, cfg, ws);
    const int64_t fs = m.frame_size();
    auto t0 = std::chrono::steady_clock::now();
    auto secs = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };

    if (mode == "encode") {
#if TTT_WITH_AUDIO
      const auto clip = io::read_audio(in, cfg.sample_rate);
      for (const auto& n : clip.notes) std::fprintf(stderr, "note: %s\n", n.c_str());
      const int64_t S = int64_t(clip.pcm.size());
      auto pcm = Tensor<float, Cpu>::from_vector({1, 1, S}, clip.pcm);
      const auto codes = m.encode(nn::to_backend<B>(ops::cast<T>(pcm))).template to<Cpu>();
      io::SafeTensorsWriter w;
      w.add_metadata("format", "mimi-codes");
      w.add_metadata("sample_rate", std::to_string(cfg.sample_rate));
      w.add_metadata("samples", std::to_string(S));
      w.add("codes", codes);
      w.write(out);
      std::fprintf(stderr, "encoded %.2f s of audio into %lld frames x %lld codebooks in %.2f s -> %s\n",
                   double(S) / double(cfg.sample_rate), (long long)codes.size(2), (long long)codes.size(1), secs(),
                   out.c_str());
      return 0;
#else
      fail("mimi encode: this build has no audio file support (install libsndfile1-dev libsoxr-dev and rebuild)");
#endif
    }
    if (mode == "decode") {
#if TTT_WITH_AUDIO
      auto f = io::SafeTensors::open(in);
      if (!f.contains("codes")) fail(in, ": missing tensor 'codes'");
      const auto codes = f.load<int64_t>("codes").contiguous();
      m.check_codes(codes, in + ": 'codes'");
      auto y = ops::cast<float>(m.decode(nn::to_backend<B>(codes))).template to<Cpu>();  // [B, 1, F fs]
      int64_t n = y.size(2);
      const auto meta = f.metadata();
      if (meta.count("samples")) n = std::min<int64_t>(n, std::stoll(meta.at("samples")));
      const auto st = io::write_wav(out, y.data(), n, cfg.sample_rate);
      std::fprintf(stderr, "decoded %lld frames into %.2f s of audio (peak %.3f, %lld samples clipped) in %.2f s -> %s\n",
                   (long long)codes.size(2), double(n) / double(cfg.sample_rate), double(st.peak), (long long)st.clipped,
                   secs(), out.c_str());
      return 0;
#else
      fail("mimi decode: this build has no audio file support (install libsndfile1-dev libsoxr-dev and rebuild)");
#endif
    }
    if (!mode.empty()) fail("mimi: unknown mode '", mode, "' (encode, decode, or none for the fixture format)");

    // The fixtures' format: whole-sequence and one-frame-per-call streaming results.
    auto f = io::SafeTensors::open(in);
    for (const char* key : {"pcm", "codes"})
      if (!f.contains(key)) fail(in, ": missing tensor '", key, "'");
    const auto pcm = f.load<float>("pcm").contiguous();
    const auto codes = f.load<int64_t>("codes").contiguous();
    if (pcm.rank() != 3 || pcm.size(1) != 1 || pcm.size(2) == 0)
      fail(in, ": 'pcm' must be [B, 1, S] with S > 0, got ", pcm.shape().str());
    m.check_codes(codes, in + ": 'codes'");
    const int64_t Bn = pcm.size(0), S = pcm.size(2), F = (S + fs - 1) / fs, Fc = codes.size(2);
    const auto pcm_b = nn::to_backend<B>(ops::cast<T>(pcm));
    io::SafeTensorsWriter w;
    w.add("latent", ops::cast<float>(m.encode_latent(pcm_b)).template to<Cpu>());
    w.add("codes", m.encode(pcm_b).template to<Cpu>());
    w.add("decoded", ops::cast<float>(m.decode(nn::to_backend<B>(codes))).template to<Cpu>());
    auto padded = Tensor<float, Cpu>::zeros({Bn, F * fs});
    padded.slice(1, 0, S).copy_from(pcm.reshape({Bn, S}));
    auto es = m.start(Bn);
    auto cs = Tensor<int64_t, Cpu>::empty({Bn, m.num_codebooks(), F});
    for (int64_t i = 0; i < F; ++i) cs.slice(2, i, i + 1).copy_from(m.encode_step(es, padded.slice(1, i * fs, (i + 1) * fs).contiguous()));
    w.add("codes_stream", cs);
    auto ds = m.start(codes.size(0));
    auto dec = Tensor<float, Cpu>::empty({codes.size(0), 1, Fc * fs});
    for (int64_t i = 0; i < Fc; ++i)
      dec.slice(2, i * fs, (i + 1) * fs).copy_from(m.decode_step(ds, codes.slice(2, i, i + 1).contiguous()).reshape({codes.size(0), 1, fs}));
    w.add("decoded_stream", dec);
    w.write(out);
    std::fprintf(stderr, "mimi: %lld x %lld samples, %lld frames, whole and streaming, in %.2f s -> %s\n", (long long)Bn,
                 (long long)S, (long long)F, secs(), out.c_str());
    return 0;
  }
};

}  // namespace

int cmd_mimi(int argc, char** argv) {
  cxxopts::Options o("ttt-moshi mimi", "Kyutai's Mimi codec: the fixture format, or encode / decode between WAV and codes");
  o.add_options()("config", "Mimi config (moshi's _mimi_config layout; default: Kyutai's Mimi with --weights, "
                            "else the bundled small Mimi)",
                  cxxopts::value<std::string>())(
      "weights", "Mimi checkpoint (e.g. tokenizer-e351c8d8-checkpoint125.safetensors; default: seeded random weights)",
      cxxopts::value<std::string>())("backend", "cpu or cuda", cxxopts::value<std::string>()->default_value("cpu"))(
      "dtype", "f32 or bf16", cxxopts::value<std::string>()->default_value("f32"))(
      "init-seed", "seed of the random weights", cxxopts::value<uint64_t>()->default_value("0"))(
      "in", "input file", cxxopts::value<std::string>())("out", "output file", cxxopts::value<std::string>())(
      "mode", "encode | decode", cxxopts::value<std::string>())("h,help", "this help");
  o.parse_positional({"mode"});
  o.positional_help("[encode|decode]");
  auto r = parse_options(o, argc, argv);
  if (!r) return 0;
  return dispatch<MimiRun>(read_common(*r), *r);
}

}  // namespace ttt_moshi
