// The split-KV decode's key pass over an int8 KV cache on the AVX-512 VNNI dot-product
// instruction (vpdpbusd: 64 products of unsigned by signed bytes summed four at a time into 16
// int32 lanes per instruction). Compiled for AVX-512 VNNI in its own translation unit; callers
// check cpu_has_avx512_vnni() first.
#pragma once

#include <cstdint>

namespace qkv::kernels {

// Whether this CPU runs AVX-512 F/BW/VL and the VNNI extension.
bool cpu_has_avx512_vnni();

// The longest rows int8_decode_scores takes: n · 255 · 127 < 2³¹.
inline constexpr std::int64_t kInt8ProductsMaxLength = 65536;

// scores[g · score_stride + k] = float(Σ_e queries[g · query_stride + e] · keys[k][e])
//                                · key_scales[k] · row_factors[g]
// for g < rows (1 … 4), k < key_count (1 … 4), e < n ≤ kInt8ProductsMaxLength: int8 query and key
// rows of unit stride, query_sums[g] = Σ_e queries[g · query_stride + e]. The sums are exact
// (int32), and the float32 products are taken in that order, as the decode's float32 tiles take
// them on integer-valued queries, whose float32 sums are exact too up to n = 1040 (127² · n < 2²⁴):
// there every target gives the same scores.
void int8_decode_scores(int rows, const std::int8_t* queries, std::int64_t query_stride,
                        const std::int32_t* query_sums, const std::int8_t* const* keys,
                        int key_count, std::int64_t n, const float* key_scales,
                        const float* row_factors, float* scores, std::int64_t score_stride);

}  // namespace qkv::kernels
