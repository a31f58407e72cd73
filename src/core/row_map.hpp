// Rows gathered from elsewhere: how a KV cache's keys and values become a [B, N, Hk, D] operand
// without a copy. The kernels read an operand a row (b, n) at a time; with a RowMap, row (b, n)
// lies at sequence slot n + slot_shift[b] of batch row batch_index[b] of a contiguous cache, or,
// paged, at row slot % page_size of page page_table[b][slot / page_size]. Set only by the KV-cache
// door (api/kv_cache.cpp), which checked every index against the cache it reads.
//
// Kernels also read rows that the masks then hide (a tile or a vector of keys is read whole). A
// slot outside the sequence's own [first_slot[b], end_slot[b]) is moved to its nearest end, so
// such reads stay inside the sequence's memory and see its finite values, never another
// sequence's slots, unwritten slots, or memory outside the cache.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>

namespace qkv::detail {

struct RowMap {
  const std::int64_t* batch_index = nullptr;  // [B]; null: batch row b
  const std::int64_t* slot_shift = nullptr;   // [B]; null: slot n
  const std::int64_t* first_slot = nullptr;   // [B]; with end_slot: the slots rows may come from
  const std::int64_t* end_slot = nullptr;     // [B]
  const std::int64_t* page_table = nullptr;   // [B, pages_per_sequence]; null: contiguous
  std::int64_t pages_per_sequence = 0;
  std::int64_t page_size = 1;
  int page_shift = -1;  // log2(page_size) when it is a power of two (a shift, not a division)

  // (first index, second index) of the storage row holding logical row (b, n): (batch row, slot)
  // of a contiguous cache, (page, row in the page) of a paged one.
  std::array<std::int64_t, 2> locate(std::int64_t b, std::int64_t n) const {
    std::int64_t slot = slot_shift == nullptr ? n : n + slot_shift[b];
    if (first_slot != nullptr)
      slot = std::clamp(slot, first_slot[b], std::max(first_slot[b], end_slot[b] - 1));
    if (page_table != nullptr) {
      if (page_shift >= 0) {
        return {page_table[b * pages_per_sequence + (slot >> page_shift)], slot & (page_size - 1)};
      }
      return {page_table[b * pages_per_sequence + slot / page_size], slot % page_size};
    }
    return {batch_index == nullptr ? b : batch_index[b], slot};
  }
  // The offset of that row in storage whose first two dimensions have these strides.
  std::int64_t offset(std::int64_t b, std::int64_t n, std::int64_t stride0,
                      std::int64_t stride1) const {
    const auto [r0, r1] = locate(b, n);
    return r0 * stride0 + r1 * stride1;
  }
};

}  // namespace qkv::detail
