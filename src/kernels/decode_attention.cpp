// Split-KV decoding.
//
// When each key/value head has only a few query rows (generating one token: Nq = 1, times the GQA
// group), attention is a pass over K and V with almost no reuse: it is bound by memory bandwidth,
// and the fused kernel's packing of K and V would only add traffic. This kernel reads K and V
// exactly once, in place.
//
// The keys are cut into chunks of kChunkKeys; one work item is (batch, chunk) for every key/value
// head at once, so it reads K[b, chunk, :, :] and V[b, chunk, :, :] front to back — in the
// [B, N, H, D] layout the rows of one head are H·D floats apart, a stride that would defeat the
// hardware prefetcher if heads were walked one by one (and, at a multiple of 4 KiB, would put a
// block's rows in the same L1 sets). The chunks also keep every core busy when
// there is a single head. The chunk size depends on the problem only, never on the thread count,
// so results are bitwise the same for any number of threads. For one item, with R = Nq · group
// rows per key head and Hk·R rows in all:
//   1. the query rows go to scratch (times the scale; or as they came, in bfloat16, for the
//      AVX-512 BF16 products: bf16_decode_scores, bf16_decode_accumulate, which round the
//      weights to bfloat16 as the fused kernel does; or, with an int8 cache, rounded to int8,
//      for the AVX-512 VNNI key products int8_decode_scores or widened to int16 for
//      Int8DotTile, the scales applied after the exact integer sum); each row's visible range is
//      found, and where each key row of the chunk lies (a KV cache's pages: a RowMap lookup per
//      key, for every head), so that rows a few KiB ahead can be prefetched wherever their page is;
//   2. keys are walked in blocks of one vector's width, four keys at a time across the heads:
//      for each head hk the four key rows are dotted with hk's R query rows, up to four rows at a
//      time (a register tile of rows × keys, SIMD along D, then one tree of horizontal sums for
//      the whole tile); the block's scores get the masks and options and each row's online
//      softmax (running max m, sum l) is updated; then, head by head, the block's value rows
//      pass once for every four of the head's R accumulators, whose stretches stay in registers
//      meanwhile (no load and store of an accumulator per key);
//   3. the chunk's partial result O_c = acc / l, LSE_c = m + log l is stored.
// A final pass merges the chunks of each row by their LSE (detail::merge_weights).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/decode_attention.cpp"
// foreach_target.h must come first, and the math header after highway.h.
// clang-format off
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/aligned_allocator.h>

#include "kernels/score_math-inl.h"
#include "kernels/vector_array-inl.h"
#include "kernels/widen-inl.h"
// clang-format on

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "core/merge.hpp"
#include "kernels/bf16_microkernels.hpp"
#include "kernels/decode_attention.hpp"
#include "kernels/fused_attention.hpp"
#include "kernels/int8_microkernels.hpp"
#include "kernels/score_operands.hpp"
#include "kernels/simd_dispatch.hpp"

#ifndef QKV_DECODE_CONSTANTS
#define QKV_DECODE_CONSTANTS
namespace qkv::kernels {
// Query rows per key/value head (Nq · Hq/Hk) up to which this kernel computes a problem: always
// up to kDecodeRows; up to kFewHeadsDecodeRows when the problem has a single (batch, key/value
// head) pair or heads of at least kWideHeadDim. The fused kernel's only parallel dimension at so
// few rows is the pairs: with one it runs on one core, and packs K and V that it reads once, where
// this kernel splits the keys over every core and reads them in place (several tokens of a
// decoding step against one sequence's cache, DeepSeek's absorbed MLA with its one key/value
// head); and with wide heads the fused kernel reads each key and value tile (295 KiB of keys at
// D = 576, beyond L1) once for every four rows, where this kernel reads four keys (9 KiB) once for
// all rows. Zen 4, 2 threads, ms, fused → this kernel:
//   B1 H16 Hk1 Nq2 Nk8192 D576 Dv512: 11.8 → 3.2-4.2
//   B8 H16 Hk1 Nq2 Nk4096 D576 Dv512: 21.4 → 14.9
//   B2 H16 Hk2 Nq4 Nk8192 D256:        9.5 → 8.3-8.5
//   B1 H8  Hk1 Nq8 Nk8192 D128:    2.6-2.9 → 1.9-2.5
// With four pairs at D = 128 the fused kernel was as fast or faster (B1 H32 Hk4 Nq8 Nk8192: 6.5
// against 7.9-9.6). A rule of the problem alone, never of the thread count: results stay bitwise
// the same for any number of threads.
constexpr std::int64_t kDecodeRows = 16;
constexpr std::int64_t kFewHeadsDecodeRows = 64;
constexpr std::int64_t kWideHeadDim = 256;
constexpr std::int64_t kChunkKeys = 1024;  // keys per work item
}  // namespace qkv::kernels
#endif

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using FloatTag = hn::ScalableTag<float>;

// Vector registers of the target: AVX-512 has 32, AVX2 and SSE4 16 (NEON and SVE have 32 but
// take the 16-register sizes: their speed cannot be measured here).
constexpr bool kAvx512Target = HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL;
constexpr int kVectorRegisters = kAvx512Target ? 32 : 16;

#if HWY_TARGET != HWY_SCALAR  // (whose vectors have one lane: nothing to shuffle)
// The tail of SumsOfLanes: each of the M vectors of v holds the partial sums of `inputs` input
// vectors, lanes / inputs adjacent lanes each, in input order. Adding the even lanes of a pair of
// vectors to their odd lanes (ConcatEven + ConcatOdd) halves every input's lanes and the number
// of vectors; once one vector is left, it is added to itself that way until each input has one
// lane. sums[i] = the sum of input i.
template <int M, class D>
HWY_INLINE void FinishSums(D d, const VectorArray<D, M>& v, std::size_t inputs,
                           hn::TFromD<D>* HWY_RESTRICT sums) {
  const std::size_t lanes = hn::Lanes(d);
  if (inputs == lanes) {  // one lane per input: done (more inputs than lanes: M vectors of them)
    for (int i = 0; i < M; ++i) hn::StoreU(v.Get(i), d, sums + static_cast<std::size_t>(i) * lanes);
    return;
  }
  if constexpr (M > 1) {
    VectorArray<D, M / 2> halved;
#pragma GCC unroll 16
    for (int i = 0; i < M / 2; ++i) {
      const auto low = v.Get(2 * i), high = v.Get(2 * i + 1);
      halved.Set(i, hn::Add(hn::ConcatEven(d, high, low), hn::ConcatOdd(d, high, low)));
    }
    FinishSums<M / 2>(d, halved, 2 * inputs, sums);
  } else {
    auto x = v.Get(0);
    for (std::size_t width = lanes / inputs; width > 1; width /= 2)
      x = hn::Add(hn::ConcatEven(d, x, x), hn::ConcatOdd(d, x, x));
    HWY_ALIGN hn::TFromD<D> all[hn::MaxLanes(D())];
    hn::Store(x, d, all);
    for (std::size_t i = 0; i < inputs; ++i) sums[i] = all[i];
  }
}
#endif

#if HWY_TARGET == HWY_AVX2
// FinishSums on AVX2, whose vectors are two blocks of four lanes: the pairs of lanes are added
// within each block (vshufps takes the even and the odd lanes of two vectors inside the blocks),
// where ConcatEven and ConcatOdd over the whole vector also move lanes across the blocks (vpermq,
// one of Zen 3's slower shuffles) at every level; the two blocks are added once, at the end. The
// same pairs are added as in FinishSums, in the same order: the sums are bitwise the same.
//   pairs(a, b), per block: [a0 + a1, a2 + a3, b0 + b1, b2 + b3].
template <class D>
HWY_INLINE hn::Vec<D> AddPairsInBlocks(D d, hn::Vec<D> a, hn::Vec<D> b) {
  const hn::Repartition<float, D> df;
  const __m256 fa = hn::BitCast(df, a).raw, fb = hn::BitCast(df, b).raw;
  return hn::Add(hn::BitCast(d, hn::Vec<decltype(df)>{_mm256_shuffle_ps(fa, fb, 0x88)}),
                 hn::BitCast(d, hn::Vec<decltype(df)>{_mm256_shuffle_ps(fa, fb, 0xDD)}));
}

// sums[i] = the sum of the lanes of v[i] for M = 2, 4 or 8 vectors.
template <int M, class D>
HWY_INLINE void FinishSumsInBlocks(D d, const VectorArray<D, M>& v,
                                   hn::TFromD<D>* HWY_RESTRICT sums) {
  static_assert(M == 2 || M == 4 || M == 8);
  // Each block of quads[i] holds the block's sums of inputs 4i … 4i + 3 (M = 2: of 0, 1, 0, 1).
  VectorArray<D, (M + 3) / 4> quads;
  if constexpr (M == 2) {
    const auto pairs = AddPairsInBlocks(d, v.Get(0), v.Get(1));
    quads.Set(0, AddPairsInBlocks(d, pairs, pairs));
  } else {
#pragma GCC unroll 2
    for (int i = 0; i < M / 4; ++i) {
      quads.Set(i, AddPairsInBlocks(d, AddPairsInBlocks(d, v.Get(4 * i), v.Get(4 * i + 1)),
                                    AddPairsInBlocks(d, v.Get(4 * i + 2), v.Get(4 * i + 3))));
    }
  }
  if constexpr (M == 8) {  // the low blocks of both, then their high blocks: the eight sums
    const auto low = hn::ConcatLowerLower(d, quads.Get(1), quads.Get(0));
    const auto high = hn::ConcatUpperUpper(d, quads.Get(1), quads.Get(0));
    hn::StoreU(hn::Add(low, high), d, sums);
  } else {
    const hn::Half<D> d4;
    const auto four = hn::Add(hn::LowerHalf(d4, quads.Get(0)), hn::UpperHalf(d4, quads.Get(0)));
    HWY_ALIGN hn::TFromD<D> all[4];
    hn::Store(four, d4, all);
    for (int i = 0; i < M; ++i) sums[i] = all[i];
  }
}
#endif

// The room SumsOfLanes<N> needs for its sums: N rounded up to a power of two.
template <int N>
constexpr int kPaddedSums = static_cast<int>(std::bit_ceil(static_cast<unsigned>(N)));

// sums[i] = the sum of the lanes of v[i], for N vectors at once: a tree of pairwise additions
// across the vectors, N·(1 − 1/lanes) additions and twice as many two-vector shuffles instead of
// N separate horizontal sums (each a chain of log2(lanes) shuffles and additions, which was a
// third of the decode's key pass). The tree takes a power of two: N = 3 · 4 (three rows of a
// tile) is padded with zero vectors to kPaddedSums<N>, whose sums past N are zero.
template <int N, class D>
HWY_INLINE void SumsOfLanes(D d, const VectorArray<D, N>& v, hn::TFromD<D>* HWY_RESTRICT sums) {
#if HWY_TARGET == HWY_SCALAR
  (void)d;
  for (int i = 0; i < N; ++i) sums[i] = hn::GetLane(v.Get(i));
#else
  constexpr int kPadded = kPaddedSums<N>;
  const auto finish = [&](const VectorArray<D, kPadded>& all) {
#if HWY_TARGET == HWY_AVX2
    if constexpr (kPadded >= 2 && kPadded <= 8) {
      FinishSumsInBlocks<kPadded>(d, all, sums);
      return;
    }
#endif
    FinishSums<kPadded>(d, all, 1, sums);
  };
  if constexpr (kPadded == N) {
    finish(v);
  } else {
    VectorArray<D, kPadded> padded;
#pragma GCC unroll 16
    for (int i = 0; i < kPadded; ++i) padded.Set(i, i < N ? v.Get(i) : hn::Zero(d));
    finish(padded);
  }
#endif
}

// sums[g · K + k] += Σ product(g, k, e') over the elements e' = e … n − 1 that a whole vector
// did not reach (D not a multiple of the lanes), for the G rows and K keys of a key tile; nothing
// when D is.
template <int G, int K, class Sum, class Product>
HWY_INLINE void AddRowTails(std::int64_t e, std::int64_t n, Sum* HWY_RESTRICT sums,
                            const Product& product) {
  if (e >= n) return;
  for (int g = 0; g < G; ++g)
    for (int k = 0; k < K; ++k)
      for (std::int64_t tail = e; tail < n; ++tail) sums[g * K + k] += product(g, k, tail);
}

// Keys per tile of the key pass for G query rows: G·K accumulators, K key vectors and a query
// vector must fit the registers (AVX-512, 4 rows: 16 + 4 + 1 of 32; AVX2, 4 rows: 8 + 2 + 1 of 16).
template <int G>
constexpr int kTileKeys = G * 4 <= kVectorRegisters / 2 ? 4 : 2;

// The sums a key tile adds its products in: float32, or int32 for an int8 cache's int16 queries.
template <class Query>
using TileSum = std::conditional_t<std::is_same_v<Query, std::int16_t>, std::int32_t, float>;

// sums[g · K + k] = Σ_e queries[g · n + e] · keys[k][e] for the G query rows and K keys of one
// key/value head (sums has room for kPaddedSums<G · K>): the register tile of the key pass. Each
// query vector is loaded once for the K keys and each key vector, widened as it is loaded, once
// for the G rows: G·K independent chains of multiply-adds. The G·K sums are then reduced together
// (SumsOfLanes) and the elements past the last whole vector added (AddRowTails). The products:
//   float queries: float32 lanes; float, bfloat16 or float16 keys widened to float32;
//   int16 queries, an int8 cache's where the CPU has no int8 dot products (AVX2, AVX-512 without
//     VNNI, NEON): each key vector widened to int16 (one instruction for a vector of int16, where
//     float takes two for half as many elements), pairs of products summed into int32 lanes
//     (vpmaddwd on x86). Each pair is at most 2 · 128² in magnitude, so the sums are exact
//     integers for n up to kInt8ProductsMaxLength (longer int8 rows go to the fused kernel:
//     decode_attention_supports), as int8_decode_scores's are. Highway's widening multiply-add
//     may put the odd lanes' products into a second accumulator (NEON; x86 leaves it zero): only
//     the lanes' total is used.
// The loops over the tile are marked for unrolling so that GCC unrolls them before it decides
// where the sums live: else it kept them on the stack, zeroed by a `rep stos` on every call.
template <int G, int K, class Query, class Stored>
HWY_INLINE void TileSums(const Query* HWY_RESTRICT queries, const Stored* const* HWY_RESTRICT keys,
                         std::int64_t n, TileSum<Query>* HWY_RESTRICT sums) {
  constexpr bool kIntegerProducts = std::is_same_v<Query, std::int16_t>;
  static_assert(kIntegerProducts ? std::is_same_v<Stored, std::int8_t>
                                 : std::is_same_v<Query, float>);
  using QueryTag = hn::ScalableTag<Query>;
  using SumTag = hn::Repartition<TileSum<Query>, QueryTag>;
  const QueryTag dq;
  const SumTag ds;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(dq));
  VectorArray<SumTag, G * K> sum;
  VectorArray<SumTag, kIntegerProducts ? G * K : 1> odd_sum;
#pragma GCC unroll 16
  for (int i = 0; i < G * K; ++i) {
    sum.Set(i, hn::Zero(ds));
    if constexpr (kIntegerProducts) odd_sum.Set(i, hn::Zero(ds));
  }
  std::int64_t e = 0;
  for (; e + lanes <= n; e += lanes) {
    VectorArray<QueryTag, K> key;
#pragma GCC unroll 4
    for (int k = 0; k < K; ++k) {
      if constexpr (kIntegerProducts) {
        key.Set(k, hn::PromoteTo(dq, hn::LoadU(hn::Rebind<std::int8_t, QueryTag>(), keys[k] + e)));
      } else {
        key.Set(k, LoadWidened(dq, keys[k] + e));
      }
    }
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
      const auto q = hn::LoadU(dq, queries + g * n + e);
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k) {
        const int i = g * K + k;
        if constexpr (kIntegerProducts) {
          auto odd = odd_sum.Get(i);
          sum.Set(i, hn::ReorderWidenMulAccumulate(ds, q, key.Get(k), sum.Get(i), odd));
          odd_sum.Set(i, odd);
        } else {
          sum.Set(i, hn::MulAdd(q, key.Get(k), sum.Get(i)));
        }
      }
    }
  }
  if constexpr (kIntegerProducts) {
#pragma GCC unroll 16
    for (int i = 0; i < G * K; ++i) sum.Set(i, hn::Add(sum.Get(i), odd_sum.Get(i)));
  }
  SumsOfLanes<G * K>(ds, sum, sums);
  AddRowTails<G, K>(e, n, sums, [&](int g, int k, std::int64_t tail) {
    if constexpr (kIntegerProducts) {
      return std::int32_t{queries[g * n + tail]} * std::int32_t{keys[k][tail]};
    } else {
      return queries[g * n + tail] * Widened(keys[k][tail]);
    }
  });
}

// out[g · out_stride + k] = Σ_d queries[g · n + d] · keys[k][d] for the G query rows and K keys
// of one key/value head (TileSums), each row's K sums copied out as one piece (a scalar loop that
// also multiplied each sum by a key scale, 1 for every key that is not int8, held a quarter of
// the tile's samples at G = 4, GQA's group).
template <int G, int K, class Stored>
HWY_INLINE void DotTile(const float* HWY_RESTRICT queries, const Stored* const* HWY_RESTRICT keys,
                        std::int64_t n, float* HWY_RESTRICT out, std::int64_t out_stride) {
  HWY_ALIGN float sums[kPaddedSums<G * K>];
  TileSums<G, K>(queries, keys, n, sums);
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) std::memcpy(out + g * out_stride, sums + g * K, K * sizeof(float));
}

// out[g · out_stride + k] = float(Σ_e queries[g · n + e] · keys[k][e]) · factors[k] ·
// row_factors[g] (in that order, as int8_decode_scores takes them) for the G query rows and K keys
// of one key/value head of an int8 cache, on its int16 query rows (the int8 rows widened once per
// chunk). TileSums sums the products exactly in int32, as int8_decode_scores does: both give
// float(sum) · factors. The factors are applied in the tile, a row's K scores at once (a scalar
// multiplication after the tile read four scalar stores back as a vector, a failed store
// forwarding; a scalar loop over the sums in the tile cost 12% of K1 under forced AVX2).
template <int G, int K>
HWY_INLINE void Int8DotTile(const std::int16_t* HWY_RESTRICT queries,
                            const std::int8_t* const* HWY_RESTRICT keys, std::int64_t n,
                            const float* HWY_RESTRICT factors,
                            const float* HWY_RESTRICT row_factors, float* HWY_RESTRICT out,
                            std::int64_t out_stride) {
  HWY_ALIGN std::int32_t sums[kPaddedSums<G * K>];
  TileSums<G, K>(queries, keys, n, sums);
  const hn::CappedTag<float, K> dk;
  const hn::RebindToSigned<decltype(dk)> dk32;
  const auto step = static_cast<int>(hn::Lanes(dk));
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    for (int k = 0; k < K; k += step) {
      const auto scores = hn::Mul(
          hn::Mul(hn::ConvertTo(dk, hn::LoadU(dk32, sums + g * K + k)), hn::LoadU(dk, factors + k)),
          hn::Set(dk, row_factors[g]));
      hn::StoreU(scores, dk, out + g * out_stride + k);
    }
  }
}

// accumulators[g · n + d] += Σ_t weights[g · weight_stride + t] · values[t][d] for G rows over
// `count` value rows: S vector-wide stretches of every row's accumulator stay in registers while
// the rows pass (G·S independent chains of multiply-adds; accumulators in at most half the
// registers, with the value vectors and the G weights beside them: with 16 registers S = 4 for
// one or two rows and 2 for three or four, with 32 twice that), and each value vector is loaded
// (and widened) once for all G rows.
template <int G, class Stored>
HWY_INLINE void AccumulateRows(const float* HWY_RESTRICT weights, std::int64_t weight_stride,
                               const Stored* const* HWY_RESTRICT values, std::int64_t count,
                               std::int64_t n, float* HWY_RESTRICT accumulators) {
  constexpr int S = kVectorRegisters / (G <= 2 ? 4 : 8);
  const FloatTag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const auto stretches = [&]<int kStretches>(std::int64_t e) {
    VectorArray<FloatTag, G * kStretches> sum;
    for (int g = 0; g < G; ++g)
      for (int x = 0; x < kStretches; ++x)
        sum.Set(g * kStretches + x, hn::LoadU(d, accumulators + g * n + e + x * lanes));
    for (std::int64_t t = 0; t < count; ++t) {
      for (int x = 0; x < kStretches; ++x) {
        const auto v = LoadWidened(d, values[t] + e + x * lanes);
        for (int g = 0; g < G; ++g) {
          sum.Set(g * kStretches + x, hn::MulAdd(hn::Set(d, weights[g * weight_stride + t]), v,
                                                 sum.Get(g * kStretches + x)));
        }
      }
    }
    for (int g = 0; g < G; ++g)
      for (int x = 0; x < kStretches; ++x)
        hn::StoreU(sum.Get(g * kStretches + x), d, accumulators + g * n + e + x * lanes);
  };
  std::int64_t e = 0;
  for (; e + S * lanes <= n; e += S * lanes) stretches.template operator()<S>(e);
  for (; e + lanes <= n; e += lanes) stretches.template operator()<1>(e);
  for (; e < n; ++e)
    for (int g = 0; g < G; ++g)
      for (std::int64_t t = 0; t < count; ++t)
        accumulators[g * n + e] += weights[g * weight_stride + t] * Widened(values[t][e]);
}

// K and V are read front to back, a few rows at a time with work in between; the hardware
// prefetcher alone keeps too few lines in flight (and cannot know where a KV cache's next page
// is), so the kernel asks for the lines of the key rows it will read about kPrefetchBytes later,
// and, as it starts each head's values, for that head's value rows of the next block (of fewer
// keys ahead when a block's value rows pass kValuePrefetchBytes: value_prefetch_keys_).
// It asks for them into L2 (locality 2: prefetcht1 on x86, PLDL2KEEP on ARM), not L1: a prefetch
// into L1 holds one of the core's few L1 miss buffers until its line arrives, so the prefetches
// themselves stalled the loop at a score of lines in flight; into L2 the core keeps several
// times more (Zen 4, S4: 12.1-13.7 -> 6.8-8.8 ms, 1.1-1.2x the memory floor instead of 1.6x).
constexpr std::int64_t kPrefetchBytes = 8192;
constexpr std::int64_t kValuePrefetchBytes = 32768;
template <class Stored>
HWY_INLINE void PrefetchRow(const Stored* row, std::int64_t length) {
  const char* first = reinterpret_cast<const char*>(row);
  const auto bytes = length * static_cast<std::int64_t>(sizeof(Stored));
  for (std::int64_t byte = 0; byte < bytes; byte += 64)
    __builtin_prefetch(first + byte, /*write=*/0, /*locality=*/2);
}

// f(std::integral_constant<int, G>{}) for G = min(rows, 4): the row groups of DotTile and
// AccumulateRows.
template <class F>
HWY_INLINE void ForGroup(std::int64_t rows, const F& f) {
  if (rows >= 4) {
    f(std::integral_constant<int, 4>{});
  } else if (rows == 3) {
    f(std::integral_constant<int, 3>{});
  } else if (rows == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// Stored: the element type of K and V (float, std::uint16_t for bfloat16, hwy::float16_t, or
// std::int8_t for an int8 KV cache: a key's products and a value's weight are multiplied by the
// row's scale, so the cache is read as it lies).
template <class Stored>
class DecodeKernel {
 public:
  explicit DecodeKernel(const FusedOperands& operands)
      : o_(operands),
        p_(*operands.problem),
        lanes_(static_cast<std::int64_t>(hn::Lanes(FloatTag()))),
        rows_(p_.q_len * p_.group_size),
        item_rows_(p_.kv_heads * rows_),
        chunks_(std::max<std::int64_t>(1, (p_.k_len + kChunkKeys - 1) / kChunkKeys)) {}

  void Run() const {
    const std::int64_t items = p_.batch * chunks_;
    // Partial results of every item: O_c [Hk·R, Dv] and LSE_c [Hk·R].
    thread_local ReusedBuffer partial_buffers[1];  // the calling thread's, kept between calls
    float* partial_out = partial_buffers[0].Get(items * item_rows_ * p_.v_dim);
    // LSE_c in double (m_c + log l_c): a float32 LSE_c would round at |LSE_c|·2⁻²⁴.
    thread_local std::vector<double> partial_lse_buffer;
    partial_lse_buffer.resize(static_cast<std::size_t>(items * item_rows_));
    double* partial_lse = partial_lse_buffer.data();
    const int threads = worker_threads(p_, kParallelDecodeWork);
    parallel_for_each(
        threads, items, [this] { return Scratch(*this); },
        [&](Scratch& scratch, std::int64_t item) {
          ComputeChunk(item / chunks_, item % chunks_, partial_out + item * item_rows_ * p_.v_dim,
                       partial_lse + item * item_rows_, scratch);
        });
    // 3'. Merge the chunks of each (batch, row); a sink joins as one more part, once, with
    // LSE = sink and O = 0 (core/sinks.hpp). The row's sums are gathered in double, chunk after
    // chunk (as detail::merge_row adds the parts), and written as a row (StridedOutput::store_row;
    // a single chunk's float32 row by StoreRow, a vector at a time).
    // (Element by element through merge_row's callbacks and the output's dtype switch, the merge
    // was 70% of a small decoding step: B1 H32 Hk8 Nk16 took 22 µs, now 6.4.)
    const std::int64_t parts = chunks_ + (p_.sinks.present ? 1 : 0);
    struct MergeScratch {
      std::vector<double> weights, sums;
    };
    parallel_for_each(
        threads, p_.batch * item_rows_,
        [&] {
          return MergeScratch{std::vector<double>(static_cast<std::size_t>(parts)),
                              std::vector<double>(static_cast<std::size_t>(p_.v_dim))};
        },
        [&](MergeScratch& m, std::int64_t row) {
          const std::int64_t b = row / item_rows_, r = row % item_rows_;
          const std::int64_t h = HeadOf(r), i = PositionOf(r);
          const std::int64_t first_item = b * chunks_;
          if (parts == 1) {  // one chunk and no sink: merging it would give it back exactly
            StoreRow(p_.out, partial_out + (first_item * item_rows_ + r) * p_.v_dim, 1.0f, p_.v_dim,
                     b, i, h);
            if (p_.lse.present) p_.lse.store(partial_lse[first_item * item_rows_ + r], b, h, i);
            return;
          }
          const double lse = detail::merge_weights<double>(m.weights, [&](std::int64_t c) {
            return c < chunks_ ? partial_lse[(first_item + c) * item_rows_ + r] : p_.sinks.load(h);
          });
          double* sums = m.sums.data();
          std::fill(m.sums.begin(), m.sums.end(), 0.0);
          // (The sink's O = 0 adds nothing: a NaN weight would be every chunk's too.)
          for (std::int64_t c = 0; c < chunks_; ++c) {
            const double weight = m.weights[static_cast<std::size_t>(c)];
            if (weight == 0) continue;  // an empty chunk's partial row may be anything
            const float* part = partial_out + ((first_item + c) * item_rows_ + r) * p_.v_dim;
            for (std::int64_t e = 0; e < p_.v_dim; ++e) sums[e] += weight * double{part[e]};
          }
          p_.out.store_row(sums, p_.v_dim, b, i, h);
          if (p_.lse.present) p_.lse.store(lse, b, h, i);
        });
  }

 private:
  // Row r of an item (r = hk·R + g·Nq + t) is query head hk·group + g at position t.
  std::int64_t HeadOf(std::int64_t r) const {
    return (r / rows_) * p_.group_size + (r % rows_) / p_.q_len;
  }
  std::int64_t PositionOf(std::int64_t r) const { return r % p_.q_len; }

  // Where key j lies, for head 0 (head hk is hk head strides further), and its scales in an int8
  // cache.
  struct BlockRow {
    const Stored* key = nullptr;
    const Stored* value = nullptr;
    const float* key_scale = nullptr;
    const float* value_scale = nullptr;
  };

  struct Scratch {
    explicit Scratch(const DecodeKernel& k)
        : queries(
              static_cast<std::size_t>(k.products_ || kInt8 ? 0 : k.item_rows_ * k.o_.score_dim)),
          queries16(static_cast<std::size_t>(k.products_ ? k.item_rows_ * k.o_.score_dim : 0)),
          queries8(static_cast<std::size_t>(k.int8_products_ ? k.item_rows_ * k.o_.score_dim : 0)),
          query_sums(static_cast<std::size_t>(k.int8_products_ ? k.item_rows_ : 0)),
          queries_int16(static_cast<std::size_t>(
              kInt8 && !k.int8_products_ ? k.item_rows_ * k.o_.score_dim : 0)),
          row_factors(static_cast<std::size_t>(kInt8 ? k.item_rows_ : 0)),
          scores(hwy::AllocateAligned<float>(
              static_cast<std::size_t>(std::max<std::int64_t>(1, k.item_rows_ * k.lanes_)))),
          accumulator(static_cast<std::size_t>(k.item_rows_ * k.p_.v_dim)),
          row_max(static_cast<std::size_t>(k.item_rows_)),
          lane_sums(hwy::AllocateAligned<float>(
              static_cast<std::size_t>(std::max<std::int64_t>(1, k.item_rows_ * k.lanes_)))),
          first(static_cast<std::size_t>(k.item_rows_)),
          last(static_cast<std::size_t>(k.item_rows_)),
          weights(static_cast<std::size_t>(4 * k.lanes_)),
          values(static_cast<std::size_t>(k.lanes_)),
          head_values(static_cast<std::size_t>(k.lanes_)),
          value_scales(hwy::AllocateAligned<float>(
              static_cast<std::size_t>(kInt8 ? k.p_.kv_heads * k.lanes_ : 1))) {}
    std::vector<float> queries;            // [rows, D], times the scale …
    std::vector<std::uint16_t> queries16;  // … or bfloat16 as they came, for the products
    // An int8 cache's: the query rows rounded to int8 (FusedOperands::q8), for the VNNI products
    // (queries8, with each row's sum) or widened to int16 (Int8DotTile), and each row's factor,
    // its scale times the softmax scale, by which its integer products are multiplied.
    std::vector<std::int8_t> queries8;
    std::vector<std::int32_t> query_sums;
    std::vector<std::int16_t> queries_int16;
    std::vector<float> row_factors;
    hwy::AlignedFreeUniquePtr<float[]> scores;  // [rows, lanes]: one block
    std::vector<float> accumulator;             // [rows, Dv]
    std::vector<float> row_max;
    // Each row's running sum l, lane by lane ([rows, lanes]): the lanes are added once, at the
    // chunk's end, not once per row and block (that horizontal sum held 2-5% of the samples of a
    // GQA decode whose K and V were in cache).
    hwy::AlignedFreeUniquePtr<float[]> lane_sums;
    std::vector<std::int64_t> first, last;  // visible key ranges
    std::vector<BlockRow> rows;             // the keys of the chunk's blocks
    std::vector<float> weights;         // [4, lanes]: a row group's weights of the keys used …
    std::vector<const Stored*> values;  // … and their value rows
    std::vector<const Stored*> head_values;  // a head's value rows of the whole block
    // An int8 cache's value scales of the block, [Hk, lanes]: gathered in the key pass, read as
    // vectors in the value pass (gathered there, head by head, the vector load of eight scalar
    // stores just made waited on a failed store forwarding).
    hwy::AlignedFreeUniquePtr<float[]> value_scales;
  };

  // rows[j − first] = where key j of sequence b lies, for j in [first, last).
  void LocateRows(std::int64_t b, std::int64_t first, std::int64_t last,
                  std::vector<BlockRow>& rows) const {
    rows.resize(static_cast<std::size_t>(std::max<std::int64_t>(0, last - first)));
    for (std::int64_t j = first; j < last; ++j) {
      BlockRow& row = rows[static_cast<std::size_t>(j - first)];
      row.key = KeyRow(b, j, 0);
      row.value = ValueRow(b, j, 0);
      if constexpr (kInt8) {
        row.key_scale = o_.k_scale.row(b, j, 0);
        row.value_scale = o_.v_scale.row(b, j, 0);
      }
    }
  }

  void ComputeChunk(std::int64_t b, std::int64_t chunk, float* out, double* lse, Scratch& s) const {
    constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
    const FloatTag d;
    const std::int64_t dim = o_.score_dim;
    const auto scale = static_cast<float>(p_.scale);
    const std::int64_t chunk_first = chunk * kChunkKeys;
    const std::int64_t chunk_last = std::min(p_.k_len, chunk_first + kChunkKeys);
    // 1. Query rows and ranges, clipped to the chunk.
    for (std::int64_t r = 0; r < item_rows_; ++r) {
      const std::int64_t i = PositionOf(r);
      if constexpr (kInt8) {
        const std::int8_t* q = o_.q8.row(b, i, HeadOf(r));
        s.row_factors[static_cast<std::size_t>(r)] = *o_.q_scale.row(b, i, HeadOf(r)) * scale;
        if (int8_products_) {
          std::copy(q, q + dim, s.queries8.begin() + r * dim);
          s.query_sums[static_cast<std::size_t>(r)] = std::accumulate(q, q + dim, std::int32_t{0});
        } else {
          std::copy(q, q + dim, s.queries_int16.begin() + r * dim);
        }
      } else if (products_) {
        const std::uint16_t* q = o_.q16.row(b, i, HeadOf(r));
        std::copy(q, q + dim, s.queries16.begin() + r * dim);
      } else {
        const float* q = o_.q.row(b, i, HeadOf(r));
        for (std::int64_t e = 0; e < dim; ++e)
          s.queries[static_cast<std::size_t>(r * dim + e)] = scale * q[e];
      }
      const detail::KeyInterval keys = detail::visible_keys_within(
          p_, b, HeadOf(r), i, detail::visible_keys(p_, b, HeadOf(r), i), chunk_first, chunk_last);
      s.first[r] = keys.first;
      s.last[r] = keys.last;
      s.row_max[r] = kMinusInfinity;
      hn::Store(hn::Zero(d), d, s.lane_sums.get() + r * lanes_);
    }
    std::fill(s.accumulator.begin(), s.accumulator.end(), 0.0f);
    // Only the keys some row sees are read: a window's or a block mask's hidden keys, and the gap
    // between sink tokens and a window, cost nothing (a chunk no row sees is left empty).
    std::int64_t seen_first = chunk_last, seen_last = chunk_first;
    for (std::int64_t r = 0; r < item_rows_; ++r) {
      if (s.first[r] >= s.last[r]) continue;
      seen_first = std::min(seen_first, s.first[r]);
      seen_last = std::max(seen_last, s.last[r]);
    }

    // 2. Blocks of `lanes_` keys. Where each row of the chunk lies is found once for all heads
    // (a RowMap lookup each), so that the rows prefetch_keys_ ahead can be asked for.
    const std::int64_t first_block = chunk_first + (seen_first - chunk_first) / lanes_ * lanes_;
    // The blocks end at seen_last rounded up to a whole block (within the chunk).
    const std::int64_t blocks_end = std::min(
        chunk_last, first_block + (seen_last - first_block + lanes_ - 1) / lanes_ * lanes_);
    LocateRows(b, first_block, blocks_end, s.rows);
    const auto row_of = [&](std::int64_t j) -> const BlockRow& {
      return s.rows[static_cast<std::size_t>(j - first_block)];
    };
    for (std::int64_t start = first_block; start < seen_last; start += lanes_) {
      const std::int64_t count = std::min(lanes_, chunk_last - start);
      // 2a. Scores: four keys at a time (one at a time at a block's ragged end), head by head,
      // each head's query rows in groups of up to four against the keys (ScoreGroup).
      for (std::int64_t t = 0; t < count;) {
        const std::int64_t keys = count - t >= 4 ? 4 : 1;
        for (std::int64_t hk = 0; hk < p_.kv_heads; ++hk) {
          const Stored* key_rows[4];
          float key_scales[4] = {};  // an int8 cache's
          for (std::int64_t k = 0; k < keys; ++k) {
            const BlockRow& row = row_of(start + t + k);
            key_rows[k] = row.key + hk * KeyHeadStride();
            if constexpr (kInt8) {
              key_scales[k] = KeyScale(row, hk);
              s.value_scales[hk * lanes_ + t + k] = ValueScale(row, hk);
            }
            if (start + t + k + prefetch_keys_ < blocks_end)
              PrefetchRow(row_of(start + t + k + prefetch_keys_).key + hk * KeyHeadStride(), dim);
          }
          for (std::int64_t r = hk * rows_; r < (hk + 1) * rows_; r += 4) {
            ScoreGroup(std::min<std::int64_t>(4, (hk + 1) * rows_ - r), r, key_rows, key_scales,
                       keys, s, s.scores.get() + r * lanes_ + t);
          }
        }
        t += keys;
      }
      // 2b. Masks and options; 2c. online softmax, P in place of S.
      for (std::int64_t r = 0; r < item_rows_; ++r) {
        float* scores = s.scores.get() + r * lanes_;
        const std::int64_t from = std::clamp<std::int64_t>(s.first[r] - start, 0, count);
        const std::int64_t to = std::clamp<std::int64_t>(s.last[r] - start, 0, count);
        std::fill(scores, scores + from, kMinusInfinity);
        std::fill(scores + std::max(from, to), scores + lanes_, kMinusInfinity);
        if (from < to) {
          apply_score_options(p_, b, HeadOf(r), PositionOf(r), start + from, to - from,
                              scores + from);
        }
        const float block_max = LargestLane(d, hn::Load(d, scores));
        float new_max = std::max(s.row_max[r], block_max);
        if (new_max == kMinusInfinity) {
          if (AnyNaN(d, scores, 0, lanes_)) {
            new_max = std::numeric_limits<float>::quiet_NaN();  // then P, the sum and O are NaN
          } else {
            std::fill(scores, scores + lanes_, 0.0f);
            continue;
          }
        }
        // The row's first visible block finds its sum and accumulator zero: nothing to rescale.
        if (new_max != s.row_max[r] && s.row_max[r] != kMinusInfinity) {
          const float correction = std::exp(s.row_max[r] - new_max);
          float* lane_sums = s.lane_sums.get() + r * lanes_;
          hn::Store(hn::Mul(hn::Load(d, lane_sums), hn::Set(d, correction)), d, lane_sums);
          float* accumulator = s.accumulator.data() + r * p_.v_dim;
          for (std::int64_t e = 0; e < p_.v_dim; ++e) accumulator[e] *= correction;
        }
        s.row_max[r] = new_max;
        const auto weights = KernelExp(d, hn::Sub(hn::Load(d, scores), hn::Set(d, new_max)));
        hn::Store(weights, d, scores);
        float* lane_sums = s.lane_sums.get() + r * lanes_;
        hn::Store(hn::Add(hn::Load(d, lane_sums), weights), d, lane_sums);
      }
      // 2d. Value rows into their head's accumulators, head by head, in groups of up to four
      // rows: each group's accumulators stay in registers while the block's value rows pass,
      // each value row read once per group. A key no row of the group weighs is not read (a
      // hidden key's values may be anything). On the way, a block's worth of the head's value
      // rows value_prefetch_keys_ ahead are asked for.
      for (std::int64_t hk = 0; hk < p_.kv_heads; ++hk) {
        for (std::int64_t t = 0; t < lanes_ && start + value_prefetch_keys_ + t < blocks_end; ++t) {
          PrefetchRow(row_of(start + value_prefetch_keys_ + t).value + hk * ValueHeadStride(),
                      p_.v_dim);
        }
        if (count == lanes_) {
          for (std::int64_t t = 0; t < count; ++t) {
            s.head_values[static_cast<std::size_t>(t)] =
                row_of(start + t).value + hk * ValueHeadStride();
          }
        }
        for (std::int64_t r = hk * rows_; r < (hk + 1) * rows_; r += 4) {
          const std::int64_t group_rows = std::min<std::int64_t>(4, (hk + 1) * rows_ - r);
          // Usually the group weighs every key of a whole block: then its weights are the
          // scores as they lie (int8: times the value rows' scales, a vector at a time), and
          // the value rows are the head's.
          const float* weights = s.weights.data();
          const Stored* const* values = s.values.data();
          std::int64_t used = 0;
          if (count == lanes_ && WeighsEveryKey(s.scores.get() + r * lanes_, group_rows)) {
            if constexpr (kInt8) {
              const auto value_scales = hn::Load(d, s.value_scales.get() + hk * lanes_);
              for (std::int64_t i = 0; i < group_rows; ++i)
                hn::StoreU(hn::Mul(hn::Load(d, s.scores.get() + (r + i) * lanes_), value_scales), d,
                           s.weights.data() + i * lanes_);
            } else {
              weights = s.scores.get() + r * lanes_;
            }
            values = s.head_values.data();
            used = count;
          } else {  // the keys some row of the group weighs, and their weights
            for (std::int64_t t = 0; t < count; ++t) {
              bool weighed = false;
              for (std::int64_t i = 0; i < group_rows; ++i)
                weighed |= s.scores[(r + i) * lanes_ + t] != 0.0f;
              if (!weighed) continue;
              const BlockRow& row = row_of(start + t);
              const float value_scale = ValueScale(row, hk);
              for (std::int64_t i = 0; i < group_rows; ++i)
                s.weights[static_cast<std::size_t>(i * lanes_ + used)] =
                    s.scores[(r + i) * lanes_ + t] * value_scale;
              s.values[static_cast<std::size_t>(used++)] = row.value + hk * ValueHeadStride();
            }
          }
          if (used > 0) AccumulateGroup(group_rows, weights, values, used, s, r);
        }
      }
    }

    // 3. The chunk's partial result.
    for (std::int64_t r = 0; r < item_rows_; ++r) {
      const bool empty = s.row_max[r] == kMinusInfinity;
      const float row_sum =
          hn::GetLane(hn::SumOfLanes(d, hn::Load(d, s.lane_sums.get() + r * lanes_)));
      const float inverse = empty ? 0.0f : 1.0f / row_sum;
      for (std::int64_t e = 0; e < p_.v_dim; ++e) {
        out[r * p_.v_dim + e] = s.accumulator[static_cast<std::size_t>(r * p_.v_dim + e)] * inverse;
      }
      lse[r] = empty ? -std::numeric_limits<double>::infinity()
                     : static_cast<double>(s.row_max[r]) + std::log(double{row_sum});
    }
  }

  // The scores of query rows r … r + rows − 1 (rows ≤ 4, one key/value head) against `keys` (1 or
  // 4) key rows, into scores[g · lanes_ + k]: on the bfloat16 or VNNI int8 products, or DotTile
  // (Int8DotTile with an int8 cache).
  void ScoreGroup(std::int64_t rows, std::int64_t r, const Stored* const* key_rows,
                  const float* key_scales, std::int64_t keys, Scratch& s, float* scores) const {
    const std::int64_t dim = o_.score_dim;
    if constexpr (kInt8) {
      if (int8_products_) {
        int8_decode_scores(static_cast<int>(rows), s.queries8.data() + r * dim, dim,
                           s.query_sums.data() + r, key_rows, static_cast<int>(keys), dim,
                           key_scales, s.row_factors.data() + r, scores, lanes_);
        return;
      }
    }
    if constexpr (std::is_same_v<Stored, std::uint16_t>) {
      if (products_) {
        bf16_decode_scores(static_cast<int>(rows), s.queries16.data() + r * dim, dim, key_rows,
                           static_cast<int>(keys), dim, static_cast<float>(p_.scale), scores,
                           lanes_);
        return;
      }
    }
    // tile<G, K>(first key, its scores): DotTile, or Int8DotTile on an int8 cache's int16 queries.
    const auto tile = [&]<int G, int K>(std::int64_t k, float* out) {
      if constexpr (kInt8) {
        Int8DotTile<G, K>(s.queries_int16.data() + r * dim, key_rows + k, dim, key_scales + k,
                          s.row_factors.data() + r, out, lanes_);
      } else {
        DotTile<G, K>(s.queries.data() + r * dim, key_rows + k, dim, out, lanes_);
      }
    };
    ForGroup(rows, [&](auto group) {
      constexpr int G = decltype(group)::value;
      if (keys == 1) {
        tile.template operator()<G, 1>(0, scores);
      } else if constexpr (kTileKeys<G> == 4) {
        tile.template operator()<G, 4>(0, scores);
      } else {
        tile.template operator()<G, 2>(0, scores);
        tile.template operator()<G, 2>(2, scores + 2);
      }
    });
  }

  // accumulator rows r … r + rows − 1 (rows ≤ 4) += their weights (lanes_ apart) times the `used`
  // value rows: on the bfloat16 products, or AccumulateRows.
  void AccumulateGroup(std::int64_t rows, const float* weights, const Stored* const* values,
                       std::int64_t used, Scratch& s, std::int64_t r) const {
    float* accumulators = s.accumulator.data() + r * p_.v_dim;
    if constexpr (std::is_same_v<Stored, std::uint16_t>) {
      if (products_) {
        bf16_decode_accumulate(static_cast<int>(rows), weights, lanes_, values,
                               static_cast<int>(used), p_.v_dim, accumulators, p_.v_dim);
        return;
      }
    }
    ForGroup(rows, [&](auto group) {
      AccumulateRows<decltype(group)::value>(weights, lanes_, values, used, p_.v_dim, accumulators);
    });
  }

  // Whether some of the `rows` rows of weights (lanes_ apart) weighs each key of the block.
  bool WeighsEveryKey(const float* weights, std::int64_t rows) const {
    const FloatTag d;
    auto weighed = hn::Ne(hn::Load(d, weights), hn::Zero(d));
    for (std::int64_t i = 1; i < rows; ++i)
      weighed = hn::Or(weighed, hn::Ne(hn::Load(d, weights + i * lanes_), hn::Zero(d)));
    return hn::AllTrue(d, weighed);
  }

  // The operands of this Stored type: float32 (k, v), int8 (k8, v8, with scales) or 16-bit.
  const auto& Keys() const {
    if constexpr (std::is_same_v<Stored, float>) {
      return o_.k;
    } else if constexpr (kInt8) {
      return o_.k8;
    } else {
      return o_.k16;
    }
  }
  const auto& Values() const {
    if constexpr (std::is_same_v<Stored, float>) {
      return o_.v;
    } else if constexpr (kInt8) {
      return o_.v8;
    } else {
      return o_.v16;
    }
  }
  const Stored* KeyRow(std::int64_t b, std::int64_t j, std::int64_t hk) const {
    return reinterpret_cast<const Stored*>(Keys().row(b, j, hk));
  }
  const Stored* ValueRow(std::int64_t b, std::int64_t j, std::int64_t hk) const {
    return reinterpret_cast<const Stored*>(Values().row(b, j, hk));
  }
  std::int64_t KeyHeadStride() const { return Keys().stride_h; }
  std::int64_t ValueHeadStride() const { return Values().stride_h; }
  // The factor a row's products are multiplied by: its scale in an int8 cache, else 1.
  float KeyScale(const BlockRow& row, std::int64_t hk) const {
    if constexpr (kInt8) return row.key_scale[hk * o_.k_scale.stride_h];
    return 1.0f;
  }
  float ValueScale(const BlockRow& row, std::int64_t hk) const {
    if constexpr (kInt8) return row.value_scale[hk * o_.v_scale.stride_h];
    return 1.0f;
  }
  static constexpr bool kInt8 = std::is_same_v<Stored, std::int8_t>;

  const FusedOperands& o_;
  const AttentionProblem& p_;
  const std::int64_t lanes_;      // floats per vector: keys per block
  const std::int64_t rows_;       // query rows per key/value head: Nq · group
  const std::int64_t item_rows_;  // query rows of an item: all key heads, Hk · Nq · group
  const std::int64_t chunks_;     // key chunks per batch
  // Both products on vdpbf16ps (FusedOperands::bf16_products): bfloat16 queries as they came
  // (q16), the weights rounded to bfloat16.
  const bool products_ = o_.bf16_products;
  // An int8 cache's key products on vpdpbusd (int8_decode_scores), where the CPU has it (its rows
  // are at most kInt8ProductsMaxLength long: decode_attention_supports).
  const bool int8_products_ = kInt8 && kAvx512Target && cpu_has_avx512_vnni();
  // Keys ahead whose rows are prefetched: about kPrefetchBytes of K (or V) ahead, and at least
  // two of the key pass's tiles of four keys (with one key ahead, S4 in 16 bits was ~10% slower).
  const std::int64_t prefetch_keys_ = std::max<std::int64_t>(
      8, kPrefetchBytes /
             std::max<std::int64_t>(
                 1, p_.kv_heads* o_.score_dim* static_cast<std::int64_t>(sizeof(Stored))));
  // Keys ahead whose value rows are prefetched, as each head's value pass starts: the next
  // block's, unless a block's value rows of all heads pass kValuePrefetchBytes, then fewer keys
  // (about that many bytes), down to 8. On an Intel Xeon of the Sapphire Rapids generation
  // (AVX-512, blocks of 16 keys), 8 keys ahead instead of 16 took 0.89 of the time of S4 in
  // float32 (16 KiB of values a key) and 0.94 with GQA (B1 H32 Hk8 D128, 4 KiB a key), but 1.17
  // for K1's int8 cache (1 KiB a key); with AVX2's blocks of 8 keys it is always the next block.
  const std::int64_t value_prefetch_keys_ = std::min<std::int64_t>(
      lanes_, std::max<std::int64_t>(
                  8, kValuePrefetchBytes /
                         std::max<std::int64_t>(
                             1, p_.kv_heads* p_.v_dim* static_cast<std::int64_t>(sizeof(Stored)))));
};

void DecodeForward(const FusedOperands& operands) {
  if (operands.int8_keys) {
    DecodeKernel<std::int8_t>(operands).Run();
  } else if (operands.bf16_keys_and_values && operands.half == DType::float16) {
    DecodeKernel<hwy::float16_t>(operands).Run();
  } else if (operands.bf16_keys_and_values || operands.bf16_products) {
    DecodeKernel<std::uint16_t>(operands).Run();
  } else {
    DecodeKernel<float>(operands).Run();
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::kernels {

HWY_EXPORT(DecodeForward);

bool decode_attention_supports(const AttentionProblem& p) {
  return (p.dtype == DType::float32 || p.dtype == DType::bfloat16 || p.dtype == DType::float16) &&
         p.form == detail::ScoreForm::dot && !p.weights.present && p.dropout == 0 && !p.sigmoid &&
         (p.q_len * p.group_size <= kDecodeRows ||
          (p.q_len * p.group_size <= kFewHeadsDecodeRows &&
           (p.batch * p.kv_heads == 1 || p.q_dim >= kWideHeadDim))) &&
         // an int8 cache's keys are read as they lie only when the score compares them so, and
         // their integer products are exact in int32 up to kInt8ProductsMaxLength
         (p.k.dtype != DType::int8 || (keys_as_they_are(detail::score_unit(p.score).operands(p)) &&
                                       p.k_dim <= kInt8ProductsMaxLength));
}

void decode_attention(const AttentionProblem& p) {
  const FusedOperands operands =
      prepare_fused_operands(p, Bfloat16Operands::products_or_keys_and_values);
  apply_simd_environment();
  HWY_DYNAMIC_DISPATCH(DecodeForward)(operands);
}

}  // namespace qkv::kernels
#endif  // HWY_ONCE
