// Mimi on the CUDA backend against Kyutai's float64 reference (tests/data/fixtures/mimi):
// fp32 codes identical and audio / latent within 1e-5, whole-sequence and streaming (the
// streaming frames replay CUDA graphs after the first two); the same session on CUDA and on
// the CPU in step; bf16 measured against fp32 (its noise). Exits 77 ("skipped") without a GPU.
#include <cstdio>

#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file provides main (v3 ignores it)
#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_session.hpp>
#endif
#include "mimi_helpers.hpp"
#include "ttt/cuda.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using mimi_test::Case;

TEST_CASE("CUDA Mimi reproduces Kyutai's float64 reference", "[mimi_cuda]") {
  mimi_test::check_fixtures<Cuda>("cuda");
}

TEST_CASE("CUDA Mimi streams in step with the CPU over a long stream (graphs replayed)", "[mimi_cuda]") {
  // Kyutai's layout at small widths; 150 frames of random audio (300 transformer steps: the
  // KV rings of 250 wrap) through both backends, the CUDA frames replaying graphs.
  const Case c("mimi_real_strides");
  const auto mc = c.model<float, Cpu>();
  const auto md = c.model<float, Cuda>();
  const int64_t fs = mc.frame_size(), F = 150;
  auto sc = mc.start(2), dsc = mc.start(2);
  auto sd = md.start(2), dsd = md.start(2);
  uint64_t x = 7;
  int64_t wrong = 0;
  double audio_err = 0;
  for (int64_t f = 0; f < F; ++f) {
    auto pcm = Tensor<float, Cpu>::empty({2, fs});
    for (int64_t i = 0; i < pcm.numel(); ++i)
      pcm.data()[i] = 0.3f * (float(io::detail::splitmix64(x) % 20001) / 10000.f - 1.f);
    const auto cc = mc.encode_step(sc, pcm), cd = md.encode_step(sd, pcm);
    wrong += mimi_test::mismatches(cd, cc);
    const auto yc = mc.decode_step(dsc, cc), yd = md.decode_step(dsd, cc);
    audio_err = std::max(audio_err, mimi_test::rel_err(yd, yc));
  }
  std::printf("[mimi cuda f32] 150 streamed frames x 2 items: %lld codes differ from the CPU, decoded audio %.2e\n",
              (long long)wrong, audio_err);
  CHECK(wrong == 0);
  CHECK(audio_err <= 1e-5);
}

TEST_CASE("CUDA Mimi in bf16 against fp32 (bf16 noise)", "[mimi_cuda][bf16]") {
  for (const char* name : {"mimi_tiny", "mimi_real_strides"}) {
    const Case c(name);
    const auto m32 = c.model<float, Cuda>();
    const auto m16 = c.model<bf16, Cuda>();
    const auto pcm = c.pcm.to<Cuda>();
    const auto l32 = m32.encode_latent(pcm).to<Cpu>();
    const auto l16 = ops::cast<float>(m16.encode_latent(ops::cast<bf16>(pcm))).to<Cpu>();
    const auto c32 = m32.encode(pcm).to<Cpu>(), c16 = m16.encode(ops::cast<bf16>(pcm)).to<Cpu>();
    const auto codes = c.codes.to<Cuda>();
    const auto d32 = m32.decode(codes).to<Cpu>(), d16 = ops::cast<float>(m16.decode(codes)).to<Cpu>();
    const double el = mimi_test::rel_err(l16, l32), ed = mimi_test::rel_err(d16, d32);
    const int64_t wrong = mimi_test::mismatches(c16, c32);
    std::printf("[mimi cuda bf16] %-18s latent %.2e, decoded %.2e (vs fp32, relative to max), codes %lld/%lld differ\n",
                name, el, ed, (long long)wrong, (long long)c32.numel());
    INFO(name);
    // bf16 keeps 8 bits of mantissa: a relative error of a few 1e-3 per op, compounding over
    // ~30 layers. Bounds at about 5x what was measured on an H200.
    CHECK(el <= 0.05);
    CHECK(ed <= 0.05);
  }
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("test_cuda_mimi: skipped, no CUDA device available\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
