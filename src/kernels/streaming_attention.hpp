// The streaming kernel: attention one query row at a time with an online softmax over blocks of
// keys, in float64 and O(N·D) memory, for every score and mask of the contract. It takes the
// float64 problems; the fused kernel takes float32 and bfloat16.
#pragma once

#include "core/problem.hpp"

namespace qkv::kernels {

// Computes problem.out (and lse, weights when present) for a validated float64 problem.
void streaming_attention(const detail::AttentionProblem& problem);

}  // namespace qkv::kernels
