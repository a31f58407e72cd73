// The fused kernel: FlashAttention-2 style tiled attention with SIMD micro-kernels (Highway,
// dispatched at run time) for float32 dot, scaled_dot and bilinear scores.
#pragma once

#include <cstdint>

#include "kernels/operands.hpp"

namespace qkv::kernels {

// True when fused_attention computes this problem: float32 q, k, v and a dot, scaled_dot or
// bilinear score (every mask and score option is supported).
bool fused_attention_supports(const AttentionProblem& problem);

// Computes problem.out (and lse, weights when present). Requires fused_attention_supports().
void fused_attention(const AttentionProblem& problem);

// The operands as the SIMD code reads them: unit stride along the head dim, bilinear already
// reduced to a dot score (q' = Wᵀq).
struct FusedOperands {
  const AttentionProblem* problem = nullptr;
  RowMajorOperand<float> q, k, v;
  std::int64_t score_dim = 0;  // length of the q and k rows that are dotted
};

// Packs q, k, v to unit stride where needed and projects q for the bilinear score.
FusedOperands prepare_fused_operands(const AttentionProblem& problem);

// The softmax's exp as the fused kernels compute it, on the SIMD target in use (for the test
// that sweeps its range): out[i] = e^in[i]. Max error 1 ULP for in ∈ [-87, 88] (normal results);
// exactly 0 for in < -104, including -inf.
void softmax_exp(const float* in, float* out, std::int64_t count);

}  // namespace qkv::kernels
