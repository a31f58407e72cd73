// Block masks: which (query, key) pairs may attend, described block by block so that the kernels
// skip what no pair of a block sees (PyTorch FlexAttention's BlockMask; docs/contract.md §3).
#pragma once

#include <cstdint>
#include <vector>

namespace qkv {

// The sizes a block mask describes: the [q_len, kv_len] plane of each (batch, head), cut into
// blocks of q_block × kv_block pairs (the last row and column of blocks may be short). A batch or
// heads of 1 serves every batch or head (FlexAttention's B=None, H=None).
struct BlockMaskShape {
  std::int64_t batch = 1, heads = 1, q_len = 0, kv_len = 0;
  std::int64_t q_block = 128, kv_block = 128;
};

// What a block holds: no visible pair, some, or only visible pairs.
enum class BlockKind : std::uint8_t { empty = 0, partial = 1, full = 2 };

// A mask of the pairs (b, h, q_idx, kv_idx) that may attend, as one BlockKind per block and, for
// each partial block, one bit per pair. Built once (from a mask_mod, or from blocks computed
// elsewhere) and reused across calls: AttentionOptions::block_mask. The kernels skip empty blocks
// and test pairs only in partial ones, so a mask that leaves a fraction f of the blocks non-empty
// costs about f of the dense attention. Memory: one byte per block, q_block·kv_block bits per
// partial block, and two integers per query row when each row's visible keys are one run.
class BlockMask {
 public:
  BlockMask() = default;

  // From blocks computed elsewhere (the Python module's create_block_mask): kinds holds
  // batch·heads·q_blocks()·kv_blocks() entries, row-major over (b, h, query block, key block);
  // `partial` holds, for each partial block in that order, q_block·kv_block bytes (row-major over
  // its pairs, non-zero = visible; pairs past q_len or kv_len are ignored). Throws qkv::Error
  // naming the argument when a size, a count or a kind is wrong.
  BlockMask(const BlockMaskShape& shape, const std::vector<BlockKind>& kinds,
            const std::vector<std::uint8_t>& partial);

  // From a mask_mod, FlexAttention's meaning: mask_mod(b, h, q_idx, kv_idx) (four std::int64_t)
  // returns true where the query may attend to the key. It is called once for every pair of
  // every (batch, head) of `shape` (so give batch 1 or heads 1 when it ignores them), in no
  // particular order; it must be a pure function of its arguments.
  template <class MaskMod>
  static BlockMask from_mask_mod(MaskMod mask_mod, const BlockMaskShape& shape) {
    const auto rows = [](const void* context, std::int64_t b, std::int64_t h, std::int64_t q_idx,
                         std::int64_t kv_begin, std::int64_t kv_end, std::uint8_t* visible) {
      const auto& mod = *static_cast<const MaskMod*>(context);
      for (std::int64_t kv_idx = kv_begin; kv_idx < kv_end; ++kv_idx)
        visible[kv_idx - kv_begin] = mod(b, h, q_idx, kv_idx) ? 1 : 0;
    };
    return BlockMask(shape, rows, &mask_mod);
  }

  const BlockMaskShape& shape() const { return shape_; }
  std::int64_t q_blocks() const { return q_blocks_; }
  std::int64_t kv_blocks() const { return kv_blocks_; }

  // The block of pairs (b, h, query block qb, key block kb); b and h are those of the problem
  // (read as 0 where the mask has batch or heads 1).
  BlockKind kind(std::int64_t b, std::int64_t h, std::int64_t qb, std::int64_t kb) const {
    return kinds_[static_cast<std::size_t>(block_index(b, h, qb, kb))];
  }
  // Whether query q_idx may attend to key kv_idx of (b, h).
  bool visible(std::int64_t b, std::int64_t h, std::int64_t q_idx, std::int64_t kv_idx) const;
  // The keys [first, last) from the first to the end of the last non-empty block of the query
  // block qb of (b, h); first == last when every block is empty.
  std::int64_t first_key(std::int64_t b, std::int64_t h, std::int64_t qb) const {
    return spans_[static_cast<std::size_t>(2 * row_index(b, h, qb))];
  }
  std::int64_t last_key(std::int64_t b, std::int64_t h, std::int64_t qb) const {
    return spans_[static_cast<std::size_t>(2 * row_index(b, h, qb) + 1)];
  }
  // The bits of row q_idx of key block kb (bit t of word t / 64: key kb·kv_block + t visible)
  // when that block is partial; nullptr when it is empty or full (kind() says which).
  const std::uint64_t* partial_bits(std::int64_t b, std::int64_t h, std::int64_t q_idx,
                                    std::int64_t kb) const {
    const std::int64_t qb = q_idx / shape_.q_block;
    const std::int64_t partial = partial_of_[static_cast<std::size_t>(block_index(b, h, qb, kb))];
    if (partial < 0) return nullptr;
    return bits_.data() + (partial * shape_.q_block + q_idx - qb * shape_.q_block) * words_per_row_;
  }
  // Whether each query row's visible keys are one run (or none), as they are under causal masks,
  // sliding windows, documents, prefix LM and their intersections, and some block is partial.
  // The kernels then take a row's run as its visible interval and need no element test: the bits
  // of the partial blocks only serve the reference and visible().
  bool rows_are_runs() const { return !runs_.empty(); }
  // When rows_are_runs(): the visible keys [run_first, run_last) of row q_idx of (b, h), equal
  // when it sees none.
  std::int64_t run_first(std::int64_t b, std::int64_t h, std::int64_t q_idx) const {
    return runs_[static_cast<std::size_t>(2 * run_index(b, h, q_idx))];
  }
  std::int64_t run_last(std::int64_t b, std::int64_t h, std::int64_t q_idx) const {
    return runs_[static_cast<std::size_t>(2 * run_index(b, h, q_idx) + 1)];
  }
  // The share of blocks that are not empty (what a kernel computes of the dense attention).
  double density() const;

 private:
  using RowFiller = void (*)(const void* context, std::int64_t b, std::int64_t h,
                             std::int64_t q_idx, std::int64_t kv_begin, std::int64_t kv_end,
                             std::uint8_t* visible);
  BlockMask(const BlockMaskShape& shape, RowFiller rows, const void* context);

  void check_shape() const;
  void set_block(std::int64_t block, const std::uint8_t* pairs, std::int64_t pair_stride,
                 std::int64_t q_count, std::int64_t kv_count);
  void finish();
  void find_runs();
  std::int64_t row_index(std::int64_t b, std::int64_t h, std::int64_t qb) const {
    return ((shape_.batch == 1 ? 0 : b) * shape_.heads + (shape_.heads == 1 ? 0 : h)) * q_blocks_ +
           qb;
  }
  std::int64_t block_index(std::int64_t b, std::int64_t h, std::int64_t qb, std::int64_t kb) const {
    return row_index(b, h, qb) * kv_blocks_ + kb;
  }
  std::int64_t run_index(std::int64_t b, std::int64_t h, std::int64_t q_idx) const {
    return ((shape_.batch == 1 ? 0 : b) * shape_.heads + (shape_.heads == 1 ? 0 : h)) *
               shape_.q_len +
           q_idx;
  }

  BlockMaskShape shape_;
  std::int64_t q_blocks_ = 0, kv_blocks_ = 0;
  std::int64_t words_per_row_ = 0;        // 64-bit words of one row of a partial block
  std::vector<BlockKind> kinds_;          // [batch, heads, q_blocks, kv_blocks]
  std::vector<std::int64_t> partial_of_;  // per block: its index among the partial ones, or -1
  std::vector<std::uint64_t> bits_;       // per partial block: q_block rows of words_per_row_
  std::vector<std::int64_t> spans_;       // per (b, h, qb): first_key, last_key
  std::vector<std::int64_t> runs_;        // per (b, h, q_idx): its run, when every row is one
};

// Combinators of mask_mods (FlexAttention's and_masks, or_masks, noop_mask): a pair is visible
// when every (and) or any (or) of the mask_mods lets it through; noop_mask lets every pair through.
template <class... MaskMods>
auto and_masks(MaskMods... mods) {
  return [=](std::int64_t b, std::int64_t h, std::int64_t q_idx, std::int64_t kv_idx) {
    return (static_cast<bool>(mods(b, h, q_idx, kv_idx)) && ...);
  };
}
template <class... MaskMods>
auto or_masks(MaskMods... mods) {
  return [=](std::int64_t b, std::int64_t h, std::int64_t q_idx, std::int64_t kv_idx) {
    return (static_cast<bool>(mods(b, h, q_idx, kv_idx)) || ...);
  };
}
inline bool noop_mask(std::int64_t, std::int64_t, std::int64_t, std::int64_t) {
  return true;
}

}  // namespace qkv
