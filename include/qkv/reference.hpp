// The float64 oracle: attention evaluated literally, one score at a time.
#pragma once

#include "qkv/attention.hpp"

namespace qkv {

// Same contract and validation as attention_forward, computed in float64 straight from the
// formulas of docs/contract.md §2–4 (every score, then every mask checked per key, then a two-pass
// softmax). Inputs of any supported dtype are widened to float64; results are rounded once into
// the output views. Slow (O(Nq·Nk·D) with no blocking) and meant for tests and small checks.
void attention_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& options, const AttentionOutputs& outputs);

// The same, also writing the scores it normalizes: scores [B, Hq, Nq, Nk] (float32, float64 or
// bfloat16) gets s_ij after every step of docs/contract.md §2 (the score, its scale, the soft cap,
// ALiBi, the bias, the score_mod), and −inf where a mask of §3 hides key j from query i. For
// readers who want to see the matrix a fused kernel never forms (qkv explain).
void attention_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& options, const AttentionOutputs& outputs,
                         const MutableTensorView& scores);

}  // namespace qkv
