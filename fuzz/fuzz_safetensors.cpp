// libFuzzer target: any bytes as a .safetensors file (length, JSON header, data). The reader must
// return its tensors or throw qkv::Error; anything else is a bug.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "qkv/error.hpp"
#include "qkv/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  std::istringstream in(std::string(reinterpret_cast<const char*>(data), size));
  try {
    const qkv::NamedTensors tensors = qkv::read_safetensors(in, size, "fuzz.safetensors");
    std::size_t bytes = 0;
    for (const auto& [name, tensor] : tensors) bytes += tensor.nbytes();
    if (bytes > size) __builtin_trap();  // the tensors are the file's own bytes, never more
  } catch (const qkv::Error&) {
  }
  return 0;
}
