// The validated attention problem: every check happens once, in make_problem, and the kernels
// below it read this plain struct without re-checking (FlashAttention's flash_api habit).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "core/mask_runs.hpp"
#include "core/position_masks.hpp"
#include "core/row_map.hpp"
#include "qkv/attention.hpp"

namespace qkv::detail {

// An input read through four indices; a dimension that is broadcast or absent has stride 0.
struct StridedInput {
  const std::byte* data = nullptr;
  DType dtype = DType::float32;
  std::array<std::int64_t, 4> strides{};
  bool present = false;
  const RowMap* rows = nullptr;  // K and V of a KV cache: rows (i0, i1) gathered (core/row_map.hpp)
  // An int8 KV cache's float32 scales: element (i0, i1, i2, i3) stands for the int8 value times
  // scale(i0, i1, i2), one scale per row and head (qkv/kv_cache.hpp), found through `rows` too.
  const float* scales = nullptr;
  std::array<std::int64_t, 3> scale_strides{};

  std::int64_t offset(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
                      std::int64_t i3 = 0) const {
    const std::int64_t leading = rows != nullptr ? rows->offset(i0, i1, strides[0], strides[1])
                                                 : i0 * strides[0] + i1 * strides[1];
    return leading + i2 * strides[2] + i3 * strides[3];
  }
  float scale(std::int64_t i0, std::int64_t i1, std::int64_t i2) const {
    const std::int64_t leading = rows != nullptr
                                     ? rows->offset(i0, i1, scale_strides[0], scale_strides[1])
                                     : i0 * scale_strides[0] + i1 * scale_strides[1];
    return scales[leading + i2 * scale_strides[2]];
  }
  // The element widened to double (bool → 0/1, integers exactly when |x| < 2^53; int8 with
  // scales: times its scale).
  double load(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0, std::int64_t i3 = 0) const;
  template <class T>
  const T* pointer(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
                   std::int64_t i3 = 0) const {
    return reinterpret_cast<const T*>(data) + offset(i0, i1, i2, i3);
  }
  // row[d] = load(i0, i1, i2, d) for d < count (Real: float or double, the value rounded to it);
  // a float32, bfloat16 or float16 row with unit stride read as a row (through load's dtype
  // switch element by element, a decoding step's new rows took 7 of its 45 µs).
  template <class Real>
  void load_row(Real* row, std::int64_t count, std::int64_t i0, std::int64_t i1,
                std::int64_t i2) const {
    if (dtype == DType::float32 && strides[3] == 1) {
      const float* first = pointer<float>(i0, i1, i2);
      for (std::int64_t d = 0; d < count; ++d) row[d] = static_cast<Real>(first[d]);
    } else if (dtype == DType::bfloat16 && strides[3] == 1) {
      const std::uint16_t* first = pointer<std::uint16_t>(i0, i1, i2);
      for (std::int64_t d = 0; d < count; ++d) row[d] = static_cast<Real>(from_bfloat16(first[d]));
    } else if (dtype == DType::float16 && strides[3] == 1) {
      const std::uint16_t* first = pointer<std::uint16_t>(i0, i1, i2);
      for (std::int64_t d = 0; d < count; ++d) row[d] = static_cast<Real>(from_float16(first[d]));
    } else {
      for (std::int64_t d = 0; d < count; ++d) row[d] = static_cast<Real>(load(i0, i1, i2, d));
    }
  }
};

// An output written through (up to) four indices.
struct StridedOutput {
  std::byte* data = nullptr;
  DType dtype = DType::float32;
  std::array<std::int64_t, 4> strides{};
  bool present = false;

  std::int64_t offset(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
                      std::int64_t i3 = 0) const {
    return i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3];
  }
  // Rounds `value` to the output dtype (float32, float64, bfloat16 or float16) and stores it.
  void store(double value, std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
             std::int64_t i3 = 0) const;
  // store(row[d], i0, i1, i2, d) for d < count (Real: float or double); a float32, bfloat16 or
  // float16 row with unit stride written as a row (through store's dtype switch element by
  // element, the decode's merge took 70% of a small step).
  template <class Real>
  void store_row(const Real* row, std::int64_t count, std::int64_t i0, std::int64_t i1,
                 std::int64_t i2) const {
    if (strides[3] == 1 && dtype == DType::float32) {
      float* first = reinterpret_cast<float*>(data) + offset(i0, i1, i2);
      for (std::int64_t d = 0; d < count; ++d) first[d] = static_cast<float>(row[d]);
    } else if (strides[3] == 1 && (dtype == DType::bfloat16 || dtype == DType::float16)) {
      std::uint16_t* first = reinterpret_cast<std::uint16_t*>(data) + offset(i0, i1, i2);
      const auto round = dtype == DType::bfloat16 ? to_bfloat16 : to_float16;
      for (std::int64_t d = 0; d < count; ++d) first[d] = round(static_cast<float>(row[d]));
    } else {
      for (std::int64_t d = 0; d < count; ++d) store(row[d], i0, i1, i2, d);
    }
  }
};

// The two forms of score the kernels compute, over compared vectors q' and k'
// (core/score_unit.hpp):
//   dot: s = q'·k';  additive: s = Σ_a v[h, a]·tanh(q'_a + k'_a).
enum class ScoreForm { dot, additive };

struct AttentionProblem {
  // Sizes (docs/contract.md §1). additive_dim is A for the additive score, 0 otherwise.
  std::int64_t batch = 0, q_len = 0, k_len = 0, q_heads = 0, kv_heads = 0;
  std::int64_t q_dim = 0, k_dim = 0, v_dim = 0, additive_dim = 0;
  std::int64_t group_size = 1;  // Hq / Hk: query heads per key/value head

  Score score = Score::scaled_dot;
  ScoreForm form = ScoreForm::dot;  // of the score's unit
  double scale = 1.0;               // resolved: the caller's or the score's default
  double softcap = 0.0;             // 0 = off
  // Sigmoid attention: P = sigmoid(s + sigmoid_bias), no normalizer (AttentionOptions).
  bool sigmoid = false;
  double sigmoid_bias = 0.0;
  double dropout = 0.0;  // probability of zeroing a weight; 0 = off
  std::uint64_t dropout_seed = 0;
  // The global coordinates dropout hashes: local (h, i, j) is (h + head_offset, i + query_offset,
  // j + key_offset) of a [B, head_total, query_total, key_total] problem.
  std::int64_t head_offset = 0, head_total = 0, query_offset = 0, query_total = 0;
  std::int64_t key_total = 0;

  DType dtype = DType::float32;  // of q, k and v

  StridedInput q, k, v;       // (b, n, h, d)
  StridedInput w;             // bilinear (h, a, c): stride 0 on h when shared
  StridedInput wq, wk;        // additive (h, a, d)
  StridedInput va;            // additive (h, a)
  StridedInput temperature;   // cosine (h): stride 0 when shared
  StridedInput alibi_slopes;  // (b, h)
  // (h): joined to each row's softmax by this call (absent in blocks whose keys do not start at
  // key 0: the block holding key 0 joins it; see join_sink).
  StridedInput sinks;
  StridedInput bias;                           // (b, h, i, j), broadcast, in the kernels' dtype
  std::array<std::int64_t, 4> bias_shape{};    // its own extents, right-aligned (1 where absent)
  std::shared_ptr<const Tensor> bias_storage;  // its converted copy, when it was converted
  const ScoreMod* score_mod = nullptr;         // after the bias: global (b, h, q_idx, kv_idx)
  StridedInput mask;                           // (b, h, i, j), broadcast, bool
  // The mask's rows as intervals, when every row is one run (core/mask_runs.hpp); else null.
  std::shared_ptr<const MaskRuns> mask_runs;
  StridedInput key_lengths;  // (b), int32 or int64, each in [0, Nk]
  StridedInput key_starts;   // (b), int32 or int64, each in [0, Nk]

  // Causal (with its prefix), window: in local coordinates, with the diagonals that place this
  // call in a larger problem (AttentionOptions::query_offset …).
  PositionMasks positions;
  // The caller's block mask (global positions: query i + query_offset, key j + key_offset).
  const BlockMask* block_mask = nullptr;
  std::int64_t key_offset = 0;  // shifts key_lengths and the block mask's keys
  int threads = 0;

  StridedOutput out;      // (b, i, h, d)
  StridedOutput lse;      // (b, h, i)
  StridedOutput weights;  // (b, h, i, j)

  // Keys of batch b at or past this (local) index are padding.
  std::int64_t key_length(std::int64_t b) const {
    if (!key_lengths.present) return k_len;
    const auto global = static_cast<std::int64_t>(key_lengths.load(b));
    return global - key_offset < 0 ? 0
                                   : (global - key_offset > k_len ? k_len : global - key_offset);
  }
  // Keys of batch b before this (local) index are padding (left padding).
  std::int64_t key_start(std::int64_t b) const {
    if (!key_starts.present) return 0;
    const auto global = static_cast<std::int64_t>(key_starts.load(b));
    return global - key_offset < 0 ? 0
                                   : (global - key_offset > k_len ? k_len : global - key_offset);
  }
  // Key/value head read by query head h.
  std::int64_t kv_head(std::int64_t h) const { return h / group_size; }
  // The row of a score_mod call for keys first_key … first_key + count − 1 of query row i of
  // head h in batch b: the whole problem's positions and heads.
  ScoreMod::Row score_mod_row(std::int64_t b, std::int64_t h, std::int64_t i,
                              std::int64_t first_key, std::int64_t count) const {
    return {b, h + head_offset, i + query_offset, first_key + key_offset, count};
  }
  // The diagonal offset of bottom-right alignment: Nk − Nq for a whole problem.
  std::int64_t diagonal() const { return positions.bottom_right_diagonal; }
};

// A view read (written) through its own strides (up to four indices), unchecked.
StridedInput input_of(const TensorView& view);
StridedOutput output_of(const MutableTensorView& view);

// Throws qkv::Error naming `name` unless the view holds float32, float64, bfloat16 or float16 data
// (not a null pointer when it has elements).
void require_float_data(const TensorView& view, const std::string& name);

// The checks every door and score unit shares, each a qkv::Error naming `name`: a rank of at most
// 4, data behind the elements, strides that stay inside int64 (require_view); a float dtype
// (require_float).
void require_view(const TensorView& view, const char* name);
void require_float(const TensorView& view, const char* name);
// A score parameter that is either shared (`shared_rank` dims equal to tail[0 …]) or one per
// query head (a leading dim of Hq): read as (h, …) with stride 0 on h when shared. `expect` says
// both shapes for the message.
StridedInput per_head_parameter(const TensorView& view, const char* name,
                                const std::array<std::int64_t, 4>& tail, int shared_rank,
                                std::int64_t q_heads, const std::string& expect);

// An output view of `rank` dims whose shape is `expected` (its first `rank` entries) and whose
// dtype is float32, float64, bfloat16 or float16; qkv::Error naming `name`, the `layout` ("[B, Hq,
// Nq]") and what was given otherwise.
StridedOutput checked_output_of(const MutableTensorView& view, const char* name,
                                const std::array<std::int64_t, 4>& expected, int rank,
                                const char* layout);

// Checks every argument against the contract and resolves defaults. Throws qkv::Error naming the
// argument, the expectation and what was given.
AttentionProblem make_problem(const TensorView& q, const TensorView& k, const TensorView& v,
                              const AttentionOptions& options, const AttentionOutputs& outputs);

}  // namespace qkv::detail
