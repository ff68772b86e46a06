#pragma once
// The subcommands of ttt-moshi, one file each. An entry gets the arguments after
// `ttt-moshi`: argv[0] is the subcommand's name, the options follow. It returns the exit
// status and throws for errors (main prints them as one line and exits non-zero).
namespace ttt_moshi {

int cmd_forward(int argc, char** argv);   // forward.cpp
int cmd_generate(int argc, char** argv);  // generate.cpp
int cmd_info(int argc, char** argv);      // info.cpp
int cmd_bench(int argc, char** argv);     // bench.cpp
int cmd_mimi(int argc, char** argv);      // mimi.cpp
int cmd_converse(int argc, char** argv);  // converse.cpp
int cmd_quantize(int argc, char** argv);  // quantize.cpp
int cmd_serve(int argc, char** argv);     // serve.cpp (+ serve_server.cpp)

}  // namespace ttt_moshi
