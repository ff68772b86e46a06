// ttt-moshi: the streaming Moshi engine from the command line.
//   forward   teacher-forced LMModel.forward over a codes file
//   generate  streaming generation (LMGen), printing progress (and text with --tokenizer)
//   info      the model's structure, parameter count, bytes and a checkpoint key check
//   bench     (CUDA) frame time on random weights made on the device
//   mimi      Kyutai's Mimi codec: fixture format, or encode / decode between WAV and codes
//   converse  a spoken conversation: user WAV -> Mimi -> Moshi -> Mimi -> reply WAV
//   quantize  a checkpoint with int8 / fp8 linear weights (per-row scales)
//   serve     real-time conversations over WebSocket (Kyutai's protocol), batched
// This file only dispatches: a subcommand is one file (commands.hpp), one line of the table
// below and one source line in examples/CMakeLists.txt.
#include <cstdio>
#include <cxxopts.hpp>
#include <exception>
#include <string>

#include "commands.hpp"
#include "ttt/core/error.hpp"

namespace {

struct Command {
  const char* name;
  const char* synopsis;  // the usage line(s): '\n' starts a continuation line
  int (*run)(int argc, char** argv);
};

const Command commands[] = {
    {"forward", "--config C --weights W --codes IN --out OUT [--backend cpu|cuda] [--dtype f32|bf16|fp8|int8]",
     ttt_moshi::cmd_forward},
    {"generate",
     "[--config C] [--weights W] [--user-codes IN] [--steps N] [--batch B] [--greedy] [--seed S]\n"
     "[--temp X] [--temp-text X] [--top-k K] [--top-k-text K] [--tokenizer SPM]\n"
     "[--save-session F] [--resume F] --out OUT",
     ttt_moshi::cmd_generate},
    {"info", "[--config C] [--weights W]", ttt_moshi::cmd_info},
    {"bench", "[--preset 7b | --config C] [--batch N] [--frames N] [--dtype bf16|fp8|int8] [--backend cuda] [--mimi]",
     ttt_moshi::cmd_bench},
    {"mimi",
     "[encode|decode] --in IN --out OUT [--config MIMI_CFG] [--weights MIMI_W] [--backend cpu|cuda]\n"
     "[--dtype f32|bf16]",
     ttt_moshi::cmd_mimi},
    {"converse",
     "[--input USER.wav] --out REPLY.wav [--config C] [--weights W] [--mimi-config M]\n"
     "[--mimi-weights MW] [--tokenizer SPM] [--tail S] [--backend cpu|cuda] [--dtype f32|bf16|fp8|int8]",
     ttt_moshi::cmd_converse},
    {"quantize", "--weights W --dtype int8|fp8 --out OUT", ttt_moshi::cmd_quantize},
    {"serve",
     "[--config C] [--weights W] [--mimi-config M] [--mimi-weights MW] [--tokenizer SPM]\n"
     "[--host H] [--port P] [--max-sessions N] [--session-dir D] [--auth-token T] [--static-dir D]",
     ttt_moshi::cmd_serve},
};

int usage() {
  std::fprintf(stderr, "usage: ttt-moshi <command> [options]\n");
  for (const Command& c : commands) {
    std::fprintf(stderr, "  %-9s ", c.name);
    for (const char* p = c.synopsis; *p; ++p) {
      std::fputc(*p, stderr);
      if (*p == '\n') std::fprintf(stderr, "%12s", "");
    }
    std::fputc('\n', stderr);
  }
  std::fprintf(stderr, "Run `ttt-moshi <command> --help` for the options of a command.\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  const std::string cmd = argv[1];
  if (cmd == "-h" || cmd == "--help" || cmd == "help") {
    usage();
    return 0;
  }
  for (const Command& c : commands) {
    if (cmd != c.name) continue;
    try {
      return c.run(argc - 1, argv + 1);
    } catch (const ttt::Error& e) {
      std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
      return 1;
    } catch (const cxxopts::exceptions::exception& e) {
      std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
      return 2;
    } catch (const std::exception& e) {
      std::fprintf(stderr, "ttt-moshi %s: error: %s\n", cmd.c_str(), e.what());
      return 1;
    }
  }
  std::fprintf(stderr, "ttt-moshi: unknown command '%s'\n", cmd.c_str());
  return usage();
}
