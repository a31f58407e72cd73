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
// hardware prefetcher if heads were walked one by one. The chunks also keep every core busy when
// there is a single head. The chunk size depends on the problem only, never on the thread count,
// so results are bitwise the same for any number of threads. For one item, with R = Nq · group
// rows per key head and Hk·R rows in all:
//   1. the query rows, times the scale, go to scratch; each row's visible range is found;
//   2. keys are walked in blocks of one vector's width: each key row (j, hk) is loaded once and
//      dotted with the R query rows of hk (SIMD along D, then one horizontal sum); the block's
//      scores get the masks and options and each row's online softmax (running max m, sum l) is
//      updated; each value row is then loaded once and added to the R accumulators of its head;
//   3. the chunk's partial result O_c = acc / l, LSE_c = m + log l is stored.
// A final pass merges the chunks of each row by their LSE (detail::merge_row).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/decode_attention.cpp"
// foreach_target.h must come first, and the math header after highway.h.
// clang-format off
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/aligned_allocator.h>
#include <hwy/cache_control.h>

#include "kernels/score_math-inl.h"
#include "kernels/widen-inl.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <limits>
#include <span>
#include <type_traits>
#include <vector>

#include "core/merge.hpp"
#include "kernels/decode_attention.hpp"
#include "kernels/fused_attention.hpp"
#include "kernels/score_operands.hpp"
#include "kernels/simd_dispatch.hpp"

#ifndef QKV_DECODE_CONSTANTS
#define QKV_DECODE_CONSTANTS
namespace qkv::kernels {
constexpr std::int64_t kDecodeRows = 16;   // most query rows per key/value head
constexpr std::int64_t kChunkKeys = 1024;  // keys per work item
}  // namespace qkv::kernels
#endif

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using FloatTag = hn::ScalableTag<float>;

// Σ_d a[d]·b[d] with two vector accumulators and a scalar tail.
template <class Stored>
HWY_INLINE float Dot(const float* a, const Stored* b, std::int64_t n) {
  const FloatTag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  auto sum0 = hn::Zero(d), sum1 = hn::Zero(d);
  std::int64_t e = 0;
  for (; e + 2 * lanes <= n; e += 2 * lanes) {
    sum0 = hn::MulAdd(hn::LoadU(d, a + e), LoadWidened(d, b + e), sum0);
    sum1 = hn::MulAdd(hn::LoadU(d, a + e + lanes), LoadWidened(d, b + e + lanes), sum1);
  }
  for (; e + lanes <= n; e += lanes)
    sum0 = hn::MulAdd(hn::LoadU(d, a + e), LoadWidened(d, b + e), sum0);
  float sum = hn::GetLane(hn::SumOfLanes(d, hn::Add(sum0, sum1)));
  for (; e < n; ++e) sum += a[e] * Widened(b[e]);
  return sum;
}

// y[d] += w·x[d].
template <class Stored>
HWY_INLINE void AddScaled(float weight, const Stored* x, float* y, std::int64_t n) {
  const FloatTag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const auto w = hn::Set(d, weight);
  std::int64_t e = 0;
  for (; e + lanes <= n; e += lanes)
    hn::StoreU(hn::MulAdd(w, LoadWidened(d, x + e), hn::LoadU(d, y + e)), d, y + e);
  for (; e < n; ++e) y[e] += weight * Widened(x[e]);
}

// K and V are read front to back, a few rows at a time with work in between; the hardware
// prefetcher alone keeps too few lines in flight, so ask for the lines kPrefetchBytes ahead.
constexpr std::int64_t kPrefetchBytes = 4096;
template <class Stored>
HWY_INLINE void PrefetchAhead(const Stored* row, std::int64_t length) {
  const char* ahead = reinterpret_cast<const char*>(row) + kPrefetchBytes;
  const auto bytes = length * static_cast<std::int64_t>(sizeof(Stored));
  for (std::int64_t byte = 0; byte < bytes; byte += 64) hwy::Prefetch(ahead + byte);
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
    const int threads = worker_threads(p_);
    parallel_for_each(
        threads, items, [this] { return Scratch(*this); },
        [&](Scratch& scratch, std::int64_t item) {
          ComputeChunk(item / chunks_, item % chunks_, partial_out + item * item_rows_ * p_.v_dim,
                       partial_lse + item * item_rows_, scratch);
        });
    // 3'. Merge the chunks of each (batch, row); a sink joins as one more part, once, with
    // LSE = sink and O = 0 (core/sinks.hpp).
    const std::int64_t parts = chunks_ + (p_.sinks.present ? 1 : 0);
    parallel_for_each(
        threads, p_.batch * item_rows_,
        [parts] { return std::vector<double>(static_cast<std::size_t>(parts)); },
        [&](std::vector<double>& weights, std::int64_t row) {
          const std::int64_t b = row / item_rows_, r = row % item_rows_;
          const std::int64_t h = HeadOf(r), i = PositionOf(r);
          const std::int64_t first_item = b * chunks_;
          const double lse = detail::merge_row<double>(
              weights, p_.v_dim,
              [&](std::int64_t c) {
                return c < chunks_ ? partial_lse[(first_item + c) * item_rows_ + r]
                                   : p_.sinks.load(h);
              },
              [&](std::int64_t c, std::int64_t d) {
                return c < chunks_ ? partial_out[((first_item + c) * item_rows_ + r) * p_.v_dim + d]
                                   : 0.0f;
              },
              [&](std::int64_t d, double value) { p_.out.store(value, b, i, h, d); });
          if (p_.lse.present) p_.lse.store(lse, b, h, i);
        });
  }

 private:
  // Row r of an item (r = hk·R + g·Nq + t) is query head hk·group + g at position t.
  std::int64_t HeadOf(std::int64_t r) const {
    return (r / rows_) * p_.group_size + (r % rows_) / p_.q_len;
  }
  std::int64_t PositionOf(std::int64_t r) const { return r % p_.q_len; }

  struct Scratch {
    explicit Scratch(const DecodeKernel& k)
        : queries(static_cast<std::size_t>(k.item_rows_ * k.o_.score_dim)),
          scores(hwy::AllocateAligned<float>(
              static_cast<std::size_t>(std::max<std::int64_t>(1, k.item_rows_ * k.lanes_)))),
          accumulator(static_cast<std::size_t>(k.item_rows_ * k.p_.v_dim)),
          row_max(static_cast<std::size_t>(k.item_rows_)),
          row_sum(static_cast<std::size_t>(k.item_rows_)),
          first(static_cast<std::size_t>(k.item_rows_)),
          last(static_cast<std::size_t>(k.item_rows_)) {}
    std::vector<float> queries;                 // [rows, D], times the scale
    hwy::AlignedFreeUniquePtr<float[]> scores;  // [rows, lanes]: one block
    std::vector<float> accumulator;             // [rows, Dv]
    std::vector<float> row_max, row_sum;
    std::vector<std::int64_t> first, last;  // visible key ranges
  };

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
      const float* q = o_.q.row(b, i, HeadOf(r));
      for (std::int64_t e = 0; e < dim; ++e)
        s.queries[static_cast<std::size_t>(r * dim + e)] = scale * q[e];
      const detail::KeyInterval keys = detail::visible_keys_within(
          p_, b, HeadOf(r), i, detail::visible_keys(p_, b, HeadOf(r), i), chunk_first, chunk_last);
      s.first[r] = keys.first;
      s.last[r] = keys.last;
      s.row_max[r] = kMinusInfinity;
      s.row_sum[r] = 0.0f;
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

    // 2. Blocks of `lanes_` keys.
    const std::int64_t first_block = chunk_first + (seen_first - chunk_first) / lanes_ * lanes_;
    for (std::int64_t start = first_block; start < seen_last; start += lanes_) {
      const std::int64_t count = std::min(lanes_, chunk_last - start);
      // 2a. Scores: key rows in memory order (key, head), each against its head's query rows.
      for (std::int64_t t = 0; t < count; ++t) {
        const Stored* key_heads = KeyRow(b, start + t, 0);  // heads lie a stride apart
        for (std::int64_t hk = 0; hk < p_.kv_heads; ++hk) {
          const Stored* key = key_heads + hk * KeyHeadStride();
          PrefetchAhead(key, dim);
          const float key_scale = KeyScale(b, start + t, hk);
          for (std::int64_t r = hk * rows_; r < (hk + 1) * rows_; ++r) {
            s.scores[r * lanes_ + t] = key_scale * Dot(s.queries.data() + r * dim, key, dim);
          }
        }
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
        const float block_max = hn::GetLane(hn::MaxOfLanes(d, hn::Load(d, scores)));
        const float new_max = std::max(s.row_max[r], block_max);
        if (new_max == kMinusInfinity) {
          std::fill(scores, scores + lanes_, 0.0f);
          continue;
        }
        if (new_max != s.row_max[r]) {
          const float correction = std::exp(s.row_max[r] - new_max);
          s.row_sum[r] *= correction;
          float* accumulator = s.accumulator.data() + r * p_.v_dim;
          for (std::int64_t e = 0; e < p_.v_dim; ++e) accumulator[e] *= correction;
          s.row_max[r] = new_max;
        }
        const auto weights = KernelExp(d, hn::Sub(hn::Load(d, scores), hn::Set(d, new_max)));
        hn::Store(weights, d, scores);
        s.row_sum[r] += hn::GetLane(hn::SumOfLanes(d, weights));
      }
      // 2d. Value rows in memory order, each into its head's accumulators.
      for (std::int64_t t = 0; t < count; ++t) {
        const Stored* value_heads = ValueRow(b, start + t, 0);
        for (std::int64_t hk = 0; hk < p_.kv_heads; ++hk) {
          const Stored* value = value_heads + hk * ValueHeadStride();
          PrefetchAhead(value, p_.v_dim);
          const float value_scale = ValueScale(b, start + t, hk);
          for (std::int64_t r = hk * rows_; r < (hk + 1) * rows_; ++r) {
            const float weight = s.scores[r * lanes_ + t];
            if (weight != 0.0f)
              AddScaled(weight * value_scale, value, s.accumulator.data() + r * p_.v_dim, p_.v_dim);
          }
        }
      }
    }

    // 3. The chunk's partial result.
    for (std::int64_t r = 0; r < item_rows_; ++r) {
      const bool empty = s.row_max[r] == kMinusInfinity;
      const float inverse = empty ? 0.0f : 1.0f / s.row_sum[r];
      for (std::int64_t e = 0; e < p_.v_dim; ++e) {
        out[r * p_.v_dim + e] = s.accumulator[static_cast<std::size_t>(r * p_.v_dim + e)] * inverse;
      }
      lse[r] = empty ? -std::numeric_limits<double>::infinity()
                     : static_cast<double>(s.row_max[r]) + std::log(double{s.row_sum[r]});
    }
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
  float KeyScale(std::int64_t b, std::int64_t j, std::int64_t hk) const {
    if constexpr (kInt8) return *o_.k_scale.row(b, j, hk);
    return 1.0f;
  }
  float ValueScale(std::int64_t b, std::int64_t j, std::int64_t hk) const {
    if constexpr (kInt8) return *o_.v_scale.row(b, j, hk);
    return 1.0f;
  }
  static constexpr bool kInt8 = std::is_same_v<Stored, std::int8_t>;

  const FusedOperands& o_;
  const AttentionProblem& p_;
  const std::int64_t lanes_;      // floats per vector: keys per block
  const std::int64_t rows_;       // query rows per key/value head: Nq · group
  const std::int64_t item_rows_;  // query rows of an item: all key heads, Hk · Nq · group
  const std::int64_t chunks_;     // key chunks per batch
};

void DecodeForward(const FusedOperands& operands) {
  if (operands.int8_keys) {
    DecodeKernel<std::int8_t>(operands).Run();
  } else if (operands.bf16_keys_and_values && operands.half == DType::float16) {
    DecodeKernel<hwy::float16_t>(operands).Run();
  } else if (operands.bf16_keys_and_values) {
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
         p.q_len * p.group_size <= kDecodeRows &&
         // an int8 cache's keys are read as they lie only when the score compares them so
         (p.k.dtype != DType::int8 || keys_as_they_are(detail::score_unit(p.score).operands(p)));
}

void decode_attention(const AttentionProblem& p) {
  const FusedOperands operands = prepare_fused_operands(p, Bfloat16Operands::keys_and_values);
  apply_simd_environment();
  HWY_DYNAMIC_DISPATCH(DecodeForward)(operands);
}

}  // namespace qkv::kernels
#endif  // HWY_ONCE
