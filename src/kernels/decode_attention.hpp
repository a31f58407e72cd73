// Split-KV attention for decoding: few query rows against many keys.
#pragma once

#include "kernels/operands.hpp"

namespace qkv::kernels {

// True when decode_attention should compute this problem: float32, bfloat16 or float16 (K and V
// also int8: a quantized KV cache whose keys the score compares as they are), a dot-form score,
// few query rows per key/value head (Nq · Hq/Hk: at most 16, or 64 when there is a single (batch,
// key/value head) pair or D ≥ 256; decode_attention.cpp), softmax (not sigmoid), no dropout and no
// weights requested.
bool decode_attention_supports(const AttentionProblem& problem);

// Computes problem.out and problem.lse. Requires decode_attention_supports().
void decode_attention(const AttentionProblem& problem);

}  // namespace qkv::kernels
