// libFuzzer target: read_audio on arbitrary bytes (libsndfile's decoders for every format it
// knows, then our checks, downmix and soxr). Every input must either decode to finite mono
// samples at 24 kHz or throw ttt::Error; anything else is a bug. Whatever decodes is also
// streamed through a Resampler in chunks the input picks, which must equal the one-shot
// result bit for bit.
//
// libsndfile and libsoxr are the system's (not instrumented): coverage guides the fuzzer
// through our layer, and a crash inside a library still shows up. Seeds (corpus/audio): one
// short file per container and encoding, made with sox and libsndfile (see docs/audio.md).
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "ttt/io/audio.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  ttt::io::AudioClip clip;
  try {
    // 10 s: a fuzzed FLAC or Ogg header can describe hours of audio in a few bytes.
    clip = ttt::io::read_audio_memory(data, size, "fuzz.wav", ttt::io::kMimiRate, 10.0);
  } catch (const ttt::Error&) {
    return 0;
  }
  if (clip.pcm.empty() || clip.sample_rate != ttt::io::kMimiRate) std::abort();
  for (float v : clip.pcm)
    if (!std::isfinite(v)) std::abort();

  // 24 kHz -> 16 kHz, one-shot against chunks sized by the input's bytes.
  const auto ref = ttt::io::resample(clip.pcm.data(), int64_t(clip.pcm.size()), 24000, 16000);
  ttt::io::Resampler r(24000, 16000);
  std::vector<float> out;
  size_t done = 0, k = 0;
  while (done < clip.pcm.size()) {
    const size_t len = std::min(clip.pcm.size() - done, size_t(data[k++ % size]) * 37 + 1);
    r.push(clip.pcm.data() + done, int64_t(len), out);
    done += len;
  }
  r.flush(out);
  if (out != ref) std::abort();
  return 0;
}
