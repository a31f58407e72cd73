// Streaming attention.
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
// Bilinear and additive scores are reduced to cheap per-key work by projecting once up front:
// bilinear uses q' = Wᵀq (then it is a dot score against k); additive uses qa = Wq q for every
// query and ka = Wk k for every key, leaving Σ_a v_a tanh(qa_a + ka_a) per pair (Nq·Nk·A tanh).

#include "kernels/streaming_attention.hpp"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

namespace qkv::kernels {

namespace {

using detail::AttentionProblem;
using detail::StridedInput;

constexpr std::int64_t kKeyBlock = 64;     // scores kept per step of the online softmax
constexpr std::int64_t kRowsPerItem = 16;  // query rows in one unit of parallel work

// A [B, N, H, D] operand with unit stride along D, in the compute type T: the caller's storage
// when it already is, else a dense copy.
template <class T>
struct RowMajorOperand {
  const T* data = nullptr;
  std::int64_t stride_b = 0, stride_n = 0, stride_h = 0;
  std::vector<T> storage;

  const T* row(std::int64_t b, std::int64_t n, std::int64_t h) const {
    return data + b * stride_b + n * stride_n + h * stride_h;
  }
};

template <class T>
void adopt_or_pack(RowMajorOperand<T>& operand, const StridedInput& input, std::int64_t batch,
                   std::int64_t length, std::int64_t heads, std::int64_t dim) {
  if (input.strides[3] == 1) {
    operand.data = input.pointer<T>(0);
    operand.stride_b = input.strides[0];
    operand.stride_n = input.strides[1];
    operand.stride_h = input.strides[2];
    return;
  }
  operand.storage.resize(static_cast<std::size_t>(batch * length * heads * dim));
  operand.stride_h = dim;
  operand.stride_n = heads * dim;
  operand.stride_b = length * heads * dim;
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t n = 0; n < length; ++n)
      for (std::int64_t h = 0; h < heads; ++h)
        for (std::int64_t d = 0; d < dim; ++d)
          operand.storage[static_cast<std::size_t>(b * operand.stride_b + n * operand.stride_n +
                                                   h * operand.stride_h + d)] =
              static_cast<T>(input.load(b, n, h, d));
  operand.data = operand.storage.data();
}

// out[b, n, h', r] = Σ_c weight(h', r, c) · in[b, n, h'', c] for every output head h', where the
// input head h'' = input_head(h') and weight(h', r, c) = W[h', r, c] (or W[h', c, r] transposed).
template <class T, class InputHead>
void project(RowMajorOperand<T>& result, const RowMajorOperand<T>& input, const StridedInput& w,
             bool transposed, std::int64_t batch, std::int64_t length, std::int64_t out_heads,
             std::int64_t out_dim, std::int64_t in_dim, InputHead input_head, int threads) {
  result.storage.assign(static_cast<std::size_t>(batch * length * out_heads * out_dim), T{0});
  result.stride_h = out_dim;
  result.stride_n = out_heads * out_dim;
  result.stride_b = length * out_heads * out_dim;
  result.data = result.storage.data();
  std::vector<T> weight(static_cast<std::size_t>(out_heads * out_dim * in_dim));
  for (std::int64_t h = 0; h < out_heads; ++h)
    for (std::int64_t r = 0; r < out_dim; ++r)
      for (std::int64_t c = 0; c < in_dim; ++c)
        weight[static_cast<std::size_t>((h * out_dim + r) * in_dim + c)] =
            static_cast<T>(transposed ? w.load(h, c, r) : w.load(h, r, c));
#pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < length; ++n) {
      for (std::int64_t h = 0; h < out_heads; ++h) {
        const T* x = input.row(b, n, input_head(h));
        T* y = result.storage.data() + b * result.stride_b + n * result.stride_n + h * out_dim;
        for (std::int64_t r = 0; r < out_dim; ++r) {
          const T* wr = weight.data() + (h * out_dim + r) * in_dim;
          T sum = 0;
          for (std::int64_t c = 0; c < in_dim; ++c) sum += wr[c] * x[c];
          y[r] = sum;
        }
      }
    }
  }
}

template <class T>
T dot(const T* a, const T* b, std::int64_t n) {
  T sum = 0;
  for (std::int64_t d = 0; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

template <class T>
class StreamingKernel {
 public:
  explicit StreamingKernel(const AttentionProblem& p) : p_(p) {
    adopt_or_pack(q_, p.q, p.batch, p.q_len, p.q_heads, p.q_dim);
    adopt_or_pack(k_, p.k, p.batch, p.k_len, p.kv_heads, p.k_dim);
    adopt_or_pack(v_, p.v, p.batch, p.k_len, p.kv_heads, p.v_dim);
    score_dim_ = p.k_dim;
    if (p.score == Score::bilinear) {
      RowMajorOperand<T> projected;
      project(
          projected, q_, p.w, /*transposed=*/true, p.batch, p.q_len, p.q_heads, p.k_dim, p.q_dim,
          [](std::int64_t h) { return h; }, threads());
      q_ = std::move(projected);
    } else if (p.score == Score::additive) {
      score_dim_ = p.additive_dim;
      RowMajorOperand<T> projected_q;
      project(
          projected_q, q_, p.wq, false, p.batch, p.q_len, p.q_heads, p.additive_dim, p.q_dim,
          [](std::int64_t h) { return h; }, threads());
      q_ = std::move(projected_q);
      // Keys are projected once per key head when Wk is shared, once per query head otherwise.
      keys_per_query_head_ = p.wk.strides[0] != 0;
      RowMajorOperand<T> projected_k;
      const std::int64_t heads = keys_per_query_head_ ? p.q_heads : p.kv_heads;
      const std::int64_t group = keys_per_query_head_ ? p.group_size : 1;
      project(
          projected_k, k_, p.wk, false, p.batch, p.k_len, heads, p.additive_dim, p.k_dim,
          [group](std::int64_t h) { return h / group; }, threads());
      k_ = std::move(projected_k);
      va_.resize(static_cast<std::size_t>(p.q_heads * p.additive_dim));
      for (std::int64_t h = 0; h < p.q_heads; ++h)
        for (std::int64_t a = 0; a < p.additive_dim; ++a)
          va_[static_cast<std::size_t>(h * p.additive_dim + a)] = static_cast<T>(p.va.load(h, a));
    }
  }

  void run() const {
    const std::int64_t row_blocks = (p_.q_len + kRowsPerItem - 1) / kRowsPerItem;
    const std::int64_t items = p_.batch * p_.q_heads * row_blocks;
#pragma omp parallel num_threads(threads())
    {
      Scratch scratch(p_.v_dim);
#pragma omp for schedule(dynamic)
      for (std::int64_t item = 0; item < items; ++item) {
        const std::int64_t row_block = item % row_blocks;
        const std::int64_t h = (item / row_blocks) % p_.q_heads;
        const std::int64_t b = item / (row_blocks * p_.q_heads);
        const std::int64_t row_end = std::min(p_.q_len, (row_block + 1) * kRowsPerItem);
        for (std::int64_t i = row_block * kRowsPerItem; i < row_end; ++i) {
          attend_row(b, h, i, scratch);
        }
      }
    }
  }

 private:
  int threads() const {
    return p_.threads > 0 ? p_.threads : omp_get_max_threads();
  }

  struct Scratch {
    explicit Scratch(std::int64_t v_dim)
        : scores(kKeyBlock), accumulator(static_cast<std::size_t>(v_dim)) {}
    std::vector<T> scores;
    std::vector<T> accumulator;
  };

  // Keys [first, last) pass the position masks for query row i of batch b.
  void visible_range(std::int64_t b, std::int64_t i, std::int64_t& first,
                     std::int64_t& last) const {
    const std::int64_t diagonal_j = i + p_.diagonal();
    first = 0;
    last = p_.key_length(b);
    if (p_.causal) {
      const std::int64_t newest = p_.causal_align == CausalAlign::bottom_right ? diagonal_j : i;
      last = std::min(last, newest + 1);
    }
    if (p_.window_left >= 0) first = std::max(first, diagonal_j - p_.window_left);
    if (p_.window_right >= 0) last = std::min(last, diagonal_j + p_.window_right + 1);
  }

  const T* key_row(std::int64_t b, std::int64_t j, std::int64_t h) const {
    return k_.row(b, j, keys_per_query_head_ ? h : p_.kv_head(h));
  }

  // Step 1: scores[0 .. count) for keys first .. first + count of row i. Returns their maximum.
  T score_block(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t first,
                std::int64_t count, T* scores) const {
    const T* query = q_.row(b, i, h);
    if (p_.score == Score::additive) {
      const T* va = va_.data() + h * p_.additive_dim;
      for (std::int64_t t = 0; t < count; ++t) {
        const T* key = key_row(b, first + t, h);
        T sum = 0;
        for (std::int64_t a = 0; a < score_dim_; ++a) sum += va[a] * std::tanh(query[a] + key[a]);
        scores[t] = sum;
      }
    } else {
      for (std::int64_t t = 0; t < count; ++t) {
        scores[t] = dot(query, key_row(b, first + t, h), score_dim_);
      }
    }
    const auto scale = static_cast<T>(p_.scale);
    for (std::int64_t t = 0; t < count; ++t) scores[t] *= scale;
    if (p_.softcap > 0) {
      const auto cap = static_cast<T>(p_.softcap);
      for (std::int64_t t = 0; t < count; ++t) scores[t] = cap * std::tanh(scores[t] / cap);
    }
    if (p_.alibi_slopes.present) {
      const auto slope = static_cast<T>(p_.alibi_slopes.load(b, h));
      const std::int64_t diagonal_j = i + p_.diagonal();
      for (std::int64_t t = 0; t < count; ++t) {
        scores[t] -= slope * static_cast<T>(std::llabs(diagonal_j - (first + t)));
      }
    }
    if (p_.bias.present) {
      for (std::int64_t t = 0; t < count; ++t) {
        scores[t] += static_cast<T>(p_.bias.load(b, h, i, first + t));
      }
    }
    if (p_.mask.present) {
      for (std::int64_t t = 0; t < count; ++t) {
        if (p_.mask.load(b, h, i, first + t) == 0.0) {
          scores[t] = -std::numeric_limits<T>::infinity();
        }
      }
    }
    T block_max = -std::numeric_limits<T>::infinity();
    for (std::int64_t t = 0; t < count; ++t) block_max = std::max(block_max, scores[t]);
    return block_max;
  }

  void attend_row(std::int64_t b, std::int64_t h, std::int64_t i, Scratch& scratch) const {
    constexpr T kMinusInfinity = -std::numeric_limits<T>::infinity();
    std::int64_t first = 0, last = 0;
    visible_range(b, i, first, last);
    T* accumulator = scratch.accumulator.data();
    std::fill(scratch.accumulator.begin(), scratch.accumulator.end(), T{0});
    T running_max = kMinusInfinity;
    T running_sum = 0;
    const std::int64_t hk = p_.kv_head(h);
    for (std::int64_t start = first; start < last; start += kKeyBlock) {
      const std::int64_t count = std::min(kKeyBlock, last - start);
      T* scores = scratch.scores.data();
      const T block_max = score_block(b, h, i, start, count, scores);
      if (block_max == kMinusInfinity) continue;  // nothing visible in this block
      // Step 2: online softmax.
      if (block_max > running_max) {
        const T correction = std::exp(running_max - block_max);  // 0 on the first visible block
        running_sum *= correction;
        for (std::int64_t d = 0; d < p_.v_dim; ++d) accumulator[d] *= correction;
        running_max = block_max;
      }
      for (std::int64_t t = 0; t < count; ++t) {
        const T weight = std::exp(scores[t] - running_max);
        if (weight == 0) continue;
        running_sum += weight;
        const T* value = v_.row(b, start + t, hk);
        for (std::int64_t d = 0; d < p_.v_dim; ++d) accumulator[d] += weight * value[d];
      }
    }

    const bool empty = running_max == kMinusInfinity;
    const T inverse_sum = empty ? T{0} : T{1} / running_sum;
    for (std::int64_t d = 0; d < p_.v_dim; ++d) {
      p_.out.store(static_cast<double>(accumulator[d] * inverse_sum), b, i, h, d);
    }
    const T lse = empty ? kMinusInfinity : running_max + std::log(running_sum);
    if (p_.lse.present) p_.lse.store(static_cast<double>(lse), b, h, i);
    if (p_.weights.present) write_weights(b, h, i, first, last, lse, scratch);
  }

  // P_ij = exp(s_ij - LSE_i) for the visible keys, 0 for every other.
  void write_weights(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t first,
                     std::int64_t last, T lse, Scratch& scratch) const {
    const bool empty = lse == -std::numeric_limits<T>::infinity();
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      if (empty || j < first || j >= last) p_.weights.store(0.0, b, h, i, j);
    }
    if (empty) return;
    for (std::int64_t start = first; start < last; start += kKeyBlock) {
      const std::int64_t count = std::min(kKeyBlock, last - start);
      T* scores = scratch.scores.data();
      score_block(b, h, i, start, count, scores);
      for (std::int64_t t = 0; t < count; ++t) {
        p_.weights.store(static_cast<double>(std::exp(scores[t] - lse)), b, h, i, start + t);
      }
    }
  }

  const AttentionProblem& p_;
  RowMajorOperand<T> q_, k_, v_;  // q_ and k_ hold the projections for bilinear/additive
  std::vector<T> va_;             // additive: v per query head [Hq, A]
  std::int64_t score_dim_ = 0;    // length of the vectors a score compares
  bool keys_per_query_head_ = false;
};

}  // namespace

void streaming_attention(const AttentionProblem& problem) {
  if (problem.dtype == DType::float64) {
    StreamingKernel<double>(problem).run();
  } else {
    StreamingKernel<float>(problem).run();
  }
}

}  // namespace qkv::kernels
