// serve::ConversationBatch on the CUDA backend, frames captured into CUDA graphs and replayed
// (the LM's and Mimi's; the per-row sampling parameters and exec mask reach a replayed graph
// through device memory): the slot-independence and resume scenario of test_conversation
// (tokens exact; audio bitwise in a batch of one, to float rounding across batch shapes),
// plain attention and the TTT designs, and the same conversation on the CPU and on CUDA
// compared (greedy: the tokens follow the logits, whose CPU / CUDA difference is rounding).
// Also what `ttt-moshi serve --devices 0,0` relies on: engines on threads of their own, each
// with its own stream (and the caching allocator keeping a stream's freed blocks to it).
// Exits 77 ("skipped") without a GPU.
#include <cstdio>
#include <string>
#include <thread>

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

TEST_CASE("CUDA caching allocator: a freed block goes back to its own stream only", "[conversation_cuda][devices]") {
  const size_t n = size_t(3) << 20;
  void* mine = nullptr;
  {
    auto p = Memory<Cuda>::allocate(n);
    mine = p.get();
  }  // freed: cached for this thread's stream
  void* other = nullptr;
  cudaStream_t other_stream = nullptr;
  std::string error;
  std::thread t([&] {
    try {
      cuda::set_device(0);
      other_stream = cuda::Context::get().stream();
      auto q = Memory<Cuda>::allocate(n);  // another stream: must not get `mine` (it may still be in use there)
      other = q.get();
    } catch (const std::exception& e) {
      error = e.what();
    }
  });
  t.join();
  REQUIRE(error.empty());
  CHECK(other_stream != cuda::Context::get().stream());
  CHECK(other != mine);
  auto again = Memory<Cuda>::allocate(n);
  CHECK(again.get() == mine);  // the same stream reuses it
  CHECK(cuda::Context::get().device() == 0);
  std::string msg;
  try {
    cuda::set_device(cuda::device_count());
  } catch (const Error& e) {
    msg = e.what();
  }
  CHECK(msg.find("does not exist") != std::string::npos);
}

TEST_CASE("CUDA: engines on two threads of one GPU (serve --devices 0,0) give each conversation its reply alone",
          "[conversation_cuda][devices]") {
  const int64_t N = 12;
  const serve::ConversationOptions o[2] = {opts(5), opts(6)};
  Track want[2];
  {
    auto e = engine<Cuda>("small.json");
    for (int i = 0; i < 2; ++i) want[i] = alone(*e, i + 1, o[i], N);
  }
  Track got[2];
  std::string error[2];
  cudaStream_t stream[2] = {nullptr, nullptr};
  auto run = [&](int i) {
    try {
      cuda::set_device(0);  // as serve's engine threads: the device first, then the engine's own model copy
      auto e = engine<Cuda>("small.json");
      stream[i] = cuda::Context::get().stream();
      for (int rep = 0; rep < 2; ++rep) got[i] = alone(*e, i + 1, o[i], N);  // the second run reuses freed blocks
    } catch (const std::exception& x) {
      error[i] = x.what();
    }
  };
  std::thread a(run, 0), b(run, 1);  // at the same time: the two streams interleave on the GPU
  a.join();
  b.join();
  for (int i = 0; i < 2; ++i) {
    INFO("engine thread " << i);
    REQUIRE(error[i].empty());
    check_same(got[i], want[i], 0, "engine thread vs the main thread", true);
  }
  CHECK(stream[0] != stream[1]);
}

int main(int argc, char** argv) {
  if (!cuda::device_available()) {
    std::printf("test_cuda_conversation: skipped, no CUDA device available\n");
    return 77;
  }
  return Catch::Session().run(argc, argv);
}
