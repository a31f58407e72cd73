#include "attention_case.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <random>

#include "core/problem.hpp"
#include "qkv/error.hpp"
#include "qkv/reference.hpp"
#include "qkv/simd.hpp"
#include "reference/naive_attention.hpp"

namespace qkv::testing {

std::string AttentionCase::name() const {
  std::string text = fmt::format("B{}_Nq{}_Nk{}_Hq{}_Hk{}_Dq{}_Dk{}_Dv{}_{}", batch, q_len, k_len,
                                 q_heads, kv_heads, q_dim, key_dim(), v_dim, score_name(score));
  if (score == Score::additive) text += fmt::format("_A{}", additive_dim);
  if (per_head_parameters) text += "_perhead";
  if (scale) text += "_scaled";
  if (softcap > 0) text += "_softcap";
  if (alibi) text += "_alibi";
  if (bias) text += "_bias";
  if (sinks) text += "_sinks";
  if (sigmoid) text += "_sigmoid";
  if (causal) text += causal_align == CausalAlign::bottom_right ? "_causalBR" : "_causalTL";
  if (prefix_length > 0) text += fmt::format("_prefix{}", prefix_length);
  if (block_mask == BlockMaskRule::documents) text += fmt::format("_documents{}", mask_block);
  if (block_mask == BlockMaskRule::strided) text += fmt::format("_strided{}", mask_block);
  if (block_mask == BlockMaskRule::head_windows) text += fmt::format("_headwindows{}", mask_block);
  if (score_mod == ScoreModRule::relative_bias) text += "_relbias";
  if (score_mod == ScoreModRule::capped_slopes) text += "_cappedslopes";
  if (window_left >= 0 || window_right >= 0) {
    text += fmt::format("_window{}x{}",
                        window_left < 0 ? std::string("inf") : std::to_string(window_left),
                        window_right < 0 ? std::string("inf") : std::to_string(window_right));
  }
  if (sink_tokens > 0) text += fmt::format("_sinktokens{}", sink_tokens);
  if (key_lengths) text += "_keylengths";
  if (key_starts) text += "_keystarts";
  if (mask) text += mask_runs ? "_maskruns" : "_mask";
  if (head_major) text += "_BHND";
  if (spaced_last_dim) text += "_spaced";
  return text;
}

Tensor random_float32(std::vector<std::int64_t> shape, std::uint64_t seed) {
  Tensor t(DType::float32, std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (std::int64_t n = 0; n < t.numel(); ++n) t.data<float>()[n] = normal(rng);
  return t;
}

bool block_mask_rule_visible(BlockMaskRule rule, std::int64_t b, std::int64_t h, std::int64_t q_idx,
                             std::int64_t kv_idx) {
  switch (rule) {
    case BlockMaskRule::none:
      return true;
    case BlockMaskRule::documents: {
      const std::int64_t length = 11 + 5 * b;
      return q_idx / length == kv_idx / length;
    }
    case BlockMaskRule::strided:
      return (kv_idx / 16 + h) % 3 != 0 && (q_idx + kv_idx) % 5 != 0;
    case BlockMaskRule::head_windows:  // a causal window per head: each row one run
      return kv_idx <= q_idx && q_idx - kv_idx <= 2 + 3 * h;
  }
  return true;
}

void PrintTo(const AttentionCase& c, std::ostream* os) {
  *os << c.name();
}

namespace {

void fill_normal(Tensor& t, std::mt19937_64& rng, double stddev) {
  std::normal_distribution<double> normal(0.0, stddev);
  for (std::int64_t i = 0; i < t.numel(); ++i) {
    if (t.dtype() == DType::float32) {
      t.data<float>()[i] = static_cast<float>(normal(rng));
    } else if (t.dtype() == DType::bfloat16) {
      t.data<std::uint16_t>()[i] = to_bfloat16(static_cast<float>(normal(rng)));
    } else if (t.dtype() == DType::float16) {
      t.data<std::uint16_t>()[i] = to_float16(static_cast<float>(normal(rng)));
    } else {
      t.data<double>()[i] = normal(rng);
    }
  }
}

// A [B, N, H, D] operand stored in the layout the case asks for; returns its logical view.
TensorView sequence_operand(const AttentionCase& c, Tensor& storage, DType dtype, std::int64_t n,
                            std::int64_t h, std::int64_t d, std::mt19937_64& rng, double stddev) {
  const std::int64_t spacing = c.spaced_last_dim ? 2 : 1;
  if (c.head_major) {
    storage = Tensor(dtype, {c.batch, h, n, d * spacing});
  } else {
    storage = Tensor(dtype, {c.batch, n, h, d * spacing});
  }
  fill_normal(storage, rng, stddev);
  TensorView view = TensorView::contiguous(storage.raw(), dtype, {c.batch, n, h, d});
  const std::int64_t sd = spacing;
  if (c.head_major) {
    view.strides = {h * n * d * sd, d * sd, n * d * sd, sd};
  } else {
    view.strides = {n * h * d * sd, h * d * sd, d * sd, sd};
  }
  return view;
}

}  // namespace

AttentionInputs make_inputs(const AttentionCase& c, DType dtype) {
  AttentionInputs in;
  std::mt19937_64 rng(c.seed);
  in.q = sequence_operand(c, in.q_storage, dtype, c.q_len, c.q_heads, c.q_dim, rng, c.input_scale);
  in.k = sequence_operand(c, in.k_storage, dtype, c.k_len, c.kv_heads, c.key_dim(), rng,
                          c.input_scale);
  in.v = sequence_operand(c, in.v_storage, dtype, c.k_len, c.kv_heads, c.v_dim, rng, 1.0);
  AttentionOptions& o = in.options;
  o.score = c.score;
  o.scale = c.scale;
  o.softcap = c.softcap;
  o.causal = c.causal;
  o.causal_align = c.causal_align;
  o.prefix_length = c.prefix_length;
  o.window_left = c.window_left;
  o.sink_tokens = c.sink_tokens;
  o.window_right = c.window_right;
  if (c.block_mask != BlockMaskRule::none) {
    const BlockMaskRule rule = c.block_mask;
    BlockMaskShape shape{
        rule == BlockMaskRule::documents ? c.batch : 1,
        rule == BlockMaskRule::strided || rule == BlockMaskRule::head_windows ? c.q_heads : 1,
        c.q_len,
        c.k_len,
        c.mask_block,
        c.mask_block};
    in.block_mask = std::make_shared<BlockMask>(BlockMask::from_mask_mod(
        [rule](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
          return block_mask_rule_visible(rule, b, h, i, j);
        },
        shape));
    o.block_mask = in.block_mask.get();
  }
  if (c.score_mod != ScoreModRule::none) {
    const bool table = c.score_mod == ScoreModRule::relative_bias;
    const DType values_dtype = dtype == DType::float64 ? DType::float64 : DType::float32;
    in.score_values = table ? Tensor(values_dtype, {c.q_heads, c.q_len + c.k_len - 1})
                            : Tensor(values_dtype, {c.q_heads});
    fill_normal(in.score_values, rng, table ? 1.0 : 0.5);
    in.score_parameter = std::make_shared<ScoreParameter>(in.score_values.view());
    const std::int64_t offset = c.k_len - 1;
    if (table) {
      in.score_mod = std::make_shared<ScoreMod>(
          [parameter = in.score_parameter, offset](Dual s, std::int64_t, std::int64_t h,
                                                   std::int64_t q, std::int64_t kv) {
            return s + (*parameter)(h, q - kv + offset);
          },
          std::vector<const ScoreParameter*>{in.score_parameter.get()});
    } else {
      in.score_mod = std::make_shared<ScoreMod>(
          [parameter = in.score_parameter](Dual s, std::int64_t, std::int64_t h, std::int64_t q,
                                           std::int64_t kv) {
            const auto distance = static_cast<double>(q > kv ? q - kv : kv - q);
            return 6.0 * qkv::tanh(s / 6.0) - (*parameter)(h) * (distance / 8.0);
          },
          std::vector<const ScoreParameter*>{in.score_parameter.get()});
    }
    o.score_mod = in.score_mod.get();
  }
  auto with_heads = [&](std::vector<std::int64_t> shape) {
    if (c.per_head_parameters) shape.insert(shape.begin(), c.q_heads);
    return shape;
  };
  if (c.score == Score::bilinear) {
    in.w = Tensor(DType::float32, with_heads({c.q_dim, c.key_dim()}));
    fill_normal(in.w, rng, 1.0 / std::sqrt(static_cast<double>(c.q_dim)));
    o.w = in.w.view();
  }
  if (c.score == Score::additive) {
    in.wq = Tensor(DType::float32, with_heads({c.additive_dim, c.q_dim}));
    in.wk = Tensor(DType::float32, with_heads({c.additive_dim, c.key_dim()}));
    in.va = Tensor(DType::float32, with_heads({c.additive_dim}));
    fill_normal(in.wq, rng, 1.0 / std::sqrt(static_cast<double>(c.q_dim)));
    fill_normal(in.wk, rng, 1.0 / std::sqrt(static_cast<double>(c.key_dim())));
    fill_normal(in.va, rng, 1.0);
    o.wq = in.wq.view();
    o.wk = in.wk.view();
    o.va = in.va.view();
  }
  if (c.score == Score::cosine) {  // temperatures between 2 and 6, so that the scores matter
    in.temperature = Tensor(DType::float32, {c.per_head_parameters ? c.q_heads : 1});
    for (std::int64_t h = 0; h < in.temperature.numel(); ++h)
      in.temperature.data<float>()[h] = 2.0f + static_cast<float>((3 * h + 1) % 5);
    o.temperature = in.temperature.view();
  }
  if (c.alibi) {
    in.alibi_slopes = Tensor(DType::float32, {c.q_heads});
    for (std::int64_t h = 0; h < c.q_heads; ++h) {
      in.alibi_slopes.data<float>()[h] =
          std::pow(2.0f, -8.0f * static_cast<float>(h + 1) / static_cast<float>(c.q_heads));
    }
    o.alibi_slopes = in.alibi_slopes.view();
  }
  if (c.sigmoid) o.normalization = Normalization::sigmoid;
  if (c.sinks) {
    in.sinks = Tensor(DType::float32, {c.q_heads});
    for (std::int64_t h = 0; h < c.q_heads; ++h)
      in.sinks.data<float>()[h] = -1.5f + 1.1f * static_cast<float>(h);
    o.sinks = in.sinks.view();
  }
  if (c.bias) {
    in.bias = Tensor(DType::float32, {c.batch, 1, c.q_len, c.k_len});
    fill_normal(in.bias, rng, 1.0);
    o.bias = in.bias.view();
  }
  if (c.mask) {
    in.mask = Tensor(DType::boolean, {1, c.q_heads, c.q_len, c.k_len});
    std::bernoulli_distribution keep(0.7);
    auto* bits = in.mask.data<bool>();
    for (std::int64_t i = 0; i < in.mask.numel(); ++i) bits[i] = keep(rng);
    if (c.mask_runs) {  // row r: keys [first, last), one run (a row of one key, a full row)
      std::uniform_int_distribution<std::int64_t> key(0, c.k_len);
      for (std::int64_t r = 0; r < c.q_heads * c.q_len; ++r) {
        std::int64_t first = key(rng), last = key(rng);
        if (first > last) std::swap(first, last);
        if (r % 7 == 3) last = std::min(first + 1, c.k_len);
        if (r == 1) first = 0, last = c.k_len;
        for (std::int64_t j = 0; j < c.k_len; ++j) bits[r * c.k_len + j] = first <= j && j < last;
      }
    }
    if (c.q_len > 1) {  // one row of head 0 sees nothing
      for (std::int64_t j = 0; j < c.k_len; ++j) bits[(c.q_len / 2) * c.k_len + j] = false;
    }
    o.mask = in.mask.view();
  }
  if (c.key_lengths) {
    in.key_lengths = Tensor(DType::int64, {c.batch});
    for (std::int64_t b = 0; b < c.batch; ++b) {
      in.key_lengths.data<std::int64_t>()[b] = (b + 1) * c.k_len / (c.batch + 1);
    }
    in.key_lengths.data<std::int64_t>()[0] = c.batch > 1 ? 0 : c.k_len / 2;
    o.key_lengths = in.key_lengths.view();
  }
  if (c.key_starts) {
    in.key_starts = Tensor(DType::int32, {c.batch});
    for (std::int64_t b = 0; b < c.batch; ++b) {
      in.key_starts.data<std::int32_t>()[b] =
          static_cast<std::int32_t>(b * c.k_len / (2 * c.batch));
    }
    if (c.batch > 2)
      in.key_starts.data<std::int32_t>()[c.batch - 1] = static_cast<std::int32_t>(c.k_len);
    o.key_starts = in.key_starts.view();
  }
  return in;
}

AttentionOutputs AttentionResults::outputs(bool with_weights) {
  AttentionOutputs outputs;
  outputs.out = out.mutable_view();
  outputs.lse = lse.mutable_view();
  if (with_weights) outputs.weights = weights.mutable_view();
  return outputs;
}

AttentionResults allocate_results(const AttentionCase& c, DType dtype) {
  AttentionResults r;
  r.out = Tensor(dtype, {c.batch, c.q_len, c.q_heads, c.v_dim});
  r.lse = Tensor(dtype, {c.batch, c.q_heads, c.q_len});
  r.weights = Tensor(dtype, {c.batch, c.q_heads, c.q_len, c.k_len});
  return r;
}

AttentionResults evaluate(const AttentionCase& c, const AttentionInputs& in, Evaluator evaluator,
                          DType result_dtype, bool with_weights) {
  AttentionResults r = allocate_results(c, result_dtype);
  const AttentionOutputs outputs = r.outputs(with_weights);
  switch (evaluator) {
    case Evaluator::fast:
      attention_forward(in.q, in.k, in.v, in.options, outputs);
      break;
    case Evaluator::reference:
      attention_reference(in.q, in.k, in.v, in.options, outputs);
      break;
    case Evaluator::naive_float32:
      detail::naive_attention<float>(detail::make_problem(in.q, in.k, in.v, in.options, outputs));
      break;
    case Evaluator::naive_bfloat16:
      detail::naive_attention_bfloat16(detail::make_problem(in.q, in.k, in.v, in.options, outputs));
      break;
  }
  return r;
}

double element(const Tensor& t, std::int64_t i) {
  switch (t.dtype()) {
    case DType::float32:
      return t.data<float>()[i];
    case DType::float64:
      return t.data<double>()[i];
    case DType::boolean:
      return t.data<bool>()[i] ? 1.0 : 0.0;
    case DType::int32:
      return t.data<std::int32_t>()[i];
    case DType::int64:
      return static_cast<double>(t.data<std::int64_t>()[i]);
    case DType::bfloat16:
      return from_bfloat16(t.data<std::uint16_t>()[i]);
    case DType::float16:
      return from_float16(t.data<std::uint16_t>()[i]);
    case DType::int8:
      return t.data<std::int8_t>()[i];
  }
  return 0.0;
}

double max_abs_difference(const Tensor& a, const Tensor& b) {
  double worst = 0.0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double x = element(a, i), y = element(b, i);
    if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::infinity();
    if (x == y) continue;  // also equal infinities
    worst = std::max(worst, std::abs(x - y));
  }
  return worst;
}

double max_abs(const Tensor& a) {
  double largest = 0.0;
  for (std::int64_t i = 0; i < a.numel(); ++i) {
    const double x = element(a, i);
    if (std::isfinite(x)) largest = std::max(largest, std::abs(x));
  }
  return largest;
}

double dot_float32(const Tensor& a, const Tensor& b) {
  double sum = 0.0;
  for (std::int64_t n = 0; n < a.numel(); ++n)
    sum += double{a.data<float>()[n]} * b.data<float>()[n];
  return sum;
}

double central_difference(float& value, float step, const std::function<double()>& loss) {
  const float saved = value;
  value = saved + step;
  const double up = loss();
  value = saved - step;
  const double down = loss();
  value = saved;
  return (up - down) / (2.0 * static_cast<double>(step));
}

std::vector<std::string> simd_targets_under_test() {
  std::vector<std::string> targets = simd_targets();
  const char* wanted = std::getenv("QKV_TEST_SIMD_TARGETS");
  if (wanted == nullptr) return targets;
  const std::string list = std::string(",") + wanted + ",";
  std::erase_if(targets, [&](const std::string& target) {
    return list.find("," + target + ",") == std::string::npos;
  });
  if (targets.empty()) {
    throw Error(fmt::format("QKV_TEST_SIMD_TARGETS: expected some of {}, got '{}'",
                            fmt::join(simd_targets(), ", "), wanted));
  }
  return targets;
}

}  // namespace qkv::testing
