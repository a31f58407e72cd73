// The float64 oracle of the backward pass (qkv::attention_backward_reference), and the same for
// one block of a larger problem, which the public backward door uses for float64 inputs.
#pragma once

#include <optional>

#include "qkv/backward.hpp"

namespace qkv::detail {

// With `saved`, the backward of one block of a larger problem: P from the saved LSE and Δ from
// the saved O, as the fused kernel does; without, everything recomputed from the inputs.
void backward_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionOptions& options, const TensorView& dout,
                        const std::optional<TensorView>& dlse, const AttentionGradients& gradients,
                        const std::optional<SavedForward>& saved);

}  // namespace qkv::detail
