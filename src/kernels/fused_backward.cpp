// The fused backward kernel (FlashAttention-2's backward, Dao 2023, on a CPU).
//
// The forward kept only O and LSE. For a row i of one head, with P_ij = e^(s_ij − LSE_i)
// recomputed from the scores, the dropout factor M_ij (1 without dropout) and dLSE_i:
//   dV_j  += P_ij M_ij dO_i                 dP_ij = M_ij (dO_i · V_j)
//   Δ_i    = Σ_j P_ij dP_ij = dO_i · O_i    dS_ij = P_ij (dP_ij − Δ_i + dLSE_i)
// then dS goes back through the soft cap (× (1 − tanh²)) to the product: dK_j += dS_ij q_i and
// dQ_i += dS_ij k_j, with q already carrying the scale (the additive score instead sends dS into
// its tanh: see AdditiveGradients).
//
// Work items are (batch, value head, chunk of keys), and an item walks its keys in blocks of 64:
// dK and dV of a block are only ever added to by this item, in a fixed order. dQ would need the
// whole key range; each chunk adds into its own copy of dQ, and fused_backward sums the copies
// in chunk order. The number of chunks depends on the shape only, so the result is bitwise the
// same for any thread count. For each key block, for each query head of the group, for each
// block of 64 query rows that can see some of the keys:
//   1. S = Q·Kᵀ (a 64 × 64 tile: Kᵀ packed so the keys run along the vector lanes);
//   2. the forward's options on S (soft cap, ALiBi, bias, masks), then P = e^(S − LSE), LSE
//      subtracted as its float32 high part and the rest (a float64 saved LSE loses nothing);
//   3. dP = dO·Vᵀ (Vᵀ packed the same way);
//   4. dS = P ∘ (dP − Δ), with dropout, the bias gradient and the cap's derivative;
//   5. dV += (P∘M)ᵀ·dO,  dK += dSᵀ·Q,  dQ += dS·K.
// Five products of 64 × 64 × D each, on a working set (two 64 × D blocks of K and V, two of Q and
// dO, three 64 × 64 tiles) that stays in L2; every product runs on the same register-tiled
// micro-kernel (Gemm below). Memory: the packed operands and one dQ per chunk, O(N·D).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/fused_backward.cpp"
// foreach_target.h must come first, and the math header after highway.h.
// clang-format off
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>
#include <hwy/contrib/math/math-inl.h>
#include <hwy/aligned_allocator.h>
#include "kernels/score_math-inl.h"
#include "kernels/vector_array-inl.h"
// clang-format on

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

#include "core/backward_arguments.hpp"
#include "core/dropout.hpp"
#include "core/sinks.hpp"
#include "kernels/decode_attention.hpp"
#include "kernels/fused_backward.hpp"
#include "kernels/operands.hpp"
#include "kernels/score_operands.hpp"
#include "kernels/simd_dispatch.hpp"

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;
using FloatTag = hn::ScalableTag<float>;
using Vec = hn::Vec<FloatTag>;

// Register tile of the micro-kernel: 4 rows × 4 vectors on AVX-512 (16 accumulators, 4 loads and
// 1 broadcast live: 21 of 32 registers); 5 × 2 where there are 16 registers (10 accumulators,
// 13 registers: more independent multiply-adds in flight than 4 × 2, as in the forward).
constexpr int kTileVectors = (HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL) ? 4 : 2;
constexpr int kTileRows = kTileVectors == 4 ? 4 : 5;
constexpr std::int64_t kBlock = kBackwardKeys;

// One operand of a product read element by element: A(m, k) = data[m·row_step + k·column_step].
// Both layouts the backward needs are this: a tile as it is (dS for dQ) or transposed (P for dV).
struct Broadcast {
  const float* data;
  std::int64_t row_step, column_step;
};

// C[m, 0 : kVectors·lanes) (+)= Σ_k A(m, k) · B[k, same columns], for the kRows rows m0 … .
// The sum over k runs in blocks of depth_block: each block is summed from zero and then added to
// C (depth_block ≥ depth: one sequential sum, continuing C's when accumulating). S = Q·Kᵀ uses
// blocks of kScoreDepthBlock, as the forward does, so both round every score the same way.
template <int kRows, int kVectors>
void GemmTile(Broadcast a, std::int64_t m0, const float* b, std::int64_t ldb, float* c,
              std::int64_t ldc, std::int64_t depth, bool accumulate, std::int64_t depth_block) {
  const FloatTag d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const bool continue_c = accumulate && depth_block >= depth;
  const float* a_row = a.data + m0 * a.row_step;
  std::int64_t k0 = 0;
  do {
    const std::int64_t k1 = std::min(depth, k0 + depth_block);
    VectorArray<FloatTag, kRows * kVectors> acc;  // C[r, v] at r·kVectors + v
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        acc.Set(r * kVectors + v,
                continue_c ? hn::LoadU(d, c + (m0 + r) * ldc + v * lanes) : hn::Zero(d));
      }
    }
    for (std::int64_t k = k0; k < k1; ++k) {
      VectorArray<FloatTag, kVectors> columns;
      for (int v = 0; v < kVectors; ++v) columns.Set(v, hn::LoadU(d, b + k * ldb + v * lanes));
      for (int r = 0; r < kRows; ++r) {
        const Vec element = hn::Set(d, a_row[r * a.row_step + k * a.column_step]);
        for (int v = 0; v < kVectors; ++v) {
          const int i = r * kVectors + v;
          acc.Set(i, hn::MulAdd(element, columns.Get(v), acc.Get(i)));
        }
      }
    }
    const bool onto_c = !continue_c && (accumulate || k0 > 0);
    for (int r = 0; r < kRows; ++r) {
      for (int v = 0; v < kVectors; ++v) {
        float* out = c + (m0 + r) * ldc + v * lanes;
        const Vec sum = acc.Get(r * kVectors + v);
        hn::StoreU(onto_c ? hn::Add(hn::LoadU(d, out), sum) : sum, d, out);
      }
    }
    k0 = k1;
  } while (k0 < depth);
}

template <int kVectors>
void GemmRows(Broadcast a, std::int64_t m0, std::int64_t rows, const float* b, std::int64_t ldb,
              float* c, std::int64_t ldc, std::int64_t depth, bool accumulate,
              std::int64_t depth_block) {
  WithRows<kTileRows>(static_cast<int>(rows), [&](auto tile_rows) {
    GemmTile<decltype(tile_rows)::value, kVectors>(a, m0, b, ldb, c, ldc, depth, accumulate,
                                                   depth_block);
  });
}

// How a product sums over its depth (see GemmTile).
enum class DepthOrder {
  sequential,  // one running sum: dP, dV, dK, dQ
  scores,      // blocks of kScoreDepthBlock, exactly as the forward's S
};

// C[m, n] (+)= Σ_{k < depth} A(m, k) · B[k, n] for m < rows, n < columns (a multiple of the
// lanes): register tiles of kTileRows × kTileVectors, the last columns a vector at a time. The
// sum over k runs in a fixed order, so a result does not depend on how the work was split.
void Gemm(std::int64_t rows, std::int64_t columns, std::int64_t depth, Broadcast a, const float* b,
          std::int64_t ldb, float* c, std::int64_t ldc, bool accumulate,
          DepthOrder order = DepthOrder::sequential) {
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(FloatTag()));
  const std::int64_t depth_block =
      order == DepthOrder::scores ? kScoreDepthBlock : std::max<std::int64_t>(depth, 1);
  for (std::int64_t n0 = 0; n0 < columns; n0 += kTileVectors * lanes) {
    const bool whole = columns - n0 >= kTileVectors * lanes;
    for (std::int64_t m0 = 0; m0 < rows; m0 += kTileRows) {
      const std::int64_t block = std::min<std::int64_t>(kTileRows, rows - m0);
      if (whole) {
        GemmRows<kTileVectors>(a, m0, block, b + n0, ldb, c + n0, ldc, depth, accumulate,
                               depth_block);
      } else {
        for (std::int64_t n = n0; n < columns; n += lanes) {
          GemmRows<1>(a, m0, block, b + n, ldb, c + n, ldc, depth, accumulate, depth_block);
        }
      }
    }
  }
}

class BackwardKernel {
 public:
  explicit BackwardKernel(const BackwardOperands& operands)
      : o_(operands),
        p_(*operands.problem),
        lanes_(static_cast<std::int64_t>(hn::Lanes(FloatTag()))),
        group_(p_.group_size),
        blocks_((p_.k_len + kBlock - 1) / kBlock),
        blocks_per_chunk_((blocks_ + o_.chunks - 1) / o_.chunks),
        head_items_(o_.heads_in_item ? 1 : p_.kv_heads) {
    // The options after the soft cap, which this kernel applies itself to keep tanh for its
    // derivative.
    after_cap_ = p_;
    after_cap_.softcap = 0.0;
    after_cap_.score_mod = nullptr;  // applied by ScoreOptions itself, keeping its input
  }

  // The row statistics from this kernel's own S, for the rows that see a key (rows whose saved
  // LSE is -inf see none and keep it), in place of the saved LSE and of dO·O, in one walk over
  // the keys with the forward's online softmax: the running maximum m, l = Σ e^(s − m) and
  // t = Σ e^(s − m) dP, rescaled together when m grows; then LSE = m + log l (stored as
  // lse_high + lse_low) and Δ = t / l, added to delta (which holds −dLSE). The same products and
  // options as steps 1–3 (S by row dot products for decode-shaped problems, else the main pass's
  // register tile); work items: (batch, query head, block of 64 rows).
  void RederiveRowStatistics(float* lse_high, float* lse_low, float* delta) const {
    const std::int64_t query_blocks = (p_.q_len + kBlock - 1) / kBlock;
    const std::int64_t items = p_.batch * p_.q_heads * query_blocks;
    parallel_for_each(
        worker_threads(p_), items,
        [this] {
          return RowStatistics{Scratch(o_), {}, {}, {}};
        },
        [&](RowStatistics& rows_of, std::int64_t item) {
          Scratch& s = rows_of.scratch;
          const std::int64_t i0 = item % query_blocks * kBlock;
          const std::int64_t h = item / query_blocks % p_.q_heads;
          const std::int64_t b = item / (query_blocks * p_.q_heads);
          const std::int64_t hv = p_.kv_head(h);
          const std::int64_t rows = std::min(kBlock, p_.q_len - i0);
          std::fill(rows_of.max, rows_of.max + rows, -std::numeric_limits<float>::infinity());
          std::fill(rows_of.sum, rows_of.sum + rows, 0.0);
          std::fill(rows_of.dot, rows_of.dot + rows, 0.0);
          for (std::int64_t j0 = 0; j0 < p_.k_len; j0 += kBlock) {
            const std::int64_t keys = std::min(kBlock, p_.k_len - j0);
            if (!FindVisible(b, h, i0, rows, j0, keys, s)) continue;
            if (o_.row_dot_scores) {
              Scores(QRow(b, h, i0), rows, KRow(b, KeyHead(h), j0), keys, s);
            } else {  // the main pass's S: the register tile over the packed Kᵀ
              PackTransposed(KRow(b, KeyHead(h), j0), o_.score_stride, keys, o_.score_dim,
                             s.keys_t);
              if (o_.additive) {
                AdditiveScores(QRow(b, h, i0), rows, h, s);
              } else {
                Scores(QRow(b, h, i0), rows, KRow(b, KeyHead(h), j0), keys, s);
              }
            }
            PackTransposed(o_.v + ((b * p_.kv_heads + hv) * p_.k_len + j0) * o_.value_stride,
                           o_.value_stride, keys, p_.v_dim, s.values_t);
            Gemm(rows, kBlock, p_.v_dim, {DoutRow(b, h, i0), o_.value_stride, 1}, s.values_t,
                 kBlock, s.d_scores, kBlock, false);
            for (std::int64_t r = 0; r < rows; ++r) {
              if (ScoreOptions(b, h, i0 + r, r, j0, s)) OnlineRowUpdate(r, rows_of, s);
            }
          }
          for (std::int64_t r = 0; r < rows; ++r) {
            if (rows_of.max[r] == -std::numeric_limits<float>::infinity()) continue;
            const std::int64_t row = (b * p_.q_heads + h) * p_.q_len + i0 + r;
            double lse = static_cast<double>(rows_of.max[r]) + std::log(rows_of.sum[r]);
            double keys_share = 1.0;  // of the row's weights, beside a sink's
            if (p_.sinks.present) {
              const detail::SinkJoin joined = detail::join_sink(lse, p_.sinks.load(h));
              lse = joined.lse;
              keys_share = joined.keys_share;
            }
            lse_high[row] = static_cast<float>(lse);
            lse_low[row] = static_cast<float>(lse - static_cast<double>(lse_high[row]));
            delta[row] =
                static_cast<float>(rows_of.dot[r] / rows_of.sum[r] * keys_share + delta[row]);
          }
        });
  }

  void Run() const {
    parallel_for_each(
        worker_threads(p_), o_.items, [this] { return Scratch(o_); },
        [&](Scratch& s, std::int64_t item) {
          const std::int64_t chunk = item % o_.chunks;
          const std::int64_t hv_item = (item / o_.chunks) % head_items_;
          const std::int64_t b_item = item / (o_.chunks * head_items_);
          for (std::int64_t b = 0; b < p_.batch; ++b) {
            if (!o_.batches_in_item && b != b_item) continue;
            for (std::int64_t hv = 0; hv < p_.kv_heads; ++hv) {
              if (!o_.heads_in_item && hv != hv_item) continue;
              ComputeChunk(item, b, hv, chunk, s);
            }
          }
        });
  }

 private:
  // One thread's working set.
  struct Scratch {
    explicit Scratch(const BackwardOperands& o) : shared_gradients(o.score_mod_gradients) {
      thread_local ReusedBuffer buffers[7];
      keys_t = buffers[0].Get(o.score_dim * kBlock);
      values_t = buffers[1].Get(o.problem->v_dim * kBlock);
      scores = buffers[2].Get(kBlock * kBlock);
      d_scores = buffers[3].Get(kBlock * kBlock);
      capped = buffers[4].Get(kBlock * kBlock);
      d_keys_t = buffers[5].Get(o.additive ? o.score_dim * kBlock : 1);
      unmodified = buffers[6].Get(o.problem->score_mod != nullptr ? kBlock * kBlock : 1);
    }
    Scratch(const Scratch&) = delete;
    Scratch& operator=(const Scratch&) = delete;
    ~Scratch() {
      if (gradients) shared_gradients->merge(*gradients);
    }
    // This thread's sums of the score_mod's parameter gradients (made on first use).
    double* const* ParameterGradients() {
      if (shared_gradients == nullptr) return nullptr;
      if (!gradients)
        gradients = std::make_unique<detail::ScoreModGradients>(shared_gradients->score_mod(),
                                                                shared_gradients->targets());
      return gradients->arrays();
    }
    float* keys_t;      // [D, 64]: the key block transposed, zero past the last key
    float* values_t;    // [Dv, 64]: the value block transposed
    float* scores;      // [64, 64]: S, then P, then P∘M
    float* d_scores;    // [64, 64]: dP, then dS
    float* capped;      // [64, 64]: tanh(s / c) of the soft cap
    float* d_keys_t;    // additive: [A, 64], the block's d(Wk k) transposed
    float* unmodified;  // score_mod: [64, 64], the scores it was given
    detail::ScoreModGradients* shared_gradients;
    std::unique_ptr<detail::ScoreModGradients> gradients;
    std::int64_t first[kBlock], last[kBlock];  // each row's visible keys, relative to the block
  };

  std::int64_t KeyHead(std::int64_t h) const {
    return o_.key_heads == p_.q_heads ? h : p_.kv_head(h);
  }
  const float* QRow(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return o_.q + ((b * p_.q_heads + h) * p_.q_len + i) * o_.score_stride;
  }
  const float* KRow(std::int64_t b, std::int64_t kh, std::int64_t j) const {
    return o_.k + ((b * o_.key_heads + kh) * p_.k_len + j) * o_.score_stride;
  }
  const float* DoutRow(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return o_.dout + ((b * p_.q_heads + h) * p_.q_len + i) * o_.value_stride;
  }

  void ComputeChunk(std::int64_t item, std::int64_t b, std::int64_t hv, std::int64_t chunk,
                    Scratch& s) const {
    const std::int64_t first_block = chunk * blocks_per_chunk_;
    const std::int64_t end_block = std::min(blocks_, first_block + blocks_per_chunk_);
    for (std::int64_t block = first_block; block < end_block; ++block) {
      const std::int64_t j0 = block * kBlock;
      const std::int64_t keys = std::min(kBlock, p_.k_len - j0);
      PackTransposed(o_.v + ((b * p_.kv_heads + hv) * p_.k_len + j0) * o_.value_stride,
                     o_.value_stride, keys, p_.v_dim, s.values_t);
      std::int64_t packed_key_head = -1;
      for (std::int64_t g = 0; g < group_; ++g) {
        const std::int64_t h = hv * group_ + g, kh = KeyHead(h);
        if (kh != packed_key_head) {
          if (!o_.row_dot_scores)
            PackTransposed(KRow(b, kh, j0), o_.score_stride, keys, o_.score_dim, s.keys_t);
          packed_key_head = kh;
        }
        if (o_.additive) std::fill(s.d_keys_t, s.d_keys_t + o_.score_dim * kBlock, 0.0f);
        for (std::int64_t i0 = 0; i0 < p_.q_len; i0 += kBlock) {
          const std::int64_t rows = std::min(kBlock, p_.q_len - i0);
          if (!FindVisible(b, h, i0, rows, j0, keys, s)) continue;
          QueryBlock(item, b, h, hv, kh, i0, rows, j0, keys, chunk, s);
        }
        if (o_.additive) {  // d(Wk k) of the block, back from [A, 64]
          for (std::int64_t t = 0; t < keys; ++t) {
            float* row = o_.dk + ((b * o_.key_heads + kh) * p_.k_len + j0 + t) * o_.score_stride;
            for (std::int64_t a = 0; a < o_.score_dim; ++a) row[a] += s.d_keys_t[a * kBlock + t];
          }
        }
      }
    }
  }

  // out[e, t] = rows[t, e] for t < count, 0 for count <= t < 64.
  static void PackTransposed(const float* rows, std::int64_t stride, std::int64_t count,
                             std::int64_t dim, float* out) {
    for (std::int64_t e = 0; e < dim; ++e) {
      float* column = out + e * kBlock;
      for (std::int64_t t = 0; t < count; ++t) column[t] = rows[t * stride + e];
      std::fill(column + count, column + kBlock, 0.0f);
    }
  }

  // Each row's visible keys within the block (core/visibility.hpp; a row whose saved LSE is -inf
  // sees none); whether any row sees any.
  bool FindVisible(std::int64_t b, std::int64_t h, std::int64_t i0, std::int64_t rows,
                   std::int64_t j0, std::int64_t keys, Scratch& s) const {
    if (detail::block_mask_hides(p_, b, h, i0, i0 + rows, j0, j0 + keys)) return false;
    bool any = false;
    for (std::int64_t r = 0; r < rows; ++r) {
      const std::int64_t i = i0 + r;
      detail::KeyInterval seen;
      if (o_.lse_high[(b * p_.q_heads + h) * p_.q_len + i] !=
          -std::numeric_limits<float>::infinity()) {
        seen = detail::visible_keys_within(p_, b, h, i, detail::visible_keys(p_, b, h, i), j0,
                                           j0 + keys);
      }
      s.first[r] = seen.empty() ? 0 : seen.first - j0;
      s.last[r] = seen.empty() ? 0 : seen.last - j0;
      any |= s.first[r] < s.last[r];
    }
    return any;
  }

  void QueryBlock(std::int64_t item, std::int64_t b, std::int64_t h, std::int64_t hv,
                  std::int64_t kh, std::int64_t i0, std::int64_t rows, std::int64_t j0,
                  std::int64_t keys, std::int64_t chunk, Scratch& s) const {
    const std::int64_t ss = o_.score_stride, vs = o_.value_stride;
    const float* q = QRow(b, h, i0);
    const float* dout = DoutRow(b, h, i0);
    // 1. S = Q·Kᵀ.
    if (o_.additive) {
      AdditiveScores(q, rows, h, s);
    } else {
      Scores(q, rows, KRow(b, kh, j0), keys, s);
    }
    // 2. The options, then P.
    for (std::int64_t r = 0; r < rows; ++r) Probabilities(b, h, i0 + r, r, j0, s);
    // 3. dP = dO·Vᵀ.
    Gemm(rows, kBlock, p_.v_dim, {dout, vs, 1}, s.values_t, kBlock, s.d_scores, kBlock, false);
    // 4. dS.
    for (std::int64_t r = 0; r < rows; ++r) ScoreGradients(b, h, i0 + r, r, j0, keys, s);
    // 5. dV += (P∘M)ᵀ·dO;  dK += dSᵀ·Q;  dQ += dS·K.
    float* dv = o_.dv + ((b * p_.kv_heads + hv) * p_.k_len + j0) * vs;
    Gemm(keys, vs, rows, {s.scores, 1, kBlock}, dout, vs, dv, vs, true);
    float* dq = o_.dq + (((chunk * p_.batch + b) * p_.q_heads + h) * p_.q_len + i0) * ss;
    if (o_.additive) {
      AdditiveGradients(item, q, rows, h, dq, s);
      return;
    }
    float* dk = o_.dk + ((b * o_.key_heads + kh) * p_.k_len + j0) * ss;
    Gemm(keys, ss, rows, {s.d_scores, 1, kBlock}, q, ss, dk, ss, true);
    Gemm(rows, ss, keys, {s.d_scores, kBlock, 1}, KRow(b, kh, j0), ss, dq, ss, true);
  }

  // 1. S [rows, 64] of the query rows q (stride ss) against the block's keys: the register-tiled
  // product over the packed Kᵀ, summed over D in blocks exactly as the forward's; or, for a
  // problem with few query rows (row_dot_scores), each score one dot product of the rows of q and
  // k in vector lanes and then across them — the order of a BLAS matrix-vector product, which
  // rounds a peaked row's scores 2–4× less than blocks of 32 (keys past `count` score 0).
  void Scores(const float* q, std::int64_t rows, const float* keys, std::int64_t count,
              Scratch& s) const {
    const std::int64_t ss = o_.score_stride;
    if (!o_.row_dot_scores) {
      Gemm(rows, kBlock, o_.score_dim, {q, ss, 1}, s.keys_t, kBlock, s.scores, kBlock, false,
           DepthOrder::scores);
      return;
    }
    const FloatTag d;
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* query = q + r * ss;
      float* scores = s.scores + r * kBlock;
      for (std::int64_t t = 0; t < count; ++t) {
        const float* key = keys + t * ss;
        Vec sum = hn::Zero(d);
        for (std::int64_t e = 0; e < ss; e += lanes_)
          sum = hn::MulAdd(hn::LoadU(d, query + e), hn::LoadU(d, key + e), sum);
        scores[t] = hn::GetLane(hn::SumOfLanes(d, sum));
      }
      std::fill(scores + count, scores + kBlock, 0.0f);
    }
  }

  // RederiveRowStatistics' running m, l and t of one block of query rows.
  struct RowStatistics {
    Scratch scratch;
    float max[kBlock];
    double sum[kBlock], dot[kBlock];
  };

  // Row r of the tile (S with the options applied, dP beside it) into the row's running
  // statistics: m' = max(m, max S), then l and t rescaled by e^(m − m') and added to.
  void OnlineRowUpdate(std::int64_t r, RowStatistics& rows_of, const Scratch& s) const {
    const FloatTag d;
    const float* scores = s.scores + r * kBlock;
    const float* d_weights = s.d_scores + r * kBlock;
    Vec maximum = hn::Set(d, -std::numeric_limits<float>::infinity());
    for (std::int64_t t = 0; t < kBlock; t += lanes_)
      maximum = hn::Max(maximum, hn::LoadU(d, scores + t));
    float new_max = std::max(rows_of.max[r], LargestLane(d, maximum));
    if (new_max == -std::numeric_limits<float>::infinity()) {
      if (!AnyNaN(d, scores, 0, kBlock)) return;
      new_max = std::numeric_limits<float>::quiet_NaN();  // (AnyNaN says why)
    }
    Vec sum = hn::Zero(d), dot = hn::Zero(d);
    for (std::int64_t t = 0; t < kBlock; t += lanes_) {
      const Vec weight = KernelExp(d, hn::Sub(hn::LoadU(d, scores + t), hn::Set(d, new_max)));
      sum = hn::Add(sum, weight);
      dot = hn::MulAdd(weight, hn::LoadU(d, d_weights + t), dot);
    }
    const double correction = std::exp(static_cast<double>(rows_of.max[r]) - new_max);
    rows_of.sum[r] = rows_of.sum[r] * correction + hn::GetLane(hn::SumOfLanes(d, sum));
    rows_of.dot[r] = rows_of.dot[r] * correction + hn::GetLane(hn::SumOfLanes(d, dot));
    rows_of.max[r] = new_max;
  }

  // 2. Row r of the tile: the options on S (ScoreOptions), then P = e^(s − LSE) with the
  // forward's exp.
  void Probabilities(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t r,
                     std::int64_t j0, Scratch& s) const {
    const FloatTag d;
    float* scores = s.scores + r * kBlock;
    if (!ScoreOptions(b, h, i, r, j0, s)) {
      std::fill(scores, scores + kBlock, 0.0f);
      return;
    }
    if (p_.sigmoid) {  // P = 1 / (1 + e^−(s + b)), the forward's (kernels/score_math-inl.h)
      const Vec negative_bias = hn::Set(d, static_cast<float>(-p_.sigmoid_bias));
      for (std::int64_t t = 0; t < kBlock; t += lanes_)
        hn::StoreU(SigmoidWeights(d, hn::LoadU(d, scores + t), negative_bias), d, scores + t);
      return;
    }
    // (s − LSE_high) is exact wherever P matters (Sterbenz); LSE_low then adds what float32
    // rounded off LSE, so large logits (±100, soft caps of 50) lose nothing to the LSE.
    const std::int64_t row = (b * p_.q_heads + h) * p_.q_len + i;
    const Vec lse_high = hn::Set(d, o_.lse_high[row]), lse_low = hn::Set(d, o_.lse_low[row]);
    for (std::int64_t t = 0; t < kBlock; t += lanes_) {
      const Vec shifted = hn::Sub(hn::Sub(hn::LoadU(d, scores + t), lse_high), lse_low);
      hn::StoreU(KernelExp(d, shifted), d, scores + t);
    }
  }

  // Row r of the tile of S: soft cap (keeping tanh), the other options, and -inf outside the
  // row's keys. Returns false (and leaves S alone) when the row sees none of the block.
  bool ScoreOptions(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t r, std::int64_t j0,
                    Scratch& s) const {
    float* scores = s.scores + r * kBlock;
    const std::int64_t from = s.first[r], to = s.last[r];
    if (from >= to) return false;
    if (o_.softcap) {  // the forward's (kernels/score_math-inl.h), on whole vectors of the row
      const FloatTag d;
      const Vec cap = hn::Set(d, static_cast<float>(p_.softcap));
      const Vec inverse_cap = hn::Set(d, static_cast<float>(1.0 / p_.softcap));
      float* capped = s.capped + r * kBlock;
      for (std::int64_t t = from / lanes_ * lanes_; t < to; t += lanes_) {
        const Vec tanh = SoftCapTanh(d, hn::LoadU(d, scores + t), inverse_cap);
        hn::StoreU(tanh, d, capped + t);
        hn::StoreU(hn::Mul(cap, tanh), d, scores + t);
      }
    }
    modify_scores(after_cap_, b, h, i, j0 + from, to - from, scores + from);
    if (p_.score_mod != nullptr) {
      std::copy(scores + from, scores + to, s.unmodified + r * kBlock + from);
      p_.score_mod->forward(p_.score_mod_row(b, h, i, j0 + from, to - from), scores + from);
    }
    detail::hide_masked_keys(p_, b, h, i, j0 + from, to - from, scores + from);
    std::fill(scores, scores + from, -std::numeric_limits<float>::infinity());
    std::fill(scores + to, scores + kBlock, -std::numeric_limits<float>::infinity());
    return true;
  }

  // 4. Row r: dS = P (M·dP − Δ) from dP, and P∘M in place of P; the bias gradient takes dS
  // before the cap's derivative 1 − tanh², which the product then sees. Sigmoid attention:
  // dS = P (1 − P)(M·dP − Δ), σ' = σ(1 − σ), with Δ = −dLSE·e^−LSE (RowStatistics).
  void ScoreGradients(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t r,
                      std::int64_t j0, std::int64_t keys, Scratch& s) const {
    const FloatTag d;
    float* weights = s.scores + r * kBlock;
    float* d_scores = s.d_scores + r * kBlock;
    const float delta = o_.delta[(b * p_.q_heads + h) * p_.q_len + i];
    if (s.first[r] >= s.last[r]) {
      std::fill(d_scores, d_scores + kBlock, 0.0f);
      return;
    }
    if (dropout_.active()) {
      const auto keep_scale = static_cast<float>(dropout_.keep_scale());
      for (std::int64_t t = 0; t < kBlock; ++t) {
        const bool keep = t < keys && dropout_.keeps(b, h, i, j0 + t);
        const float p = weights[t];
        const float slope = p_.sigmoid ? p * (1.0f - p) : p;
        d_scores[t] = slope * ((keep ? keep_scale * d_scores[t] : 0.0f) - delta);
        weights[t] = keep ? p * keep_scale : 0.0f;
      }
    } else {
      const Vec delta_v = hn::Set(d, delta);
      for (std::int64_t t = 0; t < kBlock; t += lanes_) {
        const Vec p = hn::LoadU(d, weights + t);
        const Vec slope = p_.sigmoid ? hn::NegMulAdd(p, p, p) : p;  // p − p² or p
        hn::StoreU(hn::Mul(slope, hn::Sub(hn::LoadU(d, d_scores + t), delta_v)), d, d_scores + t);
      }
    }
    if (p_.score_mod != nullptr) {  // dS of the score_mod's result → dS of its input
      const std::int64_t from = s.first[r], count = s.last[r] - s.first[r];
      p_.score_mod->backward(p_.score_mod_row(b, h, i, j0 + from, count),
                             s.unmodified + r * kBlock + from, d_scores + from,
                             s.ParameterGradients());
    }
    if (o_.dbias != nullptr) {
      float* dbias =
          o_.dbias + b * o_.dbias_strides[0] + h * o_.dbias_strides[1] + i * o_.dbias_strides[2];
      for (std::int64_t t = s.first[r]; t < s.last[r]; ++t)
        dbias[(j0 + t) * o_.dbias_strides[3]] += d_scores[t];
    }
    if (o_.softcap) {
      const float* capped = s.capped + r * kBlock;
      for (std::int64_t t = s.first[r]; t < s.last[r]; ++t)
        d_scores[t] *= 1.0f - capped[t] * capped[t];
    }
  }

  // The additive score of rows × 64 keys: S[r, t] = Σ_a v_a tanh(qa[r, a] + ka[t, a]), keys
  // along the lanes (the forward's register tile, here one row at a time).
  void AdditiveScores(const float* q, std::int64_t rows, std::int64_t h, Scratch& s) const {
    const FloatTag d;
    const float* weight = o_.additive_v + h * o_.score_dim;
    for (std::int64_t r = 0; r < rows; ++r) {
      const float* qa = q + r * o_.score_stride;
      for (std::int64_t t = 0; t < kBlock; t += lanes_) {
        Vec sum = hn::Zero(d);
        for (std::int64_t a = 0; a < o_.score_dim; ++a) {
          const Vec pre = hn::Add(hn::Set(d, qa[a]), hn::LoadU(d, s.keys_t + a * kBlock + t));
          sum = hn::MulAdd(hn::Set(d, weight[a]), hn::Tanh(d, pre), sum);
        }
        hn::StoreU(sum, d, s.scores + r * kBlock + t);
      }
    }
  }

  // The additive score's backward for rows × 64 keys, recomputing each τ = tanh(qa + ka):
  //   s = Σ_a v_a τ_a  →  dv_a += dS·τ_a,  d(qa)_a += dS·v_a(1 − τ_a²),  d(ka)_a += the same.
  // Lanes run over keys: d(ka) accumulates in [A, 64], d(qa) and dv are reduced per row.
  void AdditiveGradients(std::int64_t item, const float* q, std::int64_t rows, std::int64_t h,
                         float* dq, Scratch& s) const {
    const FloatTag d;
    const float* weight = o_.additive_v + h * o_.score_dim;
    float* dva = o_.dva + (item * p_.q_heads + h) * o_.score_dim;
    const Vec one = hn::Set(d, 1.0f);
    for (std::int64_t r = 0; r < rows; ++r) {
      if (s.first[r] >= s.last[r]) continue;
      const float* qa = q + r * o_.score_stride;
      const float* d_scores = s.d_scores + r * kBlock;
      for (std::int64_t a = 0; a < o_.score_dim; ++a) {
        const Vec query = hn::Set(d, qa[a]), v_a = hn::Set(d, weight[a]);
        Vec d_query = hn::Zero(d), d_weight = hn::Zero(d);
        for (std::int64_t t = 0; t < kBlock; t += lanes_) {
          const Vec ds = hn::LoadU(d, d_scores + t);
          const Vec tau = hn::Tanh(d, hn::Add(query, hn::LoadU(d, s.keys_t + a * kBlock + t)));
          const Vec d_pre = hn::Mul(hn::Mul(ds, v_a), hn::NegMulAdd(tau, tau, one));
          d_weight = hn::MulAdd(ds, tau, d_weight);
          d_query = hn::Add(d_query, d_pre);
          float* d_key = s.d_keys_t + a * kBlock + t;
          hn::StoreU(hn::Add(hn::LoadU(d, d_key), d_pre), d, d_key);
        }
        dq[r * o_.score_stride + a] += hn::GetLane(hn::SumOfLanes(d, d_query));
        dva[a] += hn::GetLane(hn::SumOfLanes(d, d_weight));
      }
    }
  }

  const BackwardOperands& o_;
  const AttentionProblem& p_;
  const detail::DropoutMask dropout_{p_};
  AttentionProblem after_cap_;
  const std::int64_t lanes_;
  const std::int64_t group_;             // query heads per value head
  const std::int64_t blocks_;            // key blocks per (batch, head)
  const std::int64_t blocks_per_chunk_;  // key blocks per item
  const std::int64_t head_items_;        // items along the value heads
};

void FusedBackward(const BackwardOperands& operands) {
  BackwardKernel(operands).Run();
}

void RederiveRowStatistics(const BackwardOperands& operands, float* lse_high, float* lse_low,
                           float* delta) {
  BackwardKernel(operands).RederiveRowStatistics(lse_high, lse_low, delta);
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::kernels {

HWY_EXPORT(FusedBackward);
HWY_EXPORT(RederiveRowStatistics);

namespace {

// The calling thread's buffers, one per role, kept between calls at the largest size seen (as
// the forward keeps its packed K and V): first-touch page faults would cost more than the
// small problems themselves.
enum Role {
  kQ,
  kK,
  kV,
  kDout,
  kLseHigh,
  kLseLow,
  kDelta,
  kDq,
  kDk,
  kDv,
  kDva,
  kDbias,
  kDqSum,
  kRoles
};

float* buffer(Role role, std::int64_t count) {
  thread_local ReusedBuffer buffers[kRoles];
  return buffers[role].Get(std::max<std::int64_t>(count, 1));
}

// buffer(role, count), zeroed by `threads` threads.
// Positions per work item of the door's passes over [B, N, H, D] tensors.
constexpr std::int64_t kRowsPerPass = 64;

float* zeroed(Role role, std::int64_t count, int threads) {
  float* data = buffer(role, count);
  parallel_for(threads, (count + 4095) / 4096, [&](std::int64_t block) {
    std::fill(data + block * 4096, data + std::min(count, (block + 1) * 4096), 0.0f);
  });
  return data;
}

std::int64_t padded(std::int64_t n) {
  return (n + kBackwardPad - 1) / kBackwardPad * kBackwardPad;
}

// Σ a[d]·b[d] over d < n in double, as four interleaved partial sums: one running sum waited
// on each addition's latency, 9% of a backward with a sliding window of 256 (B1 H8 N4096 D64).
double dot_in_double(const float* a, const double* b, std::int64_t n) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  std::int64_t d = 0;
  for (; d + 4 <= n; d += 4)
    for (int k = 0; k < 4; ++k) part[k] += static_cast<double>(a[d + k]) * b[d + k];
  for (; d < n; ++d) part[0] += static_cast<double>(a[d]) * b[d];
  return (part[0] + part[1]) + (part[2] + part[3]);
}

// A [B, N, H, D] input as dense [B, H, N, stride] float rows, times `factor`, each row through
// the score unit's `transform` when given; x[b, n, source_head(h), :] feeds head h.
template <class SourceHead>
void pack_rows(float* out, const StridedInput& x, std::int64_t batch, std::int64_t length,
               std::int64_t heads, std::int64_t in_dim, std::int64_t stride, double factor,
               const RowTransformer* transform, SourceHead source_head, int threads) {
  const std::int64_t out_dim = transform != nullptr ? transform->out_dim() : in_dim;
  // Positions in storage order, every head of one position together: x[b, n] is one run of
  // memory, where head by head each row would be a new read a whole [H, D] row away.
  const std::int64_t position_blocks = (length + kRowsPerPass - 1) / kRowsPerPass;
  parallel_for(threads, batch * position_blocks, [&](std::int64_t index) {
    const std::int64_t b = index / position_blocks, n0 = index % position_blocks * kRowsPerPass;
    std::vector<double> row(static_cast<std::size_t>(in_dim)),
        transformed(static_cast<std::size_t>(out_dim));
    for (std::int64_t n = n0; n < std::min(length, n0 + kRowsPerPass); ++n) {
      for (std::int64_t h = 0; h < heads; ++h) {
        float* target = out + ((b * heads + h) * length + n) * stride;
        x.load_row(row.data(), in_dim, b, n, source_head(h));
        const double* values = row.data();
        if (transform != nullptr) {
          transform->apply(h, row.data(), transformed.data());
          values = transformed.data();
        }
        for (std::int64_t r = 0; r < out_dim; ++r)
          target[r] = static_cast<float>(factor * values[r]);
        std::fill(target + out_dim, target + stride, 0.0f);  // the padding
      }
    }
  });
}

// Dense rows [B, heads, length, stride] of floats.
struct DenseRows {
  const float* data;
  std::int64_t heads, length, stride;
  const float* row(std::int64_t b, std::int64_t h, std::int64_t i) const {
    return data + ((b * heads + h) * length + i) * stride;
  }
};

// A parameter's gradient as the sum of outer products over batch and positions:
//   G[h, r, c] = Σ_b Σ_i left(b, left_head(h), i)[r] · right(b, right_head(h), i)[c]
// for each of `heads` heads, or summed over them when the parameter is shared. One task per
// (head, r), each sum in a fixed order: the same for any thread count.
template <class LeftHead, class RightHead>
void outer_product_gradient(const MutableTensorView& target, bool shared, std::int64_t heads,
                            std::int64_t rows, std::int64_t cols, std::int64_t batch,
                            std::int64_t length, DenseRows left, LeftHead left_head,
                            DenseRows right, RightHead right_head, double factor, int threads) {
  const std::int64_t stored_heads = shared ? 1 : heads;
  std::vector<double> values(static_cast<std::size_t>(stored_heads * rows * cols));
  parallel_for(threads, stored_heads * rows, [&](std::int64_t index) {
    const std::int64_t sh = index / rows, r = index % rows;
    double* sums = values.data() + (sh * rows + r) * cols;
    for (std::int64_t h = shared ? 0 : sh; h < (shared ? heads : sh + 1); ++h) {
      for (std::int64_t b = 0; b < batch; ++b) {
        for (std::int64_t i = 0; i < length; ++i) {
          const double l = left.row(b, left_head(h), i)[r];
          const float* other = right.row(b, right_head(h), i);
          for (std::int64_t c = 0; c < cols; ++c) sums[c] += l * other[c];
        }
      }
    }
    for (std::int64_t c = 0; c < cols; ++c) sums[c] *= factor;
  });
  detail::store_dense(values.data(), target);
}

// What the door's steps share: the problem, the score's transforms, the kernel's operands.
struct BackwardDoor {
  BackwardDoor(const AttentionProblem& problem, const BackwardInputs& given,
               const AttentionGradients& wanted)
      : p(problem),
        inputs(given),
        gradients(wanted),
        threads(worker_threads(problem)),
        B(problem.batch),
        Hq(problem.q_heads),
        Hk(problem.kv_heads),
        Nq(problem.q_len),
        Nk(problem.k_len),
        score(detail::score_unit(problem.score).operands(problem)),
        query_transform(score.query, Hq),
        key_transform(score.key, Hq),
        key_group(score.keys_per_query_head ? problem.group_size : 1),
        score_mod_gradients(problem.score_mod, wanted.dscore_mod) {
    o.problem = &p;
    o.additive = score.form == detail::ScoreForm::additive;
    o.softcap = p.softcap > 0;
    o.score_dim = score.dim;
    o.key_heads = score.keys_per_query_head ? Hq : Hk;
    o.score_stride = padded(o.score_dim);
    o.value_stride = padded(p.v_dim);
  }
  // The door's steps, in order (the kernel runs between PlanItems and InputGradients).
  void PackOperands();
  void RowStatistics();
  void SinkGradient();
  void PlanItems();
  void InputGradients();
  void ParameterGradients();

  // Transformed key head kh reads the keys of head kh / group (group 1 unless per query head).
  std::int64_t KeySource(std::int64_t kh) const { return kh / key_group; }
  // Whether the query transform has a factor whose gradient is asked for (cosine's τ).
  bool QueryFactorWanted() const {
    return score.query.factor != nullptr && (gradients.*score.query.factor_gradient).has_value();
  }

  const AttentionProblem& p;
  const BackwardInputs& inputs;
  const AttentionGradients& gradients;
  const int threads;
  const std::int64_t B, Hq, Hk, Nq, Nk;
  // The score unit's compared vectors: packed through its transforms, and their gradients sent
  // back through the same transforms at the end.
  const detail::ScoreOperands score;
  const RowTransformer query_transform, key_transform;
  const std::int64_t key_group;  // query heads per transformed key head
  BackwardOperands o;
  std::vector<float> additive_v;     // [Hq, A]: scale·v
  float* dq_sum = nullptr;           // ∂L/∂q' [B, Hq, Nq, dim], the chunks summed
  std::vector<double> factor_parts;  // ∂L/∂factor[h] of each (row, head), when wanted
  detail::ScoreModGradients score_mod_gradients;
};

const auto same_head = [](std::int64_t h) { return h; };

// Step 1: the operands packed densely — Q (times the scale, except for the additive score, whose
// v carries it) and K through the score's transforms, V and dO as they are.
void BackwardDoor::PackOperands() {
  const std::int64_t ss = o.score_stride, vs = o.value_stride;
  const auto key_source = [this](std::int64_t kh) { return KeySource(kh); };
  const auto same = same_head;
  // (every element written by pack_rows, the padding too: no zeroing beforehand)
  float* q = buffer(kQ, B * Hq * Nq * ss);
  float* k = buffer(kK, B * o.key_heads * Nk * ss);
  float* v = buffer(kV, B * Hk * Nk * vs);
  float* dout = buffer(kDout, B * Hq * Nq * vs);
  pack_rows(q, p.q, B, Nq, Hq, p.q_dim, ss, o.additive ? 1.0 : p.scale,
            query_transform.identity() ? nullptr : &query_transform, same, threads);
  pack_rows(k, p.k, B, Nk, o.key_heads, p.k_dim, ss, 1.0,
            key_transform.identity() ? nullptr : &key_transform, key_source, threads);
  pack_rows(v, p.v, B, Nk, Hk, p.v_dim, vs, 1.0, nullptr, same, threads);
  pack_rows(dout, inputs.dout, B, Nq, Hq, p.v_dim, vs, 1.0, nullptr, same, threads);
  if (o.additive) {
    additive_v.resize(static_cast<std::size_t>(Hq * o.score_dim));
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t a = 0; a < o.score_dim; ++a)
        additive_v[static_cast<std::size_t>(h * o.score_dim + a)] =
            static_cast<float>(p.scale * score.additive_v->load(h, a));
    o.additive_v = additive_v.data();
  }
  o.q = q;
  o.k = k;
  o.v = v;
  o.dout = dout;
}

// Step 2: each row's LSE (as two floats) and Δ − dLSE.
void BackwardDoor::RowStatistics() {
  const std::int64_t vs = o.value_stride;
  const float* dout = o.dout;
  // P = e^(s − LSE) is only as precise as s here and s in the forward agree: in a peaked row the
  // largest P is e^(s_max − LSE) ≈ 1, and any difference between the two roundings of s_max is
  // all its error; likewise Δ = dO·O must be the Σ P dP of the P recomputed here. The fused
  // forward computes S exactly as this kernel does; the split-KV decode kernel (dot products
  // along D) does not, which cost up to 10× PyTorch's float32 error in dQ and dK. A problem it
  // would have run has few query rows, so LSE and Δ are re-derived here from this kernel's own S
  // and P (one more pass of two products over those few rows) — when the call holds all of the
  // keys (a block of a larger problem needs the whole problem's, which only the caller has).
  // A score_mod's parameter gradient is a sum of dS·∂s/∂θ over whole rows, where Δ's rounding
  // (dO·O against this kernel's Σ P dP) no longer averages out: 7× PyTorch's float32 error for
  // per-head ALiBi slopes, and as much for a bias whose gradient the caller sums (a score_mod
  // of Python's general path). Those calls re-derive Δ as well, with the register-tiled S.
  const bool decode_shaped = decode_attention_supports(p);
  const bool score_sums = !gradients.dscore_mod.empty() || gradients.dbias.has_value();
  // Sigmoid attention has no Δ (its weights are not normalized): delta holds −dLSE·e^−LSE, the
  // gradient through LSE = log Σ P, and nothing is re-derived.
  const bool rederive = (decode_shaped || score_sums) && !p.sigmoid && p.key_offset == 0 &&
                        p.key_total == Nk && B * Hq * Nq > 0 && Nk > 0;
  // LSE and Δ − dLSE per row (dO as packed above); when re-derived, Δ is added below.
  float* lse_high = buffer(kLseHigh, B * Hq * Nq);
  float* lse_low = buffer(kLseLow, B * Hq * Nq);
  float* delta = buffer(kDelta, B * Hq * Nq);
  // Rows in storage order (every head of a position together: O[b, i] is one run of memory).
  const std::int64_t position_blocks = (Nq + kRowsPerPass - 1) / kRowsPerPass;
  parallel_for(threads, B * position_blocks, [&](std::int64_t index) {
    const std::int64_t b = index / position_blocks, i0 = index % position_blocks * kRowsPerPass;
    std::vector<double> out_row(static_cast<std::size_t>(p.v_dim));
    for (std::int64_t position = 0; position < (std::min(Nq, i0 + kRowsPerPass) - i0) * Hq;
         ++position) {
      const std::int64_t i = i0 + position / Hq, h = position % Hq;
      const std::int64_t row = (b * Hq + h) * Nq + i;
      double sum = 0.0;
      if (p.sigmoid) {
        const double lse = inputs.lse.load(b, h, i);
        const double d_lse = inputs.dlse.present ? inputs.dlse.load(b, h, i) : 0.0;
        delta[row] = std::isfinite(lse) ? static_cast<float>(-d_lse * std::exp(-lse)) : 0.0f;
        lse_high[row] = lse_low[row] = 0.0f;
        continue;
      }
      if (!rederive) {
        inputs.out.load_row(out_row.data(), p.v_dim, b, i, h);
        sum = dot_in_double(dout + row * vs, out_row.data(), p.v_dim);
      }
      if (inputs.dlse.present) sum -= inputs.dlse.load(b, h, i);
      const double lse = inputs.lse.load(b, h, i);
      lse_high[row] = static_cast<float>(lse);
      lse_low[row] = std::isfinite(lse) ? static_cast<float>(lse - lse_high[row]) : 0.0f;
      delta[row] = static_cast<float>(sum);
    }
  });
  o.lse_high = lse_high;
  o.lse_low = lse_low;
  if (rederive) {
    o.row_dot_scores = decode_shaped;
    apply_simd_environment();
    HWY_DYNAMIC_DISPATCH(RederiveRowStatistics)(o, lse_high, lse_low, delta);
  }
  o.delta = delta;
}

// Step 2': the sinks' gradient, from each row's LSE and Δ − dLSE: Σ over the rows of a head of
// −e^(sink − LSE)·(Δ − dLSE) (core/sinks.hpp). Zero in a block that does not join the sinks.
void BackwardDoor::SinkGradient() {
  if (!gradients.dsinks) return;
  std::vector<double> sums(static_cast<std::size_t>(Hq), 0.0);
  if (p.sinks.present) {
    for (std::int64_t b = 0; b < B; ++b)
      for (std::int64_t h = 0; h < Hq; ++h)
        for (std::int64_t i = 0; i < Nq; ++i) {
          const std::int64_t row = (b * Hq + h) * Nq + i;
          const double lse = double{o.lse_high[row]} + double{o.lse_low[row]};
          sums[static_cast<std::size_t>(h)] +=
              detail::sink_gradient(p.sinks.load(h), lse, double{o.delta[row]});
        }
  }
  const detail::StridedOutput out = detail::output_of(*gradients.dsinks);
  for (std::int64_t h = 0; h < Hq; ++h) out.store(sums[static_cast<std::size_t>(h)], h);
}

// Step 3: the work items and the kernel's zeroed results.
void BackwardDoor::PlanItems() {
  const std::int64_t ss = o.score_stride, vs = o.value_stride;
  // Items: enough key chunks for 16 items, unless a broadcast bias gradient forbids splitting.
  if (gradients.dbias) {
    std::int64_t stride = 1;
    for (std::size_t d = 4; d-- > 0;) {
      o.dbias_strides[d] = p.bias_shape[d] > 1 ? stride : 0;
      stride *= p.bias_shape[d];
    }
    o.dbias = zeroed(kDbias, stride, threads);
    o.batches_in_item = B > 1 && o.dbias_strides[0] == 0;
    o.heads_in_item = Hk > 1 && o.dbias_strides[1] == 0;
  }
  const std::int64_t blocks = (Nk + kBackwardKeys - 1) / kBackwardKeys;
  const std::int64_t base_items = (o.batches_in_item ? 1 : B) * (o.heads_in_item ? 1 : Hk);
  o.chunks = std::clamp<std::int64_t>((16 + base_items - 1) / base_items, 1,
                                      std::max<std::int64_t>(blocks, 1));
  if (gradients.dbias && o.dbias_strides[3] == 0) o.chunks = 1;
  o.items = base_items * o.chunks;
  o.dq = zeroed(kDq, o.chunks * B * Hq * Nq * ss, threads);
  o.dk = zeroed(kDk, B * o.key_heads * Nk * ss, threads);
  o.dv = zeroed(kDv, B * Hk * Nk * vs, threads);
  o.dva = zeroed(kDva, o.additive ? o.items * Hq * o.score_dim : 0, threads);
  if (score_mod_gradients.arrays() != nullptr) o.score_mod_gradients = &score_mod_gradients;
}

// Step 5: dQ, dK, dV from the kernel's gradients of the compared vectors.
void BackwardDoor::InputGradients() {
  const std::int64_t ss = o.score_stride, vs = o.value_stride;
  const float* dq = o.dq;
  const float* dk = o.dk;
  const float* dv = o.dv;
  // dQ of the compared vectors (Σ over chunks, in order), then back through the score's own
  // projection: dot/bilinear carry the scale in q.
  const std::int64_t dim = o.score_dim;
  const double dq_factor = o.additive ? 1.0 : p.scale;
  dq_sum = buffer(kDqSum, B * Hq * Nq * dim);  // every element written below
  parallel_for(threads, B * Hq * Nq, [&](std::int64_t row) {
    for (std::int64_t a = 0; a < dim; ++a) {
      float sum = 0.0f;
      for (std::int64_t c = 0; c < o.chunks; ++c) sum += dq[(c * B * Hq * Nq + row) * ss + a];
      dq_sum[row * dim + a] = static_cast<float>(dq_factor * sum);
    }
  });
  // Each row of dQ (dK) from its compared vector's gradient, back through the unit's transform;
  // a factor's gradient (the cosine's temperature) per (row, head), summed per head below.
  const bool query_factor = QueryFactorWanted();
  factor_parts.assign(query_factor ? static_cast<std::size_t>(B * Nq * Hq) : 0, 0.0);
  if (gradients.dq || query_factor) {
    const std::optional<detail::StridedOutput> out =
        gradients.dq ? std::optional(detail::output_of(*gradients.dq)) : std::nullopt;
    parallel_for(threads, B * Nq, [&](std::int64_t index) {
      const std::int64_t b = index / Nq, i = index % Nq;
      // Per thread, not per row (an allocation a row cost more than the row's own work).
      thread_local std::vector<double> compared, input, row;
      compared.resize(static_cast<std::size_t>(dim));
      input.resize(static_cast<std::size_t>(p.q_dim));
      row.resize(static_cast<std::size_t>(p.q_dim));
      for (std::int64_t h = 0; h < Hq; ++h) {
        const float* source = dq_sum + ((b * Hq + h) * Nq + i) * dim;
        std::copy(source, source + dim, compared.begin());
        if (query_transform.identity()) {
          std::copy(compared.begin(), compared.end(), row.begin());
        } else {
          p.q.load_row(input.data(), p.q_dim, b, i, h);
          const double d_factor =
              query_transform.backward(h, input.data(), compared.data(), row.data());
          if (query_factor) factor_parts[static_cast<std::size_t>(index * Hq + h)] = d_factor;
        }
        if (out) out->store_row(row.data(), p.q_dim, b, i, h);
      }
    });
  }
  if (gradients.dk) {
    const detail::StridedOutput out = detail::output_of(*gradients.dk);
    const std::int64_t heads_per_key = o.key_heads / Hk;  // transformed key heads per k head
    parallel_for(threads, B * Nk, [&](std::int64_t index) {
      const std::int64_t b = index / Nk, j = index % Nk;
      thread_local std::vector<double> compared, input, row, total;  // per thread, as for dQ
      compared.resize(static_cast<std::size_t>(dim));
      input.resize(static_cast<std::size_t>(p.k_dim));
      row.resize(static_cast<std::size_t>(p.k_dim));
      total.resize(static_cast<std::size_t>(p.k_dim));
      for (std::int64_t hk = 0; hk < Hk; ++hk) {
        std::fill(total.begin(), total.end(), 0.0);
        if (!key_transform.identity()) p.k.load_row(input.data(), p.k_dim, b, j, hk);
        for (std::int64_t kh = hk * heads_per_key; kh < (hk + 1) * heads_per_key; ++kh) {
          const float* source = dk + ((b * o.key_heads + kh) * Nk + j) * ss;
          std::copy(source, source + dim, compared.begin());
          if (key_transform.identity()) {
            std::copy(compared.begin(), compared.end(), row.begin());
          } else {
            key_transform.backward(kh, input.data(), compared.data(), row.data());
          }
          for (std::int64_t d = 0; d < p.k_dim; ++d)
            total[static_cast<std::size_t>(d)] += row[static_cast<std::size_t>(d)];
        }
        out.store_row(total.data(), p.k_dim, b, j, hk);
      }
    });
  }
  if (gradients.dv) {
    const detail::StridedOutput out = detail::output_of(*gradients.dv);
    parallel_for(threads, B * Nk, [&](std::int64_t index) {
      const std::int64_t b = index / Nk, j = index % Nk;
      thread_local std::vector<double> row;  // per thread, as for dQ
      row.resize(static_cast<std::size_t>(p.v_dim));
      for (std::int64_t hv = 0; hv < Hk; ++hv) {
        const float* values = dv + ((b * Hk + hv) * Nk + j) * vs;
        for (std::int64_t d = 0; d < p.v_dim; ++d) row[static_cast<std::size_t>(d)] = values[d];
        out.store_row(row.data(), p.v_dim, b, j, hv);
      }
    });
  }
}

// Step 6: the gradients of the score's parameters, of a score_mod's and of the bias.
void BackwardDoor::ParameterGradients() {
  const std::int64_t ss = o.score_stride;
  const auto key_source = [this](std::int64_t kh) { return KeySource(kh); };
  const auto same = same_head;
  const std::int64_t dim = o.score_dim;
  const float* dk = o.dk;
  const float* dva = o.dva;
  // The score's parameters. A transform's matrix M (x' = M x): dM = Σ dx' ⊗ x over the rows, as
  // outer products of the compared vectors' gradients with the raw inputs (packed densely for
  // the purpose); stored transposed for a transposed matrix (bilinear's q' = Wᵀq: dW = Σ q ⊗ dq').
  const DenseRows d_queries{dq_sum, Hq, Nq, dim};
  const DenseRows d_keys{dk, o.key_heads, Nk, ss};
  const auto matrix_gradient = [&](const detail::RowTransform& transform) {
    return transform.matrix != nullptr && transform.matrix_gradient != nullptr &&
                   (gradients.*transform.matrix_gradient).has_value()
               ? &*(gradients.*transform.matrix_gradient)
               : nullptr;
  };
  if (const MutableTensorView* target = matrix_gradient(score.query)) {
    std::vector<float> raw(static_cast<std::size_t>(B * Hq * Nq * p.q_dim));
    pack_rows(raw.data(), p.q, B, Nq, Hq, p.q_dim, p.q_dim, 1.0, nullptr, same, threads);
    const DenseRows queries{raw.data(), Hq, Nq, p.q_dim};
    const bool shared = score.query.matrix->strides[0] == 0;
    if (score.query.transposed) {
      outer_product_gradient(*target, shared, Hq, p.q_dim, dim, B, Nq, queries, same, d_queries,
                             same, 1.0, threads);
    } else {
      outer_product_gradient(*target, shared, Hq, dim, p.q_dim, B, Nq, d_queries, same, queries,
                             same, 1.0, threads);
    }
  }
  if (const MutableTensorView* target = matrix_gradient(score.key)) {  // per transformed key head
    std::vector<float> raw(static_cast<std::size_t>(B * Hk * Nk * p.k_dim));
    pack_rows(raw.data(), p.k, B, Nk, Hk, p.k_dim, p.k_dim, 1.0, nullptr, same, threads);
    const DenseRows keys{raw.data(), Hk, Nk, p.k_dim};
    const bool shared = score.key.matrix->strides[0] == 0;
    if (score.key.transposed) {
      outer_product_gradient(*target, shared, o.key_heads, p.k_dim, dim, B, Nk, keys, key_source,
                             d_keys, same, 1.0, threads);
    } else {
      outer_product_gradient(*target, shared, o.key_heads, dim, p.k_dim, B, Nk, d_keys, same, keys,
                             key_source, 1.0, threads);
    }
  }
  if (QueryFactorWanted()) {  // Σ over rows, per head (one sum when the factor is shared)
    const bool shared = score.query.factor->strides[0] == 0;
    std::vector<double> values(static_cast<std::size_t>(shared ? 1 : Hq));
    for (std::int64_t row = 0; row < B * Nq; ++row)
      for (std::int64_t h = 0; h < Hq; ++h)
        values[static_cast<std::size_t>(shared ? 0 : h)] +=
            factor_parts[static_cast<std::size_t>(row * Hq + h)];
    detail::store_dense(values.data(), *(gradients.*score.query.factor_gradient));
  }
  if (o.additive && (gradients.*score.additive_v_gradient).has_value()) {
    // v carried the scale; each item summed its own part.
    const MutableTensorView& target = *(gradients.*score.additive_v_gradient);
    const bool shared = score.additive_v->strides[0] == 0;
    std::vector<double> values(static_cast<std::size_t>((shared ? 1 : Hq) * dim));
    for (std::int64_t h = 0; h < Hq; ++h)
      for (std::int64_t a = 0; a < dim; ++a) {
        double sum = 0.0;
        for (std::int64_t item = 0; item < o.items; ++item) sum += dva[(item * Hq + h) * dim + a];
        values[static_cast<std::size_t>((shared ? 0 : h) * dim + a)] += p.scale * sum;
      }
    detail::store_dense(values.data(), target);
  }
  score_mod_gradients.store();
  if (gradients.dbias) {
    std::vector<double> values(static_cast<std::size_t>(gradients.dbias->as_const().numel()));
    for (std::size_t n = 0; n < values.size(); ++n) values[n] = o.dbias[n];
    detail::store_dense(values.data(), *gradients.dbias);
  }
}

}  // namespace

void fused_backward(const AttentionProblem& p, const BackwardInputs& inputs,
                    const AttentionGradients& gradients) {
  BackwardDoor door(p, inputs, gradients);
  door.PackOperands();
  door.RowStatistics();
  door.SinkGradient();
  door.PlanItems();
  if (p.batch * p.q_heads * p.q_len > 0 && p.k_len > 0) {  // step 4: the kernel
    apply_simd_environment();
    HWY_DYNAMIC_DISPATCH(FusedBackward)(door.o);
  }
  door.InputGradients();
  door.ParameterGradients();
}

}  // namespace qkv::kernels
#endif  // HWY_ONCE
