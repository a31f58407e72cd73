// Which keys a query row sees (docs/contract.md §3), as every kernel asks it: first the interval
// that the position masks, a boolean mask made of runs (core/mask_runs.hpp) and the block mask's
// non-empty blocks leave (nothing outside it is ever scored), then the element tests inside it —
// any other boolean mask and the block mask's partial blocks — which turn hidden scores into -inf.
// Empty blocks inside the interval cost one lookup, full ones no test at all; a block mask whose
// rows are each one run (BlockMask::rows_are_runs) gives each row its run as the interval, and
// its partial blocks need no test either.
#pragma once

#include <algorithm>
#include <bit>
#include <cstdint>
#include <limits>

#include "core/problem.hpp"

namespace qkv::detail {

namespace visibility {

// The first (first = true) or last visible key g in [from, to) (global positions) of row q_idx
// in one key block, or -1: none when the block is empty, an end of the range when it is full, the
// nearest set bit when it is partial.
inline std::int64_t edge_in_block(const BlockMask& mask, std::int64_t b, std::int64_t h,
                                  std::int64_t q_idx, std::int64_t kb, std::int64_t from,
                                  std::int64_t to, bool first) {
  const BlockKind kind = mask.kind(b, h, q_idx / mask.shape().q_block, kb);
  if (kind != BlockKind::partial) return kind == BlockKind::empty ? -1 : (first ? from : to - 1);
  const std::uint64_t* bits = mask.partial_bits(b, h, q_idx, kb);
  const std::int64_t base = kb * mask.shape().kv_block, begin = from - base, end = to - base;
  if (first) {
    for (std::int64_t t = begin; t < end; t = (t / 64 + 1) * 64) {
      const std::uint64_t word = bits[t / 64] >> (t % 64);
      if (word != 0) {
        const std::int64_t found = t + std::countr_zero(word);
        return found < end ? base + found : -1;
      }
    }
  } else {
    for (std::int64_t t = end - 1; t >= begin; t = t / 64 * 64 - 1) {
      const std::uint64_t word = bits[t / 64] << (63 - t % 64);  // bits above t shifted out
      if (word != 0) {
        const std::int64_t found = t - std::countl_zero(word);
        return found >= begin ? base + found : -1;
      }
    }
  }
  return -1;
}

}  // namespace visibility

// `keys` of row i (head h, batch b) with both ends moved inward to the first and the last key
// the block mask lets through (whole empty blocks skipped, partial ones by their bits).
inline KeyInterval narrow_to_block_mask(const AttentionProblem& p, std::int64_t b, std::int64_t h,
                                        std::int64_t i, KeyInterval keys) {
  if (p.block_mask == nullptr || keys.empty()) return keys;
  const BlockMask& mask = *p.block_mask;
  h += p.head_offset;          // the block mask's heads are the whole problem's
  if (mask.rows_are_runs()) {  // the row's run, in the problem's own key positions
    const std::int64_t q_idx = i + p.query_offset;
    const KeyInterval run = keys.intersect(
        {mask.run_first(b, h, q_idx) - p.key_offset, mask.run_last(b, h, q_idx) - p.key_offset});
    return run.empty() ? KeyInterval{} : run;
  }
  const std::int64_t kv_block = mask.shape().kv_block;
  const std::int64_t q_idx = i + p.query_offset, offset = p.key_offset;
  // In global key positions [g_first, g_last).
  const std::int64_t g_first = keys.first + offset, g_last = keys.last + offset;
  std::int64_t first = -1;
  for (std::int64_t g = g_first; g < g_last && first < 0;) {
    const std::int64_t kb = g / kv_block, block_end = std::min(g_last, (kb + 1) * kv_block);
    first = visibility::edge_in_block(mask, b, h, q_idx, kb, g, block_end, true);
    g = block_end;
  }
  if (first < 0) return {};
  std::int64_t last = -1;
  for (std::int64_t g = g_last; g > first && last < 0;) {
    const std::int64_t kb = (g - 1) / kv_block, block_begin = std::max(first, kb * kv_block);
    last = visibility::edge_in_block(mask, b, h, q_idx, kb, block_begin, g, false);
    g = block_begin;
  }
  return {first - offset, last + 1 - offset};
}

// The keys row i of head h in batch b may see, before the element tests: the position masks'
// interval, within the boolean mask's run when it is made of runs, narrowed to the first and last
// key the block mask lets through.
inline KeyInterval visible_keys(const AttentionProblem& p, std::int64_t b, std::int64_t h,
                                std::int64_t i) {
  KeyInterval keys = p.positions.row(i, p.key_length(b)).intersect({p.key_start(b), p.k_len});
  if (p.mask_runs != nullptr) keys = keys.intersect(p.mask_runs->row(b, h, i));
  if (p.block_mask != nullptr) {
    const std::int64_t qb = (i + p.query_offset) / p.block_mask->shape().q_block;
    const std::int64_t mask_head = h + p.head_offset;
    keys = keys.intersect({p.block_mask->first_key(b, mask_head, qb) - p.key_offset,
                           p.block_mask->last_key(b, mask_head, qb) - p.key_offset});
  }
  return narrow_to_block_mask(p, b, h, i, keys);
}

// The part of a row's visible keys `keys` inside [j0, j1), narrowed the same way: what a kernel
// must score of that range.
inline KeyInterval visible_keys_within(const AttentionProblem& p, std::int64_t b, std::int64_t h,
                                       std::int64_t i, KeyInterval keys, std::int64_t j0,
                                       std::int64_t j1) {
  KeyInterval within = keys.intersect({j0, j1});
  if (p.positions.sink_end > 0)  // the gap between sink tokens and a window
    within = without_gap(within, p.positions.gap(i, p.key_length(b)));
  within = narrow_to_block_mask(p, b, h, i, within);
  return within.empty() ? KeyInterval{} : within;
}

// What the block mask does to the pairs of rows [i0, i1) and keys [j0, j1) of (b, h), from its
// blocks alone, before any row is looked at: hides them all (none), shows them all (all: every
// block met is full), or neither (some; also without a block mask, or for an empty range).
enum class BlockCover { none, some, all };
inline BlockCover block_mask_cover(const AttentionProblem& p, std::int64_t b, std::int64_t h,
                                   std::int64_t i0, std::int64_t i1, std::int64_t j0,
                                   std::int64_t j1) {
  if (p.block_mask == nullptr || i0 >= i1 || j0 >= j1) return BlockCover::some;
  const BlockMask& mask = *p.block_mask;
  h += p.head_offset;
  const std::int64_t q_block = mask.shape().q_block, kv_block = mask.shape().kv_block;
  const std::int64_t g0 = j0 + p.key_offset, g1 = j1 + p.key_offset;
  bool none = true, all = true;
  for (std::int64_t qb = (i0 + p.query_offset) / q_block; qb * q_block < i1 + p.query_offset; ++qb)
    for (std::int64_t kb = g0 / kv_block; kb * kv_block < g1; ++kb) {
      const BlockKind kind = mask.kind(b, h, qb, kb);
      none = none && kind == BlockKind::empty;
      all = all && kind == BlockKind::full;
      if (!none && !all) return BlockCover::some;
    }
  return none ? BlockCover::none : all ? BlockCover::all : BlockCover::some;
}

// Whether the block mask hides every pair of rows [i0, i1) and keys [j0, j1) of (b, h) (false
// without a block mask).
inline bool block_mask_hides(const AttentionProblem& p, std::int64_t b, std::int64_t h,
                             std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1) {
  return block_mask_cover(p, b, h, i0, i1, j0, j1) == BlockCover::none;
}

// Sets the scores of keys j0 … j0 + count − 1 of row i (head h, batch b) that an element test
// hides to -inf: the gap between sink tokens and a window, the boolean mask, and the block mask's
// empty and partial blocks.
template <class T>
void hide_masked_keys(const AttentionProblem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                      std::int64_t j0, std::int64_t count, T* scores) {
  constexpr T kHidden = -std::numeric_limits<T>::infinity();
  if (p.positions.sink_end > 0) {  // nothing to compute on the hot path without sink tokens
    const KeyInterval gap = p.positions.gap(i, p.key_length(b)).intersect({j0, j0 + count});
    for (std::int64_t j = gap.first; j < gap.last; ++j) scores[j - j0] = kHidden;
  }
  // bool, one byte per element (make_problem checked the dtype); a mask of runs needs no test
  if (p.mask.present && p.mask_runs == nullptr) {
    const auto* allowed = p.mask.pointer<std::uint8_t>(b, h, i, j0);
    const std::int64_t stride = p.mask.strides[3];
    for (std::int64_t t = 0; t < count; ++t) {
      if (allowed[t * stride] == 0) scores[t] = kHidden;
    }
  }
  if (p.block_mask == nullptr) return;
  const BlockMask& mask = *p.block_mask;
  h += p.head_offset;
  const std::int64_t kv_block = mask.shape().kv_block;
  const std::int64_t q_idx = i + p.query_offset, qb = q_idx / mask.shape().q_block;
  if (mask.rows_are_runs()) {  // only the keys outside the row's run, none inside the interval
    const std::int64_t run_first = mask.run_first(b, h, q_idx) - p.key_offset;
    const std::int64_t run_last = mask.run_last(b, h, q_idx) - p.key_offset;
    if (run_first >= run_last) {
      std::fill(scores, scores + count, kHidden);
      return;
    }
    const std::int64_t end = j0 + count;
    const std::int64_t before = std::clamp(run_first, j0, end);
    const std::int64_t after = std::clamp(run_last, before, end);
    std::fill(scores, scores + (before - j0), kHidden);
    std::fill(scores + (after - j0), scores + count, kHidden);
    return;
  }
  // Block by block in global key positions g = j + key_offset.
  const std::int64_t g_begin = j0 + p.key_offset, g_end = g_begin + count;
  for (std::int64_t g0 = g_begin; g0 < g_end;) {
    const std::int64_t kb = g0 / kv_block;
    const std::int64_t g1 = std::min(g_end, (kb + 1) * kv_block);
    T* block_scores = scores + (g0 - g_begin);
    const BlockKind kind = mask.kind(b, h, qb, kb);
    if (kind == BlockKind::empty) {
      std::fill(block_scores, block_scores + (g1 - g0), kHidden);
    } else if (kind == BlockKind::partial) {  // word by word: only the hidden keys cost a step
      const std::uint64_t* bits = mask.partial_bits(b, h, q_idx, kb);
      const std::int64_t base = kb * kv_block;
      for (std::int64_t t = g0 - base; t < g1 - base;) {
        const std::int64_t word_end = std::min((t / 64 + 1) * 64, g1 - base);
        const std::int64_t width = word_end - t;
        const std::uint64_t wanted =
            width == 64 ? ~std::uint64_t{0} : ((std::uint64_t{1} << width) - 1);
        for (std::uint64_t hidden = ~(bits[t / 64] >> (t % 64)) & wanted; hidden != 0;
             hidden &= hidden - 1) {
          block_scores[base + t + std::countr_zero(hidden) - g0] = kHidden;
        }
        t = word_end;
      }
    }
    g0 = g1;
  }
}

}  // namespace qkv::detail
