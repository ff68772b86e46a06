// serve::ConversationBatch on the CUDA backend, frames captured into CUDA graphs and replayed
// (the LM's and Mimi's; the per-row sampling parameters and exec mask reach a replayed graph
// through device memory): the slot-independence and resume scenario of test_conversation
// (tokens exact; audio bitwise in a batch of one, to float rounding across batch shapes),
// plain attention and the TTT designs, and the same conversation on the CPU and on CUDA
// compared (greedy: the tokens follow the logits, whose CPU / CUDA difference is rounding).
// Exits 77 ("skipped") without a GPU.
#include <cstdio>

#define CATCH_CONFIG_RUNNER  // Catch2 v2: this file provides main (v3 ignores it)
#include "catch.hpp"
#if TTT_CATCH3
#include <catch2/catch_session.hpp>
#endif
#include "conversation_helpers.hpp"
#include "ttt/cuda.hpp"
#include "ttt/ttt.hpp"

using namespace ttt;
using namespace conversation_test;

TEST_CASE("CUDA: a conversation is independent of its slot and resumes exactly (plain attention)",
          "[conversation_cuda]") {
  auto e = engine<Cuda>("small.json");
  slot_and_resume(*e, "cuda attention", 1e-4);
}

TEST_CASE("CUDA: a conversation is independent of its slot and resumes exactly (TTT designs)",
          "[conversation_cuda][ttt]") {
  auto e = engine<Cuda>("small_ttt.json");
  slot_and_resume(*e, "cuda ttt", 1e-4);
}

TEST_CASE("CUDA and CPU give one greedy conversation the same tokens", "[conversation_cuda]") {
  auto ec = engine<Cpu>("small.json");
  auto ed = engine<Cuda>("small.json");
  auto o = opts(3);
  o.use_sampling = false;
  const int64_t N = 12;
  const Track c = alone(*ec, 2, o, N), d = alone(*ed, 2, o, N);
  REQUIRE(c.size() == d.size());
  int64_t text_diff = 0, audio_diff = 0;
  for (size_t f = 0; f < c.size(); ++f) {
    text_diff += c[f].text != d[f].text;
    audio_diff += c[f].audio != d[f].audio;
  }
  std::printf("[cuda vs cpu] greedy conversation, %lld frames: %lld text and %lld audio frames differ\n",
              (long long)N, (long long)text_diff, (long long)audio_diff);
  CHECK(text_diff == 0);
  CHECK(audio_diff == 0);
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("test_cuda_conversation: skipped, no CUDA device available\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
