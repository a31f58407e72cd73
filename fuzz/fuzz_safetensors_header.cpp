// libFuzzer target: the JSON header of a .safetensors file. The input is the header text; the
// target frames it with its length and the data its entries could claim, so that the fuzzer's
// effort goes into the JSON parser and the checks of every entry, not into the framing.
#include <cstddef>
#include <cstdint>
#include <sstream>
#include <string>

#include "qkv/error.hpp"
#include "qkv/safetensors.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  constexpr std::size_t kDataBytes = 64;  // room for a few small tensors after the header
  std::string file(8, '\0');
  for (int b = 0; b < 8; ++b) file[b] = static_cast<char>((size >> (8 * b)) & 0xff);
  file.append(reinterpret_cast<const char*>(data), size);
  file.append(kDataBytes, '\x01');
  std::istringstream in(file);
  try {
    const qkv::NamedTensors tensors = qkv::read_safetensors(in, file.size(), "fuzz.safetensors");
    std::size_t bytes = 0;
    for (const auto& [name, tensor] : tensors) bytes += tensor.nbytes();
    if (bytes != kDataBytes) __builtin_trap();  // accepted entries tile the data exactly
  } catch (const qkv::Error&) {
  }
  return 0;
}
