// Errors. Two kinds, because the exit code tells scripts who is at fault:
//   InputError    — the user's file, config, flag or request is wrong (exit 2);
//   InternalError — a bug or an environment failure on our side (exit 1).
// Messages name the thing (file, tensor, field, flag), where it is, and what was expected.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace dsv3 {

struct InputError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct InternalError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// cat(a, b, c): stream every argument into one string (g++ 12 has no <format>).
template <class... A>
std::string cat(A&&... a) {
  std::ostringstream s;
  (s << ... << std::forward<A>(a));
  return s.str();
}

template <class... A>
[[noreturn]] void input_error(A&&... a) {
  throw InputError(cat(std::forward<A>(a)...));
}
template <class... A>
[[noreturn]] void internal_error(A&&... a) {
  throw InternalError(cat(std::forward<A>(a)...));
}

// DSV3_CHECK(cond, msg...): an internal invariant; failing it is a bug, not bad input.
#define DSV3_CHECK(cond, ...)                                                                \
  do {                                                                                     \
    if (!(cond)) ::dsv3::internal_error(__FILE__, ":", __LINE__, ": check failed: " #cond, \
                                        " " __VA_OPT__(, ) __VA_ARGS__);                   \
  } while (0)

// Checked arithmetic for every size read from a file: an overflow is the file's fault.
bool mul_overflows(unsigned long long a, unsigned long long b, unsigned long long* out);
bool add_overflows(unsigned long long a, unsigned long long b, unsigned long long* out);

}  // namespace dsv3
