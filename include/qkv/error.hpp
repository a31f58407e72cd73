// qkv::Error — the one exception type qkv throws for bad input.
#pragma once

#include <stdexcept>
#include <string>

namespace qkv {

// Thrown for every bad input: wrong shapes, strides, dtypes, parameter sizes, sizes whose product
// overflows, malformed files. The message names the argument, what was expected and what was
// given, in one line, e.g. "k: expected Dk == Dq = 64 for score 'dot', got Dk = 32".
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

}  // namespace qkv
