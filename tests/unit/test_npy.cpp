// .npy files: round trips of every dtype, and untrusted input that must give qkv::Error —
// never a crash, a hang or a huge allocation.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include "qkv/error.hpp"
#include "qkv/npy.hpp"

namespace qkv {
namespace {

using ::testing::HasSubstr;

class NpyFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    folder_ = std::filesystem::temp_directory_path() /
              ("qkv_npy_" + std::to_string(::testing::UnitTest::GetInstance()->random_seed()) +
               "_" + ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::create_directories(folder_);
  }
  void TearDown() override { std::filesystem::remove_all(folder_); }
  std::string path(const std::string& name) const { return (folder_ / name).string(); }
  std::string write_bytes(const std::string& name, const std::string& bytes) const {
    std::ofstream(path(name), std::ios::binary) << bytes;
    return path(name);
  }
  // A file with a hand-written header (version 1.0) and `data_bytes` zero bytes of data.
  std::string with_header(const std::string& name, const std::string& dict,
                          std::size_t data_bytes) const {
    std::string header = dict + "\n";
    std::string bytes = std::string("\x93NUMPY\x01\x00", 8);
    bytes += static_cast<char>(header.size() & 0xff);
    bytes += static_cast<char>(header.size() >> 8);
    return write_bytes(name, bytes + header + std::string(data_bytes, '\0'));
  }
  void expect_load_error(const std::string& file, const std::string& piece) const {
    EXPECT_THAT([&] { load_npy(file); }, ::testing::ThrowsMessage<Error>(HasSubstr(piece)));
  }
  std::filesystem::path folder_;
};

TEST_F(NpyFiles, RoundTripsEveryDtypeAndRank) {
  for (DType dtype : {DType::float32, DType::float64, DType::float16, DType::boolean, DType::int8,
                      DType::int32, DType::int64}) {
    for (const std::vector<std::int64_t>& shape :
         {std::vector<std::int64_t>{}, {5}, {3, 4}, {2, 3, 4}, {2, 1, 3, 2}, {0, 3}}) {
      Tensor original(dtype, shape);
      auto* bytes = static_cast<unsigned char*>(original.raw());
      for (std::size_t i = 0; i < original.nbytes(); ++i) {
        bytes[i] = dtype == DType::boolean ? static_cast<unsigned char>(i % 2)
                                           : static_cast<unsigned char>(i * 37 + 11);
      }
      save_npy(path("a.npy"), original.view());
      const Tensor loaded = load_npy(path("a.npy"));
      ASSERT_EQ(loaded.dtype(), dtype);
      ASSERT_EQ(loaded.shape(), shape);
      ASSERT_EQ(loaded.nbytes(), original.nbytes());
      if (original.nbytes() > 0) {
        EXPECT_EQ(std::memcmp(loaded.raw(), original.raw(), original.nbytes()), 0);
      }
      // numpy aligns the data to 64 bytes.
      EXPECT_EQ((std::filesystem::file_size(path("a.npy")) - original.nbytes()) % 64, 0u);
    }
  }
}

// A shard of rows read through the memory map equals the same rows of the whole array.
TEST_F(NpyFiles, LoadsOnlyTheRowsOfAShard) {
  Tensor whole(DType::float32, {2, 7, 3, 2});
  for (std::int64_t n = 0; n < whole.numel(); ++n) whole.data<float>()[n] = static_cast<float>(n);
  save_npy(path("whole.npy"), whole.view());
  const std::vector<std::pair<std::int64_t, std::int64_t>> pieces{{1, 2}, {5, 2}};
  const Tensor rows = load_npy_rows(path("whole.npy"), 1, pieces);
  ASSERT_EQ(rows.shape(), (std::vector<std::int64_t>{2, 4, 3, 2}));
  for (std::int64_t b = 0; b < 2; ++b) {
    std::int64_t at = 0;
    for (const auto& [offset, length] : pieces)
      for (std::int64_t r = 0; r < length; ++r, ++at)
        for (std::int64_t x = 0; x < 6; ++x)
          EXPECT_EQ(rows.data<float>()[(b * 4 + at) * 6 + x],
                    whole.data<float>()[(b * 7 + offset + r) * 6 + x]);
  }
  const std::vector<std::pair<std::int64_t, std::int64_t>> outside{{6, 2}};
  EXPECT_THAT([&] { load_npy_rows(path("whole.npy"), 1, outside); },
              ::testing::ThrowsMessage<Error>(HasSubstr("expected rows [6, 8) within its 7 rows")));
  EXPECT_THAT([&] { load_npy_rows(with_header("bad.npy", "{'descr': '<f4'}", 0), 0, pieces); },
              ::testing::ThrowsMessage<Error>(HasSubstr("bad.npy")));
}

TEST_F(NpyFiles, WritesStridedViewsDensely) {
  Tensor t(DType::float32, {2, 3});
  for (int i = 0; i < 6; ++i) t.data<float>()[i] = static_cast<float>(i);
  TensorView transposed = TensorView::contiguous(t.raw(), DType::float32, {3, 2});
  transposed.strides = {1, 3};
  save_npy(path("t.npy"), transposed);
  const Tensor loaded = load_npy(path("t.npy"));
  const float expected[] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(loaded.data<float>()[i], expected[i]);
}

TEST_F(NpyFiles, ReadsVersionTwoHeaders) {
  const std::string header = "{'descr': '<i4', 'fortran_order': False, 'shape': (2,), }\n";
  std::string bytes = std::string("\x93NUMPY\x02\x00", 8);
  for (int shift = 0; shift < 32; shift += 8)
    bytes += static_cast<char>((header.size() >> shift) & 0xff);
  bytes += header + std::string("\x07\x00\x00\x00\x09\x00\x00\x00", 8);
  const Tensor t = load_npy(write_bytes("v2.npy", bytes));
  EXPECT_EQ(t.data<std::int32_t>()[1], 9);
}

TEST_F(NpyFiles, RejectsMalformedFiles) {
  expect_load_error(path("missing.npy"), "no such file");
  expect_load_error(folder_.string(), "not a file");
  expect_load_error(write_bytes("empty.npy", ""),
                    "expected a .npy file (at least 10 bytes), got 0 bytes");
  expect_load_error(write_bytes("magic.npy", "PK\x03\x04 this is a zip file"), "magic");
  expect_load_error(write_bytes("version.npy", std::string("\x93NUMPY\x09\x00\x10\x00", 10) +
                                                   std::string(16, ' ')),
                    "expected .npy format version 1, 2 or 3, got 9.0");
  expect_load_error(
      write_bytes("short_header.npy", std::string("\x93NUMPY\x01\x00\xff\x00{'descr'", 17)),
      "expected a 255-byte .npy header, the file ended early");
  std::string huge = std::string("\x93NUMPY\x02\x00", 8) + std::string("\xff\xff\xff\x7f", 4);
  expect_load_error(write_bytes("huge_header.npy", huge),
                    "expected a .npy header of at most 65536 bytes");
  const std::string good = "'descr': '<f4', 'fortran_order': False";
  expect_load_error(with_header("truncated.npy", "{" + good + ", 'shape': (3, 4), }", 40),
                    "expected 48 bytes of data for shape (3, 4) of float32, got 40 (truncated)");
  expect_load_error(with_header("trailing.npy", "{" + good + ", 'shape': (3, 4), }", 52),
                    "got 52 (trailing bytes)");
  expect_load_error(
      with_header("lying.npy", "{" + good + ", 'shape': (10000000000000, 1000000), }", 8),
      "expected a size that fits in memory");
  expect_load_error(with_header("big.npy", "{" + good + ", 'shape': (100000000000,), }", 8),
                    "expected 400000000000 bytes of data");
  expect_load_error(
      with_header("fortran.npy", "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", 8),
      "expected C order");
  expect_load_error(
      with_header("big_endian.npy", "{'descr': '>f4', 'fortran_order': False, 'shape': (2,), }", 8),
      "little-endian");
  expect_load_error(
      with_header("complex.npy", "{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", 16),
      "got '<c8'");
  expect_load_error(with_header("nokeys.npy", "{'descr': '<f4'}", 4),
                    "expected keys 'descr', 'fortran_order' and 'shape'");
  expect_load_error(with_header("extra.npy", "{" + good + ", 'shape': (1,), 'x': 1}", 4),
                    "unexpected key 'x'");
  expect_load_error(with_header("twice.npy", "{" + good + ", 'shape': (1,), 'shape': (1,)}", 4),
                    "'shape' given twice");
  expect_load_error(with_header("negative.npy", "{" + good + ", 'shape': (-1,), }", 4),
                    "expected a non-negative integer");
  expect_load_error(with_header("unterminated.npy", "{'descr: '<f4', }", 4),
                    "malformed .npy header");
  expect_load_error(with_header("garbage.npy", "{" + good + ", 'shape': (1,), } junk", 4),
                    "unexpected text after");
  expect_load_error(
      with_header("deep.npy", "{" + good + ", 'shape': (" + std::string(120, '1') + "), }", 4),
      "shape too large");
  std::string many_dims;
  for (int d = 0; d < 40; ++d) many_dims += "1,";
  expect_load_error(with_header("rank.npy", "{" + good + ", 'shape': (" + many_dims + "), }", 4),
                    "more than 32 dimensions");
}

// Random corruptions of a valid file: every outcome is either a tensor or a qkv::Error.
TEST_F(NpyFiles, CorruptedFilesNeverCrash) {
  Tensor t(DType::float64, {3, 5});
  std::ostringstream stream;
  write_npy(stream, t.view());
  const std::string valid = stream.str();
  std::mt19937_64 rng(3);
  int errors = 0;
  for (int trial = 0; trial < 3000; ++trial) {
    std::string bytes = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const std::size_t at = rng() % bytes.size();
      switch (rng() % 3) {
        case 0:
          bytes[at] = static_cast<char>(rng());
          break;
        case 1:
          bytes.erase(at, 1 + rng() % 8);
          break;
        default:
          bytes.insert(at, 1 + rng() % 8, static_cast<char>("0123456789(),' "[rng() % 15]));
          break;
      }
      if (bytes.empty()) bytes.push_back('x');  // (not = "x": GCC 12 -O3 warns -Wrestrict, falsely)
    }
    std::istringstream in(bytes);
    try {
      const Tensor loaded = read_npy(in, bytes.size(), "mutated");
      EXPECT_LE(loaded.nbytes(), bytes.size());
    } catch (const Error&) {
      ++errors;
    }
  }
  EXPECT_GT(errors, 1000);
}

TEST_F(NpyFiles, StagedFilesLeaveNothingUnlessCommitted) {
  Tensor t(DType::float32, {2});
  {
    StagedFiles files;
    add_npy(files, path("a.npy"), t.view());
    add_npy(files, path("b.npy"), t.view());
  }
  EXPECT_TRUE(std::filesystem::is_empty(folder_));
  {
    StagedFiles files;
    add_npy(files, path("a.npy"), t.view());
    files.commit();
  }
  EXPECT_TRUE(std::filesystem::exists(path("a.npy")));
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(folder_), {}), 1);
  EXPECT_THAT([&] { save_npy(path("no/such/folder/x.npy"), t.view()); },
              ::testing::ThrowsMessage<Error>(HasSubstr("cannot create a file here")));
}

}  // namespace
}  // namespace qkv
