// Streaming attention: the float64 kernel (float32 and bfloat16 go to the fused kernel).
//
// Work is split into items of (batch b, query head h, block of kRowsPerItem query rows) that
// OpenMP hands out dynamically; each thread owns a small scratch (one query row, one block of
// scores, one output accumulator) allocated once.
//
// For one query row i the visible keys are first narrowed to a range [first, last) from the
// position masks (causal, window, key_lengths); keys outside it are never scored. The range is
// walked in blocks of kKeyBlock keys:
//   1. score the block: s_j = scale·score(q_i, k_j), soft cap, ALiBi, bias, boolean mask (-inf);
//   2. online softmax: m' = max(m, max_j s_j); rescale the accumulator and the running sum by
//      exp(m - m'); add exp(s_j - m')·v_j and exp(s_j - m');
// and at the end O_i = acc / sum and LSE_i = m + log(sum). A row whose every visible score is
// -inf (or that has none) keeps m = -inf and gets O = 0, LSE = -inf. When the weights P are
// requested, a second walk recomputes the scores and writes P_ij = exp(s_ij - LSE_i) directly,
// so P is exactly the softmax that produced O.
//
// Every score is reduced to cheap per-key work by its unit's compared vectors, made once up front
// (kernels/score_operands.hpp): a dot of q' and k' (bilinear: q' = Wᵀq; cosine: unit vectors), or
// Σ_a v_a tanh(q'_a + k'_a) for the additive score (Nq·Nk·A tanh).

#include "kernels/streaming_attention.hpp"

#include "core/dropout.hpp"
#include "core/sinks.hpp"
#include "kernels/operands.hpp"
#include "kernels/score_operands.hpp"
#include "qkv/error.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace qkv::kernels {

namespace {

using detail::AttentionProblem;

constexpr std::int64_t kKeyBlock = 64;     // scores kept per step of the online softmax
constexpr std::int64_t kRowsPerItem = 16;  // query rows in one unit of parallel work

double dot(const double* a, const double* b, std::int64_t n) {
  double sum = 0;
  for (std::int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

class StreamingKernel {
 public:
  explicit StreamingKernel(const AttentionProblem& p) : p_(p) {
    ComparedVectors<double> vectors =
        compared_vectors<double>(p, detail::score_unit(p.score).operands(p), worker_threads(p));
    q_ = std::move(vectors.q);
    k_ = std::move(vectors.k);
    score_dim_ = vectors.dim;
    keys_per_query_head_ = vectors.key_heads != p.kv_heads;
    additive_ = vectors.additive;
    va_ = std::move(vectors.additive_v);
    adopt_or_pack(v_, p.v, p.batch, p.k_len, p.kv_heads, p.v_dim);
  }

  void run() const {
    const std::int64_t row_blocks = (p_.q_len + kRowsPerItem - 1) / kRowsPerItem;
    const std::int64_t items = p_.batch * p_.q_heads * row_blocks;
    parallel_for_each(
        worker_threads(p_), items, [this] { return Scratch(p_.v_dim); },
        [&](Scratch& scratch, std::int64_t item) {
          const std::int64_t row_block = item % row_blocks;
          const std::int64_t h = (item / row_blocks) % p_.q_heads;
          const std::int64_t b = item / (row_blocks * p_.q_heads);
          const std::int64_t row_end = std::min(p_.q_len, (row_block + 1) * kRowsPerItem);
          for (std::int64_t i = row_block * kRowsPerItem; i < row_end; ++i) {
            attend_row(b, h, i, scratch);
          }
        });
  }

 private:
  struct Scratch {
    explicit Scratch(std::int64_t v_dim)
        : scores(kKeyBlock), accumulator(static_cast<std::size_t>(v_dim)) {}
    std::vector<double> scores;
    std::vector<double> accumulator;
  };

  const double* key_row(std::int64_t b, std::int64_t j, std::int64_t h) const {
    return k_.row(b, j, keys_per_query_head_ ? h : p_.kv_head(h));
  }

  // Step 1: scores[0 .. count) for keys first .. first + count of row i. Returns their maximum.
  double score_block(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t first,
                     std::int64_t count, double* scores) const {
    const double* query = q_.row(b, i, h);
    if (additive_) {  // the scale is folded into v
      const double* va = va_.data() + h * score_dim_;
      for (std::int64_t t = 0; t < count; ++t) {
        const double* key = key_row(b, first + t, h);
        double sum = 0;
        for (std::int64_t a = 0; a < score_dim_; ++a) sum += va[a] * std::tanh(query[a] + key[a]);
        scores[t] = sum;
      }
    } else {
      const double scale = p_.scale;
      for (std::int64_t t = 0; t < count; ++t) {
        scores[t] = scale * dot(query, key_row(b, first + t, h), score_dim_);
      }
    }
    apply_score_options(p_, b, h, i, first, count, scores);
    // NaN if a score is (std::max would drop it, and a row of NaN scores would look empty).
    double block_max = -std::numeric_limits<double>::infinity();
    for (std::int64_t t = 0; t < count; ++t) {
      if (std::isnan(scores[t])) return scores[t];
      block_max = std::max(block_max, scores[t]);
    }
    return block_max;
  }

  void attend_row(std::int64_t b, std::int64_t h, std::int64_t i, Scratch& scratch) const {
    constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();
    const auto [first, last] = detail::visible_keys(p_, b, h, i);
    double* accumulator = scratch.accumulator.data();
    std::fill(scratch.accumulator.begin(), scratch.accumulator.end(), 0.0);
    double running_max = kMinusInfinity;
    double running_sum = 0;
    const std::int64_t hk = p_.kv_head(h);
    for (std::int64_t start = first; start < last; start += kKeyBlock) {
      const std::int64_t count = std::min(kKeyBlock, last - start);
      double* scores = scratch.scores.data();
      const double block_max = score_block(b, h, i, start, count, scores);
      if (block_max == kMinusInfinity) continue;  // nothing visible in this block
      // Step 2: online softmax (sigmoid attention: each weight on its own).
      if (!p_.sigmoid && (block_max > running_max || std::isnan(block_max))) {
        const double correction =
            std::exp(running_max - block_max);  // 0 on the first visible block
        running_sum *= correction;
        for (std::int64_t d = 0; d < p_.v_dim; ++d) accumulator[d] *= correction;
        running_max = block_max;
      }
      for (std::int64_t t = 0; t < count; ++t) {
        double weight = p_.sigmoid ? Sigmoid(scores[t]) : std::exp(scores[t] - running_max);
        if (weight == 0) continue;
        running_sum += weight;
        if (dropout_.active()) {  // the sum is the softmax's; only the average sees the mask
          weight *= dropout_.factor(b, h, i, start + t);
          if (weight == 0) continue;
        }
        const double* value = v_.row(b, start + t, hk);
        for (std::int64_t d = 0; d < p_.v_dim; ++d) accumulator[d] += weight * value[d];
      }
    }

    const bool empty = running_max == kMinusInfinity;
    double inverse_sum = empty ? 0.0 : 1.0 / running_sum;
    double lse = empty ? kMinusInfinity : running_max + std::log(running_sum);
    if (p_.sigmoid) {  // no normalizer: O is the sum itself; LSE, the log of its total weight
      inverse_sum = 1.0;
      lse = running_sum > 0 ? std::log(running_sum) : kMinusInfinity;
    }
    if (p_.sinks.present) {  // one more column, with no value (core/sinks.hpp)
      const detail::SinkJoin joined = detail::join_sink(lse, p_.sinks.load(h));
      lse = joined.lse;
      inverse_sum *= joined.keys_share;
    }
    for (std::int64_t d = 0; d < p_.v_dim; ++d) {
      p_.out.store(accumulator[d] * inverse_sum, b, i, h, d);
    }
    if (p_.lse.present) p_.lse.store(lse, b, h, i);
    if (p_.weights.present) write_weights(b, h, i, first, last, lse, scratch);
  }

  // P_ij = exp(s_ij - LSE_i) for the visible keys, 0 for every other.
  void write_weights(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t first,
                     std::int64_t last, double lse, Scratch& scratch) const {
    const bool empty = lse == -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      if (empty || j < first || j >= last) p_.weights.store(0.0, b, h, i, j);
    }
    if (empty) return;
    for (std::int64_t start = first; start < last; start += kKeyBlock) {
      const std::int64_t count = std::min(kKeyBlock, last - start);
      double* scores = scratch.scores.data();
      score_block(b, h, i, start, count, scores);
      for (std::int64_t t = 0; t < count; ++t) {
        double weight = p_.sigmoid ? Sigmoid(scores[t]) : std::exp(scores[t] - lse);
        if (dropout_.active()) weight *= dropout_.factor(b, h, i, start + t);
        p_.weights.store(weight, b, h, i, start + t);
      }
    }
  }

  // Sigmoid attention's weight of a score: 1 / (1 + e^−(s + b)); 0 for a hidden key.
  double Sigmoid(double score) const {
    if (score == -std::numeric_limits<double>::infinity()) return 0.0;
    return 1.0 / (1.0 + std::exp(-(score + p_.sigmoid_bias)));
  }

  const AttentionProblem& p_;
  const detail::DropoutMask dropout_{p_};
  RowMajorOperand<double> q_, k_, v_;
  // q_ and k_ hold the projections for bilinear/additive
  std::vector<double> va_;  // additive: scale·v per query head [Hq, A]
  bool additive_ = false;
  std::int64_t score_dim_ = 0;  // length of the vectors a score compares
  bool keys_per_query_head_ = false;
};

}  // namespace

void streaming_attention(const AttentionProblem& problem) {
  if (problem.dtype != DType::float64) {
    throw Error(
        "streaming_attention: expected a float64 problem (the fused kernel takes the rest)");
  }
  StreamingKernel(problem).run();
}

}  // namespace qkv::kernels
