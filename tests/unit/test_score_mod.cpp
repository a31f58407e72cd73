// score_mod: dual numbers against finite differences; a learned relative bias table as a
// score_mod equals the same table spread into a dense bias (forward, and its gradient equals the
// bias gradient summed along the diagonals); a score_mod given as whole rows equals the same rule
// as a callable; refused arguments.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "attention_case.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/reference.hpp"
#include "qkv/score_mod.hpp"

namespace qkv::testing {
namespace {

using ::testing::HasSubstr;

TEST(Dual, DerivativesMatchFiniteDifferences) {
  const std::vector<std::pair<const char*, std::function<Dual(Dual)>>> functions{
      {"exp", [](Dual x) { return qkv::exp(x); }},
      {"log", [](Dual x) { return qkv::log(x); }},
      {"tanh", [](Dual x) { return qkv::tanh(x); }},
      {"sqrt", [](Dual x) { return qkv::sqrt(x); }},
      {"abs", [](Dual x) { return qkv::abs(x - 1.0); }},
      {"sigmoid", [](Dual x) { return qkv::sigmoid(x); }},
      {"quotient", [](Dual x) { return (x * x + 3.0) / (x + 2.0); }},
      {"difference", [](Dual x) { return 2.0 - x * 4.0 + (-x); }},
      {"min max", [](Dual x) { return qkv::min(x, 1.5) + qkv::max(x * x, 0.5); }},
  };
  for (const auto& [name, f] : functions) {
    for (double x : {0.3, 0.9, 1.7, 2.6}) {
      const Dual at = f(Dual(x, 1.0));
      const double h = 1e-6;
      const double numeric = (f(Dual(x + h)).value - f(Dual(x - h)).value) / (2 * h);
      EXPECT_NEAR(at.tangent, numeric, 1e-6 * (1 + std::abs(numeric))) << name << " at " << x;
      EXPECT_DOUBLE_EQ(at.value, f(Dual(x)).value) << name;
    }
  }
}

// A relative position table [Hq, Nq + Nk − 1] read by the score_mod, and the same table spread
// into a dense [1, Hq, Nq, Nk] bias: the same attention and, summed along each diagonal, the
// same gradient; dQ, dK and dV the same too. On the fused kernels (float32) and the reference.
TEST(ScoreMod, RelativeTableEqualsTheDenseBias) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 37;
  c.k_len = 70;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.causal = true;
  c.score_mod = ScoreModRule::relative_bias;
  const AttentionInputs by_mod = make_inputs(c, DType::float32);
  const Tensor& table = by_mod.score_values;
  Tensor dense(DType::float32, {1, c.q_heads, c.q_len, c.k_len});
  for (std::int64_t h = 0; h < c.q_heads; ++h)
    for (std::int64_t i = 0; i < c.q_len; ++i)
      for (std::int64_t j = 0; j < c.k_len; ++j)
        dense.data<float>()[(h * c.q_len + i) * c.k_len + j] =
            table.data<float>()[h * (c.q_len + c.k_len - 1) + i - j + c.k_len - 1];
  AttentionInputs by_bias = by_mod;
  by_bias.options.score_mod = nullptr;
  by_bias.options.bias = dense.view();

  for (Evaluator evaluator : {Evaluator::fast, Evaluator::reference}) {
    const AttentionResults a = evaluate(c, by_mod, evaluator, DType::float64, true);
    const AttentionResults b = evaluate(c, by_bias, evaluator, DType::float64, true);
    EXPECT_LE(max_abs_difference(a.out, b.out), 1e-6);
    EXPECT_LE(max_abs_difference(a.lse, b.lse), 1e-6);
  }
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 5);
  for (bool reference : {false, true}) {
    Tensor dq_mod(DType::float64, {c.batch, c.q_len, c.q_heads, c.q_dim}), dq_bias = dq_mod;
    Tensor dtable(DType::float64, table.shape()), dbias(DType::float64, dense.shape());
    AttentionGradients mod_gradients, bias_gradients;
    mod_gradients.dq = dq_mod.mutable_view();
    mod_gradients.dscore_mod = {dtable.mutable_view()};
    bias_gradients.dq = dq_bias.mutable_view();
    bias_gradients.dbias = dbias.mutable_view();
    const auto run =
        reference ? &attention_backward_reference
                  : [](const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& o, const TensorView& d,
                       const std::optional<TensorView>& dl,
                       const AttentionGradients& g) { attention_backward(q, k, v, o, d, dl, g); };
    run(by_mod.q, by_mod.k, by_mod.v, by_mod.options, dout.view(), std::nullopt, mod_gradients);
    run(by_bias.q, by_bias.k, by_bias.v, by_bias.options, dout.view(), std::nullopt,
        bias_gradients);
    const double tolerance = reference ? 1e-12 : 2e-5;
    EXPECT_LE(max_abs_difference(dq_mod, dq_bias), tolerance * (1 + max_abs(dq_bias)));
    Tensor summed(DType::float64, table.shape());
    for (std::int64_t h = 0; h < c.q_heads; ++h)
      for (std::int64_t i = 0; i < c.q_len; ++i)
        for (std::int64_t j = 0; j < c.k_len; ++j)
          summed.data<double>()[h * (c.q_len + c.k_len - 1) + i - j + c.k_len - 1] +=
              dbias.data<double>()[(h * c.q_len + i) * c.k_len + j];
    EXPECT_LE(max_abs_difference(dtable, summed), tolerance * (1 + max_abs(summed)))
        << (reference ? "reference" : "fused");
  }
}

TEST(ScoreMod, RefusesGradientsThatDoNotFit) {
  AttentionCase c;
  c.score_mod = ScoreModRule::capped_slopes;  // slopes [Hq] = [2]
  const AttentionInputs in = make_inputs(c, DType::float32);
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 1);
  Tensor wrong(DType::float32, {3}), right(DType::float32, {2});
  AttentionGradients gradients;
  gradients.dscore_mod = {wrong.mutable_view()};
  EXPECT_THAT([&] { attention_backward(in.q, in.k, in.v, in.options, dout.view(), {}, gradients); },
              ::testing::ThrowsMessage<Error>(
                  HasSubstr("dscore_mod[0]: expected float32 or float64 [2] (the parameter's "
                            "shape), got float32 [3]")));
  gradients.dscore_mod = {right.mutable_view(), right.mutable_view()};
  EXPECT_THAT([&] { attention_backward(in.q, in.k, in.v, in.options, dout.view(), {}, gradients); },
              ::testing::ThrowsMessage<Error>(HasSubstr(
                  "dscore_mod: expected at most one gradient per parameter of the score_mod (1), "
                  "got 2")));
  const Tensor integers(DType::int32, {4});
  EXPECT_THAT([&] { ScoreParameter parameter(integers.view()); },
              ::testing::ThrowsMessage<Error>(HasSubstr(
                  "score_mod parameter: expected float32, float64 or bfloat16 of rank 1 to 4, "
                  "got int32 [4]")));
}

// A read past the parameter's shape gives NaN, never memory outside it.
TEST(ScoreMod, ReadsPastTheShapeAreNaN) {
  const Tensor values = random_float32({3}, 2);
  const ScoreParameter parameter(values.view());
  EXPECT_FLOAT_EQ(parameter(2).value, values.data<float>()[2]);
  EXPECT_TRUE(std::isnan(parameter(3).value));
  EXPECT_TRUE(std::isnan(parameter(-1).value));
}

// ALiBi with learned slopes as whole rows (ScoreMod::from_rows, the derivatives written out):
// the same attention and gradients as the same rule as a callable differentiated on dual numbers.
struct AlibiRows {
  const Tensor* slopes;
  template <class T>
  void forward(const ScoreMod::Row& row, T* scores) const {
    const double slope = slopes->data<float>()[row.h];
    for (std::int64_t t = 0; t < row.count; ++t) {  // in double, as the callable's dual numbers
      scores[t] = static_cast<T>(static_cast<double>(scores[t]) +
                                 slope * static_cast<double>(row.kv_begin + t - row.q_idx));
    }
  }
  template <class T>
  void backward(const ScoreMod::Row& row, const T*, T* d_scores, double* const* gradients) const {
    // ∂/∂s = 1 leaves d_scores as it is; ∂/∂slope[h] = kv − q.
    if (gradients == nullptr || gradients[0] == nullptr) return;
    for (std::int64_t t = 0; t < row.count; ++t) {
      gradients[0][row.h] +=
          static_cast<double>(d_scores[t]) * static_cast<double>(row.kv_begin + t - row.q_idx);
    }
  }
};

TEST(ScoreMod, RowsEqualTheCallable) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 29;
  c.k_len = 41;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.causal = true;
  const AttentionInputs inputs = make_inputs(c, DType::float32);
  const Tensor slopes = random_float32({4}, 9);
  const ScoreParameter by_callable_slopes(slopes.view()), by_rows_slopes(slopes.view());
  const ScoreMod by_callable(
      [&](Dual s, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t kv) {
        return s + by_callable_slopes(h) * static_cast<double>(kv - q);
      },
      {&by_callable_slopes});
  const ScoreMod by_rows = ScoreMod::from_rows(AlibiRows{&slopes}, {&by_rows_slopes});
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 3);
  std::vector<Tensor> results;
  for (const ScoreMod* mod : {&by_callable, &by_rows}) {
    AttentionInputs in = inputs;
    in.options.score_mod = mod;
    const AttentionResults forward = evaluate(c, in, Evaluator::fast, DType::float64, false);
    Tensor dq(DType::float64, {c.batch, c.q_len, c.q_heads, c.q_dim});
    Tensor dslopes(DType::float64, {4});
    AttentionGradients gradients;
    gradients.dq = dq.mutable_view();
    gradients.dscore_mod = {dslopes.mutable_view()};
    attention_backward(in.q, in.k, in.v, in.options, dout.view(), std::nullopt, gradients);
    results.push_back(forward.out);
    results.push_back(std::move(dq));
    results.push_back(std::move(dslopes));
  }
  for (std::size_t n = 0; n < 3; ++n) {
    EXPECT_LE(max_abs_difference(results[n], results[n + 3]), 1e-6 * (1.0 + max_abs(results[n])))
        << n;
  }
  EXPECT_GT(max_abs(results[2]), 0.0);  // the slopes' gradient is not trivially zero
}

}  // namespace
}  // namespace qkv::testing
