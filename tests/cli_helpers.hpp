#pragma once
// Running the command-line tools from tests: exit code, stdout and stderr.
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

struct CliRun {
  int code = -1;
  std::string out, err;
};

inline std::string slurp(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// Runs `tool args` from build/bin with stdout and stderr captured.
inline CliRun run_tool(const std::string& args) {
  // Per-process capture files: CTest runs the CLI tests in parallel.
  const std::string tag = std::to_string(::getpid());
  const std::string o = "cli_stdout." + tag + ".txt", e = "cli_stderr." + tag + ".txt";
  const std::string cmd = std::string(TTT_BIN_DIR) + "/" + args + " > " + o + " 2> " + e;
  CliRun r;
  const int st = std::system(cmd.c_str());
  r.code = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = slurp(o);
  r.err = slurp(e);
  std::remove(o.c_str());
  std::remove(e.c_str());
  return r;
}

inline bool file_exists(const std::string& p) { return std::ifstream(p).good(); }
