// Audio file I/O (ttt/io/audio.hpp): WAV round trips, resampling against analytic sines,
// downmixing, clipping, atomic writes, streaming resampling, and one clear error per broken
// input. Independent references: the analytic signals, and files written through libsndfile's
// own API (several channels, odd rates, NaN) rather than through the code under test.
#include <sndfile.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "ttt/io/audio.hpp"

using namespace ttt;
namespace fs = std::filesystem;

namespace {

constexpr double kPi = 3.14159265358979323846;

// A sum of sines sampled at `rate`: the exact reference at any other rate.
struct Tones {
  struct Tone {
    double hz, amp, phase;
  };
  std::vector<Tone> tones;
  double at(double t) const {
    double s = 0;
    for (auto& k : tones) s += k.amp * std::sin(2 * kPi * k.hz * t + k.phase);
    return s;
  }
  std::vector<float> sample(int64_t rate, int64_t n) const {
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) x[size_t(i)] = float(at(double(i) / double(rate)));
    return x;
  }
};

// Writes through libsndfile directly (interleaved frames), bypassing io::write_wav and its
// checks: the way to make files the writer would refuse (NaN, odd rates, several channels).
void sf_write_raw(const std::string& path, int format, int rate, int channels, const std::vector<float>& interleaved) {
  SF_INFO info{};
  info.samplerate = rate;
  info.channels = channels;
  info.format = format;
  SNDFILE* sf = sf_open(path.c_str(), SFM_WRITE, &info);
  REQUIRE(sf != nullptr);
  REQUIRE(sf_writef_float(sf, interleaved.data(), sf_count_t(interleaved.size() / size_t(channels))) ==
          sf_count_t(interleaved.size() / size_t(channels)));
  REQUIRE(sf_close(sf) == 0);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

// The message is one line that starts with the file's name and says `needle`.
void require_clear_error(const std::string& path, const std::string& needle, const std::function<void()>& f) {
  const std::string e = error_of(f);
  std::printf("[audio] error: %s\n", e.c_str());
  INFO("path: " << path << "\nerror: " << e);
  REQUIRE(!e.empty());
  REQUIRE(e.rfind(path + ": ", 0) == 0);
  REQUIRE(e.find('\n') == std::string::npos);
  REQUIRE(e.find(needle) != std::string::npos);
}

std::vector<std::string> leftovers(const std::string& stem) {
  std::vector<std::string> out;
  for (auto& e : fs::directory_iterator("."))
    if (e.path().filename().string().rfind(stem + ".tmp.", 0) == 0) out.push_back(e.path().string());
  return out;
}

std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

bool has_note(const io::AudioClip& c, const std::string& needle) {
  for (auto& n : c.notes)
    if (n.find(needle) != std::string::npos) return true;
  return false;
}

}  // namespace

TEST_CASE("WAV round trip: 16-bit within one step, float exact", "[audio]") {
  std::mt19937 g(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(24000);
  for (auto& v : x) v = u(g);
  // Full scale and its neighbours, the values where scaling conventions differ.
  const std::vector<float> edges = {1.f, -1.f, 0.f, 32767.f / 32768.f, -32767.f / 32768.f, 0.99999f, -0.99999f,
                                    1.f / 32768.f, 0.5f / 32768.f, 1e-30f};
  std::copy(edges.begin(), edges.end(), x.begin());

  auto rep = io::write_wav("rt16.wav", x, 24000);
  REQUIRE(rep.samples == 24000);
  REQUIRE(rep.clipped == 0);
  auto c = io::read_audio("rt16.wav");
  REQUIRE(c.sample_rate == 24000);
  REQUIRE(c.notes.empty());  // mono 24 kHz: nothing to convert
  REQUIRE(c.source.channels == 1);
  REQUIRE(c.source.frames == 24000);
  REQUIRE(c.source.format.find("16 bit PCM") != std::string::npos);
  REQUIRE(c.pcm.size() == x.size());
  double err16 = 0;
  for (size_t i = 0; i < x.size(); ++i) err16 = std::max(err16, std::fabs(double(c.pcm[i]) - x[i]));
  REQUIRE(err16 <= 1.0 / 32768);
  REQUIRE(c.pcm[1] == -1.f);  // -1 is representable exactly

  io::write_wav("rt32.wav", x, 24000, io::WavEncoding::float32);
  auto f = io::read_audio("rt32.wav");
  REQUIRE(f.source.format.find("32 bit float") != std::string::npos);
  REQUIRE(f.pcm == x);

  // Any rate in range round-trips with kKeepRate (no resampling).
  io::write_wav("rt_44k.wav", x, 44100, io::WavEncoding::float32);
  auto k = io::read_audio("rt_44k.wav", io::kKeepRate);
  REQUIRE(k.sample_rate == 44100);
  REQUIRE(k.pcm == x);
  REQUIRE(io::audio_info("rt_44k.wav").sample_rate == 44100);

  // From memory: the same decoder on the same bytes.
  const std::string bytes = slurp("rt16.wav");
  auto m = io::read_audio_memory(bytes.data(), bytes.size(), "upload.wav");
  REQUIRE(m.pcm == c.pcm);
  std::printf("[audio] round trip: 16-bit max abs err %.3g (bound 1/32768 = %.3g), float32 exact\n", err16, 1.0 / 32768);
  for (auto* p : {"rt16.wav", "rt32.wav", "rt_44k.wav"}) std::remove(p);
}

TEST_CASE("resampling to 24 kHz matches the analytic signal", "[audio][resample]") {
  // Two tones well inside the band soxr HQ keeps flat (91.3% of the lower Nyquist).
  for (int64_t rate : {48000, 44100, 16000, 8000}) {
    const double nyq = 0.5 * double(std::min<int64_t>(rate, 24000));
    const Tones sig{{{440.0, 0.45, 0.3}, {0.55 * nyq, 0.35, 1.1}}};
    const int64_t n = 2 * rate + 123;  // 2 s and a bit: not a whole number of output samples
    const std::string p = "rs_" + std::to_string(rate) + ".wav";
    io::write_wav(p, sig.sample(rate, n), rate, io::WavEncoding::float32);  // float: no quantisation
    auto c = io::read_audio(p);
    INFO("input rate " << rate);
    REQUIRE(c.sample_rate == 24000);
    REQUIRE(has_note(c, "resampled " + std::to_string(rate) + " Hz -> 24000 Hz"));
    // Same duration: round(n * 24000 / rate) samples.
    REQUIRE(int64_t(c.pcm.size()) == int64_t(std::llround(double(n) * 24000.0 / double(rate))));
    // Output sample k is the signal at k / 24000 s: soxr removes its filter's delay (a delay
    // of even one sample would be an error of ~0.1 on the upper tone). The edges see the
    // filter's start-up against the implicit silence outside the clip; 0.1 s is plenty.
    double err = 0, err_edge = 0;
    const int64_t m = int64_t(c.pcm.size()), margin = 2400;
    for (int64_t k = 0; k < m; ++k) {
      const double e = std::fabs(double(c.pcm[size_t(k)]) - sig.at(double(k) / 24000.0));
      double& worst = k >= margin && k < m - margin ? err : err_edge;
      worst = std::max(worst, e);
    }
    std::printf("[audio] resample %6lld Hz -> 24000 Hz (tones 440 Hz + %.0f Hz): max abs err %.2e in the middle, %.2e at the edges\n",
                (long long)rate, 0.55 * nyq, err, err_edge);
    REQUIRE(err < 1e-3);
    std::remove(p.c_str());
  }
}

TEST_CASE("downsampling removes what the new rate cannot hold", "[audio][resample]") {
  // A 15 kHz tone at 48 kHz has no place below 12 kHz: a resampler without its low-pass
  // filter would fold it to 9 kHz at full amplitude.
  const Tones high{{{15000.0, 0.8, 0.0}}};
  auto y = io::resample(high.sample(48000, 48000).data(), 48000, 48000, 24000);
  double peak = 0;
  for (size_t k = 2400; k < y.size() - 2400; ++k) peak = std::max(peak, double(std::fabs(y[k])));
  std::printf("[audio] 15 kHz tone at 48 kHz -> 24 kHz: residual peak %.2e (input 0.8)\n", peak);
  REQUIRE(peak < 1e-4);
}

TEST_CASE("several channels are averaged to mono, and the notes say what was done", "[audio]") {
  const int64_t n = 4800;
  const Tones a{{{300.0, 0.6, 0.0}}}, b{{{1000.0, 0.5, 0.7}}}, c{{{50.0, 0.9, 0.2}}};
  auto xa = a.sample(48000, n), xb = b.sample(48000, n), xc = c.sample(48000, n);
  std::vector<float> st(size_t(3 * n));
  for (int64_t i = 0; i < n; ++i) {
    st[size_t(3 * i)] = xa[size_t(i)];
    st[size_t(3 * i + 1)] = xb[size_t(i)];
    st[size_t(3 * i + 2)] = xc[size_t(i)];
  }
  sf_write_raw("three.wav", SF_FORMAT_WAV | SF_FORMAT_FLOAT, 48000, 3, st);
  auto keep = io::read_audio("three.wav", io::kKeepRate);
  REQUIRE(keep.source.channels == 3);
  REQUIRE(keep.sample_rate == 48000);
  REQUIRE(keep.pcm.size() == size_t(n));
  for (int64_t i = 0; i < n; ++i) {
    const float mean = float((double(xa[size_t(i)]) + double(xb[size_t(i)]) + double(xc[size_t(i)])) / 3.0);
    REQUIRE(keep.pcm[size_t(i)] == mean);
  }
  REQUIRE(has_note(keep, "downmixed 3 channels to mono (mean)"));
  REQUIRE(!has_note(keep, "resampled"));

  // Stereo 16-bit at 48 kHz to Mimi's input: both conversions, both noted, and the result is
  // the mean of the two tones at 24 kHz.
  std::vector<float> lr(size_t(2 * 48000));
  const Tones l{{{440.0, 0.5, 0.0}}}, r{{{880.0, 0.3, 0.5}}};
  for (int64_t i = 0; i < 48000; ++i) {
    lr[size_t(2 * i)] = float(l.at(i / 48000.0));
    lr[size_t(2 * i + 1)] = float(r.at(i / 48000.0));
  }
  sf_write_raw("stereo.wav", SF_FORMAT_WAV | SF_FORMAT_PCM_16, 48000, 2, lr);
  auto s = io::read_audio("stereo.wav");
  REQUIRE(s.sample_rate == 24000);
  REQUIRE(s.pcm.size() == 24000);
  REQUIRE(s.source.channels == 2);
  REQUIRE(s.source.sample_rate == 48000);
  REQUIRE(s.notes.size() == 2);
  REQUIRE(s.notes[0] == "downmixed 2 channels to mono (mean)");
  REQUIRE(s.notes[1].rfind("resampled 48000 Hz -> 24000 Hz (soxr HQ", 0) == 0);
  double err = 0;
  for (int64_t k = 2400; k < 24000 - 2400; ++k)
    err = std::max(err, std::fabs(s.pcm[size_t(k)] - 0.5 * (l.at(k / 24000.0) + r.at(k / 24000.0))));
  REQUIRE(err < 1e-3);  // 16-bit quantisation (~3e-5) plus the resampler
  std::remove("three.wav");
  std::remove("stereo.wav");
}

TEST_CASE("16-bit writes clip beyond full scale instead of wrapping, and count", "[audio]") {
  const std::vector<float> x = {0.5f, 1.5f, -2.f, 1.f, -1.f, 1.0001f, 0.99f, -1.25f};
  auto rep = io::write_wav("clip.wav", x, 24000);
  REQUIRE(rep.over_full_scale == 4);
  REQUIRE(rep.clipped == 4);
  REQUIRE(rep.peak == 2.f);
  auto c = io::read_audio("clip.wav");
  REQUIRE(c.pcm.size() == x.size());
  const float top = 32767.f / 32768.f;  // the largest 16-bit value, read back
  REQUIRE(c.pcm[1] == top);             // 1.5: clipped, not wrapped to a negative value
  REQUIRE(c.pcm[2] == -1.f);            // -2
  REQUIRE(c.pcm[3] == top);             // 1.0 itself maps to the largest value
  REQUIRE(c.pcm[5] == top);
  REQUIRE(c.pcm[7] == -1.f);
  REQUIRE(std::fabs(c.pcm[0] - 0.5f) <= 1.f / 32768);
  REQUIRE(std::fabs(c.pcm[6] - 0.99f) <= 1.f / 32768);

  // Float keeps everything; the report still says how much was beyond full scale, and so do
  // the notes when it is read.
  auto fr = io::write_wav("clip32.wav", x, 24000, io::WavEncoding::float32);
  REQUIRE(fr.clipped == 0);
  REQUIRE(fr.over_full_scale == 4);
  auto f = io::read_audio("clip32.wav");
  REQUIRE(f.pcm == x);
  REQUIRE(has_note(f, "peak 2 exceeds full scale"));
  std::remove("clip.wav");
  std::remove("clip32.wav");
}

TEST_CASE("writes are atomic: complete file or the old one, no temporary left", "[audio]") {
  const std::vector<float> a(1000, 0.25f), b(500, -0.5f);
  io::write_wav("atomic.wav", a, 24000);
  io::write_wav("atomic.wav", b, 24000);  // replaces
  REQUIRE(io::read_audio("atomic.wav").pcm.size() == 500);
  REQUIRE(leftovers("atomic.wav").empty());
  const std::string before = slurp("atomic.wav");

  std::vector<float> bad(100, 0.1f);
  bad[42] = std::nanf("");
  require_clear_error("atomic.wav", "sample 42 (0.00175 s) is NaN", [&] { io::write_wav("atomic.wav", bad, 24000); });
  bad[42] = -INFINITY;
  require_clear_error("atomic.wav", "is infinite", [&] { io::write_wav("atomic.wav", bad, 24000); });
  REQUIRE(slurp("atomic.wav") == before);  // untouched
  REQUIRE(leftovers("atomic.wav").empty());

  require_clear_error("no_such_dir/out.wav", "cannot write (No such file or directory)",
                      [&] { io::write_wav("no_such_dir/out.wav", a, 24000); });
  fs::create_directories("a_dir.wav");
  require_clear_error("a_dir.wav", "is a directory", [&] { io::write_wav("a_dir.wav", a, 24000); });
  REQUIRE(leftovers("a_dir.wav").empty());
  require_clear_error("atomic.wav", "sample rate 0 Hz is outside", [&] { io::write_wav("atomic.wav", a, 0); });
  require_clear_error("atomic.wav", "sample rate 5000000 Hz is outside", [&] { io::write_wav("atomic.wav", a, 5000000); });
  REQUIRE(slurp("atomic.wav") == before);
  std::remove("atomic.wav");
  fs::remove("a_dir.wav");
}

TEST_CASE("broken inputs: one clear error naming the file", "[audio][errors]") {
  const Tones sig{{{440.0, 0.5, 0.0}}};
  io::write_wav("good.wav", sig.sample(24000, 24000), 24000);
  const std::string good = slurp("good.wav");
  REQUIRE(good.size() == 44 + 2 * 24000);  // canonical header: "data" size at byte 40
  REQUIRE(good.compare(36, 4, "data") == 0);
  auto write_bytes = [](const std::string& p, const std::string& bytes) {
    std::ofstream(p, std::ios::binary | std::ios::trunc) << bytes;
  };
  auto patch_u32 = [](std::string s, size_t at, uint32_t v) {
    for (int i = 0; i < 4; ++i) s[at + size_t(i)] = char((v >> (8 * i)) & 0xff);
    return s;
  };
  auto patch_u16 = [](std::string s, size_t at, uint16_t v) {
    s[at] = char(v & 0xff);
    s[at + 1] = char(v >> 8);
    return s;
  };

  struct Case {
    const char* what;
    std::string path;
    std::function<void(const std::string&)> make;
    std::string needle;
  };
  std::vector<Case> cases = {
      {"missing file", "missing.wav", [](const std::string&) {}, "cannot open (No such file or directory)"},
      {"directory", "dir.wav", [](const std::string& p) { fs::create_directories(p); }, "is a directory, not an audio file"},
      {"0 bytes", "zero.wav", [&](const std::string& p) { write_bytes(p, ""); }, "is empty (0 bytes)"},
      {"text named .wav", "text.wav",
       [&](const std::string& p) { write_bytes(p, "Hello Moshi, this is a text file, not a WAV.\n"); }, "not an audio file"},
      {"truncated in the data", "cut.wav", [&](const std::string& p) { write_bytes(p, good.substr(0, 30000)); },
       "truncated (the header declares 24000 frames, the file holds 14978)"},
      {"only the header", "header_only.wav", [&](const std::string& p) { write_bytes(p, good.substr(0, 44)); },
       "truncated (the header declares 24000 frames, the file holds 0)"},
      {"truncated in the header", "cut_header.wav", [&](const std::string& p) { write_bytes(p, good.substr(0, 30)); },
       "damaged or truncated audio file"},
      {"0 frames", "empty.wav", [](const std::string& p) { io::write_wav(p, std::vector<float>{}, 24000); },
       "contains no audio (0 frames)"},
      {"0 channels", "nochan.wav", [&](const std::string& p) { write_bytes(p, patch_u16(good, 22, 0)); },
       "damaged or truncated audio file (libsndfile: Channel count is zero.)"},
      {"absurd rate (header)", "rate5.wav", [&](const std::string& p) { write_bytes(p, patch_u32(good, 24, 5)); },
       "sample rate 5 Hz is outside the supported 1000..768000 Hz"},
      {"absurd rate (libsndfile)", "rate100.wav",
       [&](const std::string& p) { sf_write_raw(p, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 100, 1, sig.sample(100, 100)); },
       "sample rate 100 Hz is outside"},
      {"absurd rate (high)", "rate2M.wav",
       [&](const std::string& p) { sf_write_raw(p, SF_FORMAT_WAV | SF_FORMAT_PCM_16, 2000000, 1, sig.sample(24000, 100)); },
       "sample rate 2000000 Hz is outside"},
      {"NaN sample", "nan.wav",
       [&](const std::string& p) {
         auto x = sig.sample(24000, 2400);
         x[1234] = std::nanf("");
         sf_write_raw(p, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 24000, 1, x);
       },
       "sample 1234 (0.0514167 s, channel 0) is NaN"},
      {"infinite sample, second channel", "inf.wav",
       [&](const std::string& p) {
         std::vector<float> x(200, 0.1f);
         x[2 * 50 + 1] = INFINITY;
         sf_write_raw(p, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 24000, 2, x);
       },
       "sample 50 (0.00208333 s, channel 1) is infinite"},
      {"float samples far past full scale (random bytes read as floats)", "huge.wav",
       [&](const std::string& p) {
         auto x = sig.sample(24000, 2400);
         x[700] = 3e30f;
         sf_write_raw(p, SF_FORMAT_WAV | SF_FORMAT_FLOAT, 24000, 1, x);
       },
       "samples reach 3e+30, 1000 times full scale or more"},
  };
  for (auto& c : cases) {
    INFO(c.what);
    fs::remove_all(c.path);
    c.make(c.path);
    require_clear_error(c.path, c.needle, [&] { io::read_audio(c.path); });
    // The memory decoder gives the same verdict for a file's bytes.
    if (fs::is_regular_file(c.path)) {
      const std::string bytes = slurp(c.path);
      const std::string e = error_of([&] { io::read_audio_memory(bytes.data(), bytes.size(), "mem:" + c.path); });
      INFO("memory: " << e);
      REQUIRE(e.rfind("mem:" + c.path + ": ", 0) == 0);
    }
    fs::remove_all(c.path);
  }

  // A streamed WAV (sox, ffmpeg writing to a pipe) has a placeholder length: read what is
  // there and say so, rather than calling it truncated.
  write_bytes("streamed.wav", patch_u32(patch_u32(good, 40, 0xffffffffu), 4, 0xffffffffu));
  auto s = io::read_audio("streamed.wav");
  REQUIRE(s.pcm.size() == 24000);
  REQUIRE(has_note(s, "the header gives no data length"));
  // Longer than the caller's limit: refused before decoding.
  require_clear_error("good.wav", "longer than the 0.5 s limit", [] { io::read_audio("good.wav", io::kMimiRate, 0.5); });
  require_clear_error("good.wav", "target rate 7 Hz is outside", [] { io::read_audio("good.wav", 7); });
  // Found by fuzzing: a few frames at a high rate resample to nothing.
  io::write_wav("tiny.wav", std::vector<float>{0.5f}, 96000);
  require_clear_error("tiny.wav", "too short: 1 frames at 96000 Hz make less than one sample at 24000 Hz",
                      [] { io::read_audio("tiny.wav"); });
  REQUIRE(io::read_audio("tiny.wav", io::kKeepRate).pcm.size() == 1);
  std::remove("tiny.wav");
  std::remove("streamed.wav");
  std::remove("good.wav");
}

TEST_CASE("streaming Resampler equals one-shot, bit for bit, for any chunking", "[audio][resample]") {
  std::mt19937 g(3);
  std::normal_distribution<float> nd(0.f, 0.3f);
  for (auto [in, out] : std::vector<std::pair<int64_t, int64_t>>{
           {48000, 24000}, {44100, 24000}, {16000, 24000}, {8000, 24000}, {24000, 48000}, {24000, 24000}}) {
    INFO(in << " Hz -> " << out << " Hz");
    std::vector<float> x(size_t(in + 777));
    for (auto& v : x) v = nd(g);
    const auto ref = io::resample(x.data(), int64_t(x.size()), in, out);
    REQUIRE(int64_t(ref.size()) == int64_t(std::llround(double(x.size()) * double(out) / double(in))));
    io::Resampler r(in, out);
    for (int pass = 0; pass < 2; ++pass) {  // the second stream reuses the resampler after flush
      std::vector<float> y;
      size_t done = 0;
      while (done < x.size()) {
        // Chunks of 0 (a no-op), 1, a Mimi frame at the input rate, and random sizes.
        const size_t pick = g() % 4;
        size_t len = pick == 0 ? 0 : pick == 1 ? 1 : pick == 2 ? size_t(in) * 1920 / 24000 : 1 + g() % 5000;
        len = std::min(len, x.size() - done);
        auto part = r.push(x.data() + done, int64_t(len));
        y.insert(y.end(), part.begin(), part.end());
        done += len;
      }
      r.flush(y);
      REQUIRE(y == ref);
    }
    if (in == out) REQUIRE(ref == x);  // equal rates pass through
  }
  std::printf("[audio] streaming Resampler == one-shot: bit-identical for 6 rate pairs, random chunking\n");

  // reset() drops a half-pushed stream.
  io::Resampler r(48000, 24000);
  std::vector<float> junk(1000, 0.9f), x(4800, 0.f);
  (void)r.push(junk.data(), 1000);
  r.reset();
  auto y = r.push(x.data(), 4800);
  r.flush(y);
  REQUIRE(y == std::vector<float>(2400, 0.f));

  REQUIRE_THROWS_WITH(io::Resampler(0, 24000), TTT_CONTAINS("Resampler: input rate 0 Hz is outside"));
  REQUIRE_THROWS_WITH(io::Resampler(24000, 10000000), TTT_CONTAINS("Resampler: output rate 10000000 Hz is outside"));
}

TEST_CASE("the bundled example is Mimi's format already", "[audio]") {
  const std::string p = test_data("../../examples/audio/user.wav");
  auto c = io::read_audio(p);
  INFO(c.source.format);
  REQUIRE(c.notes.empty());  // 24 kHz mono: used as is
  REQUIRE(c.source.format == "WAV (Microsoft), Signed 16 bit PCM");
  REQUIRE(c.seconds() >= 3.0);
  REQUIRE(c.seconds() <= 6.0);
  float peak = 0;
  double energy = 0;
  for (float v : c.pcm) {
    peak = std::max(peak, std::fabs(v));
    energy += double(v) * v;
  }
  REQUIRE(peak < 1.f);                                          // no clipping
  REQUIRE(std::sqrt(energy / double(c.pcm.size())) > 0.02);      // speech, not silence
  std::printf("[audio] examples/audio/user.wav: %.2f s, %zu samples (%.1f Mimi frames), peak %.3f\n", c.seconds(),
              c.pcm.size(), double(c.pcm.size()) / 1920.0, peak);
}
