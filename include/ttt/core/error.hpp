#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace ttt {

// Every failure the library reports to a user is a ttt::Error whose message names the
// file, key or argument at fault and the problem: callers print what() and exit.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

// Concatenates anything printable; gcc 12 (CI's compiler) has no <format>.
template <class... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(str(std::forward<Args>(args)...));
}

}  // namespace ttt

// Argument checks that stay on in release builds: a bad shape from a user's file must
// never become an out-of-bounds access.
#define TTT_CHECK(cond, ...)                       \
  do {                                             \
    if (!(cond)) ::ttt::fail(__VA_ARGS__);         \
  } while (0)
