// What every kernel does before its main loop: operands with unit stride along the head dim,
// the bilinear/additive projections, the options applied to a row of scores.
#pragma once

#include <hwy/aligned_allocator.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/problem.hpp"
#include "core/visibility.hpp"
#include "kernels/workers.hpp"

namespace qkv::kernels {

using detail::AttentionProblem;
using detail::StridedInput;

// Aligned float storage kept by a thread from one call to the next: first-touch page faults cost
// more than the attention itself on small problems, so each buffer is allocated at the largest
// size seen and reused. (A thread keeps the memory of its largest problem.)
class ReusedBuffer {
 public:
  float* Get(std::int64_t count) {
    if (count > capacity_) {
      capacity_ = std::max<std::int64_t>(count, 1);
      data_ = hwy::AllocateAligned<float>(static_cast<std::size_t>(capacity_));
    }
    return data_.get();
  }

 private:
  hwy::AlignedFreeUniquePtr<float[]> data_;
  std::int64_t capacity_ = 0;
};

// A score q·k is summed over D in blocks of this many terms, each block from zero and then added
// to the running total, by the fused forward and the fused backward alike (the backward's
// P = e^(s − LSE) needs the forward's very rounding of s). One sequential sum of D = 64 products
// rounds 2–5× worse than the blocked sums of a BLAS (measured against PyTorch's float32), which
// broke FlashAttention's 3× rule for gradients. Blocks of 32 keep every case of
// tests/python/test_precision.py within 2× (worst 1.98) for one extra add per score at D = 64 and
// cost 1% of S1 and 2.5% of S3 (one thread); blocks of 16 were barely more precise and cost 3–7%.
inline constexpr std::int64_t kScoreDepthBlock = 32;

// Below this many multiply-adds (the two products of the pairs the position masks leave) a call
// runs on the calling thread alone: waking a second thread and sharing the work out would cost
// more than it saves, and on a busy machine it would make the call wait for a core. Measured with
// `qkv bench --threads 1|2` (Zen 4, float32, D = 64): at 1.6e6 (B1H4N80 causal) one thread takes
// 89 µs and two 105 µs; at 4.2e6 (B1H4N128 causal) both 155 µs; at 9.4e6 (B1H4N192 causal) two
// take 184 µs against one's 325. Beside PyTorch's threads (a Python model's projections before
// and after each call) waking a second thread costs about 100 µs more, so the threshold sits at
// the upper end of the even range.
inline constexpr double kParallelWork = 5e6;
// The split-KV decode reads a new key and value for about every multiply-add: bound by memory,
// it gains from a second core's loads well below kParallelWork.
inline constexpr double kParallelDecodeWork = 2.5e6;

// Multiply-adds of a call: the pairs the position masks leave (padding and the other masks
// counted as visible) times the multiply-adds of a pair, the two products (the additive score
// pays a tanh, about 8 multiply-adds, per element of A).
inline double call_work(const AttentionProblem& p) {
  const double per_pair =
      static_cast<double>(p.v_dim) + (p.form == detail::ScoreForm::additive
                                          ? 8.0 * static_cast<double>(p.additive_dim)
                                          : static_cast<double>(p.k_dim));
  const double heads = static_cast<double>(p.batch * p.q_heads) * per_pair;
  const double all_pairs = static_cast<double>(p.q_len) * static_cast<double>(p.k_len);
  if (heads * all_pairs > 100.0 * kParallelWork) return heads * all_pairs;  // no need to count
  double pairs = 0;
  for (std::int64_t i = 0; i < p.q_len; ++i) {
    const detail::KeyInterval keys = p.positions.row(i, p.k_len);
    pairs += static_cast<double>(std::max<std::int64_t>(0, keys.last - keys.first));
  }
  return heads * pairs;
}

// Threads a kernel uses for this problem: the caller's choice (AttentionOptions::threads), else
// one below `threshold` multiply-adds and OpenMP's count (OMP_NUM_THREADS, or every core) above.
inline int worker_threads(const AttentionProblem& p, double threshold = kParallelWork) {
  if (p.threads > 0) return p.threads;
  return call_work(p) < threshold ? 1 : omp_get_max_threads();
}

// docs/contract.md §2 after the scaled product, in its order, on the scores of keys first_key …
// first_key + count − 1 of query row i of head h in batch b: soft cap, ALiBi, float bias, then
// the score_mod. Only the options present cost anything.
template <class T>
void modify_scores(const AttentionProblem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                   std::int64_t first_key, std::int64_t count, T* scores) {
  if (p.softcap > 0) {
    const auto cap = static_cast<T>(p.softcap);
    for (std::int64_t t = 0; t < count; ++t) scores[t] = cap * std::tanh(scores[t] / cap);
  }
  if (p.alibi_slopes.present) {
    const auto slope = static_cast<T>(p.alibi_slopes.load(b, h));
    const std::int64_t diagonal_j = i + p.diagonal();
    for (std::int64_t t = 0; t < count; ++t) {
      scores[t] -= slope * static_cast<T>(std::llabs(diagonal_j - (first_key + t)));
    }
  }
  if (p.bias.present) {
    // In the kernels' own dtype since make_problem (float32, or float64 for float64 problems).
    constexpr DType kStored = std::is_same_v<T, double> ? DType::float64 : DType::float32;
    if (p.bias.dtype == kStored) {
      const T* bias = p.bias.pointer<T>(b, h, i, first_key);
      const std::int64_t stride = p.bias.strides[3];
      for (std::int64_t t = 0; t < count; ++t) scores[t] += bias[t * stride];
    } else {  // the naive float32 evaluation of a float64 problem (tests' error floor)
      for (std::int64_t t = 0; t < count; ++t)
        scores[t] += static_cast<T>(p.bias.load(b, h, i, first_key + t));
    }
  }
  if (p.score_mod != nullptr)
    p.score_mod->forward(p.score_mod_row(b, h, i, first_key, count), scores);
}

// Everything after the scaled product: the modifications, then the masks' element tests (hidden
// keys get -inf: core/visibility.hpp).
template <class T>
void apply_score_options(const AttentionProblem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                         std::int64_t first_key, std::int64_t count, T* scores) {
  modify_scores(p, b, h, i, first_key, count, scores);
  detail::hide_masked_keys(p, b, h, i, first_key, count, scores);
}

// A [B, N, H, D] operand with unit stride along D, in the compute type T: the caller's storage
// when it already is (a KV cache's rows found through its RowMap), else a dense copy.
template <class T>
struct RowMajorOperand {
  const T* data = nullptr;
  std::int64_t stride_b = 0, stride_n = 0, stride_h = 0;
  const detail::RowMap* rows = nullptr;
  std::vector<T> storage;

  const T* row(std::int64_t b, std::int64_t n, std::int64_t h) const {
    const std::int64_t leading =
        rows != nullptr ? rows->offset(b, n, stride_b, stride_n) : b * stride_b + n * stride_n;
    return data + leading + h * stride_h;
  }
};

// A value in the element type T of a packed operand (std::uint16_t holds bfloat16, or float16
// when the input was float16).
template <class T>
T StoredAs(double value, [[maybe_unused]] DType input_dtype) {
  if constexpr (std::is_same_v<T, std::uint16_t>) {
    return input_dtype == DType::float16 ? to_float16(static_cast<float>(value))
                                         : to_bfloat16(static_cast<float>(value));
  } else {
    return static_cast<T>(value);
  }
}

// An int8 KV cache's operand as it lies (the door checked unit stride along D), with its scales:
// a RowMajorOperand<float> whose row(b, n, h) points at the scale of row (b, n, h).
inline void adopt_int8(RowMajorOperand<std::int8_t>& operand, RowMajorOperand<float>& scales,
                       const StridedInput& input) {
  operand.data = reinterpret_cast<const std::int8_t*>(input.data);
  operand.stride_b = input.strides[0];
  operand.stride_n = input.strides[1];
  operand.stride_h = input.strides[2];
  operand.rows = input.rows;
  scales.data = input.scales;
  scales.stride_b = input.scale_strides[0];
  scales.stride_n = input.scale_strides[1];
  scales.stride_h = input.scale_strides[2];
  scales.rows = input.rows;
}

// T = std::uint16_t keeps bfloat16 or float16 as it comes (the operand's caller knows which).
template <class T>
void adopt_or_pack(RowMajorOperand<T>& operand, const StridedInput& input, std::int64_t batch,
                   std::int64_t length, std::int64_t heads, std::int64_t dim) {
  constexpr bool kHalf = std::is_same_v<T, std::uint16_t>;
  constexpr DType kStorageType = std::is_same_v<T, float>    ? DType::float32
                                 : std::is_same_v<T, double> ? DType::float64
                                                             : DType::bfloat16;
  const bool stored_alike = input.dtype == kStorageType || (kHalf && input.dtype == DType::float16);
  if (input.strides[3] == 1 && stored_alike) {
    operand.data = reinterpret_cast<const T*>(input.data);  // rows, if any, found by row()
    operand.stride_b = input.strides[0];
    operand.stride_n = input.strides[1];
    operand.stride_h = input.strides[2];
    operand.rows = input.rows;
    return;
  }
  operand.storage.resize(static_cast<std::size_t>(batch * length * heads * dim));
  operand.stride_h = dim;
  operand.stride_n = heads * dim;
  operand.stride_b = length * heads * dim;
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t n = 0; n < length; ++n) {
      for (std::int64_t h = 0; h < heads; ++h) {
        T* row = operand.storage.data() + b * operand.stride_b + n * operand.stride_n +
                 h * operand.stride_h;
        if constexpr (kHalf) {
          for (std::int64_t d = 0; d < dim; ++d)
            row[d] = StoredAs<T>(input.load(b, n, h, d), input.dtype);
        } else {  // float or double: a row at a time
          input.load_row(row, dim, b, n, h);
        }
      }
    }
  }
  operand.data = operand.storage.data();
}

}  // namespace qkv::kernels
