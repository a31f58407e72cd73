// The fused attention kernel (FlashAttention-2 on a CPU).
//
// Work items. One item is (batch b, key/value head hk, block of query positions). Its rows are
// the query rows of every query head that reads hk (the GQA group) at those positions, head by
// head, about kItemRows rows in all: the K/V tiles loaded for the item serve the whole group.
// The workers (kernels/workers.hpp) take items one at a time (longest first), each thread
// claiming its next item while it computes the current one, to prefetch that item's Q and O rows
// (PrefetchNextRows); each thread keeps its scratch between calls.
//
// Once per call, for all items, K and V are packed into tiles of T = TVectors vectors of keys
// (128 keys on AVX-512 and AVX2): Kᵀ as [D, T] (keys along the vector lanes), V as [T, Dv']
// (Dv' = Dv rounded up to whole vectors), zero-padded; in bfloat16 mode as pairs for the BF16
// dot product.
// Then, for one item:
//   1. Pack the item's Q rows (times the score scale) into q_tile [R, D], and find the union of
//      the rows' visible key ranges (position masks, and the block mask's first and last visible
//      key: core/visibility.hpp); keys outside it are never touched.
//   2. For each key tile in that range, for each block of R rows (kBlockRows: 4 on AVX-512, 5 with
//      16 registers) whose ranges meet the tile
//      (and only the vectors of it that some row of the block can see):
//        a. S = Q·Kᵀ: register tiles of R rows × kTileVectors (AVX-512: 4 × 4 vectors, 16
//           accumulators, 4 loads of k_tile and 1 broadcast of q live per step, 21 of 32 zmm
//           registers; AVX2: 5 × 2, 13 of 16 ymm);
//        b. -inf outside each row's range, then, in a scalar pass over the range, only the options
//           given: soft cap, ALiBi, bias, score_mod, and the masks' element tests (boolean mask,
//           the block mask's empty and partial blocks);
//        c. online softmax per row: m' = max(m, max S), α = e^(m − m'), P = e^(S − m') in place,
//           l = α·l + Σ P;
//        d. O_acc = α·O_acc + P·V: an R × kTileVectors register tile per step over the keys, V
//           rows loaded once per R rows.
//   3. O = O_acc / l, LSE = m + log l (in double); rows that saw no key get O = 0 and LSE = -inf.
//      When the weights are requested, a second walk recomputes S and writes P = e^(S − LSE),
//      LSE subtracted as two floats (its high and low parts).
//
// Cost per tile and R-row block: 2·R·T·(D + Dv) flops on data that stays in L1/L2 (a key
// tile and a value tile are 32 KiB each at D = Dv = 64, T = 128). The exp work
// is T per row per tile, small beside the 2·T·(D + Dv) flops of the two products.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/fused_attention.cpp"
// foreach_target.h must come first, and the math header after highway.h.
// clang-format off
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/cache_control.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/aligned_allocator.h>
#include "kernels/score_math-inl.h"
#include "kernels/vector_array-inl.h"
#include "kernels/widen-inl.h"
// clang-format on

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "core/dropout.hpp"
#include "core/int8_rows.hpp"
#include "core/sinks.hpp"
#include "kernels/bf16_microkernels.hpp"
#include "kernels/fused_attention.hpp"
#include "kernels/score_operands.hpp"
#include "kernels/simd_dispatch.hpp"

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

constexpr std::int64_t kItemRows = 64;  // query rows per work item (all heads of a group)
// Q, K and V rows lie a whole [H, D] row apart ([B, N, H, D]); read one head at a time, each row
// is a new page every few rows, and the hardware prefetcher lets each read wait for memory. The
// copy of an item's Q rows asks for the row kRowsAhead ahead instead (K and V are copied across
// heads, front to back: PackKeysAndValues), and each thread asks for the Q and O rows of the item
// it takes next while it computes the current one, a few rows between each of its blocks
// (PrefetchNextRows).
constexpr std::int64_t kRowsAhead = 4;
HWY_INLINE void PrefetchBytes(const void* start, std::int64_t length) {
  const char* bytes = static_cast<const char*>(start);
  for (std::int64_t byte = 0; byte < length; byte += 64) hwy::Prefetch(bytes + byte);
}
// Vectors across one register tile: 4 rows × 4 vectors = 16 accumulators + 4 loads + 1 broadcast
// = 21 registers fits AVX-512's 32; other targets use 2 vectors (kBlockRows below).
constexpr int kTileVectors = (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL) ? 4 : 2;
// Rows of one register tile: 4 with 4 vectors (AVX-512: 16 accumulators); 5 with 2 vectors
// elsewhere, so that 10 accumulators + 2 loads + 1 broadcast = 13 of 16 registers carry 10
// independent chains of multiply-adds, more of their latency covered at two a cycle than 4 × 2's
// 8 (AVX2, forced on Zen 4: S1 and S2 6-10% faster; 6 rows made GCC spill an accumulator, and
// 5 or 6 rows on AVX-512 were slower). The bf16 tiles, which take at most 4 rows, run only on
// AVX-512 targets (TargetRunsBf16Tiles).
constexpr int kBlockRows = kTileVectors == 4 ? 4 : 5;

// Keys per tile, in vectors: the softmax bookkeeping of a row (max, rescale) is paid once per
// tile, so longer tiles spend a larger share of the time in the two products. 128 keys on AVX-512
// (8 vectors) and on AVX2 (16: forced on Zen 4, S3 and S5 6-8% faster than 64 keys, S2 2-5%).
constexpr int TVectors = kTileVectors == 4 ? 8 : 16;

// Keys transposed at once as PackKeys packs a key tile: 8 × 8 blocks in 256-bit registers on x86
// where the target has them (Transpose8x8), 4 × 4 elsewhere (and for the last keys of a tile).
#if HWY_ARCH_X86 && HWY_MAX_BYTES >= 32
constexpr std::int64_t kPackKeys = 8;
#else
constexpr std::int64_t kPackKeys = 4;
#endif

using FloatTag = hn::ScalableTag<float>;

// out[0 … n) = the bfloat16 or float16 values in[0 … n) as float32 (kernels/widen-inl.h).
HWY_INLINE void WidenRow(const std::uint16_t* in, float* out, std::int64_t n, DType half) {
  if (half == DType::float16) {
    WidenRow(reinterpret_cast<const hwy::float16_t*>(in), out, n);
  } else {
    WidenRow(in, out, n);
  }
}

// out[i] = f(in[i]) for a vector function f, whole vectors then one lane at a time (the test
// hooks below, which sweep the kernels' elementwise functions).
template <class VectorFunction>
void Elementwise(const float* in, float* out, std::int64_t count, VectorFunction f) {
  const FloatTag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t i = 0;
  for (; i + lanes <= count; i += lanes) hn::StoreU(f(hn::LoadU(d, in + i)), d, out + i);
  for (; i < count; ++i) out[i] = hn::GetLane(f(hn::Set(d, in[i])));
}

void SoftmaxExp(const float* in, float* out, std::int64_t count) {
  Elementwise(in, out, count, [](auto x) { return KernelExp(FloatTag(), x); });
}

void SigmoidAttentionWeights(const float* scores, float bias, float* out, std::int64_t count) {
  const auto negative_bias = hn::Set(FloatTag(), -bias);
  Elementwise(scores, out, count,
              [&](auto score) { return SigmoidWeights(FloatTag(), score, negative_bias); });
}

// The largest of in[0, count), reduced as SoftmaxRow reduces a row's scores: a running Max of
// whole vectors (the last one padded with −inf), then LargestLane.
float LargestOfScores(const float* in, std::int64_t count) {
  const FloatTag d;
  constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
  const auto width = static_cast<std::int64_t>(hn::Lanes(d));
  HWY_ALIGN float lanes[hn::MaxLanes(d)];
  auto maximum = hn::Set(d, kMinusInfinity);
  for (std::int64_t i = 0; i < count; i += width) {
    for (std::int64_t t = 0; t < width; ++t) lanes[t] = i + t < count ? in[i + t] : kMinusInfinity;
    maximum = hn::Max(maximum, hn::Load(d, lanes));
  }
  return LargestLane(d, maximum);
}

class FusedKernel {
 public:
  explicit FusedKernel(const FusedOperands& operands)
      : o_(operands),
        p_(*operands.problem),
        lanes_(static_cast<std::int64_t>(hn::Lanes(FloatTag()))),
        key_tile_(TVectors * lanes_),
        v_stride_((p_.v_dim + lanes_ - 1) / lanes_ * lanes_),
        item_group_(p_.q_heads / operands.key_heads),
        // (no more positions than the sequence has: a short one, several tokens of a decoding
        // step, would leave rows of every register tile empty, their products computed for
        // nothing)
        positions_(std::clamp<std::int64_t>(kItemRows / item_group_, 1,
                                            std::max<std::int64_t>(1, p_.q_len))),
        rows_(positions_ * item_group_),
        tiles_((p_.k_len + key_tile_ - 1) / key_tile_),
        bf16_(operands.bf16_products),
        pair_dim_((o_.score_dim + 1) / 2),
        sub_tile_(bf16_ ? 64 : lanes_),
        key_tile_words_(bf16_ ? pair_dim_ * key_tile_ : o_.score_dim * key_tile_),
        value_tile_words_(bf16_ ? key_tile_ / 2 * v_stride_ : key_tile_ * v_stride_) {}

  void Run() {
    PackKeysAndValues();
    const std::int64_t position_blocks = (p_.q_len + positions_ - 1) / positions_;
    const std::int64_t items = p_.batch * o_.key_heads * position_blocks;
    // Later query blocks see more keys under a causal mask: hand those out first, so the
    // dynamic schedule ends on short items.
    const auto item_start = [&](std::int64_t item) {
      const std::int64_t block = position_blocks - 1 - item % position_blocks;
      const std::int64_t kh = (item / position_blocks) % o_.key_heads;
      const std::int64_t b = item / (position_blocks * o_.key_heads);
      return std::array<std::int64_t, 3>{b, kh, block * positions_};
    };
    parallel_for_each_ahead(
        worker_threads(p_), items, [this] { return Scratch(*this); },
        [&](Scratch& scratch, std::int64_t item) {
          scratch.next_item = item_start(item);
          scratch.next_row = 0;
        },
        [&](Scratch& scratch, std::int64_t item) {
          const auto [b, kh, i0] = item_start(item);
          ComputeItem(b, kh, i0, scratch);
        });
  }

 private:
  // One worker thread's working set, in buffers the thread keeps between calls.
  struct Scratch {
    explicit Scratch(const FusedKernel& k) {
      thread_local ReusedBuffer buffers[6];
      q_tile = buffers[0].Get(k.rows_ * k.o_.score_dim);
      scores = buffers[1].Get(k.rows_ * k.key_tile_);
      accumulator = buffers[2].Get(k.rows_ * k.v_stride_);
      row_sum = buffers[3].Get(k.rows_ * k.lanes_);
      if (k.bf16_) {
        q_pairs = reinterpret_cast<std::uint32_t*>(buffers[4].Get(k.rows_ * k.pair_dim_));
        p_pairs = reinterpret_cast<std::uint32_t*>(buffers[5].Get(k.rows_ * k.key_tile_ / 2));
      }
      row_max.resize(static_cast<std::size_t>(k.rows_));
      lse_low.resize(static_cast<std::size_t>(k.rows_));
      correction.resize(static_cast<std::size_t>(k.rows_));
      first.resize(static_cast<std::size_t>(k.rows_));
      last.resize(static_cast<std::size_t>(k.rows_));
    }
    float* q_tile;                     // [rows, D]: the item's queries times the scale
    float* scores;                     // [rows, T]: S, then P, of the current tile
    float* accumulator;                // [rows, Dv']: unnormalized O
    float* row_sum;                    // [rows, lanes]: per-lane partial softmax sums
    std::uint32_t* q_pairs = nullptr;  // bf16 mode: [rows, ⌈D/2⌉] query pairs (unscaled)
    std::uint32_t* p_pairs = nullptr;  // bf16 mode: [rows, T/2] weight pairs
    std::vector<float> row_max, correction;
    std::vector<float> lse_low;  // after step 3: LSE − row_max, row_max then holding float(LSE)
    std::vector<std::int64_t> first, last;  // each row's visible key range
    // The item the thread takes next (b, kh, i0), and the first of its rows not yet prefetched.
    std::array<std::int64_t, 3> next_item{};
    std::int64_t next_row = std::numeric_limits<std::int64_t>::max();
  };

  // Row r of the item of key head kh is query head kh·item_group + r / positions, at position
  // i0 + r % positions; the values it reads are those of key/value head ValueHead(kh).
  std::int64_t HeadOf(std::int64_t kh, std::int64_t r) const {
    return kh * item_group_ + r / positions_;
  }
  std::int64_t ValueHead(std::int64_t kh) const { return kh * item_group_ / p_.group_size; }

  // Asks for the Q rows the thread's next item reads and the O rows it writes (a whole [H, D] row
  // apart each: read or written as the item starts and ends, they would wait on memory one short
  // row at a time), `count` rows at a time between the current item's blocks, so that they arrive
  // while it computes. Asked for all at once, 2·rows·D·4 bytes of them (32 KiB at D = 64) would
  // stall the core until the miss buffers drained, as long as the loads themselves.
  void PrefetchNextRows(Scratch& s, std::int64_t count) const {
    if (s.next_row >= rows_) return;
    const auto [b, kh, i0] = s.next_item;
    const std::int64_t positions = std::min(positions_, p_.q_len - i0);
    const bool float_out = p_.out.dtype == DType::float32 && p_.out.strides[3] == 1;
    const std::int64_t end = std::min(rows_, s.next_row + count);
    for (std::int64_t r = s.next_row; r < end; ++r) {
      const std::int64_t t = r % positions_, h = HeadOf(kh, r);
      if (t >= positions) continue;
      if (o_.bf16_queries || bf16_) {
        PrefetchBytes(o_.q16.row(b, i0 + t, h), o_.score_dim * 2);
      } else {
        PrefetchBytes(o_.q.row(b, i0 + t, h), o_.score_dim * 4);
      }
      if (float_out)
        PrefetchBytes(reinterpret_cast<const float*>(p_.out.data) + p_.out.offset(b, i0 + t, h),
                      p_.v_dim * 4);
    }
    s.next_row = end;
  }

  void ComputeItem(std::int64_t b, std::int64_t kh, std::int64_t i0, Scratch& s) const {
    const std::int64_t positions = std::min(positions_, p_.q_len - i0);
    const std::int64_t dim = o_.score_dim;
    // The additive score carries its scale in additive_v instead.
    const auto scale = o_.additive ? 1.0f : static_cast<float>(p_.scale);
    // 1. Q rows, scaled; visible ranges; their union.
    std::int64_t item_first = p_.k_len, item_last = 0;
    for (std::int64_t r = 0; r < rows_; ++r) {
      const std::int64_t t = r % positions_;
      float* row = s.q_tile + r * dim;
      if (t >= positions) {  // past the end of the sequence: an empty row
        s.first[r] = 0;
        s.last[r] = 0;
        std::fill(row, row + dim, 0.0f);
        if (bf16_) std::fill(s.q_pairs + r * pair_dim_, s.q_pairs + (r + 1) * pair_dim_, 0u);
        continue;
      }
      if (bf16_) {  // pairs along D; the scale is applied to the float32 scores instead
        const std::uint16_t* q = o_.q16.row(b, i0 + t, HeadOf(kh, r));
        for (std::int64_t e = 0; e < pair_dim_; ++e) {
          s.q_pairs[r * pair_dim_ + e] = bf16_pair(q[2 * e], 2 * e + 1 < dim ? q[2 * e + 1] : 0);
        }
      } else if (o_.bf16_queries) {  // bfloat16 or float16 widened here, a row at a time
        WidenRow(o_.q16.row(b, i0 + t, HeadOf(kh, r)), row, dim, o_.half);
        for (std::int64_t d = 0; d < dim; ++d) row[d] *= scale;
      } else {
        const float* q = o_.q.row(b, i0 + t, HeadOf(kh, r));
        const std::int64_t ahead = r + kRowsAhead;
        if (ahead < rows_ && ahead % positions_ < positions)
          PrefetchBytes(o_.q.row(b, i0 + ahead % positions_, HeadOf(kh, ahead)), dim * 4);
        for (std::int64_t d = 0; d < dim; ++d) row[d] = scale * q[d];
      }
      const detail::KeyInterval keys = detail::visible_keys(p_, b, HeadOf(kh, r), i0 + t);
      s.first[r] = keys.first;
      s.last[r] = keys.last;
      if (s.first[r] < s.last[r]) {
        item_first = std::min(item_first, s.first[r]);
        item_last = std::max(item_last, s.last[r]);
      }
    }
    std::fill(s.row_max.begin(), s.row_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(s.row_sum, s.row_sum + rows_ * lanes_, 0.0f);
    std::fill(s.accumulator, s.accumulator + rows_ * v_stride_, 0.0f);

    // 2. Key tiles that meet the item's key range; before each block, a few of the next item's
    // rows are prefetched, all of them by the middle of the item's blocks.
    const std::int64_t row_blocks = (rows_ + kBlockRows - 1) / kBlockRows;
    const std::int64_t steps =
        std::max<std::int64_t>(1, item_last > item_first
                                      ? (item_last - 1) / key_tile_ - item_first / key_tile_ + 1
                                      : 0) *
        row_blocks;
    const std::int64_t prefetch_rows = (2 * rows_ + steps - 1) / steps;
    for (std::int64_t tile = item_first / key_tile_; tile * key_tile_ < item_last; ++tile) {
      const std::int64_t start = tile * key_tile_;
      const std::int64_t count = std::min(key_tile_, p_.k_len - start);
      const float* keys = KeyTile(b, kh, tile);
      const float* values = ValueTile(b, ValueHead(kh), tile);
      const TileBlocks blocks = ClassifyTile(b, kh, i0, positions, start, count);
      if (blocks == TileBlocks::empty) continue;
      // Whether the block mask can hide nothing inside the rows' intervals: its blocks here are
      // all full, or its rows are runs, which the intervals already are within (visible_keys).
      const bool full = blocks == TileBlocks::full || block_mask_rows_are_runs_;
      for (std::int64_t r0 = 0; r0 < rows_; r0 += kBlockRows) {
        const int block = static_cast<int>(std::min<std::int64_t>(kBlockRows, rows_ - r0));
        PrefetchNextRows(s, prefetch_rows);
        const KeySpan span = VisibleSpan(s, b, kh, i0, r0, block, start, count, full);
        if (span.begin >= span.end) continue;
        ScoreBlock(s, keys, kh, r0, block, span);
        bool any_visible = false;
        for (int r = 0; r < block; ++r)
          any_visible |= MaskRow(b, kh, i0, r0 + r, start, count, s, full);
        if (!any_visible) continue;
        if (p_.sigmoid) {
          for (int r = 0; r < block; ++r) SigmoidRow(r0 + r, span, s);
        } else {
          for (int r = 0; r < block; ++r) SoftmaxRow(r0 + r, span, s);
        }
        if (dropout_.active()) {
          for (int r = 0; r < block; ++r) DropoutRow(b, kh, i0, r0 + r, start, span, s);
        }
        AccumulateValues(s, values, r0, block, span);
      }
    }

    PrefetchNextRows(s, rows_);  // an item without visible keys
    // 3. Normalize and write.
    for (std::int64_t r = 0; r < rows_; ++r) {
      const std::int64_t t = r % positions_;
      if (t >= positions) continue;
      const std::int64_t h = HeadOf(kh, r), i = i0 + t;
      const bool empty = s.row_max[r] == -std::numeric_limits<float>::infinity();
      const float row_sum =
          hn::GetLane(hn::SumOfLanes(FloatTag(), hn::Load(FloatTag(), s.row_sum + r * lanes_)));
      float inverse = 0.0f;
      double lse = -std::numeric_limits<double>::infinity();
      if (p_.sigmoid) {  // no normalizer: O is the sum itself; LSE, the log of its total weight
        inverse = 1.0f;
        if (row_sum > 0.0f) lse = std::log(double{row_sum});
      } else if (!empty) {
        // LSE in double: m is one of the scores, exact; log l is small. A float32 LSE would round
        // at |LSE|·2⁻²⁴, which for logits of ±1e4 is far more than the weights' own error.
        inverse = 1.0f / row_sum;
        lse = static_cast<double>(s.row_max[r]) + std::log(double{row_sum});
      }
      if (p_.sinks.present) {  // one more column, with no value (core/sinks.hpp)
        const detail::SinkJoin joined = detail::join_sink(lse, p_.sinks.load(h));
        lse = joined.lse;
        inverse *= static_cast<float>(joined.keys_share);
      }
      StoreRow(p_.out, s.accumulator + r * v_stride_, inverse, p_.v_dim, b, i, h);
      if (p_.lse.present) p_.lse.store(lse, b, h, i);
      // Kept for the weights pass as two floats, lse_high + lse_low = LSE to about 2⁻⁴⁸·|LSE|.
      s.row_max[r] = static_cast<float>(lse);
      s.lse_low[r] =
          std::isfinite(lse) ? static_cast<float>(lse - static_cast<double>(s.row_max[r])) : 0.0f;
    }
    if (p_.weights.present) WriteWeights(b, kh, i0, positions, s);
  }

  // What the block mask makes of keys [start, start + count) for the item's rows (positions
  // i0 … i0 + positions − 1 of each of its heads): empty when it hides them all, full when it
  // shows them all (its blocks there all full), partial otherwise or without a block mask.
  enum class TileBlocks { empty, partial, full };
  TileBlocks ClassifyTile(std::int64_t b, std::int64_t kh, std::int64_t i0, std::int64_t positions,
                          std::int64_t start, std::int64_t count) const {
    if (p_.block_mask == nullptr) return TileBlocks::partial;
    bool empty = true, full = true;
    for (std::int64_t h = HeadOf(kh, 0); h < HeadOf(kh, rows_ - 1) + 1; ++h) {
      const detail::BlockCover cover =
          detail::block_mask_cover(p_, b, h, i0, i0 + positions, start, start + count);
      empty = empty && cover == detail::BlockCover::none;
      full = full && cover == detail::BlockCover::all;
    }
    return empty ? TileBlocks::empty : full ? TileBlocks::full : TileBlocks::partial;
  }

  // The keys [begin, end) of a tile, relative to its start, that any row of a block can see,
  // widened to whole vectors (sub_tile_ keys; 64 for the bf16 tiles): only these are scored,
  // exponentiated and summed. On the diagonal of a causal mask, the edges of a window, beside a
  // block mask's empty blocks or in the gap after sink tokens, this skips the parts of the tile
  // that no row of the block sees. [seen_begin, seen_end) are those keys before the widening:
  // the weights outside it are zero, and the float32 value pass skips them.
  struct KeySpan {
    std::int64_t begin = 0, end = 0;
    std::int64_t seen_begin = 0, seen_end = 0;
  };
  // `blocks_full`: the block mask hides nothing of the tile inside the rows' intervals (its blocks
  // there are all full, ClassifyTile, or its rows are runs), so that it narrows nothing.
  KeySpan VisibleSpan(const Scratch& s, std::int64_t b, std::int64_t kh, std::int64_t i0,
                      std::int64_t r0, int block, std::int64_t start, std::int64_t count,
                      bool blocks_full = false) const {
    std::int64_t first = count, last = 0;
    const bool narrow = (p_.block_mask != nullptr && !blocks_full) || p_.positions.sink_end > 0;
    for (int r = 0; r < block; ++r) {
      detail::KeyInterval keys{s.first[r0 + r], s.last[r0 + r]};
      // Past the tile's empty blocks, and the gap between sink tokens and a window.
      if (narrow && !keys.empty()) {
        keys = detail::visible_keys_within(p_, b, HeadOf(kh, r0 + r), i0 + (r0 + r) % positions_,
                                           keys, start, start + count);
      }
      const std::int64_t from = std::max<std::int64_t>(keys.first - start, 0);
      const std::int64_t to = std::min<std::int64_t>(keys.last - start, count);
      if (from < to) {
        first = std::min(first, from);
        last = std::max(last, to);
      }
    }
    if (first >= last) return {};
    return {first / sub_tile_ * sub_tile_,
            std::min(key_tile_, (last + sub_tile_ - 1) / sub_tile_ * sub_tile_), first, last};
  }

  // K and V of every (batch, key head) in tiles, once for all items:
  //   key tile n:   [D, T], element (d, t) = K[n·T + t, d]   (Kᵀ, so keys run
  //                 along the vector lanes of the score micro-kernel)
  //   value tile n: [T, Dv'], row t = V[n·T + t, :] padded with zeros
  // Keys past Nk in the last tile are zero; the masks give them -inf scores.
  void PackKeysAndValues() {
    const std::int64_t key_sets = p_.batch * o_.key_heads, value_sets = p_.batch * p_.kv_heads;
    thread_local ReusedBuffer keys_buffer, values_buffer;  // the calling thread's
    packed_keys_ = keys_buffer.Get(key_sets * tiles_ * key_tile_words_);
    packed_values_ = values_buffer.Get(value_sets * tiles_ * value_tile_words_);
    if (bf16_) {
      PackPairs(key_sets, value_sets);
      return;
    }
    // One index per tile position of a batch and a run of heads, for the keys, then for the
    // values. A key's rows of neighbouring heads lie side by side, so the copies read whole
    // [H, D] rows from one end to the other, a stream the hardware prefetches; one head at a time
    // reads 4·D bytes a whole row apart, each read waiting for memory.
    const int threads = worker_threads(p_);
    const HeadRuns key_runs = SplitHeads(o_.key_heads, threads);
    const HeadRuns value_runs = SplitHeads(p_.kv_heads, threads);
    const std::int64_t key_tasks = p_.batch * tiles_ * key_runs.count;
    parallel_for(threads, key_tasks + p_.batch * tiles_ * value_runs.count,
                 [&](std::int64_t index) {
                   const bool keys = index < key_tasks;
                   const HeadRuns& runs = keys ? key_runs : value_runs;
                   const std::int64_t heads = keys ? o_.key_heads : p_.kv_heads;
                   if (!keys) index -= key_tasks;
                   const std::int64_t run = index % runs.count, tile = index / runs.count % tiles_;
                   const std::int64_t b = index / runs.count / tiles_;
                   const std::int64_t first = run * runs.heads;
                   const std::int64_t end = std::min(heads, first + runs.heads);
                   if (keys) {
                     PackKeyTiles(b, first, end, tile);
                   } else {
                     PackValueTiles(b, first, end, tile);
                   }
                 });
  }

  // Heads split into `count` runs of `heads` (the last one shorter): as few runs as give the
  // threads about 8 copies each.
  struct HeadRuns {
    std::int64_t count, heads;
  };
  HeadRuns SplitHeads(std::int64_t heads, int threads) const {
    const std::int64_t positions = std::max<std::int64_t>(1, p_.batch * tiles_);  // 0 keys: none
    const std::int64_t count =
        std::clamp<std::int64_t>((8 * threads + positions - 1) / positions, 1, heads);
    const std::int64_t per_run = (heads + count - 1) / count;
    return {(heads + per_run - 1) / per_run, per_run};
  }

  // Key tile `tile` of (b, kh) for key heads first_head … end_head − 1: Kᵀ as [D, T], zero
  // past Nk.
  void PackKeyTiles(std::int64_t b, std::int64_t first_head, std::int64_t end_head,
                    std::int64_t tile) const {
    const std::int64_t dim = o_.score_dim;
    // Keys past Nk: zero, a contiguous run at the end of each of the tile's D rows.
    const std::int64_t keys_in_tile =
        std::clamp<std::int64_t>(p_.k_len - tile * key_tile_, 0, key_tile_);
    for (std::int64_t kh = first_head; kh < end_head; ++kh) {
      float* keys = KeyTile(b, kh, tile);
      for (std::int64_t d = 0; d < dim; ++d) {
        std::fill(keys + d * key_tile_ + keys_in_tile, keys + (d + 1) * key_tile_, 0.0f);
      }
    }
    PackKeys(b, first_head, end_head, tile, keys_in_tile);
  }

  // Value tile `tile` of (b, hv) for value heads first_head … end_head − 1, key by key and, for
  // each key, head by head: rows of Dv' with zeros past Dv and past Nk.
  void PackValueTiles(std::int64_t b, std::int64_t first_head, std::int64_t end_head,
                      std::int64_t tile) const {
    for (std::int64_t t = 0; t < key_tile_; ++t) {
      const std::int64_t j = tile * key_tile_ + t;
      for (std::int64_t hv = first_head; hv < end_head; ++hv) {
        float* value_row = ValueTile(b, hv, tile) + t * v_stride_;
        std::int64_t d = 0;
        if (j < p_.k_len) {  // widened in place, or copied from where a float32 row lies
          const float* value = FloatRow(Operand::values, b, j, hv, value_row);
          if (value != value_row) std::copy(value, value + p_.v_dim, value_row);
          d = p_.v_dim;
        }
        std::fill(value_row + d, value_row + v_stride_, 0.0f);
      }
    }
  }

  // Kᵀ of the keys of tile `tile` (its first `count` keys) for key heads first_head … end_head − 1,
  // eight keys at a time on x86 with 256-bit vectors (Transpose8x8), four elsewhere and for the
  // last keys, and for those keys head by head: each block (keys × as many elements of D) is
  // transposed in registers, so that each of the tile's D rows is written eight or four floats
  // at once. A key at a time writes one float to each of D rows, a store per element that cost
  // more than the scores of a short sequence (bfloat16 and float16 S1 on AVX2 took 4-9% more than
  // float32 that way); blocks of 8 instead of 4 took the packing of B1 H8 N4096 D64 from 0.77 to
  // 0.55 ms (Zen 5). Float32 rows are read where they lie; bfloat16, float16 and int8 rows are
  // first widened (int8: times their scale) into rows of scratch. The last keys and elements of D
  // that do not fill a block go one at a time.
  void PackKeys(std::int64_t b, std::int64_t first_head, std::int64_t end_head, std::int64_t tile,
                std::int64_t count) const {
    const std::int64_t dim = o_.score_dim;
    thread_local std::vector<float> widened;  // a group's key rows, when they are not float32
    widened.resize(static_cast<std::size_t>(kPackKeys * dim));
    const float* rows[kPackKeys];
    for (std::int64_t t0 = 0; t0 < count;) {
      const std::int64_t group =
          count - t0 >= kPackKeys ? kPackKeys : std::min<std::int64_t>(4, count - t0);
      for (std::int64_t kh = first_head; kh < end_head; ++kh) {
        for (std::int64_t t = 0; t < group; ++t)
          rows[t] =
              FloatRow(Operand::keys, b, tile * key_tile_ + t0 + t, kh, widened.data() + t * dim);
        float* keys = KeyTile(b, kh, tile) + t0;
        std::int64_t d0 = 0;
#if HWY_ARCH_X86 && HWY_MAX_BYTES >= 32
        if (group == 8) {
          for (; d0 + 8 <= dim; d0 += 8) Transpose8x8(rows, d0, keys + d0 * key_tile_);
        }
#endif
#if HWY_TARGET != HWY_SCALAR  // (which has no 4-lane vectors)
        if (group == 4) {
          for (; d0 + 4 <= dim; d0 += 4) Transpose4x4(rows, d0, keys + d0 * key_tile_);
        }
#endif
        for (; d0 < dim; ++d0) {
          for (std::int64_t t = 0; t < group; ++t) keys[d0 * key_tile_ + t] = rows[t][d0];
        }
      }
      t0 += group;
    }
  }

#if HWY_TARGET != HWY_SCALAR
  // out[e · key_tile_ + t] = rows[t][d0 + e] for 4 rows t and 4 elements e, in 128-bit
  // registers: rows a, b, c, e interleaved in pairs, then the pairs' halves joined.
  void Transpose4x4(const float* const* rows, std::int64_t d0, float* out) const {
    const hn::FixedTag<float, 4> d4;
    const auto a = hn::LoadU(d4, rows[0] + d0), b = hn::LoadU(d4, rows[1] + d0);
    const auto c = hn::LoadU(d4, rows[2] + d0), e = hn::LoadU(d4, rows[3] + d0);
    const auto ab_low = hn::InterleaveLower(d4, a, b);   // a0 b0 a1 b1
    const auto ab_high = hn::InterleaveUpper(d4, a, b);  // a2 b2 a3 b3
    const auto ce_low = hn::InterleaveLower(d4, c, e);
    const auto ce_high = hn::InterleaveUpper(d4, c, e);
    hn::StoreU(hn::ConcatLowerLower(d4, ce_low, ab_low), d4, out);
    hn::StoreU(hn::ConcatUpperUpper(d4, ce_low, ab_low), d4, out + key_tile_);
    hn::StoreU(hn::ConcatLowerLower(d4, ce_high, ab_high), d4, out + 2 * key_tile_);
    hn::StoreU(hn::ConcatUpperUpper(d4, ce_high, ab_high), d4, out + 3 * key_tile_);
  }
#endif

#if HWY_ARCH_X86 && HWY_MAX_BYTES >= 32
  // out[e · key_tile_ + t] = rows[t][d0 + e] for 8 rows t and 8 elements e: an 8 × 8 block
  // transposed in 256-bit registers (pairs of rows interleaved, then pairs of pairs, then the
  // 128-bit halves joined), each of the tile's 8 rows written as 32 bytes at once.
  void Transpose8x8(const float* const* rows, std::int64_t d0, float* out) const {
    const hn::FixedTag<float, 8> d8;
    const hn::Repartition<double, decltype(d8)> d64;
    using V = hn::Vec<decltype(d8)>;
    V pairs[8];
    for (int t = 0; t < 8; t += 2) {
      const V a = hn::LoadU(d8, rows[t] + d0), b = hn::LoadU(d8, rows[t + 1] + d0);
      pairs[t] = hn::InterleaveLower(d8, a, b);      // a0 b0 a1 b1 | a4 b4 a5 b5
      pairs[t + 1] = hn::InterleaveUpper(d8, a, b);  // a2 b2 a3 b3 | a6 b6 a7 b7
    }
    V quads[8];
    for (int half = 0; half < 2; ++half) {  // rows 0-3, then rows 4-7
      for (int upper = 0; upper < 2; ++upper) {
        const auto ab = hn::BitCast(d64, pairs[4 * half + upper]);
        const auto ce = hn::BitCast(d64, pairs[4 * half + 2 + upper]);
        // elements 2·upper (and + 4), then 2·upper + 1 (and + 5), of the four rows
        quads[4 * half + 2 * upper] = hn::BitCast(d8, hn::InterleaveLower(d64, ab, ce));
        quads[4 * half + 2 * upper + 1] = hn::BitCast(d8, hn::InterleaveUpper(d64, ab, ce));
      }
    }
    for (int e = 0; e < 4; ++e) {
      hn::StoreU(hn::ConcatLowerLower(d8, quads[4 + e], quads[e]), d8, out + e * key_tile_);
      hn::StoreU(hn::ConcatUpperUpper(d8, quads[4 + e], quads[e]), d8, out + (e + 4) * key_tile_);
    }
  }
#endif

  // Row j of head h of K or V in float32: where it lies, or widened into `scratch` [D or Dv]
  // (bfloat16 and float16 exactly, int8 times its scale).
  enum class Operand { keys, values };
  const float* FloatRow(Operand operand, std::int64_t b, std::int64_t j, std::int64_t h,
                        float* scratch) const {
    const bool keys = operand == Operand::keys;
    const std::int64_t length = keys ? o_.score_dim : p_.v_dim;
    if (o_.bf16_keys_and_values) {
      WidenRow((keys ? o_.k16 : o_.v16).row(b, j, h), scratch, length, o_.half);
      return scratch;
    }
    if (keys ? o_.int8_keys : o_.int8_values) {
      DequantizeRow((keys ? o_.k8 : o_.v8).row(b, j, h),
                    *(keys ? o_.k_scale : o_.v_scale).row(b, j, h), scratch, length);
      return scratch;
    }
    return (keys ? o_.k : o_.v).row(b, j, h);
  }

  // The bf16 mode's tiles, same order as above, in 32-bit words of two bfloat16 values:
  //   key tile:   [⌈D/2⌉, T], word (e, t) = (K[j, 2e], K[j, 2e + 1]) with j = tile·T + t
  //   value tile: [T/2, Dv'],  word (t, d) = (V[2t', d], V[2t' + 1, d]) with t' = tile·T/2 + t
  // (pairs along D for Q·Kᵀ, pairs of neighbouring keys for P·V), zero past Nk, D and Dv.
  void PackPairs(std::int64_t key_sets, std::int64_t value_sets) {
    const std::int64_t dim = o_.score_dim;
    const auto element = [](const std::uint16_t* row, std::int64_t d, std::int64_t length) {
      return row != nullptr && d < length ? row[d] : std::uint16_t{0};
    };
    const std::int64_t key_tiles = key_sets * tiles_;
    parallel_for(worker_threads(p_), key_tiles + value_sets * tiles_, [&](std::int64_t index) {
      if (index < key_tiles) {
        const std::int64_t set = index / tiles_, tile = index % tiles_;
        const std::int64_t b = set / o_.key_heads, kh = set % o_.key_heads;
        auto* keys = reinterpret_cast<std::uint32_t*>(KeyTile(b, kh, tile));
        for (std::int64_t t = 0; t < key_tile_; ++t) {
          const std::int64_t j = tile * key_tile_ + t;
          const std::uint16_t* key = j < p_.k_len ? o_.k16.row(b, j, kh) : nullptr;
          for (std::int64_t e = 0; e < pair_dim_; ++e) {
            keys[e * key_tile_ + t] =
                bf16_pair(element(key, 2 * e, dim), element(key, 2 * e + 1, dim));
          }
        }
        return;
      }
      const std::int64_t set = (index - key_tiles) / tiles_, tile = (index - key_tiles) % tiles_;
      const std::int64_t b = set / p_.kv_heads, hv = set % p_.kv_heads;
      auto* values = reinterpret_cast<std::uint32_t*>(ValueTile(b, hv, tile));
      for (std::int64_t t = 0; t < key_tile_ / 2; ++t) {
        const std::int64_t j = tile * key_tile_ + 2 * t;
        const std::uint16_t* even = j < p_.k_len ? o_.v16.row(b, j, hv) : nullptr;
        const std::uint16_t* odd = j + 1 < p_.k_len ? o_.v16.row(b, j + 1, hv) : nullptr;
        for (std::int64_t d = 0; d < v_stride_; ++d) {
          values[t * v_stride_ + d] =
              bf16_pair(element(even, d, p_.v_dim), element(odd, d, p_.v_dim));
        }
      }
    });
  }

  float* KeyTile(std::int64_t b, std::int64_t kh, std::int64_t tile) const {
    return packed_keys_ + ((b * o_.key_heads + kh) * tiles_ + tile) * key_tile_words_;
  }
  float* ValueTile(std::int64_t b, std::int64_t hv, std::int64_t tile) const {
    return packed_values_ + ((b * p_.kv_heads + hv) * tiles_ + tile) * value_tile_words_;
  }

  // 2a. scores[r0 + r, :] = q_tile[r0 + r, :] · k_tile for r < block.
  void ScoreBlock(Scratch& s, const float* k, std::int64_t kh, std::int64_t r0, int block,
                  KeySpan span) const {
    WithRows<kBlockRows>(block,
                         [&](auto rows) { ScoreRows<decltype(rows)::value>(s, k, kh, r0, span); });
  }

  // Scores of the keys in `span` (the rest of the row is left to MaskRow, which sets it to -inf).
  template <int kRows>
  void ScoreRows(Scratch& s, const float* k, std::int64_t kh, std::int64_t r0, KeySpan span) const {
    if (bf16_) {  // register tiles of 64 keys
      for (std::int64_t c0 = span.begin; c0 < span.end; c0 += 64) {
        bf16_score_tile(kRows, s.q_pairs + r0 * pair_dim_, pair_dim_,
                        reinterpret_cast<const std::uint32_t*>(k) + c0, key_tile_, pair_dim_,
                        static_cast<float>(p_.scale), s.scores + r0 * key_tile_ + c0, key_tile_);
      }
      return;
    }
    // Whole register tiles, then the last vectors of the span as one narrower tile.
    const std::int64_t end = span.end / lanes_;
    std::int64_t c0 = span.begin / lanes_;
    for (; c0 + kTileVectors <= end; c0 += kTileVectors) {
      if (o_.additive) {
        ScoreTile<kRows, true, kTileVectors>(s, k, kh, r0, c0);
      } else {
        ScoreTile<kRows, false, kTileVectors>(s, k, kh, r0, c0);
      }
    }
    ScoreNarrowTile<kRows, kTileVectors - 1>(s, k, kh, r0, c0, end - c0);
  }

  // Scores of the `vectors` vectors of keys from c0 (fewer than a register tile's), in one tile of
  // that width: its kRows × vectors accumulators keep more multiply-adds in flight than tiles of
  // one vector, whose kRows chains wait on each other's latency. Spans end mid-tile at the edges
  // of a window or of a block mask's blocks: one-vector tiles held 6-7% of M2's time in
  // `qkv bench` (AVX-512; the whole 4 × 4 tiles 22%). A span of a single vector (a causal
  // diagonal, four rows wide) still takes the one-vector tile. Each score is summed in the same
  // order whatever the tile's width.
  template <int kRows, int kVectors>
  void ScoreNarrowTile(Scratch& s, const float* k, std::int64_t kh, std::int64_t r0,
                       std::int64_t c0, std::int64_t vectors) const {
    if constexpr (kVectors > 0) {
      if (vectors != kVectors) {
        ScoreNarrowTile<kRows, kVectors - 1>(s, k, kh, r0, c0, vectors);
      } else if (o_.additive) {
        ScoreTile<kRows, true, kVectors>(s, k, kh, r0, c0);
      } else {
        ScoreTile<kRows, false, kVectors>(s, k, kh, r0, c0);
      }
    }
  }

  // The register tile: rows r0 … r0 + kRows against keys c0·lanes … (c0 + kVectors)·lanes,
  // one step per element e of the compared vectors:
  //   dot:       S[r, t] += q[r, e] · k[t, e]
  //   additive:  S[r, t] += v[h_r, e] · tanh(qa[r, e] + ka[t, e])   (e runs over A)
  // The additive step costs kRows·kVectors vector tanh: there is no way around the Nq·Nk·A
  // tanh of that score, only to make each one cheap.
  template <int kRows, bool kAdditive, int kVectors>
  void ScoreTile(Scratch& s, const float* k, std::int64_t kh, std::int64_t r0,
                 std::int64_t c0) const {
    const FloatTag d;
    using V = hn::Vec<FloatTag>;
    VectorArray<FloatTag, kRows * kVectors> acc;  // S[r, c] at r·kVectors + c
    const float* v_of_row[kRows];                 // additive: the v of each row's head
    for (int r = 0; r < kRows; ++r) {
      if constexpr (kAdditive)
        v_of_row[r] = o_.additive_v.data() + HeadOf(kh, r0 + r) * o_.score_dim;
      for (int c = 0; c < kVectors; ++c) acc.Set(r * kVectors + c, hn::Zero(d));
    }
    const std::int64_t dim = o_.score_dim;
    const float* q = s.q_tile + r0 * dim;
    // The dot score sums over D in blocks of kScoreDepthBlock (operands.hpp), as the backward
    // does; the additive score's sum over A stays one sequential sum, as its backward's.
    const std::int64_t depth_block = kAdditive ? std::max<std::int64_t>(dim, 1) : kScoreDepthBlock;
    std::int64_t e0 = 0;
    do {
      const std::int64_t e1 = std::min(dim, e0 + depth_block);
      if (e0 > 0) {
        for (int i = 0; i < kRows * kVectors; ++i) acc.Set(i, hn::Zero(d));
      }
      for (std::int64_t e = e0; e < e1; ++e) {
        const float* k_row = k + e * key_tile_ + c0 * lanes_;
        VectorArray<FloatTag, kVectors> keys;
        for (int c = 0; c < kVectors; ++c) keys.Set(c, hn::Load(d, k_row + c * lanes_));
        for (int r = 0; r < kRows; ++r) {
          const V query = hn::Set(d, q[r * dim + e]);
          if constexpr (kAdditive) {
            const V weight = hn::Set(d, v_of_row[r][e]);
            for (int c = 0; c < kVectors; ++c) {
              const int i = r * kVectors + c;
              acc.Set(i, hn::MulAdd(weight, hn::Tanh(d, hn::Add(query, keys.Get(c))), acc.Get(i)));
            }
          } else {
            for (int c = 0; c < kVectors; ++c) {
              const int i = r * kVectors + c;
              acc.Set(i, hn::MulAdd(query, keys.Get(c), acc.Get(i)));
            }
          }
        }
      }
      for (int r = 0; r < kRows; ++r) {
        float* out = s.scores + (r0 + r) * key_tile_ + c0 * lanes_;
        for (int c = 0; c < kVectors; ++c) {
          float* lane_out = out + c * lanes_;
          const V sum = acc.Get(r * kVectors + c);
          hn::Store(e0 > 0 ? hn::Add(hn::Load(d, lane_out), sum) : sum, d, lane_out);
        }
      }
      e0 = e1;
    } while (e0 < dim);
  }

  // 2b. Everything after the product, for one row of one tile; returns whether any key of the
  // tile stays visible to the row.
  // `blocks_full` as for VisibleSpan: the block mask's element tests are skipped.
  bool MaskRow(std::int64_t b, std::int64_t kh, std::int64_t i0, std::int64_t r, std::int64_t start,
               std::int64_t count, Scratch& s, bool blocks_full = false) const {
    constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
    float* scores = s.scores + r * key_tile_;
    const std::int64_t from = std::max<std::int64_t>(0, s.first[r] - start);
    const std::int64_t to = std::min<std::int64_t>(count, s.last[r] - start);
    if (from >= to) {
      std::fill(scores, scores + key_tile_, kMinusInfinity);
      return false;
    }
    if (p_.softcap > 0) {  // vectorized (kernels/score_math-inl.h), the backward's own
      const FloatTag d;
      const auto cap = hn::Set(d, static_cast<float>(p_.softcap));
      const auto inverse_cap = hn::Set(d, static_cast<float>(1.0 / p_.softcap));
      for (std::int64_t t = from / lanes_ * lanes_; t < to; t += lanes_)
        hn::Store(hn::Mul(cap, SoftCapTanh(d, hn::Load(d, scores + t), inverse_cap)), d,
                  scores + t);
    }
    std::fill(scores, scores + from, kMinusInfinity);
    std::fill(scores + to, scores + key_tile_, kMinusInfinity);
    apply_score_options(blocks_full ? without_block_mask_ : after_cap_, b, HeadOf(kh, r),
                        i0 + r % positions_, start + from, to - from, scores + from);
    return true;
  }

  // 2c. Online softmax of one row of the tile, over the keys of `span` (whole vectors; the rest
  // of the tile is never read): P in place of S.
  void SoftmaxRow(std::int64_t r, KeySpan span, Scratch& s) const {
    const FloatTag d;
    float* scores = s.scores + r * key_tile_;
    auto maximum = hn::Set(d, -std::numeric_limits<float>::infinity());
    for (std::int64_t t = span.begin; t < span.end; t += lanes_) {
      maximum = hn::Max(maximum, hn::Load(d, scores + t));
    }
    const float tile_max = LargestLane(d, maximum);
    const float old_max = s.row_max[r];
    float new_max = std::max(old_max, tile_max);
    if (new_max == -std::numeric_limits<float>::infinity()) {
      if (AnyNaN(d, scores, span.begin, span.end)) {
        new_max = std::numeric_limits<float>::quiet_NaN();  // then P, the sum and O are NaN
      } else {                                              // nothing visible yet
        s.correction[r] = 1.0f;
        std::fill(scores, scores + key_tile_, 0.0f);
        return;
      }
    }
    // e^(old − new): 1 while the maximum holds (most tiles), 0 when old_max = -inf (the row's
    // first visible tile: without the call, which took 1% of a document mask's time).
    const float correction = new_max == old_max ? 1.0f
                             : old_max == -std::numeric_limits<float>::infinity()
                                 ? 0.0f
                                 : std::exp(old_max - new_max);
    const auto shift = hn::Set(d, new_max);
    // The row's sum is kept lane by lane and reduced once, at the end of the item.
    float* lane_sums = s.row_sum + r * lanes_;
    auto sum = hn::Mul(hn::Load(d, lane_sums), hn::Set(d, correction));
    for (std::int64_t t = span.begin; t < span.end; t += lanes_) {
      const auto p = KernelExp(d, hn::Sub(hn::Load(d, scores + t), shift));
      hn::Store(p, d, scores + t);
      sum = hn::Add(sum, p);
    }
    hn::Store(sum, d, lane_sums);
    s.row_max[r] = new_max;
    s.correction[r] = correction;
  }

  // 2c, sigmoid attention: P = 1 / (1 + e^−(s + b)) over the keys of `span`, each on its own
  // (kernels/score_math-inl.h): nothing is carried from tile to tile but the row's sum of P (its
  // LSE at the end).
  void SigmoidRow(std::int64_t r, KeySpan span, Scratch& s) const {
    const FloatTag d;
    float* scores = s.scores + r * key_tile_;
    const auto negative_bias = hn::Set(d, static_cast<float>(-p_.sigmoid_bias));
    float* lane_sums = s.row_sum + r * lanes_;
    auto sum = hn::Load(d, lane_sums);
    for (std::int64_t t = span.begin; t < span.end; t += lanes_) {
      const auto p = SigmoidWeights(d, hn::Load(d, scores + t), negative_bias);
      hn::Store(p, d, scores + t);
      sum = hn::Add(sum, p);
    }
    hn::Store(sum, d, lane_sums);
    s.correction[r] = 1.0f;
  }

  // 2c'. Training only: the weights of one row times the dropout mask, after the row's softmax
  // sum has taken them whole.
  void DropoutRow(std::int64_t b, std::int64_t kh, std::int64_t i0, std::int64_t r,
                  std::int64_t start, KeySpan span, Scratch& s) const {
    const std::int64_t h = HeadOf(kh, r), i = i0 + r % positions_;
    float* weights = s.scores + r * key_tile_;
    const auto keep_scale = static_cast<float>(dropout_.keep_scale());
    for (std::int64_t t = span.begin; t < span.end; ++t) {
      if (weights[t] != 0.0f)
        weights[t] = dropout_.keeps(b, h, i, start + t) ? weights[t] * keep_scale : 0.0f;
    }
  }

  // 2d. accumulator[r0 + r, :] = correction·accumulator + P·V for r < block.
  // Only the keys in `span` carry weight (P is 0 elsewhere in the tile).
  void AccumulateValues(Scratch& s, const float* values, std::int64_t r0, int block,
                        KeySpan span) const {
    if (bf16_) {  // P rounded to bfloat16 pairs, then the dot-product tiles
      const std::int64_t pairs = key_tile_ / 2, first_pair = span.begin / 2;
      bf16_pair_rows(block, s.scores + r0 * key_tile_ + span.begin, key_tile_,
                     span.end - span.begin, s.p_pairs + r0 * pairs + first_pair, pairs);
      const std::int64_t vectors = v_stride_ / 16;
      for (std::int64_t c0 = 0; c0 < vectors; c0 += 4) {
        bf16_accumulate_tile(
            block, static_cast<int>(std::min<std::int64_t>(4, vectors - c0)),
            s.p_pairs + r0 * pairs + first_pair, pairs,
            reinterpret_cast<const std::uint32_t*>(values) + first_pair * v_stride_ + c0 * 16,
            v_stride_, (span.end - span.begin) / 2, s.correction.data() + r0,
            s.accumulator + r0 * v_stride_ + c0 * 16, v_stride_);
      }
      return;
    }
    const KeySpan seen{span.seen_begin, span.seen_end};
    WithRows<kBlockRows>(
        block, [&](auto rows) { AccumulateRows<decltype(rows)::value>(s, values, r0, seen); });
  }

  template <int kRows>
  void AccumulateRows(Scratch& s, const float* values, std::int64_t r0, KeySpan span) const {
    const std::int64_t vectors = v_stride_ / lanes_;
    for (std::int64_t c0 = 0; c0 < vectors; c0 += kTileVectors) {
      if (vectors - c0 >= kTileVectors) {
        AccumulateTile<kRows, kTileVectors>(s, values, r0, c0, span);
      } else {  // the last few vectors, one at a time
        for (std::int64_t c = c0; c < vectors; ++c)
          AccumulateTile<kRows, 1>(s, values, r0, c, span);
      }
    }
  }

  template <int kRows, int kVectors>
  void AccumulateTile(Scratch& s, const float* values, std::int64_t r0, std::int64_t c0,
                      KeySpan span) const {
    const FloatTag d;
    using V = hn::Vec<FloatTag>;
    VectorArray<FloatTag, kRows * kVectors> acc;  // row r's vector c at r·kVectors + c
    for (int r = 0; r < kRows; ++r) {
      const V correction = hn::Set(d, s.correction[r0 + r]);
      const float* row = s.accumulator + (r0 + r) * v_stride_ + c0 * lanes_;
      for (int c = 0; c < kVectors; ++c)
        acc.Set(r * kVectors + c, hn::Mul(correction, hn::Load(d, row + c * lanes_)));
    }
    const float* p = s.scores + r0 * key_tile_;
    const float* v = values + c0 * lanes_;
    for (std::int64_t t = span.begin; t < span.end; ++t) {
      VectorArray<FloatTag, kVectors> value_vectors;
      for (int c = 0; c < kVectors; ++c)
        value_vectors.Set(c, hn::Load(d, v + t * v_stride_ + c * lanes_));
      for (int r = 0; r < kRows; ++r) {
        const V weight = hn::Set(d, p[r * key_tile_ + t]);
        for (int c = 0; c < kVectors; ++c) {
          const int i = r * kVectors + c;
          acc.Set(i, hn::MulAdd(weight, value_vectors.Get(c), acc.Get(i)));
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      float* row = s.accumulator + (r0 + r) * v_stride_ + c0 * lanes_;
      for (int c = 0; c < kVectors; ++c) hn::Store(acc.Get(r * kVectors + c), d, row + c * lanes_);
    }
  }

  // 3'. P = e^((S − LSE_high) − LSE_low) with the same products and masks as the forward walk
  // (row_max holds LSE_high = float(LSE), lse_low the rest). S − LSE_high is exact wherever P is
  // not negligible (Sterbenz), so P is as precise as a softmax that subtracts the row's maximum.
  void WriteWeights(std::int64_t b, std::int64_t kh, std::int64_t i0, std::int64_t positions,
                    Scratch& s) const {
    for (std::int64_t r = 0; r < rows_; ++r) {
      if (r % positions_ >= positions) continue;
      const std::int64_t h = HeadOf(kh, r), i = i0 + r % positions_;
      for (std::int64_t j = 0; j < p_.k_len; ++j) p_.weights.store(0.0, b, h, i, j);
    }
    std::int64_t item_first = p_.k_len, item_last = 0;
    for (std::int64_t r = 0; r < rows_; ++r) {
      if (s.first[r] < s.last[r]) {
        item_first = std::min(item_first, s.first[r]);
        item_last = std::max(item_last, s.last[r]);
      }
    }
    const FloatTag d;
    for (std::int64_t tile = item_first / key_tile_; tile * key_tile_ < item_last; ++tile) {
      const std::int64_t start = tile * key_tile_;
      const std::int64_t count = std::min(key_tile_, p_.k_len - start);
      for (std::int64_t r0 = 0; r0 < rows_; r0 += kBlockRows) {
        const int block = static_cast<int>(std::min<std::int64_t>(kBlockRows, rows_ - r0));
        const KeySpan span = VisibleSpan(s, b, kh, i0, r0, block, start, count);
        if (span.begin >= span.end) continue;
        ScoreBlock(s, KeyTile(b, kh, tile), kh, r0, block, span);
        for (int r = 0; r < block; ++r) {
          const std::int64_t row = r0 + r;
          if (!MaskRow(b, kh, i0, row, start, count, s)) continue;
          if (s.row_max[row] == -std::numeric_limits<float>::infinity()) continue;
          float* scores = s.scores + row * key_tile_;
          if (p_.sigmoid) {  // the same P as the pass that averaged V
            SigmoidRow(row, {0, key_tile_}, s);
          } else {
            const auto lse_high = hn::Set(d, s.row_max[row]), lse_low = hn::Set(d, s.lse_low[row]);
            for (std::int64_t t = 0; t < key_tile_; t += lanes_) {
              const auto shifted = hn::Sub(hn::Sub(hn::Load(d, scores + t), lse_high), lse_low);
              hn::Store(KernelExp(d, shifted), d, scores + t);
            }
          }
          if (dropout_.active()) DropoutRow(b, kh, i0, row, start, {0, count}, s);
          const std::int64_t h = HeadOf(kh, row), i = i0 + row % positions_;
          for (std::int64_t t = 0; t < count; ++t) p_.weights.store(scores[t], b, h, i, start + t);
        }
      }
    }
  }

  const FusedOperands& o_;
  const AttentionProblem& p_;
  // The problem without its soft cap, which MaskRow applies itself on whole vectors.
  const AttentionProblem after_cap_ = [this] {
    AttentionProblem copy = p_;
    copy.softcap = 0.0;
    return copy;
  }();
  // The same without its block mask, for tiles the block mask shows whole.
  const AttentionProblem without_block_mask_ = [this] {
    AttentionProblem copy = after_cap_;
    copy.block_mask = nullptr;
    return copy;
  }();
  const bool block_mask_rows_are_runs_ = p_.block_mask != nullptr && p_.block_mask->rows_are_runs();
  const detail::DropoutMask dropout_{p_};
  const std::int64_t lanes_;             // floats per vector on this target
  const std::int64_t key_tile_;          // keys per tile: kTileVectors vectors
  const std::int64_t v_stride_;          // Dv rounded up to whole vectors
  const std::int64_t item_group_;        // query heads per item: those that share a key head
  const std::int64_t positions_;         // query positions per item
  const std::int64_t rows_;              // rows per item: positions × group
  const std::int64_t tiles_;             // key tiles per (batch, key head)
  const bool bf16_;                      // products on vdpbf16ps (see FusedOperands::bf16_products)
  const std::int64_t pair_dim_;          // ⌈D/2⌉: bfloat16 pairs along D
  const std::int64_t sub_tile_;          // a span's granularity: a vector (64 keys for bf16)
  const std::int64_t key_tile_words_;    // floats (or pairs) of one packed key tile
  const std::int64_t value_tile_words_;  // floats (or pairs) of one packed value tile
  float* packed_keys_ = nullptr;         // [B·key_heads, tiles, D, T]
  float* packed_values_ = nullptr;       // [B·Hk, tiles, T, Dv']
};

// Whether this target may call the AVX-512 BF16 tiles (on a CPU that has them).
bool TargetRunsBf16Tiles() {
  return (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL) && cpu_has_avx512_bf16();
}

void FusedForward(const FusedOperands& operands) {
  FusedKernel(operands).Run();
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::kernels {

HWY_EXPORT(FusedForward);
HWY_EXPORT(TargetRunsBf16Tiles);
HWY_EXPORT(SoftmaxExp);
HWY_EXPORT(SigmoidAttentionWeights);
HWY_EXPORT(LargestOfScores);

bool fused_attention_supports(const AttentionProblem& problem) {
  return problem.dtype == DType::float32 || problem.dtype == DType::bfloat16 ||
         problem.dtype == DType::float16;
}

namespace {

// FusedOperands::q8 and q_scale from the float32 query rows [batch, length, heads, score_dim] in
// operands.q, which then holds their rounded values q8 · q_scale instead. A row holding a NaN or
// an infinity gets the scale NaN, so that its scores, and its output, are NaN as they would be
// unrounded.
void round_queries_to_int8(FusedOperands& operands, std::int64_t batch, std::int64_t length,
                           std::int64_t heads) {
  const std::int64_t dim = operands.score_dim;
  const auto rows = static_cast<std::size_t>(batch * length * heads);
  RowMajorOperand<float> rounded;
  rounded.storage.resize(rows * static_cast<std::size_t>(dim));
  operands.q8.storage.resize(rows * static_cast<std::size_t>(dim));
  operands.q_scale.storage.resize(rows);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t i = 0; i < length; ++i)
      for (std::int64_t h = 0; h < heads; ++h) {
        const std::int64_t r = (b * length + i) * heads + h;
        const float* q = operands.q.row(b, i, h);
        const float scale = detail::int8_row_scale(q, dim);
        std::int8_t* q8 = operands.q8.storage.data() + r * dim;
        detail::quantize_int8_row(q, dim, scale, q8);
        operands.q_scale.storage[static_cast<std::size_t>(r)] = scale;
        for (std::int64_t e = 0; e < dim; ++e)
          rounded.storage[static_cast<std::size_t>(r * dim + e)] =
              static_cast<float>(q8[e]) * scale;
      }
  const auto point_at_storage = [&](auto& operand, std::int64_t row_length) {
    operand.data = operand.storage.data();
    operand.stride_h = row_length;
    operand.stride_n = heads * row_length;
    operand.stride_b = length * heads * row_length;
  };
  point_at_storage(rounded, dim);
  point_at_storage(operands.q8, dim);
  point_at_storage(operands.q_scale, 1);
  operands.q = std::move(rounded);
}

}  // namespace

FusedOperands prepare_fused_operands(const AttentionProblem& p, Bfloat16Operands bf16) {
  FusedOperands operands;
  operands.problem = &p;
  apply_simd_environment();
  // 16-bit inputs (bfloat16 or float16) are kept where the score compares them as they are.
  const bool bf16_inputs = p.dtype == DType::bfloat16 || p.dtype == DType::float16;
  operands.half = p.dtype == DType::float16 ? DType::float16 : DType::bfloat16;
  const detail::ScoreOperands score = detail::score_unit(p.score).operands(p);
  if (p.v.dtype == DType::int8) {
    // An int8 KV cache: Q in float32 (converted once; it is small), K and V kept.
    operands.int8_values = true;
    operands.int8_keys = keys_as_they_are(score);
    ComparedVectors<float> vectors =
        compared_vectors<float>(p, score, worker_threads(p), false, operands.int8_keys);
    operands.q = std::move(vectors.q);
    operands.score_dim = vectors.dim;
    operands.key_heads = vectors.key_heads;
    operands.additive = vectors.additive;
    operands.additive_v = std::move(vectors.additive_v);
    if (operands.int8_keys) {
      adopt_int8(operands.k8, operands.k_scale, p.k);
      round_queries_to_int8(operands, p.batch, p.q_len, p.q_heads);
    } else {
      operands.k = std::move(vectors.k);
    }
    adopt_int8(operands.v8, operands.v_scale, p.v);
    return operands;
  }
  const bool products_wanted =
      bf16 == Bfloat16Operands::products || bf16 == Bfloat16Operands::products_or_keys_and_values;
  if (products_wanted && p.dtype == DType::bfloat16 && score.query.identity() &&
      keys_as_they_are(score) && HWY_DYNAMIC_DISPATCH(TargetRunsBf16Tiles)()) {
    operands.bf16_products = true;
    operands.score_dim = p.k_dim;
    operands.key_heads = p.kv_heads;
    adopt_or_pack(operands.q16, p.q, p.batch, p.q_len, p.q_heads, p.q_dim);
    adopt_or_pack(operands.k16, p.k, p.batch, p.k_len, p.kv_heads, p.k_dim);
    adopt_or_pack(operands.v16, p.v, p.batch, p.k_len, p.kv_heads, p.v_dim);
    return operands;
  }
  // The score unit's compared vectors in float32; K and V stay bfloat16 for a kernel that
  // converts them on the fly, when the keys are compared as they are (and Q too, for the fused
  // kernel, when the queries are).
  const bool keep_keys = bf16 != Bfloat16Operands::widen && bf16_inputs && keys_as_they_are(score);
  const bool keep_queries =
      keep_keys && bf16 == Bfloat16Operands::products && score.query.identity();
  ComparedVectors<float> vectors =
      compared_vectors<float>(p, score, worker_threads(p), keep_queries, keep_keys);
  operands.q = std::move(vectors.q);
  operands.score_dim = vectors.dim;
  operands.key_heads = vectors.key_heads;
  operands.additive = vectors.additive;
  operands.additive_v = std::move(vectors.additive_v);
  if (keep_queries) {
    operands.bf16_queries = true;
    adopt_or_pack(operands.q16, p.q, p.batch, p.q_len, p.q_heads, p.q_dim);
  }
  if (keep_keys) {
    operands.bf16_keys_and_values = true;
    adopt_or_pack(operands.k16, p.k, p.batch, p.k_len, p.kv_heads, p.k_dim);
    adopt_or_pack(operands.v16, p.v, p.batch, p.k_len, p.kv_heads, p.v_dim);
  } else {
    operands.k = std::move(vectors.k);
    adopt_or_pack(operands.v, p.v, p.batch, p.k_len, p.kv_heads, p.v_dim);
  }
  return operands;
}

void fused_attention(const AttentionProblem& p) {
  const FusedOperands operands = prepare_fused_operands(p, Bfloat16Operands::products);
  apply_simd_environment();
  HWY_DYNAMIC_DISPATCH(FusedForward)(operands);
}

void softmax_exp(const float* in, float* out, std::int64_t count) {
  apply_simd_environment();
  HWY_DYNAMIC_DISPATCH(SoftmaxExp)(in, out, count);
}

void sigmoid_weights(const float* scores, float bias, float* out, std::int64_t count) {
  apply_simd_environment();
  HWY_DYNAMIC_DISPATCH(SigmoidAttentionWeights)(scores, bias, out, count);
}

float largest_score(const float* in, std::int64_t count) {
  apply_simd_environment();
  return HWY_DYNAMIC_DISPATCH(LargestOfScores)(in, count);
}

}  // namespace qkv::kernels
#endif  // HWY_ONCE
