// Attention sinks: a sink is a softmax column with a logit and no value. Checked against exactly
// that — one more key whose score is the sink (a zero key, a bias column holding the sink) and
// whose value is zero — on every kernel (fused, split-KV decode, float64, bfloat16); and in blocks
// of a larger problem, where the block holding key 0 joins the sink and merging counts it once.
// (The zoos check sinks against the float64 reference with every score, mask and option.)

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "attention_case.hpp"
#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/merge.hpp"

namespace qkv::testing {
namespace {

struct Problem {
  std::int64_t batch, q_len, k_len, q_heads, kv_heads, dim;
};

Tensor converted(const Tensor& t, DType dtype) {
  Tensor out(dtype, t.shape());
  for (std::int64_t n = 0; n < t.numel(); ++n) {
    const double value = t.data<float>()[n];
    if (dtype == DType::float64) out.data<double>()[n] = value;
    if (dtype == DType::float32) out.data<float>()[n] = static_cast<float>(value);
    if (dtype == DType::bfloat16)
      out.data<std::uint16_t>()[n] = to_bfloat16(static_cast<float>(value));
  }
  return out;
}

// O and LSE (float64) of a call on dtype inputs.
std::pair<Tensor, Tensor> run(const Problem& s, const Tensor& q, const Tensor& k, const Tensor& v,
                              const AttentionOptions& options) {
  Tensor out(DType::float64, {s.batch, s.q_len, s.q_heads, s.dim});
  Tensor lse(DType::float64, {s.batch, s.q_heads, s.q_len});
  attention_forward(q.view(), k.view(), v.view(), options,
                    {out.mutable_view(), lse.mutable_view(), {}});
  return {std::move(out), std::move(lse)};
}

// With sinks over Nk keys, and without them over Nk + 1 keys, the last a zero key and value
// whose score is made the sink by a bias column.
void expect_sink_is_a_valueless_column(const Problem& s, DType dtype, double tolerance) {
  const Tensor q = random_float32({s.batch, s.q_len, s.q_heads, s.dim}, 1);
  const Tensor k = random_float32({s.batch, s.k_len, s.kv_heads, s.dim}, 2);
  const Tensor v = random_float32({s.batch, s.k_len, s.kv_heads, s.dim}, 3);
  Tensor sinks(DType::float32, {s.q_heads});
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    sinks.data<float>()[h] = -4.0f + 3.0f * static_cast<float>(h);  // up to far above the scores
  Tensor k_more(DType::float32, {s.batch, s.k_len + 1, s.kv_heads, s.dim});
  Tensor v_more(DType::float32, {s.batch, s.k_len + 1, s.kv_heads, s.dim});
  std::memset(k_more.raw(), 0, k_more.nbytes());
  std::memset(v_more.raw(), 0, v_more.nbytes());
  const std::int64_t row = s.kv_heads * s.dim;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    std::memcpy(k_more.data<float>() + b * (s.k_len + 1) * row, k.data<float>() + b * s.k_len * row,
                static_cast<std::size_t>(s.k_len * row) * sizeof(float));
    std::memcpy(v_more.data<float>() + b * (s.k_len + 1) * row, v.data<float>() + b * s.k_len * row,
                static_cast<std::size_t>(s.k_len * row) * sizeof(float));
  }
  Tensor bias(DType::float32, {1, s.q_heads, 1, s.k_len + 1});
  std::memset(bias.raw(), 0, bias.nbytes());
  for (std::int64_t h = 0; h < s.q_heads; ++h)
    bias.data<float>()[h * (s.k_len + 1) + s.k_len] = sinks.data<float>()[h];

  AttentionOptions with_sinks;
  with_sinks.score = Score::dot;
  with_sinks.scale = 0.3;
  with_sinks.sinks = sinks.view();
  AttentionOptions with_column = with_sinks;
  with_column.sinks.reset();
  with_column.bias = bias.view();
  const Tensor qd = converted(q, dtype), kd = converted(k, dtype), vd = converted(v, dtype);
  const auto [out, lse] = run(s, qd, kd, vd, with_sinks);
  const auto [column_out, column_lse] =
      run(s, qd, converted(k_more, dtype), converted(v_more, dtype), with_column);
  EXPECT_LE(max_abs_difference(out, column_out), tolerance) << dtype_name(dtype);
  EXPECT_LE(max_abs_difference(lse, column_lse), tolerance * (1 + max_abs(lse)))
      << dtype_name(dtype);
}

TEST(Sinks, AreAColumnWithNoValueOnEveryKernel) {
  for (DType dtype : {DType::float32, DType::bfloat16, DType::float64}) {
    const double tolerance = dtype == DType::float64   ? 1e-12
                             : dtype == DType::float32 ? 2e-6
                                                       : 2e-2;
    expect_sink_is_a_valueless_column({2, 37, 70, 4, 2, 16}, dtype, tolerance);   // fused
    expect_sink_is_a_valueless_column({2, 1, 3000, 4, 1, 32}, dtype, tolerance);  // split-KV
  }
}

// Keys split in two blocks (key_offset), each call given the sinks, merged: the result of the
// whole call. Only the block holding key 0 joins them; the sinks' gradient likewise.
TEST(Sinks, JoinOnceWhenBlocksAreMerged) {
  // Two sequences: with one, 20 rows per key/value head would be decode-shaped
  // (decode_attention_supports), and the whole call's backward would re-derive LSE and Δ, which
  // a block of keys cannot; the gradients below are compared bit for bit.
  const Problem s{2, 20, 50, 2, 2, 8};
  const Tensor q = random_float32({s.batch, s.q_len, s.q_heads, s.dim}, 4);
  const Tensor k = random_float32({s.batch, s.k_len, s.kv_heads, s.dim}, 5);
  const Tensor v = random_float32({s.batch, s.k_len, s.kv_heads, s.dim}, 6);
  Tensor sinks(DType::float32, {s.q_heads});
  sinks.data<float>()[0] = 1.5f;
  sinks.data<float>()[1] = -0.5f;
  AttentionOptions options;
  options.sinks = sinks.view();
  options.causal = true;
  const auto [whole_out, whole_lse] = run(s, q, k, v, options);
  std::vector<Tensor> outs, lses;
  for (auto [first, last] : {std::pair<std::int64_t, std::int64_t>{0, 30}, {30, 50}}) {
    AttentionOptions block = options;
    block.key_offset = first;
    block.key_total = s.k_len;
    Problem part = s;
    part.k_len = last - first;
    auto [out, lse] = run(part, q, to_tensor(k.view().narrow(1, first, last)),
                          to_tensor(v.view().narrow(1, first, last)), block);
    outs.push_back(std::move(out));
    lses.push_back(std::move(lse));
  }
  Tensor merged_out(DType::float64, whole_out.shape()),
      merged_lse(DType::float64, whole_lse.shape());
  const TensorView out_views[] = {outs[0].view(), outs[1].view()};
  const TensorView lse_views[] = {lses[0].view(), lses[1].view()};
  merge_attention(out_views, lse_views, merged_out.mutable_view(), merged_lse.mutable_view());
  EXPECT_LE(max_abs_difference(merged_out, whole_out), 1e-6);
  EXPECT_LE(max_abs_difference(merged_lse, whole_lse), 1e-6);

  // The sinks' gradient of the whole call is the first block's; the second block's is 0.
  const Tensor dout = random_float32({s.batch, s.q_len, s.q_heads, s.dim}, 7);
  Tensor dsinks(DType::float64, {s.q_heads});
  AttentionGradients whole;
  whole.dsinks = dsinks.mutable_view();
  attention_backward(q.view(), k.view(), v.view(), options, dout.view(), std::nullopt, whole,
                     SavedForward{whole_out.view(), whole_lse.view()});
  for (auto [first, last] : {std::pair<std::int64_t, std::int64_t>{0, 30}, {30, 50}}) {
    AttentionOptions block = options;
    block.key_offset = first;
    block.key_total = s.k_len;
    Tensor part(DType::float64, {s.q_heads});
    AttentionGradients gradients;
    gradients.dsinks = part.mutable_view();
    attention_backward(q.view(), k.view().narrow(1, first, last), v.view().narrow(1, first, last),
                       block, dout.view(), std::nullopt, gradients,
                       SavedForward{whole_out.view(), whole_lse.view()});
    for (std::int64_t h = 0; h < s.q_heads; ++h) {
      EXPECT_EQ(part.data<double>()[h], first == 0 ? dsinks.data<double>()[h] : 0.0);
    }
  }
  EXPECT_NE(dsinks.data<double>()[0], 0.0);
}

}  // namespace
}  // namespace qkv::testing
