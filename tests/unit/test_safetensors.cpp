// .safetensors files: round trips, a file laid out as PyTorch writes it, and untrusted input that
// must give qkv::Error — never a crash, a hang or a huge allocation.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "qkv/error.hpp"
#include "qkv/safetensors.hpp"

namespace qkv {
namespace {

using ::testing::HasSubstr;

// A file of a hand-written header (padded to 8 bytes) followed by `data`.
std::string file_bytes(const std::string& header, const std::string& data) {
  std::string padded = header;
  padded.append((8 - padded.size() % 8) % 8, ' ');
  std::string bytes(8, '\0');
  for (int b = 0; b < 8; ++b) bytes[b] = static_cast<char>(padded.size() >> (8 * b));
  return bytes + padded + data;
}

NamedTensors parse(const std::string& bytes) {
  std::istringstream in(bytes);
  return read_safetensors(in, bytes.size(), "model.safetensors");
}

void expect_error(const std::string& bytes, const std::string& piece) {
  EXPECT_THAT([&] { parse(bytes); }, ::testing::ThrowsMessage<Error>(HasSubstr(piece))) << piece;
}

TEST(Safetensors, RoundTripsEveryDtypeThroughAFile) {
  NamedTensors tensors;
  std::mt19937 rng(5);
  for (auto [name, dtype, shape] :
       {std::tuple{"in_proj_weight", DType::float32, std::vector<std::int64_t>{6, 2}},
        std::tuple{"in_proj_bias", DType::float64, std::vector<std::int64_t>{6}},
        std::tuple{"out_proj.weight", DType::bfloat16, std::vector<std::int64_t>{2, 2}},
        std::tuple{"steps", DType::int64, std::vector<std::int64_t>{}},
        std::tuple{"lengths", DType::int32, std::vector<std::int64_t>{3}},
        std::tuple{"k_cache", DType::int8, std::vector<std::int64_t>{2, 3}},
        std::tuple{"half", DType::float16, std::vector<std::int64_t>{3}},
        std::tuple{"mask", DType::boolean, std::vector<std::int64_t>{2, 1, 2}},
        std::tuple{"empty", DType::float32, std::vector<std::int64_t>{0, 4}}}) {
    Tensor t(dtype, shape);
    auto* bytes = static_cast<unsigned char*>(t.raw());
    for (std::size_t i = 0; i < t.nbytes(); ++i) {
      bytes[i] = dtype == DType::boolean ? static_cast<unsigned char>(rng() % 2)
                                         : static_cast<unsigned char>(rng());
    }
    tensors.emplace(name, std::move(t));
  }
  const auto path = (std::filesystem::temp_directory_path() / "qkv_roundtrip.safetensors").string();
  save_safetensors(path, tensors);
  const NamedTensors loaded = load_safetensors(path);
  std::filesystem::remove(path);
  ASSERT_EQ(loaded.size(), tensors.size());
  for (const auto& [name, tensor] : tensors) {
    const Tensor& back = loaded.at(name);
    EXPECT_EQ(back.dtype(), tensor.dtype()) << name;
    EXPECT_EQ(back.shape(), tensor.shape()) << name;
    ASSERT_EQ(back.nbytes(), tensor.nbytes());
    if (tensor.nbytes() > 0) {
      EXPECT_EQ(std::memcmp(back.raw(), tensor.raw(), tensor.nbytes()), 0) << name;
    }
  }
}

// The layout PyTorch's safetensors writer produces: metadata, tensors out of name order in the
// header, data in offset order.
TEST(Safetensors, ReadsAFileLaidOutAsPyTorchWritesIt) {
  const float weight[] = {1.0f, 2.0f, 3.0f, 4.0f};
  const float bias[] = {0.5f, -0.5f};
  std::string data(reinterpret_cast<const char*>(bias), 8);
  data += std::string(reinterpret_cast<const char*>(weight), 16);
  const NamedTensors tensors = parse(file_bytes(
      R"({"__metadata__":{"format":"pt"},"weight":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},)"
      R"("bias":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
      data));
  EXPECT_EQ(tensors.at("weight").data<float>()[3], 4.0f);
  EXPECT_EQ(tensors.at("bias").data<float>()[1], -0.5f);
}

TEST(Safetensors, RejectsMalformedFiles) {
  const std::string entry = R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::string eight(8, '\0');
  expect_error("abc", "expected a .safetensors file (at least 8 bytes), got 3 bytes");
  expect_error(std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8),
               "expected a header of at most 100000000 bytes");
  expect_error(std::string("\x40\x00\x00\x00\x00\x00\x00\x00{}", 10),
               "expected a 64-byte header, the file ended early");
  expect_error(file_bytes("{not json", ""), "malformed header");
  expect_error(file_bytes("[1, 2]", ""), "expected a JSON object, got array");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[[[[1]]]],"data_offsets":[0,4]}})", ""),
               "nested deeper than 3");
  expect_error(
      file_bytes(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})",
                 std::string(2, '\0')),
      "tensor 'w': expected dtype F32, F64, BF16, F16, I8, I32, I64 or BOOL, got 'F8_E4M3'");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[2]}})", eight),
               "expected exactly \"dtype\", \"shape\" and \"data_offsets\"");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", eight),
               "expected non-negative integers in \"shape\"");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", eight),
               "expected non-negative integers in \"shape\"");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", eight),
               "expected 12 bytes for F32 [3], got 8");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", eight),
               "expected data_offsets within the 8 bytes of data");
  expect_error(
      file_bytes(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}})",
                 eight),
      "expected a size that fits in memory");
  expect_error(
      file_bytes("{" + entry + R"(,"v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
      "overlaps the tensor before it");
  expect_error(file_bytes(R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", eight),
               "no holes allowed");
  expect_error(file_bytes("{" + entry + "}", eight + "trailing"),
               "expected the tensors to cover all 16 bytes of data, they cover 8");
  expect_error(file_bytes(R"({"__metadata__":[1]})", ""),
               "expected \"__metadata__\" to be an object");
  EXPECT_THAT([] { load_safetensors("/no/such/model.safetensors"); },
              ::testing::ThrowsMessage<Error>(HasSubstr("no such file")));
}

// Random corruptions of a valid file: every outcome is either tensors or a qkv::Error.
TEST(Safetensors, CorruptedFilesNeverCrash) {
  NamedTensors tensors;
  tensors.emplace("a", Tensor(DType::float32, {3, 2}));
  tensors.emplace("b", Tensor(DType::bfloat16, {5}));
  std::ostringstream stream;
  write_safetensors(stream, tensors);
  const std::string valid = stream.str();
  ASSERT_EQ(parse(valid).size(), 2u);
  std::mt19937_64 rng(11);
  int errors = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = valid;
    for (int e = 0, edits = 1 + static_cast<int>(rng() % 3); e < edits; ++e) {
      const std::size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes.erase(at, 1 + rng() % 4);
          break;
        default:
          bytes.insert(at, 1, "0123456789[]{},:\" "[rng() % 18]);
          break;
      }
      if (bytes.empty()) bytes.push_back('x');  // (not = "x": GCC 12 -O3 warns -Wrestrict, falsely)
    }
    try {
      const NamedTensors parsed = parse(bytes);
      for (const auto& [name, tensor] : parsed) EXPECT_LE(tensor.nbytes(), bytes.size());
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 1000);
}

}  // namespace
}  // namespace qkv
