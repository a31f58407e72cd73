// AVX-512 BF16 register tiles. Register budget as in the float32 kernel: 4 rows × 4 vectors =
// 16 accumulators, 4 loads and 1 broadcast live, 21 of 32 zmm registers.

#include "kernels/bf16_microkernels.hpp"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

namespace qkv::kernels {

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace {

template <int kRows>
void score_tile(const std::uint32_t* q_pairs, std::int64_t q_stride, const std::uint32_t* key_pairs,
                std::int64_t key_stride, std::int64_t pair_count, float scale, float* scores,
                std::int64_t score_stride) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (std::int64_t e = 0; e < pair_count; ++e) {
    const std::uint32_t* row = key_pairs + e * key_stride;
    __m512bh keys[4];
    for (int c = 0; c < 4; ++c) keys[c] = (__m512bh)_mm512_load_si512(row + c * 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh query =
          (__m512bh)_mm512_set1_epi32(static_cast<int>(q_pairs[r * q_stride + e]));
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], query, keys[c]);
    }
  }
  const __m512 scale_vector = _mm512_set1_ps(scale);
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) {
      _mm512_store_ps(scores + r * score_stride + c * 16, _mm512_mul_ps(acc[r][c], scale_vector));
    }
}

template <int kRows, int kVectors>
void accumulate_tile(const std::uint32_t* p_pairs, std::int64_t p_stride,
                     const std::uint32_t* value_pairs, std::int64_t value_stride,
                     std::int64_t pair_count, const float* correction, float* acc_rows,
                     std::int64_t acc_stride) {
  __m512 acc[kRows][kVectors];
  for (int r = 0; r < kRows; ++r) {
    const __m512 factor = _mm512_set1_ps(correction[r]);
    for (int c = 0; c < kVectors; ++c) {
      acc[r][c] = _mm512_mul_ps(factor, _mm512_load_ps(acc_rows + r * acc_stride + c * 16));
    }
  }
  for (std::int64_t t = 0; t < pair_count; ++t) {
    const std::uint32_t* row = value_pairs + t * value_stride;
    __m512bh values[kVectors];
    for (int c = 0; c < kVectors; ++c) values[c] = (__m512bh)_mm512_load_si512(row + c * 16);
    for (int r = 0; r < kRows; ++r) {
      const __m512bh weight =
          (__m512bh)_mm512_set1_epi32(static_cast<int>(p_pairs[r * p_stride + t]));
      for (int c = 0; c < kVectors; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], weight, values[c]);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < kVectors; ++c)
      _mm512_store_ps(acc_rows + r * acc_stride + c * 16, acc[r][c]);
}

template <int kRows>
void accumulate_rows(int vectors, const std::uint32_t* p_pairs, std::int64_t p_stride,
                     const std::uint32_t* value_pairs, std::int64_t value_stride,
                     std::int64_t pair_count, const float* correction, float* acc,
                     std::int64_t acc_stride) {
  switch (vectors) {
    case 4:
      return accumulate_tile<kRows, 4>(p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                       correction, acc, acc_stride);
    case 3:
      return accumulate_tile<kRows, 3>(p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                       correction, acc, acc_stride);
    case 2:
      return accumulate_tile<kRows, 2>(p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                       correction, acc, acc_stride);
    default:
      return accumulate_tile<kRows, 1>(p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                       correction, acc, acc_stride);
  }
}

}  // namespace

void bf16_score_tile(int rows, const std::uint32_t* q_pairs, std::int64_t q_stride,
                     const std::uint32_t* key_pairs, std::int64_t key_stride,
                     std::int64_t pair_count, float scale, float* scores,
                     std::int64_t score_stride) {
  switch (rows) {
    case 4:
      return score_tile<4>(q_pairs, q_stride, key_pairs, key_stride, pair_count, scale, scores,
                           score_stride);
    case 3:
      return score_tile<3>(q_pairs, q_stride, key_pairs, key_stride, pair_count, scale, scores,
                           score_stride);
    case 2:
      return score_tile<2>(q_pairs, q_stride, key_pairs, key_stride, pair_count, scale, scores,
                           score_stride);
    default:
      return score_tile<1>(q_pairs, q_stride, key_pairs, key_stride, pair_count, scale, scores,
                           score_stride);
  }
}

void bf16_pair_rows(int rows, const float* p, std::int64_t p_stride, std::int64_t count,
                    std::uint32_t* pairs, std::int64_t pairs_stride) {
  // Two float32 vectors become 32 consecutive bfloat16 values, i.e. 16 pairs of neighbours.
  for (int r = 0; r < rows; ++r) {
    for (std::int64_t t = 0; t < count; t += 32) {
      const __m512bh rounded = _mm512_cvtne2ps_pbh(_mm512_load_ps(p + r * p_stride + t + 16),
                                                   _mm512_load_ps(p + r * p_stride + t));
      _mm512_store_si512(pairs + r * pairs_stride + t / 2, (__m512i)rounded);
    }
  }
}

void bf16_accumulate_tile(int rows, int vectors, const std::uint32_t* p_pairs,
                          std::int64_t p_stride, const std::uint32_t* value_pairs,
                          std::int64_t value_stride, std::int64_t pair_count,
                          const float* correction, float* acc, std::int64_t acc_stride) {
  switch (rows) {
    case 4:
      return accumulate_rows<4>(vectors, p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                correction, acc, acc_stride);
    case 3:
      return accumulate_rows<3>(vectors, p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                correction, acc, acc_stride);
    case 2:
      return accumulate_rows<2>(vectors, p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                correction, acc, acc_stride);
    default:
      return accumulate_rows<1>(vectors, p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                correction, acc, acc_stride);
  }
}

}  // namespace qkv::kernels

#else  // no AVX-512 on this architecture

#include <cstdlib>

namespace qkv::kernels {

// The check says no, so the fused kernel never calls the tiles; they exist for the linker, and
// reaching one would be a bug.
bool cpu_has_avx512_bf16() {
  return false;
}

void bf16_score_tile(int, const std::uint32_t*, std::int64_t, const std::uint32_t*, std::int64_t,
                     std::int64_t, float, float*, std::int64_t) {
  std::abort();
}

void bf16_pair_rows(int, const float*, std::int64_t, std::int64_t, std::uint32_t*, std::int64_t) {
  std::abort();
}

void bf16_accumulate_tile(int, int, const std::uint32_t*, std::int64_t, const std::uint32_t*,
                          std::int64_t, std::int64_t, const float*, float*, std::int64_t) {
  std::abort();
}

}  // namespace qkv::kernels

#endif
