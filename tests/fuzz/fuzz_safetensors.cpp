// libFuzzer target: the safetensors reader on arbitrary bytes. Every input must either
// parse (and every tensor then load) or throw ttt::Error; anything else is a bug.
#include <cstddef>
#include <cstdint>

#include "ttt/io/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    auto st = ttt::io::SafeTensors::from_bytes(data, size, "fuzz.safetensors");
    for (const auto& t : st.tensors()) {
      const bool fl = t.dtype == ttt::DType::f32 || t.dtype == ttt::DType::f64 || t.dtype == ttt::DType::bf16 ||
                      t.dtype == ttt::DType::f16;
      if (fl) {
        auto x = st.load<float>(t.name);
        volatile float sink = x.numel() ? x.data()[x.numel() - 1] : 0.f;
        (void)sink;
      } else {
        auto x = st.load<int64_t>(t.name);
        volatile int64_t sink = x.numel() ? x.data()[x.numel() - 1] : 0;
        (void)sink;
      }
    }
  } catch (const ttt::Error&) {
  }
  return 0;
}
