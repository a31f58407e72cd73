// Dropout on the attention weights: which weights survive, as a pure function of where they are.
//
// The mask is not stored: the forward, the weights pass and the backward each ask again, and get
// the same answer, because weight (b, h, i, j) survives iff a 64-bit hash of the seed and the
// weight's flat index in the whole problem (global positions, when this call is a block of a
// larger one), read as a number in [0, 1), is at least p. The hash is SplitMix64's
// finalizer (Steele, Lea and Flood 2014), a bijection with full avalanche, so neighbouring weights
// are independent for all practical purposes and the mask does not depend on thread count or
// kernel. A survivor is scaled by 1 / (1 − p) so that the expected output is unchanged.
#pragma once

#include <cstdint>

#include "core/problem.hpp"

namespace qkv::detail {

class DropoutMask {
 public:
  explicit DropoutMask(const AttentionProblem& p)
      : seed_(p.dropout_seed),
        heads_(p.head_total),
        rows_(p.query_total),
        keys_(p.key_total),
        head_offset_(p.head_offset),
        query_offset_(p.query_offset),
        key_offset_(p.key_offset),
        // keep iff hash >> 11 (53 random bits) >= p · 2^53
        threshold_(static_cast<std::uint64_t>(p.dropout * 9007199254740992.0)),
        keep_scale_(p.dropout > 0 ? 1.0 / (1.0 - p.dropout) : 1.0),
        active_(p.dropout > 0) {}

  bool active() const { return active_; }
  // 1 / (1 − p): the factor of a surviving weight.
  double keep_scale() const { return keep_scale_; }

  bool keeps(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    const auto index = static_cast<std::uint64_t>(
        ((b * heads_ + h + head_offset_) * rows_ + i + query_offset_) * keys_ + j + key_offset_);
    std::uint64_t x = seed_ + (index + 1) * 0x9e3779b97f4a7c15ULL;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return (x >> 11) >= threshold_;
  }
  // The factor weight (b, h, i, j) is multiplied by: 0 or 1 / (1 − p).
  double factor(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    return keeps(b, h, i, j) ? keep_scale_ : 0.0;
  }

 private:
  std::uint64_t seed_;
  std::int64_t heads_, rows_, keys_, head_offset_, query_offset_, key_offset_;
  std::uint64_t threshold_;
  double keep_scale_;
  bool active_;
};

}  // namespace qkv::detail
