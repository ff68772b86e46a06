#pragma once
// Shared pieces of the Mimi tests (CPU and CUDA): a fixture case of Kyutai's Mimi
// (tests/data/fixtures/mimi/<case>, float64 reference) run through our model.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "catch.hpp"
#include "ttt/io/safetensors.hpp"
#include "ttt/io/weight_source.hpp"
#include "ttt/mimi/mimi.hpp"

namespace mimi_test {

using namespace ttt;

inline std::string fixture_dir(const std::string& name) { return std::string(TTT_TEST_DATA) + "/fixtures/mimi/" + name; }

// max |a - ref| / max(1e-30, max |ref|).
inline double rel_err(const Tensor<float, Cpu>& a, const Tensor<float, Cpu>& ref) {
  REQUIRE(a.shape() == ref.shape());
  const auto av = a.contiguous(), rv = ref.contiguous();
  double m = 0, r = 0;
  for (int64_t i = 0; i < av.numel(); ++i) {
    m = std::max(m, std::abs(double(av.data()[i]) - double(rv.data()[i])));
    r = std::max(r, std::abs(double(rv.data()[i])));
  }
  return m / std::max(r, 1e-30);
}

inline int64_t mismatches(const Tensor<int64_t, Cpu>& a, const Tensor<int64_t, Cpu>& ref) {
  REQUIRE(a.shape() == ref.shape());
  const auto av = a.contiguous(), rv = ref.contiguous();
  int64_t n = 0;
  for (int64_t i = 0; i < av.numel(); ++i) n += av.data()[i] != rv.data()[i];
  return n;
}

struct Case {
  std::string dir;
  mimi::MimiConfig cfg;
  io::SafeTensors io;
  Tensor<float, Cpu> pcm, latent, decoded, decoded_stream;
  Tensor<int64_t, Cpu> codes, codes_stream;

  explicit Case(const std::string& name)
      : dir(fixture_dir(name)),
        cfg(mimi::MimiConfig::load(dir + "/config.json")),
        io(io::SafeTensors::open(dir + "/io.safetensors")) {
    pcm = io.load<float>("pcm").contiguous();
    latent = io.load<float>("latent").contiguous();
    decoded = io.load<float>("decoded").contiguous();
    decoded_stream = io.load<float>("decoded_stream").contiguous();
    codes = io.load<int64_t>("codes").contiguous();
    codes_stream = io.load<int64_t>("codes_stream").contiguous();
  }
  // The model with every checkpoint key used (an unused key would mean a weight we ignore).
  template <class T, class B>
  mimi::Mimi<T, B> model() const {
    io::WeightSource ws(dir + "/model.safetensors");
    auto m = mimi::Mimi<T, B>::load(cfg, ws);
    const auto unused = ws.unused();
    INFO("unused checkpoint keys: " << unused.size() << (unused.empty() ? "" : " (first: " + unused[0] + ")"));
    CHECK(unused.empty());
    return m;
  }
};

struct Errors {
  int64_t codes = 0, codes_stream = 0;
  double latent = 0, decoded = 0, decoded_stream = 0;
};

// Whole-sequence encode / decode and one-frame-per-call streaming, as the fixture made them.
template <class T, class B>
Errors run_case(const Case& c) {
  const auto m = c.model<T, B>();
  Errors e;
  const auto pcm = nn::to_backend<B>(ops::cast<T>(c.pcm));
  const auto latent = m.encode_latent(pcm);
  e.latent = rel_err(ops::cast<float>(latent).template to<Cpu>(), c.latent);
  e.codes = mismatches(m.encode(pcm).template to<Cpu>(), c.codes);
  e.decoded = rel_err(ops::cast<float>(m.decode(nn::to_backend<B>(c.codes))).template to<Cpu>(), c.decoded);

  const int64_t Bn = c.pcm.size(0), S = c.pcm.size(2), fs = m.frame_size(), F = S / fs;
  auto s = m.start(Bn);
  auto codes = Tensor<int64_t, Cpu>::empty(c.codes_stream.shape());
  auto pcm2 = c.pcm.reshape({Bn, S});
  for (int64_t f = 0; f < F; ++f)
    codes.slice(2, f, f + 1).copy_from(m.encode_step(s, pcm2.slice(1, f * fs, (f + 1) * fs).contiguous()));
  e.codes_stream = mismatches(codes, c.codes_stream);
  auto ds = m.start(Bn);
  auto audio = Tensor<float, Cpu>::empty({Bn, F * fs});
  for (int64_t f = 0; f < F; ++f)
    audio.slice(1, f * fs, (f + 1) * fs).copy_from(m.decode_step(ds, c.codes.slice(2, f, f + 1).contiguous()));
  e.decoded_stream = rel_err(audio.reshape({Bn, 1, F * fs}), c.decoded_stream);
  return e;
}

// Both fixture cases in fp32 on backend B: codes identical, latent and audio within 1e-5 of the
// largest reference value, whole-sequence and one frame per call; a line per case.
template <class B>
void check_fixtures(const char* tag) {
  for (const char* name : {"mimi_tiny", "mimi_real_strides"}) {
    const Case c(name);
    const auto e = run_case<float, B>(c);
    std::printf("[mimi %s f32] %-18s codes %lld/%lld wrong, stream codes %lld wrong, latent %.2e, decoded %.2e, "
                "decoded_stream %.2e\n",
                tag, name, (long long)e.codes, (long long)c.codes.numel(), (long long)e.codes_stream, e.latent,
                e.decoded, e.decoded_stream);
    INFO(name);
    CHECK(e.codes == 0);
    CHECK(e.codes_stream == 0);
    CHECK(e.latent <= 1e-5);
    CHECK(e.decoded <= 1e-5);
    CHECK(e.decoded_stream <= 1e-5);
  }
}

}  // namespace mimi_test
