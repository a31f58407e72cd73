// What the AVX-512 microkernels (bf16_microkernels.cpp, int8_microkernels.cpp) share: the count
// of a tile's rows or keys as a compile-time constant, the tree that reduces the lanes of many
// sums at once, and the decode's score tile built on it. Only for translation units compiled for
// AVX-512 F.
#pragma once

#include <immintrin.h>

#include <bit>
#include <cstdint>
#include <type_traits>

namespace qkv::kernels::avx512 {

// f(std::integral_constant<int, n>{}) for n = count clamped to 1 … 4: a tile's rows (or keys) as
// a compile-time constant.
template <class F>
void with_count(int count, const F& f) {
  switch (count) {
    case 4:
      return f(std::integral_constant<int, 4>{});
    case 3:
      return f(std::integral_constant<int, 3>{});
    case 2:
      return f(std::integral_constant<int, 2>{});
    default:
      return f(std::integral_constant<int, 1>{});
  }
}

// The even lanes of the pair (a, b) (a's 8, then b's) plus their odd lanes.
inline __m512 add_even_to_odd(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}
inline __m512i add_even_to_odd(__m512i a, __m512i b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_epi32(_mm512_permutex2var_epi32(a, even, b),
                          _mm512_permutex2var_epi32(a, odd, b));
}
inline void store_lanes(__m512 x, float* out) {
  _mm512_store_ps(out, x);
}
inline void store_lanes(__m512i x, std::int32_t* out) {
  _mm512_store_si512(out, x);
}

// The lanes of many sums (float32 or int32; the decode kernel's SumsOfLanes on 16-lane vectors):
// each of the M vectors of v holds `inputs` inputs' partial sums, 16 / inputs adjacent lanes
// each, in input order; adding the even lanes of a pair of vectors to their odd lanes halves
// both. sums[i] = the sum of input i.
//
// A tile's sums stay in registers only if GCC unrolls every loop over them before it decides
// where they live: the tiles mark those loops `#pragma GCC unroll`, and this is inlined. (Else
// the sums lived on the stack, zeroed by a `rep stos` of 1 KiB per call: a quarter of the time
// of the decode's score tile.)
template <int M, class Vector, class Scalar>
[[gnu::always_inline]] inline void finish_sums(const Vector* v, int inputs, Scalar* sums) {
  if constexpr (M > 1) {
    Vector halved[M / 2];
#pragma GCC unroll 16
    for (int i = 0; i < M / 2; ++i) halved[i] = add_even_to_odd(v[2 * i], v[2 * i + 1]);
    finish_sums<M / 2>(halved, 2 * inputs, sums);
  } else {
    Vector x = v[0];
    for (int width = 16 / inputs; width > 1; width /= 2) x = add_even_to_odd(x, x);
    // A whole store (a masked store's data cannot be forwarded to the loads that follow).
    alignas(64) Scalar all[16];
    store_lanes(x, all);
    for (int i = 0; i < inputs; ++i) sums[i] = all[i];
  }
}

// The decode's score tile (kernels/decode_attention.cpp), on the dot-product instruction of one
// element type: sums[g · kKeys + k] = the sum of the products of query row g with key k, for g <
// kRows and k < kKeys (1 … 4 each). From e = 0 below n, `step` elements at a time, load_key(k, e)
// and load_query(g, e) give the vectors of key k and query row g (each key vector is loaded once
// for every row) and multiply_add(sum, query, key) adds their products to a sum that starts at
// `zero`; the kRows · kKeys sums are reduced together (finish_sums).
template <int kRows, int kKeys, class Vector, class Scalar, class LoadKey, class LoadQuery,
          class MultiplyAdd>
[[gnu::always_inline]] inline void tile_sums(std::int64_t n, std::int64_t step, Vector zero,
                                             const LoadKey& load_key, const LoadQuery& load_query,
                                             const MultiplyAdd& multiply_add, Scalar* sums) {
  // One sum per (row, key), padded with zero sums to a power of two for finish_sums.
  constexpr int kSums = static_cast<int>(std::bit_ceil(static_cast<unsigned>(kRows * kKeys)));
  Vector acc[kSums];
#pragma GCC unroll 16
  for (int i = 0; i < kSums; ++i) acc[i] = zero;
  for (std::int64_t e = 0; e < n; e += step) {
    decltype(load_key(0, e)) key[kKeys];
#pragma GCC unroll 4
    for (int k = 0; k < kKeys; ++k) key[k] = load_key(k, e);
#pragma GCC unroll 4
    for (int g = 0; g < kRows; ++g) {
      const auto query = load_query(g, e);
#pragma GCC unroll 4
      for (int k = 0; k < kKeys; ++k)
        acc[g * kKeys + k] = multiply_add(acc[g * kKeys + k], query, key[k]);
    }
  }
  Scalar padded[kSums];
  finish_sums<kSums>(acc, 1, padded);
  for (int i = 0; i < kRows * kKeys; ++i) sums[i] = padded[i];
}

}  // namespace qkv::kernels::avx512
