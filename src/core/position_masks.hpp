// The position masks (docs/contract.md §3): rules on a query position i and a key position j that
// leave each query row one interval of keys, whose ends never decrease from one row to the next
// (with sink tokens, two: the tokens and the window, and the gap between them hidden).
// Each mask is one unit here — its rule, its name — and everything that needs to know which keys
// a row sees (the kernels, the backward, the ring's skipping of whole blocks) asks PositionMasks.
// The float64 reference keeps its own literal formula of each (reference/naive_attention.cpp).
#pragma once

#include <algorithm>
#include <cstdint>

#include "qkv/attention.hpp"
#include "qkv/block_mask.hpp"

namespace qkv::detail {

// The keys [first, last) of one row.
struct KeyInterval {
  std::int64_t first = 0, last = 0;
  bool empty() const { return first >= last; }
  KeyInterval intersect(KeyInterval other) const {
    return {std::max(first, other.first), std::min(last, other.last)};
  }
};

// causal: key j visible to query i iff j <= i + diagonal, where the diagonal is that of the
// chosen alignment (bottom-right: Nk − Nq, top-left: 0, both shifted by the call's offsets).
// With a prefix (prefix LM), keys j < prefix_end are visible to every query as well.
struct CausalMask {
  static constexpr const char* kName = "causal";
  std::int64_t diagonal = 0;
  std::int64_t prefix_end = 0;  // local: prefix_length − key_offset (≤ 0: no prefix)
  KeyInterval keys(std::int64_t i) const { return {0, std::max(i + diagonal + 1, prefix_end)}; }
};

// window: key j visible to query i iff i + d − left <= j <= i + d + right, d the bottom-right
// diagonal; a side of −1 is unbounded.
struct WindowMask {
  static constexpr const char* kName = "window";
  std::int64_t diagonal = 0, left = -1, right = -1;
  KeyInterval keys(std::int64_t i, std::int64_t key_end) const {
    return {left >= 0 ? i + diagonal - left : 0,
            right >= 0 ? std::min(key_end, i + diagonal + right + 1) : key_end};
  }
};

// sink tokens (StreamingLLM): keys j < sink_end stay visible past a window's left edge, so a row
// sees two intervals, the sink tokens and its window, with a gap between them; the tokens still
// obey the causal mask, the window's right edge and the key lengths.
struct SinkTokens {
  static constexpr const char* kName = "sink_tokens";
  std::int64_t sink_end = 0;  // local: sink_tokens − key_offset (≤ 0: none)
  // The tokens row i may see, within the keys `allowed` by every mask but the window's left edge.
  KeyInterval keys(KeyInterval allowed) const { return allowed.intersect({0, sink_end}); }
};

// The part of `keys` outside `gap`, as one interval: `keys` itself when the gap lies strictly
// inside it (the element tests, visibility.hpp's hide_masked_keys, then hide the gap's keys).
inline KeyInterval without_gap(KeyInterval keys, KeyInterval gap) {
  if (gap.empty() || keys.empty()) return keys;
  if (keys.first >= gap.first && keys.last <= gap.last) return {};  // all in the gap
  if (keys.first >= gap.first && keys.first < gap.last) keys.first = gap.last;
  if (keys.last > gap.first && keys.last <= gap.last) keys.last = gap.first;
  return keys;
}

// Every position mask of a problem (the key lengths, the third, are per batch: key_end).
struct PositionMasks {
  bool causal = false;
  CausalAlign causal_align = CausalAlign::bottom_right;
  // Prefix LM: local keys j < prefix_end are in the prefix (prefix_length − key_offset; ≤ 0: none).
  std::int64_t prefix_end = 0;
  std::int64_t window_left = -1, window_right = -1;
  // Sink tokens (with a window): local keys j < sink_end (sink_tokens − key_offset; ≤ 0: none).
  std::int64_t sink_end = 0;
  // Where this call sits in the whole problem, as the key aligned with local query 0:
  // bottom-right (FlashAttention) and top-left (PyTorch) alignment.
  std::int64_t bottom_right_diagonal = 0, top_left_diagonal = 0;

  // The keys query row i sees, of the keys [0, key_end) that are not padding: one interval, from
  // its first visible key to its last; with sink tokens, the keys between the tokens and the
  // window (gap(i)) are inside it but hidden.
  KeyInterval row(std::int64_t i, std::int64_t key_end) const {
    const KeyInterval window = WindowKeys(i, key_end), tokens = TokenKeys(i, key_end);
    if (tokens.empty()) return window;
    if (window.empty()) return tokens;
    return {std::min(window.first, tokens.first), std::max(window.last, tokens.last)};
  }

  // The keys of row(i) it does not see: between the sink tokens and the window (else empty).
  KeyInterval gap(std::int64_t i, std::int64_t key_end) const {
    if (sink_end <= 0 || window_left < 0) return {};
    const KeyInterval window = WindowKeys(i, key_end), tokens = TokenKeys(i, key_end);
    if (tokens.empty() || window.empty() || tokens.last >= window.first) return {};
    return {tokens.last, window.first};
  }

  // Rows [i0, i1) against keys [j0, j1): empty when no row sees any of the keys, full when every
  // row sees all of them, partial otherwise.
  BlockKind tile(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1,
                 std::int64_t key_end) const {
    bool any = false, all = true;
    for (std::int64_t i = i0; i < i1; ++i) {
      const KeyInterval seen = row(i, key_end).intersect({j0, j1});
      const KeyInterval hidden = gap(i, key_end).intersect({j0, j1});
      any = any || !without_gap(seen, hidden).empty();
      all = all && seen.first == j0 && seen.last == j1 && hidden.empty();
    }
    return !any ? BlockKind::empty : (all ? BlockKind::full : BlockKind::partial);
  }

 private:
  // Every mask but the window's left edge.
  KeyInterval Allowed(std::int64_t i, std::int64_t key_end) const {
    KeyInterval keys{0, key_end};
    if (causal) {
      const CausalMask mask{
          causal_align == CausalAlign::bottom_right ? bottom_right_diagonal : top_left_diagonal,
          prefix_end};
      keys = keys.intersect(mask.keys(i));
    }
    if (window_right >= 0)
      keys = keys.intersect(WindowMask{bottom_right_diagonal, -1, window_right}.keys(i, key_end));
    return keys;
  }
  // The window's interval of row i (every mask applied).
  KeyInterval WindowKeys(std::int64_t i, std::int64_t key_end) const {
    KeyInterval keys = Allowed(i, key_end);
    if (window_left >= 0)
      keys = keys.intersect(WindowMask{bottom_right_diagonal, window_left, -1}.keys(i, key_end));
    return keys;
  }
  // The sink tokens row i sees (only with a left window edge: otherwise the window has them).
  KeyInterval TokenKeys(std::int64_t i, std::int64_t key_end) const {
    if (sink_end <= 0 || window_left < 0) return {};
    return SinkTokens{sink_end}.keys(Allowed(i, key_end));
  }
};

}  // namespace qkv::detail
