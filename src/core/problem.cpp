#include "core/problem.hpp"

#include "core/backward_arguments.hpp"
#include "core/score_unit.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>

#include "qkv/error.hpp"

namespace qkv::detail {

double StridedInput::load(std::int64_t i0, std::int64_t i1, std::int64_t i2,
                          std::int64_t i3) const {
  const std::int64_t at = offset(i0, i1, i2, i3);
  switch (dtype) {
    case DType::float32:
      return reinterpret_cast<const float*>(data)[at];
    case DType::float64:
      return reinterpret_cast<const double*>(data)[at];
    case DType::boolean:
      return data[at] != std::byte{0} ? 1.0 : 0.0;
    case DType::int32:
      return reinterpret_cast<const std::int32_t*>(data)[at];
    case DType::int64:
      return static_cast<double>(reinterpret_cast<const std::int64_t*>(data)[at]);
    case DType::bfloat16:
      return from_bfloat16(reinterpret_cast<const std::uint16_t*>(data)[at]);
    case DType::float16:
      return from_float16(reinterpret_cast<const std::uint16_t*>(data)[at]);
    case DType::int8: {
      const double quantized = static_cast<const std::int8_t*>(static_cast<const void*>(data))[at];
      return scales == nullptr ? quantized : quantized * double{scale(i0, i1, i2)};
    }
  }
  return 0.0;
}

void StridedOutput::store(double value, std::int64_t i0, std::int64_t i1, std::int64_t i2,
                          std::int64_t i3) const {
  const std::int64_t at = offset(i0, i1, i2, i3);
  if (dtype == DType::float32) {
    reinterpret_cast<float*>(data)[at] = static_cast<float>(value);
  } else if (dtype == DType::bfloat16) {
    reinterpret_cast<std::uint16_t*>(data)[at] = to_bfloat16(static_cast<float>(value));
  } else if (dtype == DType::float16) {
    reinterpret_cast<std::uint16_t*>(data)[at] = to_float16(static_cast<float>(value));
  } else {
    reinterpret_cast<double*>(data)[at] = value;
  }
}

StridedInput input_of(const TensorView& view) {
  StridedInput input;
  input.data = static_cast<const std::byte*>(view.data);
  input.dtype = view.dtype;
  input.present = true;
  for (int d = 0; d < view.rank; ++d) input.strides[d] = view.strides[d];
  return input;
}

StridedOutput output_of(const MutableTensorView& view) {
  StridedOutput output;
  output.data = static_cast<std::byte*>(view.data);
  output.dtype = view.dtype;
  output.present = true;
  for (int d = 0; d < view.rank; ++d) output.strides[d] = view.strides[d];
  return output;
}

void require_float_data(const TensorView& view, const std::string& name) {
  if (view.dtype != DType::float32 && view.dtype != DType::float64 &&
      view.dtype != DType::bfloat16 && view.dtype != DType::float16) {
    throw Error(fmt::format("{}: expected dtype float32, float64, bfloat16 or float16, got {}",
                            name, dtype_name(view.dtype)));
  }
  if (view.data == nullptr && view.numel() != 0) {
    throw Error(fmt::format("{}: expected data, got a null pointer", name));
  }
}

namespace {

using Shape = std::array<std::int64_t, 4>;

std::string dims(const TensorView& view) {
  return view.shape_string();
}

// Floating-point data of any width qkv reads: float32, float64, bfloat16, float16.
bool is_float(DType dtype) {
  return dtype == DType::float32 || dtype == DType::float64 || dtype == DType::bfloat16 ||
         dtype == DType::float16;
}

// Rejects views whose addressed span overflows int64 (a lying stride or size).
void check_extent(const TensorView& view, const char* name) {
  checked_numel(std::span<const std::int64_t>(view.shape.data(), view.rank), dtype_size(view.dtype),
                name);
  if (view.numel() == 0) return;
  constexpr auto kMax = std::numeric_limits<std::int64_t>::max() / 16;
  std::int64_t reach = 0;
  for (int d = 0; d < view.rank; ++d) {
    const std::int64_t stride = std::llabs(view.strides[d]);
    if (stride != 0 && view.shape[d] - 1 > (kMax - reach) / stride) {
      throw Error(
          fmt::format("{}: expected strides that address memory, got strides [{}]", name,
                      fmt::join(view.strides.begin(), view.strides.begin() + view.rank, ", ")));
    }
    reach += stride * (view.shape[d] - 1);
  }
}

}  // namespace

void require_view(const TensorView& view, const char* name) {
  if (view.rank < 0 || view.rank > kMaxRank) {
    throw Error(fmt::format("{}: expected rank <= {}, got rank {}", name, kMaxRank, view.rank));
  }
  if (view.data == nullptr && view.numel() != 0) {
    throw Error(fmt::format("{}: expected data for shape {}, got a null pointer", name,
                            view.shape_string()));
  }
  check_extent(view, name);
}

void require_float(const TensorView& view, const char* name) {
  if (!is_float(view.dtype)) {
    throw Error(fmt::format("{}: expected dtype float32, float64, bfloat16 or float16, got {}",
                            name, dtype_name(view.dtype)));
  }
}

// A parameter that is either shared (`shared_rank` dims matching `tail`) or per query head (one
// more leading dim of size Hq). Returned with a leading head index whose stride is 0 if shared.
StridedInput per_head_parameter(const TensorView& view, const char* name,
                                const std::array<std::int64_t, 4>& tail, int shared_rank,
                                std::int64_t q_heads, const std::string& expect) {
  require_view(view, name);
  require_float(view, name);
  const bool per_head = view.rank == shared_rank + 1;
  bool ok = view.rank == shared_rank || per_head;
  if (ok && per_head) ok = view.shape[0] == q_heads;
  for (int d = 0; ok && d < shared_rank; ++d) {
    ok = view.shape[d + (per_head ? 1 : 0)] == tail[d];
  }
  if (!ok) throw Error(fmt::format("{}: expected {}, got {}", name, expect, view.shape_string()));
  StridedInput input = input_of(view);
  if (!per_head) {
    for (int d = shared_rank; d > 0; --d) input.strides[d] = input.strides[d - 1];
    input.strides[0] = 0;
  }
  return input;
}

namespace {

// A [B, N, H, D] operand (q, k or v).
StridedInput sequence_operand(const TensorView& view, const char* name, const char* layout) {
  require_view(view, name);
  if (view.rank != 4) {
    throw Error(
        fmt::format("{}: expected rank 4 {}, got rank {} {}", name, layout, view.rank, dims(view)));
  }
  require_float(view, name);
  return input_of(view);
}

// A tensor broadcast (numpy rules, aligned right) to `target`.
StridedInput broadcast_operand(const TensorView& view, const char* name, const Shape& target) {
  require_view(view, name);
  const std::string expected =
      fmt::format("a shape broadcastable to [B, Hq, Nq, Nk] = [{}]", fmt::join(target, ", "));
  StridedInput input;
  input.data = static_cast<const std::byte*>(view.data);
  input.dtype = view.dtype;
  input.present = true;
  const int skip = 4 - view.rank;
  for (int d = 0; d < view.rank; ++d) {
    const std::int64_t extent = view.shape[d];
    if (extent == target[skip + d]) {
      input.strides[skip + d] = extent == 1 ? 0 : view.strides[d];
    } else if (extent == 1) {
      input.strides[skip + d] = 0;
    } else {
      throw Error(fmt::format("{}: expected {}, got {}", name, expected, dims(view)));
    }
  }
  return input;
}

}  // namespace

StridedOutput checked_output_of(const MutableTensorView& view, const char* name,
                                const std::array<std::int64_t, 4>& expected, int rank,
                                const char* layout) {
  const TensorView as_input = view.as_const();
  require_view(as_input, name);
  bool ok = view.rank == rank;
  for (int d = 0; ok && d < rank; ++d) ok = view.shape[d] == expected[d];
  if (!ok) {
    throw Error(fmt::format("{}: expected {} = [{}], got {}", name, layout,
                            fmt::join(expected.begin(), expected.begin() + rank, ", "),
                            dims(as_input)));
  }
  if (!is_float(view.dtype)) {
    throw Error(fmt::format("{}: expected dtype float32, float64, bfloat16 or float16, got {}",
                            name, dtype_name(view.dtype)));
  }
  StridedOutput output;
  output.data = static_cast<std::byte*>(view.data);
  output.dtype = view.dtype;
  output.present = true;
  for (int d = 0; d < rank; ++d) output.strides[d] = view.strides[d];
  return output;
}

namespace {

// A [B] vector of key positions in [0, Nk] (key_lengths, key_starts), int32 or int64.
StridedInput per_batch_positions(const std::optional<TensorView>& given, const char* name,
                                 std::int64_t batch, std::int64_t k_total) {
  if (!given) return {};
  const TensorView& positions = *given;
  require_view(positions, name);
  if (positions.dtype != DType::int32 && positions.dtype != DType::int64) {
    throw Error(fmt::format("{}: expected dtype int32 or int64, got {}", name,
                            dtype_name(positions.dtype)));
  }
  if (positions.rank != 1 || positions.shape[0] != batch) {
    throw Error(fmt::format("{}: expected [B] = [{}], got {}", name, batch, dims(positions)));
  }
  StridedInput input = input_of(positions);
  for (std::int64_t b = 0; b < batch; ++b) {
    const double position = input.load(b);
    if (position < 0 || position > static_cast<double>(k_total)) {
      throw Error(fmt::format("{}: expected values in [0, Nk = {}], got {} at [{}]", name, k_total,
                              position, b));
    }
  }
  return input;
}

// q, k, v: rank 4, one float dtype, sizes that agree (docs/contract.md §1).
void check_operands(const TensorView& q, const TensorView& k, const TensorView& v,
                    AttentionProblem& p) {
  p.q = sequence_operand(q, "q", "[B, Nq, Hq, Dq]");
  p.k = sequence_operand(k, "k", "[B, Nk, Hk, Dk]");
  p.v = sequence_operand(v, "v", "[B, Nk, Hk, Dv]");
  if (k.dtype != q.dtype || v.dtype != q.dtype) {
    throw Error(fmt::format("k, v: expected the dtype of q ({}), got k {} and v {}",
                            dtype_name(q.dtype), dtype_name(k.dtype), dtype_name(v.dtype)));
  }
  p.dtype = q.dtype;
  p.batch = q.shape[0];
  p.q_len = q.shape[1];
  p.q_heads = q.shape[2];
  p.q_dim = q.shape[3];
  p.k_len = k.shape[1];
  p.kv_heads = k.shape[2];
  p.k_dim = k.shape[3];
  p.v_dim = v.shape[3];
  if (k.shape[0] != p.batch) {
    throw Error(fmt::format("k: expected batch B = {} (from q), got {}", p.batch, k.shape[0]));
  }
  if (v.shape[0] != p.batch || v.shape[1] != p.k_len || v.shape[2] != p.kv_heads) {
    throw Error(fmt::format("v: expected [B, Nk, Hk, Dv] = [{}, {}, {}, Dv] (from q and k), got {}",
                            p.batch, p.k_len, p.kv_heads, dims(v)));
  }
  if (p.q_heads < 1 || p.kv_heads < 1) {
    throw Error(fmt::format("q, k: expected at least one head, got Hq = {}, Hk = {}", p.q_heads,
                            p.kv_heads));
  }
  if (p.q_heads % p.kv_heads != 0) {
    throw Error(
        fmt::format("k: expected Hk dividing Hq = {} (grouped-query attention), got Hk = {}",
                    p.q_heads, p.kv_heads));
  }
  p.group_size = p.q_heads / p.kv_heads;
  if (p.q_dim < 1 || p.k_dim < 1 || p.v_dim < 1) {
    throw Error(fmt::format("q, k, v: expected head dims >= 1, got Dq = {}, Dk = {}, Dv = {}",
                            p.q_dim, p.k_dim, p.v_dim));
  }
}

// The score (its unit), and what §2 applies after it: scale, soft cap, ALiBi, bias, score_mod;
// dropout; the boolean mask.
void check_score_options(const AttentionOptions& options, AttentionProblem& p) {
  // The score: its unit checks its parameters and knows its default scale and form.
  const ScoreUnit& unit = score_unit(options.score);
  p.score = options.score;
  unit.check(options, p);
  p.form = unit.operands(p).form;
  if (options.scale) {
    if (!std::isfinite(*options.scale)) {
      throw Error(fmt::format("scale: expected a finite number, got {}", *options.scale));
    }
    p.scale = *options.scale;
  } else {
    p.scale = unit.default_scale(p);
  }
  if (!(options.softcap >= 0.0) || !std::isfinite(options.softcap)) {
    throw Error(
        fmt::format("softcap: expected a finite number >= 0 (0 = off), got {}", options.softcap));
  }
  p.softcap = options.softcap;
  if (!(options.dropout >= 0.0 && options.dropout < 1.0)) {
    throw Error(fmt::format("dropout: expected a probability in [0, 1), got {}", options.dropout));
  }
  p.dropout = options.dropout;
  p.dropout_seed = options.dropout_seed;

  const Shape score_shape{p.batch, p.q_heads, p.q_len, p.k_len};
  if (options.alibi_slopes) {
    const TensorView& slopes = *options.alibi_slopes;
    require_view(slopes, "alibi_slopes");
    require_float(slopes, "alibi_slopes");
    const bool shared = slopes.rank == 1 && slopes.shape[0] == p.q_heads;
    const bool per_batch =
        slopes.rank == 2 && slopes.shape[0] == p.batch && slopes.shape[1] == p.q_heads;
    if (!shared && !per_batch) {
      throw Error(
          fmt::format("alibi_slopes: expected [Hq] = [{0}] or [B, Hq] = [{1}, {0}], got {2}",
                      p.q_heads, p.batch, dims(slopes)));
    }
    p.alibi_slopes = input_of(slopes);
    if (shared) p.alibi_slopes.strides = {0, slopes.strides[0], 0, 0};
  }
  if (options.sinks) {
    const TensorView& sinks = *options.sinks;
    require_view(sinks, "sinks");
    require_float(sinks, "sinks");
    if (sinks.rank != 1 || sinks.shape[0] != p.q_heads) {
      throw Error(fmt::format("sinks: expected [Hq] = [{}], got {}", p.q_heads, dims(sinks)));
    }
    if (options.key_offset == 0) p.sinks = input_of(sinks);  // the block holding key 0 joins it
  }
  if (options.bias) {
    const TensorView& bias = *options.bias;
    require_float(bias, "bias");
    p.bias = broadcast_operand(bias, "bias", score_shape);
    for (int d = 0; d < 4; ++d)
      p.bias_shape[d] = d < 4 - bias.rank ? 1 : bias.shape[d - (4 - bias.rank)];
    // Read by the kernels in their own dtype, converted once here when it is not.
    const DType kernel_dtype = p.dtype == DType::float64 ? DType::float64 : DType::float32;
    if (bias.dtype != kernel_dtype) {
      auto copy = std::make_shared<Tensor>(
          kernel_dtype,
          std::vector<std::int64_t>(bias.shape.begin(), bias.shape.begin() + bias.rank));
      StridedInput element = input_of(bias);
      element.strides = {1, 0, 0, 0};
      for (std::int64_t n = 0; n < copy->numel(); ++n) {
        const double value = element.load(offset_of(bias, n));
        if (kernel_dtype == DType::float64) {
          copy->data<double>()[n] = value;
        } else {
          copy->data<float>()[n] = static_cast<float>(value);
        }
      }
      p.bias = broadcast_operand(copy->view(), "bias", score_shape);
      p.bias_storage = std::move(copy);
    }
  }
  p.score_mod = options.score_mod;
  if (options.mask) {
    if (options.mask->dtype != DType::boolean) {
      throw Error(
          fmt::format("mask: expected dtype bool, got {}", dtype_name(options.mask->dtype)));
    }
    p.mask = broadcast_operand(*options.mask, "mask", score_shape);
    p.mask_runs = MaskRuns::read(p.mask.pointer<std::uint8_t>(0), p.mask.strides, score_shape);
  }
}

// This call's place in a larger problem, and the position masks and block mask of §3.
void check_positions(const AttentionOptions& options, AttentionProblem& p) {
  // Positions: this call as a block of a larger problem. Each total (0: this call's extent)
  // must hold the block at its offset.
  const auto resolve_total = [](std::int64_t offset, std::int64_t total, std::int64_t local,
                                const char* names, const char* extent) {
    const std::int64_t resolved = total > 0 ? total : local;
    if (total < 0 || offset < 0 || offset > resolved - local) {
      throw Error(
          fmt::format("{}: expected 0 <= offset <= total - {} with {} = {}, got offset {} "
                      "and total {}",
                      names, extent, extent, local, offset, total));
    }
    return resolved;
  };
  const std::int64_t q_total = resolve_total(options.query_offset, options.query_total, p.q_len,
                                             "query_offset, query_total", "Nq");
  const std::int64_t k_total =
      resolve_total(options.key_offset, options.key_total, p.k_len, "key_offset, key_total", "Nk");
  const std::int64_t head_total =
      resolve_total(options.query_head_offset, options.query_head_total, p.q_heads,
                    "query_head_offset, query_head_total", "Hq");
  p.head_offset = options.query_head_offset;
  p.head_total = head_total;
  p.query_offset = options.query_offset;
  p.query_total = q_total;
  p.key_total = k_total;
  p.positions.top_left_diagonal = options.query_offset - options.key_offset;
  p.positions.bottom_right_diagonal = k_total - q_total + p.positions.top_left_diagonal;
  p.key_offset = options.key_offset;
  p.key_lengths = per_batch_positions(options.key_lengths, "key_lengths", p.batch, k_total);
  p.key_starts = per_batch_positions(options.key_starts, "key_starts", p.batch, k_total);
  p.positions.causal = options.causal;
  p.positions.causal_align = options.causal_align;
  if (options.prefix_length != 0 && (!options.causal || options.prefix_length < 0)) {
    throw Error(
        fmt::format("prefix_length: expected 0, or a length >= 0 with causal (prefix LM), got {}{}",
                    options.prefix_length, options.causal ? "" : " without causal"));
  }
  p.positions.prefix_end = options.prefix_length - options.key_offset;
  if (options.window_left < -1 || options.window_right < -1) {
    throw Error(
        fmt::format("window: expected (left, right) each >= 0 or -1 (unbounded), got ({}, {})",
                    options.window_left, options.window_right));
  }
  p.positions.window_left = options.window_left;
  p.positions.window_right = options.window_right;
  if (options.sink_tokens != 0 && (options.window_left < 0 || options.sink_tokens < 0)) {
    throw Error(fmt::format(
        "sink_tokens: expected 0, or a count >= 0 with a window's left edge (window_left >= 0), "
        "got {}{}",
        options.sink_tokens, options.window_left < 0 ? " without one" : ""));
  }
  p.positions.sink_end = options.sink_tokens - options.key_offset;
  if (options.block_mask != nullptr) {
    const BlockMaskShape& shape = options.block_mask->shape();
    const bool batch_fits = shape.batch == 1 || shape.batch == p.batch;
    // Heads of the whole problem: a head-parallel call reads its heads at query_head_offset.
    const bool heads_fit = shape.heads == 1 || shape.heads == p.head_total;
    if (!batch_fits || !heads_fit || shape.q_len != q_total || shape.kv_len != k_total) {
      throw Error(fmt::format(
          "block_mask: expected [1 or B, 1 or Hq, Nq, Nk] = [1 or {}, 1 or {}, {}, {}], got "
          "[{}, {}, {}, {}]",
          p.batch, p.head_total, q_total, k_total, shape.batch, shape.heads, shape.q_len,
          shape.kv_len));
    }
    p.block_mask = options.block_mask;
  }
}

// Softmax or sigmoid (§4): the sigmoid's bias, −log(Nk) of the whole problem when unset. Sinks
// are a column of a softmax, and mean nothing to a sigmoid.
void check_normalization(const AttentionOptions& options, AttentionProblem& p) {
  if (options.normalization != Normalization::softmax &&
      options.normalization != Normalization::sigmoid) {
    throw Error(fmt::format("normalization: expected softmax or sigmoid, got the value {}",
                            static_cast<int>(options.normalization)));
  }
  p.sigmoid = options.normalization == Normalization::sigmoid;
  if (!p.sigmoid) {
    if (options.sigmoid_bias) {
      throw Error(fmt::format("sigmoid_bias: expected none with normalization 'softmax', got {}",
                              *options.sigmoid_bias));
    }
    return;
  }
  if (options.sinks) {
    throw Error(fmt::format(
        "sinks: expected none with normalization 'sigmoid' (a sink is a softmax column), got {}",
        dims(*options.sinks)));
  }
  const double bias = options.sigmoid_bias
                          ? *options.sigmoid_bias
                          : -std::log(static_cast<double>(std::max<std::int64_t>(p.key_total, 1)));
  if (!std::isfinite(bias)) {
    throw Error(fmt::format("sigmoid_bias: expected a finite number, got {}", bias));
  }
  p.sigmoid_bias = bias;
}

}  // namespace

AttentionProblem make_problem(const TensorView& q, const TensorView& k, const TensorView& v,
                              const AttentionOptions& options, const AttentionOutputs& outputs) {
  AttentionProblem p;
  check_operands(q, k, v, p);
  check_score_options(options, p);
  check_positions(options, p);
  check_normalization(options, p);
  if (options.threads < 0) {
    throw Error(fmt::format("threads: expected >= 0 (0 = default), got {}", options.threads));
  }
  p.threads = options.threads;

  // Results.
  p.out = checked_output_of(outputs.out, "out", {p.batch, p.q_len, p.q_heads, p.v_dim}, 4,
                            "[B, Nq, Hq, Dv]");
  if (outputs.lse) {
    p.lse =
        checked_output_of(*outputs.lse, "lse", {p.batch, p.q_heads, p.q_len, 0}, 3, "[B, Hq, Nq]");
  }
  if (outputs.weights) {
    p.weights =
        checked_output_of(*outputs.weights, "weights", Shape{p.batch, p.q_heads, p.q_len, p.k_len},
                          4, "[B, Hq, Nq, Nk]");
  }
  return p;
}

}  // namespace qkv::detail
