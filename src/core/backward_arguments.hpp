// What both backward passes (the float64 oracle and the fused kernel) do at their door: check
// dout, dlse and the gradient views, and move values between strided views and dense buffers.
#pragma once

#include <cstdint>
#include <optional>

#include "core/problem.hpp"
#include "qkv/backward.hpp"

namespace qkv::detail {

// Validates the forward's arguments (as attention_forward would), then dout [B, Nq, Hq, Dv],
// dlse [B, Hq, Nq] and every requested gradient (the primal's shape, a float dtype; none for a
// parameter the score does not have). Throws qkv::Error naming the argument. Returns the
// problem, whose output slot has O's shape and no storage (the backward never writes it).
AttentionProblem check_backward_arguments(const TensorView& q, const TensorView& k,
                                          const TensorView& v, const AttentionOptions& options,
                                          const TensorView& dout,
                                          const std::optional<TensorView>& dlse,
                                          const AttentionGradients& gradients);

// Offset, in elements, of the n-th element (row-major order) of a strided view.
std::int64_t offset_of(const TensorView& view, std::int64_t n);

// A dense float64 copy of a float view; other dtypes (masks, lengths) are copied as they are.
Tensor dense_copy(const TensorView& view);

// Writes values[n] to the n-th element (row-major order) of a float view of any strides,
// rounding to its dtype.
void store_dense(const double* values, const MutableTensorView& view);

}  // namespace qkv::detail
