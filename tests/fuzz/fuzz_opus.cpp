// libFuzzer target: OpusStreamReader on arbitrary bytes (libogg's page sync and stream
// reassembly, our header and granule checks, libopus's decoder). Every input must either decode
// to finite samples or throw ttt::Error; anything else is a bug. The input is fed twice, whole
// and in chunks whose sizes the input picks: the two must agree exactly (same samples, same
// error message or none), since a WebSocket splits the stream anywhere.
//
// Then the same bytes, read as 16-bit PCM (at most 0.25 s), go through OpusStreamWriter with
// options the input picks, and back through a reader: that must decode without an error to
// exactly as many samples.
//
// libopus and libogg are the system's (not instrumented): coverage guides the fuzzer through our
// layer, and a crash inside a library still shows up. Seeds (corpus/opus): short streams from our
// writer, Kyutai's sphn and libsndfile (see docs/audio.md).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "ttt/io/opus_stream.hpp"

namespace {

struct Result {
  std::vector<float> pcm;
  std::string error;
};

ttt::io::OpusReaderOptions reader_options() {
  ttt::io::OpusReaderOptions o;
  o.max_pending_seconds = 5;  // a few hundred bytes can decode to minutes: keep each run short
  return o;
}

// chunked: in pieces of 1..97 bytes, sizes taken from the input itself.
Result read(const uint8_t* data, size_t size, bool chunked) {
  Result r;
  ttt::io::OpusStreamReader reader(reader_options());
  try {
    if (!chunked) {
      reader.append_bytes(data, size);
    } else {
      size_t done = 0, k = 0;
      while (done < size) {
        const size_t len = std::min(size - done, size_t(data[k++ % size]) % 97 + 1);
        reader.append_bytes(data + done, len);
        done += len;
      }
    }
    reader.finish();
  } catch (const ttt::Error& e) {
    r.error = e.what();
    if (!reader.failed()) std::abort();
  }
  reader.read_pcm(r.pcm);
  if (int64_t(r.pcm.size()) != reader.samples_out()) std::abort();
  if (r.pcm.size() > size_t(5 * 24000)) std::abort();
  return r;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Result whole = read(data, size, false);
  const Result chunked = read(data, size, true);
  if (whole.error != chunked.error || whole.pcm != chunked.pcm) std::abort();
  for (float v : whole.pcm)
    if (!std::isfinite(v)) std::abort();

  // Writer -> reader on the bytes as PCM.
  if (size >= 4) {
    ttt::io::OpusWriterOptions o;
    static const int frame_ms[] = {10, 20, 40, 60};
    o.frame_ms = frame_ms[data[0] & 3];
    o.application = static_cast<ttt::io::OpusApplication>((data[0] >> 2) % 3);
    o.bitrate = 6000 + int(data[1]) * 1976;  // up to 509,880 bits/s
    o.vbr = data[0] & 0x20;
    o.complexity = data[2] % 11;
    o.frames_per_page = data[3] % 4 + 1;
    std::vector<float> pcm;
    for (size_t i = 4; i + 1 < size && pcm.size() < 6000; i += 2)
      pcm.push_back(float(int16_t(uint16_t(data[i] | (data[i + 1] << 8)))) / 32768.f);
    ttt::io::OpusStreamWriter w(o);
    w.append_pcm(pcm);
    w.finish();
    const auto bytes = w.read_bytes();
    ttt::io::OpusStreamReader r;
    r.append_bytes(bytes);  // throws (and so crashes the fuzzer) on any error
    r.finish();
    if (!r.ended() || r.read_pcm().size() != pcm.size()) std::abort();
  }
  return 0;
}
