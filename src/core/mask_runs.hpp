// A boolean mask (AttentionOptions::mask) read once at the door, as the intervals it is made of.
//
// Masks that PyTorch users write out as booleans — causal (`~torch.ones(L, S).triu(1)`), sliding
// windows, prefix LM, documents, padding — leave each query row one run of visible keys. When
// every row of a mask is one run (or sees no key), each row's run is its visible interval: the
// kernels then skip every key outside it, as they do for the position masks, and need no element
// test inside it. Any other mask keeps its element test (core/visibility.hpp). The float64
// reference always reads the mask element by element, so the tests compare the two readings.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <vector>

#include "core/position_masks.hpp"

namespace qkv::detail {

class MaskRuns {
 public:
  // The runs of a boolean mask over [B, H, Nq, Nk] whose element (b, h, i, j) is the byte at
  // data + b·strides[0] + h·strides[1] + i·strides[2] + j·strides[3] (nonzero: visible; a stride
  // of 0 broadcasts), or nullptr when some row is not one run. Rows that broadcast (stride 0 on
  // b, h or i) are read once. Reads each row at most once, 8 bytes at a time when strides[3] = 1.
  static std::shared_ptr<const MaskRuns> read(const std::uint8_t* data,
                                              const std::array<std::int64_t, 4>& strides,
                                              const std::array<std::int64_t, 4>& shape);

  // The visible keys of row i of head h in batch b: exactly the mask's true elements.
  KeyInterval row(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return runs_[static_cast<std::size_t>(b * strides_[0] + h * strides_[1] + i * strides_[2])];
  }

 private:
  std::vector<KeyInterval> runs_;
  std::array<std::int64_t, 3> strides_{};  // into runs_, 0 where the mask broadcasts
};

}  // namespace qkv::detail
