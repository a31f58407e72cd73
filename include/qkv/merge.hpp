// Merging attention results computed over disjoint sets of keys.
#pragma once

#include <optional>
#include <span>

#include "qkv/attention.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// Given, for parts p = 0 … P−1, the results of attention of the same queries over disjoint sets
// of keys — outs[p]: O_p [B, Nq, Hq, Dv] and lses[p]: LSE_p [B, Hq, Nq] — writes the result over
// the union of the key sets, exactly as if it had been computed at once:
//   LSE = log Σ_p e^(LSE_p),   O = Σ_p e^(LSE_p − LSE) · O_p   (in float64, rounded once).
// Parts that saw no key (LSE_p = -inf) contribute nothing; rows no part saw get O = 0, LSE = -inf.
// A part with LSE_p = NaN makes its row's O and LSE NaN.
// All tensors float32, float64, bfloat16 or float16, any strides; `out` may be one of the parts'
// storage. Throws qkv::Error naming the argument when counts, shapes or dtypes disagree. With
// normalization sigmoid (no normalizer: each part's O is already a plain sum), O = Σ_p O_p and LSE
// as above (the log of the rows' total weight).
void merge_attention(std::span<const TensorView> outs, std::span<const TensorView> lses,
                     const MutableTensorView& out,
                     const std::optional<MutableTensorView>& lse = std::nullopt,
                     Normalization normalization = Normalization::softmax);

}  // namespace qkv
