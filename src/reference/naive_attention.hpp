// Attention evaluated literally, in a chosen precision. With Real = double this is the oracle
// (qkv::attention_reference); with Real = float it is the naive float32 algorithm whose error
// against the oracle sets the tolerance of every float32 kernel test (STYLE.md: error floors).
#pragma once

#include "core/problem.hpp"

namespace qkv::detail {

template <class Real>
void naive_attention(const AttentionProblem& problem);

extern template void naive_attention<float>(const AttentionProblem&);
extern template void naive_attention<double>(const AttentionProblem&);

// Whether key j is visible to query row i of head h in batch b: every mask of docs/contract.md §3
// checked literally, one condition at a time (the backward's oracle asks it too).
bool key_visible(const AttentionProblem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                 std::int64_t j);

// The naive algorithm as a bfloat16 pipeline runs it (matmul → softmax → matmul, each stage
// stored in bfloat16): float32 arithmetic, with the scores, the weights and the output rounded to
// bfloat16. Its error is the floor for bfloat16 kernels.
void naive_attention_bfloat16(const AttentionProblem& problem);

}  // namespace qkv::detail
