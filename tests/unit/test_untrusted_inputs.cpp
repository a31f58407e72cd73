// Untrusted files: every fuzzing seed and regression (fuzz/) read back through the readers, and
// the bytes of a malformed file never reaching a message raw.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "qkv/error.hpp"
#include "qkv/npy.hpp"
#include "qkv/safetensors.hpp"

namespace qkv {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

const std::filesystem::path kFuzzFolder = std::filesystem::path(QKV_SOURCE_DIR) / "fuzz";

std::string read_bytes(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A message may hold printable ASCII and the UTF-8 of qkv's own words, never a control byte.
bool has_control_bytes(const std::string& message) {
  for (const char c : message) {
    const auto byte = static_cast<unsigned char>(c);
    if (byte < 0x20 || byte == 0x7f) return true;
  }
  return false;
}

// A .safetensors file: the header's length (8 bytes, little-endian), the header, then `data`.
std::string safetensors_file(const std::string& header, const std::string& data) {
  std::string file;
  for (int b = 0; b < 8; ++b) file += static_cast<char>((header.size() >> (8 * b)) & 0xff);
  return file + header + data;
}

// Reads `bytes` as the reader `kind` would ("npy", "safetensors", or "safetensors_header": the
// bytes framed as the fuzz target frames them). Returns the error message, or "" on success.
std::string read_as(const std::string& kind, const std::string& bytes) {
  try {
    if (kind == "npy") {
      std::istringstream in(bytes);
      read_npy(in, bytes.size(), "file.npy");
    } else {
      const std::string file =
          kind == "safetensors_header" ? safetensors_file(bytes, std::string(64, '\x01')) : bytes;
      std::istringstream in(file);
      read_safetensors(in, file.size(), "file.safetensors");
    }
  } catch (const Error& error) {
    return error.what();
  }
  return "";
}

std::vector<std::filesystem::path> files_in(const std::filesystem::path& folder) {
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(folder))
    if (entry.is_regular_file() && entry.path().extension() != ".md") files.push_back(entry.path());
  return files;
}

TEST(UntrustedInputs, EverySeedIsRead) {
  for (const std::string kind : {"npy", "safetensors", "safetensors_header"}) {
    const auto seeds = files_in(kFuzzFolder / "corpus" / kind);
    ASSERT_FALSE(seeds.empty()) << kind;
    for (const auto& seed : seeds) EXPECT_EQ(read_as(kind, read_bytes(seed)), "") << seed;
  }
}

TEST(UntrustedInputs, EveryRegressionGivesAnErrorOfOneSafeLine) {
  const auto regressions = files_in(kFuzzFolder / "regressions");
  ASSERT_GE(regressions.size(), 10u);
  for (const auto& regression : regressions) {
    const std::string name = regression.filename().string();
    const std::string kind = name.rfind("npy_", 0) == 0 ? "npy" : "safetensors";
    const std::string message = read_as(kind, read_bytes(regression));
    EXPECT_NE(message, "") << name << " was accepted";
    EXPECT_FALSE(has_control_bytes(message)) << name << ": " << message;
  }
}

// A version 1.0 .npy file of `header` and four bytes of data.
std::string npy_file(const std::string& header) {
  std::string file = std::string("\x93NUMPY\x01\x00", 8);
  file += static_cast<char>(header.size());
  file += '\0';
  return file + header + std::string(4, '\0');
}

TEST(UntrustedInputs, NpyHeaderBytesAreEscaped) {
  const std::string key =
      read_as("npy", npy_file("{'descr': '<f4', '\x1b[2J\x07\xff': False, 'shape': (1,), }"));
  EXPECT_THAT(key, HasSubstr("unexpected key '\\x1b[2J\\x07\\xff'"));
  EXPECT_FALSE(has_control_bytes(key)) << key;
  const std::string descr =
      read_as("npy", npy_file("{'descr': '\x1b]0', 'fortran_order': False, 'shape': (1,), }"));
  EXPECT_THAT(descr, HasSubstr("got '\\x1b]0'"));
  EXPECT_FALSE(has_control_bytes(descr)) << descr;
}

TEST(UntrustedInputs, SafetensorsNamesAndJsonAreEscaped) {
  const std::string header =
      "{\"\\u001b[31mred\": {\"dtype\": \"F\\u0007\", \"shape\": [1], \"data_offsets\": [0, 4]}}";
  const std::string message =
      read_as("safetensors", safetensors_file(header, std::string(4, '\0')));
  EXPECT_THAT(message, HasSubstr("tensor '\\x1b[31mred'"));
  EXPECT_THAT(message, HasSubstr("got 'F\\x07'"));
  EXPECT_FALSE(has_control_bytes(message)) << message;

  // nlohmann's own parse error quotes the bytes it read last.
  const std::string broken = "{\"a\x1b\x9b\": ";
  const std::string parse_error = read_as("safetensors", safetensors_file(broken, ""));
  EXPECT_THAT(parse_error, HasSubstr("malformed header"));
  EXPECT_FALSE(has_control_bytes(parse_error)) << parse_error;
  EXPECT_THAT(parse_error, Not(HasSubstr("\x9b")));
}

}  // namespace
}  // namespace qkv
