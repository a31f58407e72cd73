// AVX-512 VNNI tile of the decode's key pass over an int8 cache.
//
// vpdpbusd multiplies unsigned bytes by signed bytes. Both the keys and the queries are signed:
// the keys are moved into the unsigned range by flipping their sign bit (k XOR 0x80 = k + 128),
// once per key vector for all the tile's query rows, and the 128 · Σ_e q_e this adds to every
// sum of row q is taken off at the end (query_sums). Each product is at most 255 · 127 in
// magnitude, so a row's whole sum stays within int32 for n up to kInt8ProductsMaxLength.

#include "kernels/int8_microkernels.hpp"

#if defined(__x86_64__) || defined(__i386__)

#include <immintrin.h>

#include "kernels/avx512_tiles.hpp"

namespace qkv::kernels {

bool cpu_has_avx512_vnni() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
  return has;
}

namespace {

// The 64 int8 elements of `row` from e on, those at or past n zero.
inline __m512i load_int8(const std::int8_t* row, std::int64_t e, std::int64_t n) {
  if (n - e >= 64) return _mm512_loadu_si512(row + e);
  return _mm512_maskz_loadu_epi8((__mmask64{1} << (n - e)) - 1, row + e);
}

template <int kRows, int kKeys>
void decode_scores(const std::int8_t* queries, std::int64_t query_stride,
                   const std::int32_t* query_sums, const std::int8_t* const* keys, std::int64_t n,
                   const float* key_scales, const float* row_factors, float* scores,
                   std::int64_t score_stride) {
  const __m512i sign_bits = _mm512_set1_epi8(static_cast<char>(0x80));
  std::int32_t sums[kRows * kKeys];
  // (A key's zero past n becomes 128, times a query's zero.)
  avx512::tile_sums<kRows, kKeys>(
      n, 64, _mm512_setzero_si512(),
      [&](int k, std::int64_t e) { return _mm512_xor_si512(load_int8(keys[k], e, n), sign_bits); },
      [&](int g, std::int64_t e) { return load_int8(queries + g * query_stride, e, n); },
      [](__m512i sum, __m512i query, __m512i key) { return _mm512_dpbusd_epi32(sum, key, query); },
      sums);
  for (int g = 0; g < kRows; ++g)
    for (int k = 0; k < kKeys; ++k) {
      const std::int32_t sum = sums[g * kKeys + k] - 128 * query_sums[g];
      scores[g * score_stride + k] = static_cast<float>(sum) * key_scales[k] * row_factors[g];
    }
}

}  // namespace

void int8_decode_scores(int rows, const std::int8_t* queries, std::int64_t query_stride,
                        const std::int32_t* query_sums, const std::int8_t* const* keys,
                        int key_count, std::int64_t n, const float* key_scales,
                        const float* row_factors, float* scores, std::int64_t score_stride) {
  avx512::with_count(rows, [&](auto r) {
    avx512::with_count(key_count, [&](auto k) {
      decode_scores<r.value, k.value>(queries, query_stride, query_sums, keys, n, key_scales,
                                      row_factors, scores, score_stride);
    });
  });
}

}  // namespace qkv::kernels

#else  // no AVX-512 on this architecture

#include <cstdlib>

namespace qkv::kernels {

// The check says no, so the decode never calls the tile; it exists for the linker, and reaching
// it would be a bug.
bool cpu_has_avx512_vnni() {
  return false;
}

void int8_decode_scores(int, const std::int8_t*, std::int64_t, const std::int32_t*,
                        const std::int8_t* const*, int, std::int64_t, const float*, const float*,
                        float*, std::int64_t) {
  std::abort();
}

}  // namespace qkv::kernels

#endif
