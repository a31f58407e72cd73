// The two register tiles of the fused kernel on the AVX-512 BF16 dot-product instruction
// (vdpbf16ps: 32 bfloat16 products accumulated into 16 float32 lanes per instruction, twice the
// multiply-adds of a float32 FMA). Compiled for AVX-512 BF16 in their own translation unit;
// callers check cpu_has_avx512_bf16() first.
//
// "Pairs" are two bfloat16 values in one 32-bit word, the first in the low half: the instruction
// multiplies pairs by pairs and adds both products to one float32 lane.
#pragma once

#include <cstdint>

namespace qkv::kernels {

// Whether this CPU runs AVX-512 F/BW/DQ/VL and the BF16 extension.
bool cpu_has_avx512_bf16();

// The bfloat16 pair (a, b) → one 32-bit word, a in the low half.
inline std::uint32_t bf16_pair(std::uint16_t low, std::uint16_t high) {
  return static_cast<std::uint32_t>(low) | (static_cast<std::uint32_t>(high) << 16);
}

// scores[r, c·16 + l] = scale · Σ_e q_pairs[r, e] · key_pairs[e, c·16 + l] for r < rows (1 … 4),
// c < 4 (64 keys), e < pair_count. q_pairs rows are q_stride words apart, key_pairs rows
// key_stride words (keys along a row), scores rows score_stride floats.
void bf16_score_tile(int rows, const std::uint32_t* q_pairs, std::int64_t q_stride,
                     const std::uint32_t* key_pairs, std::int64_t key_stride,
                     std::int64_t pair_count, float scale, float* scores,
                     std::int64_t score_stride);

// pairs[r, t] = (bf16(p[r, 2t]), bf16(p[r, 2t + 1])) for r < rows, t < count / 2: rows of float32
// weights rounded (to nearest even) into the pair layout of bf16_accumulate_tile. count is a
// multiple of 32; p rows are p_stride floats apart, pairs rows pairs_stride words.
void bf16_pair_rows(int rows, const float* p, std::int64_t p_stride, std::int64_t count,
                    std::uint32_t* pairs, std::int64_t pairs_stride);

// acc[r, c·16 + l] = correction[r] · acc[r, c·16 + l]
//                    + Σ_t p_pairs[r, t] · value_pairs[t, c·16 + l]
// for r < rows (1 … 4), c < vectors (1 … 4), t < pair_count (pairs of keys). p_pairs rows are
// p_stride words apart, value_pairs rows value_stride words, acc rows acc_stride floats.
void bf16_accumulate_tile(int rows, int vectors, const std::uint32_t* p_pairs,
                          std::int64_t p_stride, const std::uint32_t* value_pairs,
                          std::int64_t value_stride, std::int64_t pair_count,
                          const float* correction, float* acc, std::int64_t acc_stride);

// The split-KV decode's two products (kernels/decode_attention.cpp), which read K and V in place:
//
// scores[g · score_stride + k] = scale · Σ_e queries[g · query_stride + e] · keys[k][e] for
// g < rows (1 … 4), k < key_count (1 … 4), e < n: bfloat16 query and key rows, unit stride. Each
// product of two bfloat16 values is exact in float32; the sums are float32.
void bf16_decode_scores(int rows, const std::uint16_t* queries, std::int64_t query_stride,
                        const std::uint16_t* const* keys, int key_count, std::int64_t n,
                        float scale, float* scores, std::int64_t score_stride);

// acc[g · acc_stride + d] += Σ_t bf16(weights[g · weight_stride + t]) · values[t][d] for
// g < rows (1 … 4), t < count (at most 16), d < n: the weights rounded to bfloat16 (to nearest
// even, as the fused kernel rounds P for its products), bfloat16 value rows of unit stride.
void bf16_decode_accumulate(int rows, const float* weights, std::int64_t weight_stride,
                            const std::uint16_t* const* values, int count, std::int64_t n,
                            float* acc, std::int64_t acc_stride);

}  // namespace qkv::kernels
