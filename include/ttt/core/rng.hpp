#pragma once
// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011). A draw depends only
// on (seed, counter, index), never on thread order, so the CPU and CUDA backends sample
// the same token from the same logits, and a session's RNG state is two integers.
#include <cmath>
#include <cstdint>

#include "ttt/config.hpp"

namespace ttt {

struct Philox {
  TTT_HD static inline void mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
    uint64_t p = uint64_t(a) * uint64_t(b);
    hi = uint32_t(p >> 32);
    lo = uint32_t(p);
  }
  // Returns 4 random words for the 128-bit counter (c0..c3) under the 64-bit key.
  TTT_HD static inline void generate(uint32_t c[4], uint32_t k0, uint32_t k1) {
    for (int r = 0; r < 10; ++r) {
      uint32_t hi0, lo0, hi1, lo1;
      mulhilo(0xD2511F53u, c[0], hi0, lo0);
      mulhilo(0xCD9E8D57u, c[2], hi1, lo1);
      uint32_t n0 = hi1 ^ c[1] ^ k0, n1 = lo1, n2 = hi0 ^ c[3] ^ k1, n3 = lo0;
      c[0] = n0;
      c[1] = n1;
      c[2] = n2;
      c[3] = n3;
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
  }
  // Uniform in (0, 1): never 0, so -log(u) is finite.
  TTT_HD static inline float uniform(uint64_t seed, uint64_t counter, uint64_t index) {
    uint32_t c[4] = {uint32_t(index), uint32_t(index >> 32), uint32_t(counter), uint32_t(counter >> 32)};
    generate(c, uint32_t(seed), uint32_t(seed >> 32));
    return (float(c[0] >> 8) + 0.5f) * (1.0f / 16777216.0f);
  }
  // Exp(1) variate.
  TTT_HD static inline float exponential(uint64_t seed, uint64_t counter, uint64_t index) {
    return -logf(uniform(seed, counter, index));
  }
};

}  // namespace ttt
