// The streaming kernel: attention one query row at a time with an online softmax over blocks of
// keys, in O(N·D) memory. It covers every score and mask of the contract for float32 and float64
// and is the fallback beneath the fused SIMD kernel.
#pragma once

#include "core/problem.hpp"

namespace qkv::kernels {

// Computes problem.out (and lse, weights when present) for a validated problem.
void streaming_attention(const detail::AttentionProblem& problem);

}  // namespace qkv::kernels
