#pragma once
// Audio files in and out for the Mimi front end (24 kHz mono): libsndfile decodes (WAV, FLAC,
// OGG/Vorbis/Opus, AIFF, ... whatever the system's libsndfile was built with) and writes WAV;
// libsoxr converts sample rates. Nothing here parses a file format itself: the two libraries
// are the parsers, this layer adds the checks they leave to the caller (empty, truncated,
// absurd rate, NaN samples) and reports each as one ttt::Error naming the file.
//
// Link the ttt::audio CMake target (sndfile + soxr, defines TTT_WITH_AUDIO=1). See docs/audio.md.
#include <fcntl.h>
#include <sndfile.h>
#include <soxr.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "ttt/core/error.hpp"

namespace ttt::io {

// Sample rates accepted anywhere in this layer. Telephone audio (8 kHz) down to 1 kHz, studio
// audio up to 768 kHz; anything outside is a broken header, not a recording.
inline constexpr int64_t kMinAudioRate = 1000;
inline constexpr int64_t kMaxAudioRate = 768000;
// Largest sample magnitude read_audio accepts (60 dB over full scale).
inline constexpr float kMaxAudioPeak = 1000.f;
// Mimi's rate; read_audio's default target.
inline constexpr int64_t kMimiRate = 24000;
// read_audio(path, kKeepRate): no resampling, the clip keeps the file's rate.
inline constexpr int64_t kKeepRate = 0;

// What a file holds, before any conversion.
struct AudioInfo {
  int64_t sample_rate = 0;
  int64_t channels = 0;
  int64_t frames = 0;  // per channel
  std::string format;  // libsndfile's names, e.g. "WAV (Microsoft), Signed 16 bit PCM"
};

// Mono float samples (nominally in [-1, 1]) at `sample_rate`, plus what was done to get there
// ("downmixed 2 channels to mono (mean)", "resampled 48000 Hz -> 24000 Hz (soxr HQ, 20-bit,
// linear phase)"): the CLI prints the notes so a user sees every conversion.
struct AudioClip {
  std::vector<float> pcm;
  int64_t sample_rate = 0;
  std::vector<std::string> notes;
  AudioInfo source;  // the file as it was
  double seconds() const { return sample_rate > 0 ? double(pcm.size()) / double(sample_rate) : 0.0; }
};

enum class WavEncoding {
  pcm16,    // 16-bit integer PCM, clipped to [-1, 1]: what every player takes
  float32,  // IEEE float, lossless: values beyond [-1, 1] are kept
};

struct WavWriteReport {
  int64_t samples = 0;
  int64_t over_full_scale = 0;  // samples with |x| > 1
  int64_t clipped = 0;          // of those, clipped to full scale (pcm16: all of them; float32: none)
  float peak = 0.f;             // max |x| of the input
};

namespace detail {

inline void check_rate(const std::string& who, const char* what, int64_t rate) {
  TTT_CHECK(rate >= kMinAudioRate && rate <= kMaxAudioRate, who, ": ", what, " ", rate, " Hz is outside the supported ",
            kMinAudioRate, "..", kMaxAudioRate, " Hz");
}

// ---- soxr -----------------------------------------------------------------------------------

struct SoxrDeleter {
  void operator()(soxr_t s) const { soxr_delete(s); }
};
using SoxrPtr = std::unique_ptr<std::remove_pointer_t<soxr_t>, SoxrDeleter>;

// ---- libsndfile -----------------------------------------------------------------------------

struct SndfileCloser {
  void operator()(SNDFILE* f) const { sf_close(f); }
};
using SndfilePtr = std::unique_ptr<SNDFILE, SndfileCloser>;

// Closes a descriptor we opened (libsndfile is told not to: its behaviour on a failed open
// has differed between versions).
struct Fd {
  int fd = -1;
  Fd() = default;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// A byte buffer seen by libsndfile as a read-only file (sf_open_virtual): the fuzzer and
// callers with audio already in memory (an upload) decode without touching the disk.
struct MemoryStream {
  const unsigned char* data = nullptr;
  sf_count_t size = 0, pos = 0;

  static sf_count_t get_filelen(void* u) { return static_cast<MemoryStream*>(u)->size; }
  static sf_count_t seek(sf_count_t offset, int whence, void* u) {
    auto* m = static_cast<MemoryStream*>(u);
    sf_count_t base = whence == SEEK_SET ? 0 : whence == SEEK_CUR ? m->pos : whence == SEEK_END ? m->size : -1;
    // Like lseek: a position before the start (or an overflowing one) is refused.
    if (base < 0 || (offset < 0 && base + offset < 0) || (offset > 0 && offset > INT64_MAX - base)) return -1;
    m->pos = base + offset;
    return m->pos;
  }
  static sf_count_t read(void* ptr, sf_count_t count, void* u) {
    auto* m = static_cast<MemoryStream*>(u);
    if (count <= 0 || m->pos >= m->size) return 0;
    const sf_count_t n = std::min(count, m->size - m->pos);
    std::memcpy(ptr, m->data + m->pos, size_t(n));
    m->pos += n;
    return n;
  }
  static sf_count_t write(const void*, sf_count_t, void*) { return 0; }
  static sf_count_t tell(void* u) { return static_cast<MemoryStream*>(u)->pos; }
};

inline std::string sf_format_name(int format) {
  SF_FORMAT_INFO major{}, sub{};
  major.format = format & SF_FORMAT_TYPEMASK;
  sub.format = format & SF_FORMAT_SUBMASK;
  std::string s = sf_command(nullptr, SFC_GET_FORMAT_INFO, &major, sizeof(major)) == 0 && major.name
                      ? major.name
                      : str("format 0x", std::hex, major.format);
  if (sf_command(nullptr, SFC_GET_FORMAT_INFO, &sub, sizeof(sub)) == 0 && sub.name) s += str(", ", sub.name);
  return s;
}

// Bytes per sample of the fixed-width encodings; 0 for compressed ones (ADPCM, GSM, ...).
inline int64_t fixed_sample_bytes(int format) {
  switch (format & SF_FORMAT_SUBMASK) {
    case SF_FORMAT_PCM_S8:
    case SF_FORMAT_PCM_U8:
    case SF_FORMAT_ULAW:
    case SF_FORMAT_ALAW:
      return 1;
    case SF_FORMAT_PCM_16:
      return 2;
    case SF_FORMAT_PCM_24:
      return 3;
    case SF_FORMAT_PCM_32:
    case SF_FORMAT_FLOAT:
      return 4;
    case SF_FORMAT_DOUBLE:
      return 8;
    default:
      return 0;
  }
}

// Placeholder lengths that streaming writers put in a WAV header when they cannot seek back
// to fill it in (sox: 0x7ffff000, ffmpeg and others: 0xffffffff or 0x7fffffff).
inline constexpr uint32_t kUnknownDataLength = 0x7ffff000u;

// The audio payload size the header declares, in bytes, through libsndfile's chunk API
// (WAV "data", AIFF "SSND" less its 8-byte offset/block header); -1 when the format has no
// such chunk, -2 when the header holds a placeholder. libsndfile quietly shortens a data chunk
// that runs past the end of the file; comparing its frame count with this number is how a
// cut-off download is told apart from a complete file.
inline int64_t declared_data_bytes(SNDFILE* sf, int format) {
  const int major = format & SF_FORMAT_TYPEMASK;
  const char* id = nullptr;
  int64_t header = 0;
  if (major == SF_FORMAT_WAV || major == SF_FORMAT_WAVEX) {
    id = "data";
  } else if (major == SF_FORMAT_AIFF) {
    id = "SSND";
    header = 8;
  } else {
    return -1;
  }
  SF_CHUNK_INFO ci{};
  std::snprintf(ci.id, sizeof(ci.id), "%s", id);
  ci.id_size = 4;
  SF_CHUNK_ITERATOR* it = sf_get_chunk_iterator(sf, &ci);
  if (!it) return -1;
  SF_CHUNK_INFO got{};
  if (sf_get_chunk_size(it, &got) != SF_ERR_NO_ERROR) return -1;
  if (got.datalen >= kUnknownDataLength) return -2;  // a streamed file: the length is whatever is there
  return std::max<int64_t>(0, int64_t(got.datalen) - header);
}

// An open libsndfile handle on a file (our descriptor) or a memory buffer.
struct SoundFile {
  std::string name;
  Fd fd;
  MemoryStream mem;
  SF_VIRTUAL_IO vio{};
  SF_INFO info{};
  SndfilePtr sf;
};

inline std::string sf_open_error() {
  // sf_strerror(nullptr) is libsndfile's last open error (a process-wide value; good enough
  // for a message).
  const char* e = sf_strerror(nullptr);
  return e && *e ? e : "unknown error";
}

// libsndfile's reason, prefixed with which of the user's problems it is.
[[noreturn]] inline void fail_open(const std::string& name) {
  const std::string why = str("libsndfile: ", sf_open_error());
  switch (sf_error(nullptr)) {
    case SF_ERR_UNRECOGNISED_FORMAT:
      fail(name, ": not an audio file (", why, ")");
    case SF_ERR_UNSUPPORTED_ENCODING:
      fail(name, ": uses an audio encoding that cannot be decoded (", why, ")");
    case SF_ERR_SYSTEM:
      fail(name, ": cannot read (", why, ")");
    default:  // the header was recognised but is inconsistent or cut short
      fail(name, ": damaged or truncated audio file (", why, ")");
  }
}

inline void check_opened(SoundFile& f) {
  if (!f.sf) fail_open(f.name);
  const SF_INFO& i = f.info;
  TTT_CHECK(i.channels >= 1, f.name, ": has ", i.channels, " channels (needs at least one)");
  check_rate(f.name, "sample rate", i.samplerate);
}

inline void open_path(SoundFile& f, const std::string& path) {
  f.name = path;
  // Our own open() and fstat() first: a missing file, a directory or an empty file each get
  // their own message instead of libsndfile's generic one.
  f.fd.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (f.fd.fd < 0) fail(path, ": cannot open (", std::strerror(errno), ")");
  struct stat st {};
  if (::fstat(f.fd.fd, &st) != 0) fail(path, ": cannot stat (", std::strerror(errno), ")");
  TTT_CHECK(!S_ISDIR(st.st_mode), path, ": is a directory, not an audio file");
  TTT_CHECK(!S_ISREG(st.st_mode) || st.st_size > 0, path, ": is empty (0 bytes), not an audio file");
  f.sf.reset(sf_open_fd(f.fd.fd, SFM_READ, &f.info, SF_FALSE));
  check_opened(f);
}

inline void open_memory(SoundFile& f, const void* data, size_t size, const std::string& name) {
  f.name = name;
  TTT_CHECK(size > 0, name, ": is empty (0 bytes), not an audio file");
  TTT_CHECK(data != nullptr, name, ": no data");
  f.mem.data = static_cast<const unsigned char*>(data);
  f.mem.size = sf_count_t(size);
  f.vio = {&MemoryStream::get_filelen, &MemoryStream::seek, &MemoryStream::read, &MemoryStream::write,
           &MemoryStream::tell};
  f.sf.reset(sf_open_virtual(&f.vio, SFM_READ, &f.info, &f.mem));
  check_opened(f);
}

inline AudioInfo info_of(const SoundFile& f) {
  return {f.info.samplerate, f.info.channels, f.info.frames, sf_format_name(f.info.format)};
}

// Decodes the whole file to mono at the file's rate: the mean of the channels, accumulated in
// double (two full-scale float channels must not overflow, and the order of the sum is fixed).
inline AudioClip decode_mono(SoundFile& f, double max_seconds) {
  const std::string& name = f.name;
  const SF_INFO& in = f.info;
  TTT_CHECK(max_seconds > 0, name, ": the length limit must be positive (got ", max_seconds, " s)");
  AudioClip clip;
  clip.source = info_of(f);
  clip.sample_rate = in.samplerate;
  const int64_t channels = in.channels;
  // A header can claim anything; memory is only committed for what actually decodes.
  const double limit_d = max_seconds * double(in.samplerate);
  const int64_t limit = limit_d >= 9.0e18 ? INT64_MAX : int64_t(limit_d);
  const bool frames_known = in.frames > 0 && in.frames != SF_COUNT_MAX;
  TTT_CHECK(!frames_known || in.frames <= limit, name, ": ", in.frames, " frames at ", in.samplerate,
            " Hz is longer than the ", max_seconds, " s limit");
  if (frames_known) clip.pcm.reserve(size_t(std::min<int64_t>(in.frames, int64_t(1) << 24)));

  const int64_t block = std::max<int64_t>(1, 65536 / channels);
  std::vector<float> buf(size_t(block * channels));
  int64_t total = 0;
  for (;;) {
    const sf_count_t got = sf_readf_float(f.sf.get(), buf.data(), block);
    if (got <= 0) break;
    TTT_CHECK(total + got <= limit, name, ": longer than the ", max_seconds, " s limit at ", in.samplerate, " Hz");
    for (sf_count_t t = 0; t < got; ++t) {
      const float* fr = buf.data() + t * channels;
      double s = 0.0;
      for (int64_t c = 0; c < channels; ++c) s += fr[c];
      const double m = s / double(channels);
      if (!std::isfinite(m)) {
        // Find the culprit channel for the message (the mean of finite floats in double is finite).
        int64_t c = 0;
        while (c < channels && std::isfinite(fr[c])) ++c;
        const float bad = c < channels ? fr[c] : float(m);
        fail(name, ": sample ", total + t, " (", double(total + t) / in.samplerate, " s, channel ", c,
             ") is ", std::isnan(bad) ? "NaN" : "infinite", "; the file is corrupt");
      }
      clip.pcm.push_back(float(m));
    }
    total += got;
  }
  if (sf_error(f.sf.get()) != SF_ERR_NO_ERROR)
    fail(name, ": decoding failed after ", total, " frames (libsndfile: ", sf_strerror(f.sf.get()), ")");

  // Truncation before emptiness: a header whose data was cut off entirely is a truncated
  // file, not an empty recording.
  const int major = in.format & SF_FORMAT_TYPEMASK;
  if (frames_known && total < in.frames) {
    // MP3 lengths are estimates when the file has no Xing/Info header: not a truncation.
    if (major == SF_FORMAT_MPEG)
      clip.notes.push_back(str("decoded ", total, " frames; the header estimated ", in.frames));
    else
      fail(name, ": truncated (the header promises ", in.frames, " frames, only ", total, " decode)");
  }
  const int64_t width = fixed_sample_bytes(in.format) * channels;
  const int64_t declared = declared_data_bytes(f.sf.get(), in.format);
  if (declared == -2) {
    clip.notes.push_back(str("the header gives no data length (a streamed file): read the ", total, " frames present"));
  } else if (declared >= 0 && width > 0 && total < declared / width) {
    fail(name, ": truncated (the header declares ", declared / width, " frames, the file holds ", total, ")");
  }
  TTT_CHECK(total > 0, name, ": contains no audio (0 frames)");

  if (channels > 1) clip.notes.push_back(str("downmixed ", channels, " channels to mono (mean)"));
  float peak = 0.f;
  for (float v : clip.pcm) peak = std::max(peak, std::fabs(v));
  // Float files may go past full scale (±1), a little; 60 dB past it is not a recording but
  // random bytes read as floats, and its magnitudes overflow what a resampler or codec computes.
  TTT_CHECK(peak <= kMaxAudioPeak, name, ": samples reach ", peak, ", ", kMaxAudioPeak,
            " times full scale or more (full scale is 1): not a recording, the file is corrupt");
  if (peak > 1.f) clip.notes.push_back(str("peak ", peak, " exceeds full scale (kept as is)"));
  return clip;
}

}  // namespace detail

enum class ResampleQuality {
  high,       // soxr HQ: 20-bit precision, flat to 91.3% of the band. Default.
  very_high,  // soxr VHQ: 28-bit precision, 1.3-1.6x the time.
};

// Streaming sample-rate conversion (soxr, linear phase): push chunks of any size, take what
// comes out, flush at the end. The output of a stream does not depend on how its input was
// chunked (tests/test_audio.cpp checks it bit for bit), and soxr removes its filter's delay:
// output sample k is the input signal at time k / out_rate, so a flushed stream lines up with
// its input and holds round(n * out_rate / in_rate) samples. In a real-time loop the price is
// latency: about delay() output samples are held back until later input (or flush) arrives.
// Equal rates pass samples through untouched. Single-threaded and deterministic: the same
// input gives the same output on a given machine (soxr picks SIMD code by CPU, so the last
// bits may differ between machines).
class Resampler {
 public:
  Resampler(int64_t in_rate, int64_t out_rate, ResampleQuality quality = ResampleQuality::high)
      : in_rate_(in_rate), out_rate_(out_rate), quality_(quality) {
    detail::check_rate("Resampler", "input rate", in_rate);
    detail::check_rate("Resampler", "output rate", out_rate);
    if (in_rate != out_rate) {
      soxr_error_t err = nullptr;
      const auto io = soxr_io_spec(SOXR_FLOAT32_I, SOXR_FLOAT32_I);
      const auto q = soxr_quality_spec(quality == ResampleQuality::high ? SOXR_HQ : SOXR_VHQ, SOXR_LINEAR_PHASE);
      const auto rt = soxr_runtime_spec(1);  // one thread: no OpenMP scheduling in the output
      soxr_.reset(soxr_create(double(in_rate), double(out_rate), 1, &err, &io, &q, &rt));
      if (err || !soxr_) fail("Resampler ", in_rate, " Hz -> ", out_rate, " Hz: soxr_create failed (", soxr_strerror(err), ")");
    }
  }

  int64_t input_rate() const { return in_rate_; }
  int64_t output_rate() const { return out_rate_; }
  ResampleQuality quality() const { return quality_; }
  // Output samples currently held back inside the filter.
  double delay() const { return soxr_ ? soxr_delay(soxr_.get()) : 0.0; }
  static std::string describe(ResampleQuality q) {
    return str("soxr ", q == ResampleQuality::high ? "HQ, 20-bit" : "VHQ, 28-bit", ", linear phase");
  }

  // Appends to `out` everything the next `n` input samples let the filter produce.
  void push(const float* in, int64_t n, std::vector<float>& out) {
    TTT_CHECK(n >= 0 && (n == 0 || in != nullptr), "Resampler::push: bad input (", n, " samples)");
    if (!soxr_) {
      out.insert(out.end(), in, in + n);
      return;
    }
    // soxr takes only as much input as the output room given could hold, so loop until all
    // input is in and the last call left room unused (nothing more to drain).
    int64_t done = 0;
    for (;;) {
      const size_t olen = size_t(std::ceil(double(n - done) * ratio())) + 256;
      const size_t old = out.size();
      out.resize(old + olen);
      size_t idone = 0, odone = 0;
      soxr_error_t err = soxr_process(soxr_.get(), in + done, size_t(n - done), &idone, out.data() + old, olen, &odone);
      out.resize(old + odone);
      if (err) fail("Resampler: soxr_process failed (", err, ")");
      done += int64_t(idone);
      if (done == n && odone < olen) break;
    }
  }
  std::vector<float> push(const float* in, int64_t n) {
    std::vector<float> out;
    push(in, n, out);
    return out;
  }

  // Ends the stream: appends the filter's tail. The resampler is then ready for a new stream.
  void flush(std::vector<float>& out) {
    if (!soxr_) return;
    for (;;) {
      const size_t olen = 4096, old = out.size();
      out.resize(old + olen);
      size_t odone = 0;
      soxr_error_t err = soxr_process(soxr_.get(), nullptr, 0, nullptr, out.data() + old, olen, &odone);
      out.resize(old + odone);
      if (err) fail("Resampler: soxr_process (flush) failed (", err, ")");
      if (odone == 0) break;
    }
    reset();
  }
  std::vector<float> flush() {
    std::vector<float> out;
    flush(out);
    return out;
  }

  // Drops any buffered input: the next push starts a fresh stream.
  void reset() {
    if (soxr_) {
      soxr_error_t err = soxr_clear(soxr_.get());
      if (err) fail("Resampler: soxr_clear failed (", err, ")");
    }
  }

 private:
  double ratio() const { return double(out_rate_) / double(in_rate_); }
  int64_t in_rate_, out_rate_;
  ResampleQuality quality_;
  detail::SoxrPtr soxr_;
};

// One-shot conversion of a whole signal (a flushed Resampler stream).
inline std::vector<float> resample(const float* in, int64_t n, int64_t in_rate, int64_t out_rate,
                                   ResampleQuality quality = ResampleQuality::high) {
  Resampler r(in_rate, out_rate, quality);
  std::vector<float> out;
  out.reserve(size_t(std::ceil(double(n) * double(out_rate) / double(in_rate))) + 16);
  r.push(in, n, out);
  r.flush(out);
  return out;
}

namespace detail {

inline AudioClip finish_clip(const std::string& name, AudioClip clip, int64_t target_rate) {
  if (target_rate == kKeepRate || target_rate == clip.sample_rate) return clip;
  check_rate(name, "target rate", target_rate);
  auto out = resample(clip.pcm.data(), int64_t(clip.pcm.size()), clip.sample_rate, target_rate);
  // A few frames at a high rate round to nothing at a lower one (found by fuzzing: 4 frames
  // at 263 kHz); a clip is never returned empty.
  TTT_CHECK(!out.empty(), name, ": too short: ", clip.pcm.size(), " frames at ", clip.sample_rate,
            " Hz make less than one sample at ", target_rate, " Hz");
  clip.notes.push_back(str("resampled ", clip.sample_rate, " Hz -> ", target_rate, " Hz (",
                           Resampler::describe(ResampleQuality::high), ")"));
  clip.pcm = std::move(out);
  clip.sample_rate = target_rate;
  return clip;
}

}  // namespace detail

// What `path` holds, without decoding the audio.
inline AudioInfo audio_info(const std::string& path) {
  detail::SoundFile f;
  detail::open_path(f, path);
  return detail::info_of(f);
}

// Decodes `path` (any format the system's libsndfile reads) to mono float at `target_rate`
// (kKeepRate: the file's own rate). Several channels are averaged; another rate is converted
// with soxr HQ. Refused, each with one message naming the file: missing, unreadable, a
// directory, empty, not audio, zero channels, a rate outside 1..768 kHz, truncated, no
// frames, NaN or infinite samples, longer than `max_seconds` (a guard against headers that
// claim days of audio).
inline AudioClip read_audio(const std::string& path, int64_t target_rate = kMimiRate, double max_seconds = 4 * 3600.0) {
  if (target_rate != kKeepRate) detail::check_rate(path, "target rate", target_rate);
  detail::SoundFile f;
  detail::open_path(f, path);
  return detail::finish_clip(f.name, detail::decode_mono(f, max_seconds), target_rate);
}

// The same for a file already in memory; `name` is what messages call it.
inline AudioClip read_audio_memory(const void* data, size_t size, const std::string& name,
                                   int64_t target_rate = kMimiRate, double max_seconds = 4 * 3600.0) {
  if (target_rate != kKeepRate) detail::check_rate(name, "target rate", target_rate);
  detail::SoundFile f;
  detail::open_memory(f, data, size, name);
  return detail::finish_clip(f.name, detail::decode_mono(f, max_seconds), target_rate);
}

// Writes mono `pcm` as a WAV file, atomically: the samples go to a temporary file in the same
// directory, which is synced and renamed over `path` only when complete, so a crash or a full
// disk never leaves a partial file under the final name. pcm16 clips samples beyond [-1, 1]
// to full scale (libsndfile's SFC_SET_CLIPPING; without it they would wrap around to the
// opposite sign, a loud click) and reports how many; float32 stores every value exactly.
// NaN or infinite samples are refused before anything is written.
inline WavWriteReport write_wav(const std::string& path, const float* pcm, int64_t n, int64_t rate,
                                WavEncoding encoding = WavEncoding::pcm16) {
  TTT_CHECK(n >= 0 && (n == 0 || pcm != nullptr), path, ": cannot write ", n, " samples");
  detail::check_rate(path, "sample rate", rate);
  WavWriteReport rep;
  rep.samples = n;
  for (int64_t i = 0; i < n; ++i) {
    const float v = pcm[i];
    if (!std::isfinite(v))
      fail(path, ": refusing to write: sample ", i, " (", double(i) / double(rate), " s) is ",
           std::isnan(v) ? "NaN" : "infinite");
    const float a = std::fabs(v);
    rep.peak = std::max(rep.peak, a);
    rep.over_full_scale += a > 1.f;
  }
  rep.clipped = encoding == WavEncoding::pcm16 ? rep.over_full_scale : 0;
  struct stat st {};
  TTT_CHECK(!(::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)), path, ": is a directory");

  // pid + counter: two threads (or processes) writing the same path never share a temporary.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp = str(path, ".tmp.", ::getpid(), ".", counter++);
  detail::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666));
  if (fd.fd < 0) fail(path, ": cannot write (", std::strerror(errno), ")");
  auto abandon = [&](const std::string& why) {
    ::close(fd.fd);
    fd.fd = -1;
    std::remove(tmp.c_str());
    fail(path, ": write failed (", why, ")");
  };

  SF_INFO info{};
  info.samplerate = int(rate);
  info.channels = 1;
  info.format = SF_FORMAT_WAV | (encoding == WavEncoding::pcm16 ? SF_FORMAT_PCM_16 : SF_FORMAT_FLOAT);
  detail::SndfilePtr sf(sf_open_fd(fd.fd, SFM_WRITE, &info, SF_FALSE));
  if (!sf) abandon(detail::sf_open_error());
  sf_command(sf.get(), SFC_SET_CLIPPING, nullptr, SF_TRUE);
  int64_t written = 0;
  while (written < n) {
    const sf_count_t chunk = sf_count_t(std::min<int64_t>(n - written, int64_t(1) << 20));
    const sf_count_t w = sf_writef_float(sf.get(), pcm + written, chunk);
    if (w != chunk) {
      const std::string why = sf_strerror(sf.get());
      sf.reset();
      abandon(why);
    }
    written += w;
  }
  // sf_close writes the final header sizes; its status is the last chance to see a failure.
  const int closed = sf_close(sf.release());
  if (closed != SF_ERR_NO_ERROR) abandon(sf_error_number(closed));
  if (::fsync(fd.fd) != 0) abandon(std::strerror(errno));
  const int c = ::close(fd.fd);
  fd.fd = -1;
  if (c != 0 || std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    fail(path, ": write failed (", std::strerror(e), ")");
  }
  return rep;
}

inline WavWriteReport write_wav(const std::string& path, const std::vector<float>& pcm, int64_t rate,
                                WavEncoding encoding = WavEncoding::pcm16) {
  return write_wav(path, pcm.data(), int64_t(pcm.size()), rate, encoding);
}

inline WavWriteReport write_wav(const std::string& path, const AudioClip& clip, WavEncoding encoding = WavEncoding::pcm16) {
  return write_wav(path, clip.pcm, clip.sample_rate, encoding);
}

}  // namespace ttt::io
