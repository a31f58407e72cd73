// Block masks: classification of each block from its pairs, the bits of the partial blocks, and
// each query block's span of non-empty key blocks.

#include "qkv/block_mask.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <limits>
#include <utility>

#include "qkv/error.hpp"

namespace qkv {

namespace {

std::int64_t blocks_of(std::int64_t length, std::int64_t block) {
  return (length + block - 1) / block;
}

}  // namespace

void BlockMask::check_shape() const {
  const BlockMaskShape& s = shape_;
  if (s.batch < 1 || s.heads < 1) {
    throw Error(fmt::format("block_mask: expected batch >= 1 and heads >= 1, got {} and {}",
                            s.batch, s.heads));
  }
  if (s.q_len < 0 || s.kv_len < 0) {
    throw Error(fmt::format("block_mask: expected lengths >= 0, got q_len {} and kv_len {}",
                            s.q_len, s.kv_len));
  }
  if (s.q_block < 1 || s.kv_block < 1 || s.q_block > (1 << 16) || s.kv_block > (1 << 16)) {
    throw Error(fmt::format("block_mask: expected block sizes in [1, 65536], got {} × {}",
                            s.q_block, s.kv_block));
  }
  // One byte per block: refuse a count that would not fit in memory before allocating it.
  const double blocks = static_cast<double>(s.batch) * static_cast<double>(s.heads) *
                        static_cast<double>(blocks_of(s.q_len, s.q_block)) *
                        static_cast<double>(blocks_of(s.kv_len, s.kv_block));
  if (blocks > 1e10) {
    throw Error(fmt::format("block_mask: expected at most 1e10 blocks, got {:.3g}", blocks));
  }
}

BlockMask::BlockMask(const BlockMaskShape& shape, RowFiller rows, const void* context)
    : shape_(shape) {
  check_shape();
  q_blocks_ = blocks_of(shape_.q_len, shape_.q_block);
  kv_blocks_ = blocks_of(shape_.kv_len, shape_.kv_block);
  words_per_row_ = (shape_.kv_block + 63) / 64;
  kinds_.assign(static_cast<std::size_t>(shape_.batch * shape_.heads * q_blocks_ * kv_blocks_),
                BlockKind::empty);
  partial_of_.assign(kinds_.size(), -1);
  // One row of query blocks at a time: its pairs for every key, then each block classified.
  std::vector<std::uint8_t> pairs(static_cast<std::size_t>(shape_.q_block * shape_.kv_len));
  for (std::int64_t b = 0; b < shape_.batch; ++b) {
    for (std::int64_t h = 0; h < shape_.heads; ++h) {
      for (std::int64_t qb = 0; qb < q_blocks_; ++qb) {
        const std::int64_t i0 = qb * shape_.q_block;
        const std::int64_t q_count = std::min(shape_.q_block, shape_.q_len - i0);
        for (std::int64_t r = 0; r < q_count; ++r) {
          rows(context, b, h, i0 + r, 0, shape_.kv_len, pairs.data() + r * shape_.kv_len);
        }
        for (std::int64_t kb = 0; kb < kv_blocks_; ++kb) {
          const std::int64_t j0 = kb * shape_.kv_block;
          set_block(block_index(b, h, qb, kb), pairs.data() + j0, shape_.kv_len, q_count,
                    std::min(shape_.kv_block, shape_.kv_len - j0));
        }
      }
    }
  }
  finish();
}

BlockMask::BlockMask(const BlockMaskShape& shape, const std::vector<BlockKind>& kinds,
                     const std::vector<std::uint8_t>& partial)
    : shape_(shape) {
  check_shape();
  q_blocks_ = blocks_of(shape_.q_len, shape_.q_block);
  kv_blocks_ = blocks_of(shape_.kv_len, shape_.kv_block);
  words_per_row_ = (shape_.kv_block + 63) / 64;
  const auto expected =
      static_cast<std::size_t>(shape_.batch * shape_.heads * q_blocks_ * kv_blocks_);
  if (kinds.size() != expected) {
    throw Error(
        fmt::format("block_mask kinds: expected batch·heads·q_blocks·kv_blocks = {} "
                    "entries, got {}",
                    expected, kinds.size()));
  }
  std::size_t partial_blocks = 0;
  for (const BlockKind kind : kinds) {
    if (kind != BlockKind::empty && kind != BlockKind::partial && kind != BlockKind::full) {
      throw Error(
          fmt::format("block_mask kinds: expected 0 (empty), 1 (partial) or 2 (full), "
                      "got {}",
                      static_cast<int>(kind)));
    }
    partial_blocks += kind == BlockKind::partial ? 1 : 0;
  }
  const auto block_pairs = static_cast<std::size_t>(shape_.q_block * shape_.kv_block);
  if (partial.size() != partial_blocks * block_pairs) {
    throw Error(
        fmt::format("block_mask partial: expected {} partial blocks × {} pairs = {} "
                    "bytes, got {}",
                    partial_blocks, block_pairs, partial_blocks * block_pairs, partial.size()));
  }
  kinds_.assign(kinds.size(), BlockKind::empty);
  partial_of_.assign(kinds.size(), -1);
  std::size_t next_partial = 0;
  for (std::size_t block = 0; block < kinds.size(); ++block) {
    const auto index = static_cast<std::int64_t>(block);
    const std::int64_t qb = index / kv_blocks_ % q_blocks_, kb = index % kv_blocks_;
    const std::int64_t q_count = std::min(shape_.q_block, shape_.q_len - qb * shape_.q_block);
    const std::int64_t kv_count = std::min(shape_.kv_block, shape_.kv_len - kb * shape_.kv_block);
    if (kinds[block] == BlockKind::partial) {
      // Classified again from its pairs: a "partial" block whose pairs are all visible (or
      // none) is stored as what it is.
      set_block(index, partial.data() + next_partial * block_pairs, shape_.kv_block, q_count,
                kv_count);
      ++next_partial;
    } else {
      kinds_[block] = kinds[block];
    }
  }
  finish();
}

void BlockMask::set_block(std::int64_t block, const std::uint8_t* pairs, std::int64_t pair_stride,
                          std::int64_t q_count, std::int64_t kv_count) {
  std::int64_t visible = 0;
  for (std::int64_t r = 0; r < q_count; ++r)
    for (std::int64_t t = 0; t < kv_count; ++t) visible += pairs[r * pair_stride + t] != 0;
  const auto index = static_cast<std::size_t>(block);
  if (visible == 0) {
    kinds_[index] = BlockKind::empty;
    return;
  }
  if (visible == q_count * kv_count) {
    kinds_[index] = BlockKind::full;
    return;
  }
  kinds_[index] = BlockKind::partial;
  const std::int64_t words = shape_.q_block * words_per_row_;
  partial_of_[index] = static_cast<std::int64_t>(bits_.size()) / words;
  const std::size_t base = bits_.size();
  bits_.resize(base + static_cast<std::size_t>(words), 0);
  for (std::int64_t r = 0; r < q_count; ++r) {
    for (std::int64_t t = 0; t < kv_count; ++t) {
      if (pairs[r * pair_stride + t] != 0) {
        bits_[base + static_cast<std::size_t>(r * words_per_row_ + t / 64)] |= std::uint64_t{1}
                                                                               << (t % 64);
      }
    }
  }
}

void BlockMask::finish() {
  spans_.assign(static_cast<std::size_t>(2 * shape_.batch * shape_.heads * q_blocks_), 0);
  for (std::int64_t row = 0; row < shape_.batch * shape_.heads * q_blocks_; ++row) {
    std::int64_t first = -1, last = -1;
    for (std::int64_t kb = 0; kb < kv_blocks_; ++kb) {
      if (kinds_[static_cast<std::size_t>(row * kv_blocks_ + kb)] == BlockKind::empty) continue;
      if (first < 0) first = kb;
      last = kb;
    }
    const auto at = static_cast<std::size_t>(2 * row);
    if (first >= 0) {
      spans_[at] = first * shape_.kv_block;
      spans_[at + 1] = std::min(shape_.kv_len, (last + 1) * shape_.kv_block);
    }
  }
  find_runs();
}

// A row's visible keys are one run when there are as many of them as keys from its first visible
// key to its last: counted over its full blocks and the set bits of its partial ones. Without a
// partial block every row is already described by its blocks, and nothing is stored.
void BlockMask::find_runs() {
  runs_.clear();
  if (std::none_of(kinds_.begin(), kinds_.end(),
                   [](BlockKind kind) { return kind == BlockKind::partial; })) {
    return;
  }
  std::vector<std::int64_t> runs(
      static_cast<std::size_t>(2 * shape_.batch * shape_.heads * shape_.q_len));
  for (std::int64_t row = 0; row < shape_.batch * shape_.heads * shape_.q_len; ++row) {
    const std::int64_t q_idx = row % shape_.q_len, bh = row / shape_.q_len;
    const std::int64_t qb = q_idx / shape_.q_block, r = q_idx - qb * shape_.q_block;
    std::int64_t first = -1, last = -1, visible = 0;  // keys [first, last) hold `visible` ones
    const auto see = [&](std::int64_t begin, std::int64_t end, std::int64_t count) {
      if (first < 0) first = begin;
      last = end;
      visible += count;
    };
    for (std::int64_t kb = 0; kb < kv_blocks_; ++kb) {
      const auto block = static_cast<std::size_t>((bh * q_blocks_ + qb) * kv_blocks_ + kb);
      const std::int64_t j0 = kb * shape_.kv_block;
      if (kinds_[block] == BlockKind::full) {
        const std::int64_t end = std::min(shape_.kv_len, j0 + shape_.kv_block);
        see(j0, end, end - j0);
      } else if (kinds_[block] == BlockKind::partial) {
        const std::uint64_t* bits =
            bits_.data() + (partial_of_[block] * shape_.q_block + r) * words_per_row_;
        for (std::int64_t w = 0; w < words_per_row_; ++w) {
          if (bits[w] == 0) continue;
          const std::int64_t base = j0 + 64 * w;
          see(base + std::countr_zero(bits[w]), base + 64 - std::countl_zero(bits[w]),
              std::popcount(bits[w]));
        }
      }
    }
    if (visible != last - first && first >= 0) return;  // a hole: the kernels test the bits
    runs[static_cast<std::size_t>(2 * row)] = std::max<std::int64_t>(first, 0);
    runs[static_cast<std::size_t>(2 * row + 1)] = std::max<std::int64_t>(last, 0);
  }
  runs_ = std::move(runs);
}

bool BlockMask::visible(std::int64_t b, std::int64_t h, std::int64_t q_idx,
                        std::int64_t kv_idx) const {
  const std::int64_t qb = q_idx / shape_.q_block, kb = kv_idx / shape_.kv_block;
  const auto block = static_cast<std::size_t>(block_index(b, h, qb, kb));
  switch (kinds_[block]) {
    case BlockKind::empty:
      return false;
    case BlockKind::full:
      return true;
    case BlockKind::partial:
      break;
  }
  const std::int64_t r = q_idx - qb * shape_.q_block, t = kv_idx - kb * shape_.kv_block;
  const std::uint64_t word = bits_[static_cast<std::size_t>(
      (partial_of_[block] * shape_.q_block + r) * words_per_row_ + t / 64)];
  return ((word >> (t % 64)) & 1u) != 0;
}

double BlockMask::density() const {
  if (kinds_.empty()) return 0.0;
  const auto non_empty = std::count_if(kinds_.begin(), kinds_.end(),
                                       [](BlockKind kind) { return kind != BlockKind::empty; });
  return static_cast<double>(non_empty) / static_cast<double>(kinds_.size());
}

}  // namespace qkv
