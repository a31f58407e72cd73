#include "io/untrusted_file.hpp"

#include <fmt/format.h>

#include <filesystem>

#include "qkv/error.hpp"

namespace qkv::io {

UntrustedFile open_untrusted_file(const std::string& path, const char* kind) {
  std::error_code error;
  if (!std::filesystem::is_regular_file(path, error)) {
    throw Error(fmt::format(
        "{}: expected a readable {} file, got {}", path, kind,
        std::filesystem::exists(path, error) ? "something that is not a file" : "no such file"));
  }
  UntrustedFile file;
  file.size = std::filesystem::file_size(path, error);
  file.stream.open(path, std::ios::binary);
  if (error || !file.stream) throw Error(fmt::format("{}: cannot open for reading", path));
  return file;
}

std::string escaped(std::string_view untrusted) {
  std::string text;
  text.reserve(untrusted.size());
  for (const char c : untrusted) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte == '\\') {
      text += "\\\\";
    } else if (byte >= 0x20 && byte < 0x7f) {
      text += c;
    } else {
      text += fmt::format("\\x{:02x}", byte);
    }
  }
  return text;
}

}  // namespace qkv::io
