// Opening an input file that qkv treats as untrusted (.npy, .safetensors).
#pragma once

#include <cstdint>
#include <fstream>
#include <string>
#include <string_view>

namespace qkv::io {

// An open input file and its size in bytes, which the readers check every length against.
struct UntrustedFile {
  std::ifstream stream;
  std::uint64_t size = 0;
};

// Opens `path` for reading. Only regular files are accepted (a FIFO or device could hang or never
// end); throws qkv::Error naming the path and `kind` (e.g. ".npy") otherwise.
UntrustedFile open_untrusted_file(const std::string& path, const char* kind);

// Text taken from a file, made safe to put in a message: printable ASCII stays as it is, a
// backslash becomes \\ and every other byte (control characters, escape sequences, non-ASCII)
// becomes \xNN, so a crafted header can neither drive a terminal nor break a line.
std::string escaped(std::string_view untrusted);

}  // namespace qkv::io
