// A boolean mask read as one run of keys per row (core/mask_runs.hpp): every row pattern of up to
// 12 keys and runs and holes across the 8-byte words of longer rows, against a literal reading;
// strided and broadcast masks; any nonzero byte counts as visible.

#include <gtest/gtest.h>

#include <array>
#include <cstdint>
#include <optional>
#include <random>
#include <vector>

#include "core/mask_runs.hpp"

namespace qkv::testing {
namespace {

using detail::KeyInterval;
using detail::MaskRuns;

// The run of a row read one byte at a time, or nothing when its visible keys are not one run.
std::optional<KeyInterval> literal_run(const std::vector<std::uint8_t>& row) {
  std::int64_t first = -1, last = -1, visible = 0;
  for (std::size_t j = 0; j < row.size(); ++j) {
    if (row[j] == 0) continue;
    if (first < 0) first = static_cast<std::int64_t>(j);
    last = static_cast<std::int64_t>(j) + 1;
    ++visible;
  }
  if (visible == 0) return KeyInterval{};
  if (last - first != visible) return std::nullopt;
  return KeyInterval{first, last};
}

// One row as a [1, 1, 1, count] mask.
std::shared_ptr<const MaskRuns> read_row(const std::vector<std::uint8_t>& row) {
  const auto count = static_cast<std::int64_t>(row.size());
  return MaskRuns::read(row.data(), {0, 0, 0, 1}, {1, 1, 1, count});
}

void expect_read_as_literal(const std::vector<std::uint8_t>& row) {
  const std::optional<KeyInterval> expected = literal_run(row);
  const auto runs = read_row(row);
  ASSERT_EQ(runs != nullptr, expected.has_value()) << "row of " << row.size();
  if (!expected) return;
  const KeyInterval got = runs->row(0, 0, 0);
  if (expected->empty()) {
    EXPECT_TRUE(got.empty());
  } else {
    EXPECT_EQ(got.first, expected->first);
    EXPECT_EQ(got.last, expected->last);
  }
}

TEST(MaskRuns, EveryShortRowAsItsLiteralReading) {
  for (int count = 0; count <= 12; ++count) {
    for (std::uint32_t bits = 0; bits < (1u << count); ++bits) {
      std::vector<std::uint8_t> row(static_cast<std::size_t>(count));
      for (int j = 0; j < count; ++j) row[static_cast<std::size_t>(j)] = (bits >> j) & 1u;
      expect_read_as_literal(row);
    }
  }
}

TEST(MaskRuns, RunsAndHolesAcrossWordsOfLongRows) {
  std::mt19937_64 rng(5);
  for (const std::int64_t count : {15, 16, 17, 63, 64, 65, 200}) {
    std::uniform_int_distribution<std::int64_t> key(0, count);
    for (int trial = 0; trial < 300; ++trial) {
      std::int64_t first = key(rng), last = key(rng);
      if (first > last) std::swap(first, last);
      std::vector<std::uint8_t> row(static_cast<std::size_t>(count));
      for (std::int64_t j = first; j < last; ++j) row[static_cast<std::size_t>(j)] = 1;
      expect_read_as_literal(row);  // a run
      const auto flip = static_cast<std::size_t>(key(rng) % count);
      row[flip] = row[flip] == 0 ? 1 : 0;  // a hole inside, a key outside, or a shorter run
      expect_read_as_literal(row);
    }
  }
}

TEST(MaskRuns, AnyNonzeroByteIsVisible) {
  // Bytes of bool tensors written by other programs: 0x80 alone would fool a test of the high bit,
  // 0x01 next to 0xFF one of equality with 0x01.
  for (std::uint8_t value : {std::uint8_t{2}, std::uint8_t{0x80}, std::uint8_t{0xFF}}) {
    std::vector<std::uint8_t> row(40, 0);
    for (std::size_t j = 5; j < 30; ++j) row[j] = j % 3 == 0 ? value : 1;
    expect_read_as_literal(row);
    row[20] = 0;
    expect_read_as_literal(row);
  }
}

TEST(MaskRuns, StridedAndBroadcastMasks) {
  // [B = 2, H = 3, Nq = 4, Nk = 10] stored as [H, Nq, Nk, 2] (every other byte along the keys,
  // the odd bytes garbage), broadcast over the batch: row (h, i) keeps keys [h + i, h + 2i + 1).
  constexpr std::int64_t kHeads = 3, kRows = 4, kKeys = 10;
  std::vector<std::uint8_t> bytes(kHeads * kRows * kKeys * 2);
  for (std::int64_t h = 0; h < kHeads; ++h)
    for (std::int64_t i = 0; i < kRows; ++i)
      for (std::int64_t j = 0; j < kKeys; ++j) {
        const std::int64_t at = ((h * kRows + i) * kKeys + j) * 2;
        bytes[static_cast<std::size_t>(at)] = h + i <= j && j < h + 2 * i + 1;
        bytes[static_cast<std::size_t>(at + 1)] = (j * 7) % 3;
      }
  const std::array<std::int64_t, 4> strides{0, kRows * kKeys * 2, kKeys * 2, 2};
  const auto runs = MaskRuns::read(bytes.data(), strides, {2, kHeads, kRows, kKeys});
  ASSERT_NE(runs, nullptr);
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < kHeads; ++h)
      for (std::int64_t i = 0; i < kRows; ++i) {
        EXPECT_EQ(runs->row(b, h, i).first, h + i);
        EXPECT_EQ(runs->row(b, h, i).last, h + 2 * i + 1);
      }
  // Broadcast along the keys (one byte per row) and along the rows.
  const std::uint8_t visible = 1, hidden = 0;
  const auto all = MaskRuns::read(&visible, {0, 0, 0, 0}, {2, 3, 5, 9});
  ASSERT_NE(all, nullptr);
  EXPECT_EQ(all->row(1, 2, 4).first, 0);
  EXPECT_EQ(all->row(1, 2, 4).last, 9);
  const auto none = MaskRuns::read(&hidden, {0, 0, 0, 0}, {2, 3, 5, 9});
  ASSERT_NE(none, nullptr);
  EXPECT_TRUE(none->row(0, 1, 3).empty());
  // One row that is not a run refuses the whole mask.
  bytes[static_cast<std::size_t>(((2 * kRows + 3) * kKeys + 0) * 2)] = 1;
  EXPECT_EQ(MaskRuns::read(bytes.data(), strides, {2, kHeads, kRows, kKeys}), nullptr);
}

}  // namespace
}  // namespace qkv::testing
