// AVX-512 BF16 register tiles. Register budget as in the float32 kernel: 4 rows × 4 vectors =
// 16 accumulators, 4 loads and 1 broadcast live, 21 of 32 zmm registers.

#include "kernels/bf16_microkernels.hpp"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include <algorithm>
#include <array>
#include <type_traits>

#include "kernels/avx512_tiles.hpp"

namespace qkv::kernels {

bool cpu_has_avx512_bf16() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512bf16");
  return has;
}

namespace {

using avx512::with_count;

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

// The 32 bfloat16 elements of `row` from e on, those at or past n zero.
inline __m512i load_bf16(const std::uint16_t* row, std::int64_t e, std::int64_t n) {
  if (n - e >= 32) return _mm512_loadu_si512(row + e);
  const auto mask = static_cast<__mmask32>((std::uint64_t{1} << (n - e)) - 1);
  return _mm512_maskz_loadu_epi16(mask, row + e);
}

template <int kRows, int kKeys>
void decode_scores(const std::uint16_t* queries, std::int64_t query_stride,
                   const std::uint16_t* const* keys, std::int64_t n, float scale, float* scores,
                   std::int64_t score_stride) {
  float sums[kRows * kKeys];
  avx512::tile_sums<kRows, kKeys>(
      n, 32, _mm512_setzero_ps(),
      [&](int k, std::int64_t e) { return (__m512bh)load_bf16(keys[k], e, n); },
      [&](int g, std::int64_t e) { return (__m512bh)load_bf16(queries + g * query_stride, e, n); },
      [](__m512 sum, __m512bh query, __m512bh key) { return _mm512_dpbf16_ps(sum, query, key); },
      sums);
  for (int g = 0; g < kRows; ++g)
    for (int k = 0; k < kKeys; ++k) scores[g * score_stride + k] = scale * sums[g * kKeys + k];
}

// kBlocks blocks of 32 elements of every row's accumulator stay in registers (2 vectors each)
// while the value rows pass two at a time: their elements interleaved into pairs (row t, row
// t + 1), multiplied by the rows' weight pair (t, t + 1).
template <int kRows, int kBlocks>
void decode_accumulate_blocks(const std::uint32_t* weight_pairs, const std::uint16_t* const* values,
                              int count, std::int64_t d, std::int64_t n, float* acc,
                              std::int64_t acc_stride) {
  // Word l of a pair vector: (a[l], b[l]) for the low half of a and b, (a[16 + l], b[16 + l]) for
  // the high half (index bit 5 picks b).
  alignas(64) static constexpr auto kIndices = [] {
    std::array<std::uint16_t, 64> indices{};  // low's 32, then high's
    for (int l = 0; l < 16; ++l) {
      indices[2 * l] = static_cast<std::uint16_t>(l);
      indices[2 * l + 1] = static_cast<std::uint16_t>(32 + l);
      indices[32 + 2 * l] = static_cast<std::uint16_t>(16 + l);
      indices[32 + 2 * l + 1] = static_cast<std::uint16_t>(48 + l);
    }
    return indices;
  }();
  const __m512i low = _mm512_load_si512(kIndices.data());
  const __m512i high = _mm512_load_si512(kIndices.data() + 32);
  __mmask16 masks[2 * kBlocks];
  for (int c = 0; c < 2 * kBlocks; ++c) {
    const std::int64_t left = std::max<std::int64_t>(0, std::min<std::int64_t>(16, n - d - 16 * c));
    masks[c] = static_cast<__mmask16>((1u << left) - 1);
  }
  __m512 sum[kRows][2 * kBlocks];
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < 2 * kBlocks; ++c)
      sum[g][c] = _mm512_maskz_loadu_ps(masks[c], acc + g * acc_stride + d + 16 * c);
  for (int t = 0; t < count; t += 2) {
    for (int b = 0; b < kBlocks; ++b) {
      const std::int64_t e = d + 32 * b;
      const __m512i first = load_bf16(values[t], e, n);
      const __m512i second =
          t + 1 < count ? load_bf16(values[t + 1], e, n) : _mm512_setzero_si512();
      const auto pairs_low = (__m512bh)_mm512_permutex2var_epi16(first, low, second);
      const auto pairs_high = (__m512bh)_mm512_permutex2var_epi16(first, high, second);
      for (int g = 0; g < kRows; ++g) {
        const auto weight =
            (__m512bh)_mm512_set1_epi32(static_cast<int>(weight_pairs[g * 8 + t / 2]));
        sum[g][2 * b] = _mm512_dpbf16_ps(sum[g][2 * b], weight, pairs_low);
        sum[g][2 * b + 1] = _mm512_dpbf16_ps(sum[g][2 * b + 1], weight, pairs_high);
      }
    }
  }
  for (int g = 0; g < kRows; ++g)
    for (int c = 0; c < 2 * kBlocks; ++c)
      _mm512_mask_storeu_ps(acc + g * acc_stride + d + 16 * c, masks[c], sum[g][c]);
}

template <int kRows>
void decode_accumulate(const float* weights, std::int64_t weight_stride,
                       const std::uint16_t* const* values, int count, std::int64_t n, float* acc,
                       std::int64_t acc_stride) {
  // The weights as bfloat16 pairs (t, t + 1), 8 pairs per row; a missing 16th weight is zero.
  alignas(64) std::uint32_t weight_pairs[kRows * 8];
  const auto used = static_cast<__mmask16>((1u << count) - 1);
  for (int g = 0; g < kRows; ++g) {
    const __m256bh rounded =
        _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(used, weights + g * weight_stride));
    _mm256_store_si256(reinterpret_cast<__m256i*>(weight_pairs + g * 8), (__m256i)rounded);
  }
  // Accumulators in at most 16 registers: 4 blocks of 32 elements for one or two rows, 2 for
  // three or four.
  constexpr int kBlocks = kRows <= 2 ? 4 : 2;
  std::int64_t d = 0;
  for (; d + 32 * kBlocks <= n; d += 32 * kBlocks)
    decode_accumulate_blocks<kRows, kBlocks>(weight_pairs, values, count, d, n, acc, acc_stride);
  for (; d < n; d += 32)
    decode_accumulate_blocks<kRows, 1>(weight_pairs, values, count, d, n, acc, acc_stride);
}
}  // namespace

void bf16_score_tile(int rows, const std::uint32_t* q_pairs, std::int64_t q_stride,
                     const std::uint32_t* key_pairs, std::int64_t key_stride,
                     std::int64_t pair_count, float scale, float* scores,
                     std::int64_t score_stride) {
  with_count(rows, [&](auto r) {
    score_tile<r.value>(q_pairs, q_stride, key_pairs, key_stride, pair_count, scale, scores,
                        score_stride);
  });
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
  with_count(rows, [&](auto r) {
    with_count(vectors, [&](auto c) {
      accumulate_tile<r.value, c.value>(p_pairs, p_stride, value_pairs, value_stride, pair_count,
                                        correction, acc, acc_stride);
    });
  });
}

void bf16_decode_scores(int rows, const std::uint16_t* queries, std::int64_t query_stride,
                        const std::uint16_t* const* keys, int key_count, std::int64_t n,
                        float scale, float* scores, std::int64_t score_stride) {
  with_count(rows, [&](auto r) {
    with_count(key_count, [&](auto k) {
      decode_scores<r.value, k.value>(queries, query_stride, keys, n, scale, scores, score_stride);
    });
  });
}

void bf16_decode_accumulate(int rows, const float* weights, std::int64_t weight_stride,
                            const std::uint16_t* const* values, int count, std::int64_t n,
                            float* acc, std::int64_t acc_stride) {
  with_count(rows, [&](auto r) {
    decode_accumulate<r.value>(weights, weight_stride, values, count, n, acc, acc_stride);
  });
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

void bf16_decode_scores(int, const std::uint16_t*, std::int64_t, const std::uint16_t* const*, int,
                        std::int64_t, float, float*, std::int64_t) {
  std::abort();
}

void bf16_decode_accumulate(int, const float*, std::int64_t, const std::uint16_t* const*, int,
                            std::int64_t, float*, std::int64_t) {
  std::abort();
}

}  // namespace qkv::kernels

#endif
