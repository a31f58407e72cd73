// libFuzzer target: any bytes as a .npy file. The reader must return a tensor or throw qkv::Error;
// a crash, a hang, a sanitizer report or an allocation past libFuzzer's limit is a bug.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "qkv/error.hpp"
#include "qkv/npy.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const qkv::Tensor tensor = qkv::read_npy(in, size, "fuzz.npy");
    // A tensor that came back must describe exactly the bytes that followed its header.
    if (tensor.nbytes() > size) __builtin_trap();
  } catch (const qkv::Error&) {
  }
  return 0;
}
