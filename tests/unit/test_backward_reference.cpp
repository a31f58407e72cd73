// The float64 reference backward against central finite differences of the reference forward, on
// tiny shapes, for every score, mask and option: the loss is L = Σ dO·O + Σ dLSE·LSE.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <random>

#include "attention_case.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/reference.hpp"

namespace qkv::testing {
namespace {

// Float64 copies of a case's parameters (finite differences need float64 everywhere).
struct Float64Problem {
  explicit Float64Problem(const AttentionCase& base)
      : c(base), in(make_inputs(base, DType::float64)) {
    for (auto [slot, tensor] :
         {std::pair{&in.options.w, &w}, std::pair{&in.options.wq, &wq},
          std::pair{&in.options.wk, &wk}, std::pair{&in.options.va, &va},
          std::pair{&in.options.temperature, &temperature}, std::pair{&in.options.bias, &bias},
          std::pair{&in.options.sinks, &sinks}}) {
      if (!*slot) continue;
      *tensor =
          Tensor(DType::float64, std::vector<std::int64_t>((*slot)->shape.begin(),
                                                           (*slot)->shape.begin() + (*slot)->rank));
      for (std::int64_t n = 0; n < tensor->numel(); ++n) {
        tensor->data<double>()[n] = static_cast<const float*>((*slot)->data)[n];
      }
      *slot = tensor->view();
    }
    std::mt19937_64 rng(c.seed + 99);
    std::normal_distribution<double> normal;
    dout = Tensor(DType::float64, {c.batch, c.q_len, c.q_heads, c.v_dim});
    dlse = Tensor(DType::float64, {c.batch, c.q_heads, c.q_len});
    for (Tensor* t : {&dout, &dlse})
      for (std::int64_t n = 0; n < t->numel(); ++n) t->data<double>()[n] = normal(rng);
  }

  double loss() const {
    Tensor out(DType::float64, {c.batch, c.q_len, c.q_heads, c.v_dim});
    Tensor lse(DType::float64, {c.batch, c.q_heads, c.q_len});
    attention_reference(in.q, in.k, in.v, in.options, {out.mutable_view(), lse.mutable_view(), {}});
    double total = 0.0;
    for (std::int64_t n = 0; n < out.numel(); ++n)
      total += dout.data<double>()[n] * out.data<double>()[n];
    for (std::int64_t n = 0; n < lse.numel(); ++n) {
      if (std::isfinite(lse.data<double>()[n]))
        total += dlse.data<double>()[n] * lse.data<double>()[n];
    }
    return total;
  }

  AttentionCase c;
  AttentionInputs in;
  Tensor w, wq, wk, va, temperature, bias, sinks, dout, dlse;
};

// Every element of `values` nudged by ±h; the central difference of the loss against `analytic`.
void expect_gradient(Float64Problem& problem, double* values, std::int64_t count,
                     const Tensor& analytic, const std::string& what) {
  constexpr double kStep = 1e-6;
  for (std::int64_t n = 0; n < count; ++n) {
    const double saved = values[n];
    if (!std::isfinite(saved)) continue;
    values[n] = saved + kStep;
    const double up = problem.loss();
    values[n] = saved - kStep;
    const double down = problem.loss();
    values[n] = saved;
    const double numeric = (up - down) / (2 * kStep);
    const double exact = analytic.data<double>()[n];
    ASSERT_FALSE(std::isnan(exact)) << what << "[" << n << "]";
    ASSERT_NEAR(exact, numeric, 1e-6 * (1.0 + std::abs(numeric)))
        << what << "[" << n << "] of " << problem.c.name();
  }
}

std::vector<AttentionCase> backward_cases() {
  std::vector<AttentionCase> cases;
  std::uint64_t seed = 500;
  for (Score score :
       {Score::dot, Score::scaled_dot, Score::bilinear, Score::additive, Score::cosine}) {
    for (bool per_head : {false, true}) {
      if (per_head && (score == Score::dot || score == Score::scaled_dot)) continue;
      for (int variant = 0; variant < 10; ++variant) {
        AttentionCase c;
        c.batch = 2;
        c.q_len = 3;
        c.k_len = 5;
        c.q_heads = 4;
        c.kv_heads = 2;
        c.q_dim = 3;
        c.v_dim = 2;
        c.additive_dim = 3;
        c.score = score;
        c.per_head_parameters = per_head;
        if (score == Score::bilinear || score == Score::additive) c.k_dim = 4;
        c.causal = variant == 1 || variant == 2;
        c.causal_align = variant == 2 ? CausalAlign::top_left : CausalAlign::bottom_right;
        if (variant == 2) c.window_left = 1;
        c.key_lengths = variant == 3;  // batch 0 sees no key
        c.mask = variant == 3;         // and one row of head 0 sees none
        c.softcap = variant == 4 ? 1.5 : 0.0;
        c.alibi = variant == 4;
        c.bias = variant == 0 || variant == 4;
        if (variant == 4) c.scale = 0.8;
        if (variant == 5) {  // a learned relative bias table under a causal mask
          c.score_mod = ScoreModRule::relative_bias;
          c.causal = true;
        }
        if (variant == 6) {  // a non-linear score_mod after the soft cap and a bias
          c.score_mod = ScoreModRule::capped_slopes;
          c.softcap = 2.5;
          c.bias = true;
        }
        if (variant == 7) {  // sinks, with rows that see no key (their LSE is the sink)
          c.sinks = true;
          c.key_lengths = true;
          c.mask = true;
          c.causal = true;
        }
        if (variant == 9) {  // a sink token and a window of 1, a gap between them
          c.causal = true;
          c.window_left = 1;
          c.sink_tokens = 1;
        }
        if (variant == 8) {  // sigmoid attention (dLSE through LSE = log Σ P), empty rows
          c.sigmoid = true;
          c.key_lengths = true;
          c.mask = true;
          c.bias = true;
        }
        c.seed = ++seed;
        cases.push_back(c);
      }
    }
  }
  return cases;
}

class BackwardReference : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(BackwardReference, MatchesFiniteDifferences) {
  Float64Problem problem(GetParam());
  const AttentionCase& c = problem.c;
  AttentionInputs& in = problem.in;
  Tensor dq(DType::float64, {c.batch, c.q_len, c.q_heads, c.q_dim});
  Tensor dk(DType::float64, {c.batch, c.k_len, c.kv_heads, c.key_dim()});
  Tensor dv(DType::float64, {c.batch, c.k_len, c.kv_heads, c.v_dim});
  const auto like = [](const Tensor& t) { return Tensor(DType::float64, t.shape()); };
  Tensor dw = like(problem.w), dwq = like(problem.wq), dwk = like(problem.wk),
         dva = like(problem.va), dbias = like(problem.bias),
         dtemperature = like(problem.temperature), dsinks = like(problem.sinks);
  AttentionGradients gradients;
  gradients.dq = dq.mutable_view();
  gradients.dk = dk.mutable_view();
  gradients.dv = dv.mutable_view();
  if (in.options.w) gradients.dw = dw.mutable_view();
  if (in.options.wq) {
    gradients.dwq = dwq.mutable_view();
    gradients.dwk = dwk.mutable_view();
    gradients.dva = dva.mutable_view();
  }
  if (in.options.bias) gradients.dbias = dbias.mutable_view();
  if (in.options.temperature) gradients.dtemperature = dtemperature.mutable_view();
  if (in.options.sinks) gradients.dsinks = dsinks.mutable_view();
  Tensor dscore_mod;
  if (in.score_parameter) {
    dscore_mod = like(in.score_values);
    gradients.dscore_mod = {dscore_mod.mutable_view()};
  }
  attention_backward_reference(in.q, in.k, in.v, in.options, problem.dout.view(),
                               problem.dlse.view(), gradients);

  expect_gradient(problem, const_cast<double*>(static_cast<const double*>(in.q.data)), dq.numel(),
                  dq, "dq");
  expect_gradient(problem, const_cast<double*>(static_cast<const double*>(in.k.data)), dk.numel(),
                  dk, "dk");
  expect_gradient(problem, const_cast<double*>(static_cast<const double*>(in.v.data)), dv.numel(),
                  dv, "dv");
  for (auto [tensor, gradient, name] :
       {std::tuple{&problem.w, &dw, "dw"}, std::tuple{&problem.wq, &dwq, "dwq"},
        std::tuple{&problem.wk, &dwk, "dwk"}, std::tuple{&problem.va, &dva, "dva"},
        std::tuple{&problem.bias, &dbias, "dbias"},
        std::tuple{&problem.temperature, &dtemperature, "dtemperature"},
        std::tuple{&problem.sinks, &dsinks, "dsinks"}}) {
    if (tensor->numel() > 0)
      expect_gradient(problem, tensor->data<double>(), tensor->numel(), *gradient, name);
  }
  if (in.score_parameter) {
    expect_gradient(problem, in.score_values.data<double>(), in.score_values.numel(), dscore_mod,
                    "dscore_mod");
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, BackwardReference, ::testing::ValuesIn(backward_cases()),
                         [](const ::testing::TestParamInfo<AttentionCase>& param) {
                           return std::to_string(param.index) + "_" + param.param.name();
                         });

// Rows that see no key give exactly zero gradients, and nothing is NaN.
TEST(BackwardReference, EmptyRowsGiveZeroGradients) {
  AttentionCase c;
  c.batch = 2;
  c.key_lengths = true;  // batch 0 sees no key
  Float64Problem problem(c);
  Tensor dq(DType::float64, {c.batch, c.q_len, c.q_heads, c.q_dim});
  Tensor dk(DType::float64, {c.batch, c.k_len, c.kv_heads, c.key_dim()});
  AttentionGradients gradients;
  gradients.dq = dq.mutable_view();
  gradients.dk = dk.mutable_view();
  attention_backward_reference(problem.in.q, problem.in.k, problem.in.v, problem.in.options,
                               problem.dout.view(), problem.dlse.view(), gradients);
  const std::int64_t per_batch = c.q_len * c.q_heads * c.q_dim;
  for (std::int64_t n = 0; n < dq.numel(); ++n) {
    ASSERT_FALSE(std::isnan(dq.data<double>()[n]));
    if (n < per_batch) {
      ASSERT_EQ(dq.data<double>()[n], 0.0);
    }
  }
  EXPECT_GT(std::abs(dq.data<double>()[per_batch]), 0.0);
}

TEST(BackwardReference, BadGradientArguments) {
  AttentionCase c;
  Float64Problem problem(c);
  const auto message = [&](const AttentionGradients& gradients, const TensorView& dout) {
    try {
      attention_backward_reference(problem.in.q, problem.in.k, problem.in.v, problem.in.options,
                                   dout, std::nullopt, gradients);
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  Tensor wrong(DType::float64, {1, 2, 3, 4}), dw(DType::float64, {8, 8});
  AttentionGradients bad_dq;
  bad_dq.dq = wrong.mutable_view();
  EXPECT_THAT(message(bad_dq, problem.dout.view()),
              ::testing::HasSubstr("dq: expected the shape of q, [1, 8, 2, 8], got [1, 2, 3, 4]"));
  AttentionGradients bad_dw;
  bad_dw.dw = dw.mutable_view();
  EXPECT_THAT(message(bad_dw, problem.dout.view()),
              ::testing::HasSubstr("dw: expected none (w is not an input of this score)"));
  EXPECT_THAT(
      message({}, wrong.view()),
      ::testing::HasSubstr("dout: expected [B, Nq, Hq, Dv] = [1, 8, 2, 8], got [1, 2, 3, 4]"));
}

}  // namespace
}  // namespace qkv::testing
