#include "core/mask_runs.hpp"

#include <cstring>
#include <optional>

namespace qkv::detail {

namespace {

constexpr std::uint64_t kLowBits = 0x0101010101010101ull;
constexpr std::uint64_t kHighBits = 0x8080808080808080ull;

std::uint64_t word_at(const std::uint8_t* bytes) {
  std::uint64_t word;
  std::memcpy(&word, bytes, sizeof word);
  return word;
}

// Whether one of the word's 8 bytes is zero (the classic test: only a zero byte borrows into
// its own high bit without having had it set).
bool has_zero_byte(std::uint64_t word) {
  return ((word - kLowBits) & ~word & kHighBits) != 0;
}

// The first j >= from in [from, count) whose byte is (visible = true) nonzero or (false) zero,
// else count; contiguous bytes.
std::int64_t next_contiguous(const std::uint8_t* row, std::int64_t from, std::int64_t count,
                             bool visible) {
  std::int64_t j = from;
  if (visible) {
    while (j + 8 <= count && word_at(row + j) == 0) j += 8;
    while (j < count && row[j] == 0) ++j;
  } else {
    while (j + 8 <= count && !has_zero_byte(word_at(row + j))) j += 8;
    while (j < count && row[j] != 0) ++j;
  }
  return j;
}

std::int64_t next_strided(const std::uint8_t* row, std::int64_t stride, std::int64_t from,
                          std::int64_t count, bool visible) {
  std::int64_t j = from;
  while (j < count && (row[j * stride] != 0) != visible) ++j;
  return j;
}

// The run of nonzero bytes in a row of `count`, or nothing when they are not one run.
std::optional<KeyInterval> run_of(const std::uint8_t* row, std::int64_t stride,
                                  std::int64_t count) {
  const auto next = [&](std::int64_t from, bool visible) {
    return stride == 1 ? next_contiguous(row, from, count, visible)
                       : next_strided(row, stride, from, count, visible);
  };
  const std::int64_t first = next(0, true);
  if (first == count) return KeyInterval{};
  const std::int64_t last = next(first, false);
  if (next(last, true) != count) return std::nullopt;  // a visible key after a hidden one
  return KeyInterval{first, last};
}

}  // namespace

std::shared_ptr<const MaskRuns> MaskRuns::read(const std::uint8_t* data,
                                               const std::array<std::int64_t, 4>& strides,
                                               const std::array<std::int64_t, 4>& shape) {
  // The distinct rows: one along every broadcast dimension.
  const std::int64_t batches = strides[0] == 0 ? 1 : shape[0];
  const std::int64_t heads = strides[1] == 0 ? 1 : shape[1];
  const std::int64_t rows = strides[2] == 0 ? 1 : shape[2];
  auto runs = std::make_shared<MaskRuns>();
  runs->strides_ = {strides[0] == 0 ? 0 : heads * rows, strides[1] == 0 ? 0 : rows,
                    strides[2] == 0 ? 0 : 1};
  runs->runs_.reserve(static_cast<std::size_t>(batches * heads * rows));
  for (std::int64_t b = 0; b < batches; ++b) {
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::uint8_t* row = data + b * strides[0] + h * strides[1] + i * strides[2];
        const std::optional<KeyInterval> run = run_of(row, strides[3], shape[3]);
        if (!run) return nullptr;
        runs->runs_.push_back(*run);
      }
    }
  }
  return runs;
}

}  // namespace qkv::detail
