// qkv::DifferentialAttention: every parameter's gradient and the input's against central finite
// differences of the layer's own forward (float32, a tiny shape), and the argument checks. (The
// Python module, the same formula, is checked against a literal float64 layer in
// tests/python/test_differential.py.)

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>

#include "attention_case.hpp"
#include "qkv/differential_attention.hpp"
#include "qkv/error.hpp"

namespace qkv::testing {
namespace {

// L = Σ dout·output; step 1e-2 in float32 (truncation O(h²), rounding O(ε·|L|/h), near 1e-4).
TEST(DifferentialAttention, GradientsMatchFiniteDifferences) {
  for (auto [heads, kv_heads, causal] : {std::tuple{2, 2, true}, std::tuple{2, 1, false}}) {
    DifferentialAttentionOptions options;
    options.embed_dim = 8;
    options.num_heads = heads;
    options.num_kv_heads = kv_heads;
    options.depth = 2;
    options.causal = causal;
    DifferentialAttention layer(options, 5);
    Tensor x = random_float32({2, 5, 8}, 6);
    const Tensor dout = random_float32({2, 5, 8}, 7);
    const auto loss = [&] { return dot_float32(layer.forward(x.view()), dout); };
    loss();
    layer.zero_grad();
    const Tensor dx = layer.backward(dout.view());
    const auto check = [&](float* values, const float* analytic, std::int64_t count,
                           const std::string& what) {
      for (std::int64_t n = 0; n < count; n += 3) {
        const double numeric = central_difference(values[n], 1e-2f, loss);
        EXPECT_NEAR(analytic[n], numeric, 3e-3 * (1 + std::abs(numeric)))
            << what << "[" << n << "]";
      }
    };
    for (auto& [name, tensor] : layer.parameters()) {
      const Tensor gradient = layer.gradients().at(name);  // a copy: loss() keeps the gradients
      check(tensor.data<float>(), gradient.data<float>(), tensor.numel(), name);
    }
    check(x.data<float>(), dx.data<float>(), x.numel(), "x");
  }
}

TEST(DifferentialAttention, LambdaAndArguments) {
  DifferentialAttentionOptions options;
  options.embed_dim = 16;
  options.num_heads = 2;
  options.depth = 3;
  DifferentialAttention layer(options);
  EXPECT_NEAR(layer.lambda_init(), 0.8 - 0.6 * std::exp(-0.9), 1e-12);
  NamedTensors& p = layer.parameters();
  for (const char* name : {"lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"})
    for (std::int64_t n = 0; n < p.at(name).numel(); ++n) p.at(name).data<float>()[n] = 0.5f;
  // e^(4·0.25) − e^(4·0.25) + λ_init
  EXPECT_NEAR(layer.lambda(), layer.lambda_init(), 1e-12);
  EXPECT_EQ(p.at("k_proj.weight").shape(), (std::vector<std::int64_t>{16, 16}));
  EXPECT_THAT(
      [] {
        DifferentialAttention({15, 2});
      },
      ::testing::ThrowsMessage<Error>(
          ::testing::HasSubstr("embed_dim: expected a positive multiple of 2·num_heads")));
  EXPECT_THAT(
      [] {
        DifferentialAttention({16, 4, 3});
      },
      ::testing::ThrowsMessage<Error>(
          ::testing::HasSubstr("num_kv_heads: expected a divisor of num_heads (4)")));
  EXPECT_THAT(
      [&] {
        layer.backward(Tensor(DType::float32, {1, 2, 16}).view());
      },
      ::testing::ThrowsMessage<Error>(::testing::HasSubstr("expected a forward call")));
  DifferentialAttention reshaped(options);
  reshaped.parameters().at("q_proj.weight") = Tensor(DType::float32, {2, 2});
  EXPECT_THAT(
      [&] {
        reshaped.forward(Tensor(DType::float32, {1, 2, 16}).view());
      },
      ::testing::ThrowsMessage<Error>(
          ::testing::HasSubstr("q_proj.weight: expected float32 [16, 16], got float32 [2, 2]")));
  EXPECT_THAT(
      [&] {
        layer.forward(Tensor(DType::float32, {1, 2, 8}).view());
      },
      ::testing::ThrowsMessage<Error>(::testing::HasSubstr("x: expected [N, L, E]")));
}

}  // namespace
}  // namespace qkv::testing
