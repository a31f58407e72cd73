// Linear and MultiHeadAttention: Linear against float64 loops; the scores PyTorch lacks wired
// through the layer (bilinear at W = I is scaled_dot; the score parameters' gradients against
// finite differences of the layer's loss); state_dict round trips and errors. PyTorch parity of
// the layer is tests/cli/test_mha_torch.py.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>

#include "attention_case.hpp"
#include "qkv/error.hpp"
#include "qkv/linear.hpp"
#include "qkv/multihead_attention.hpp"

namespace qkv {
namespace {

using testing::central_difference;
using testing::dot_float32;
using testing::random_float32;

double max_difference(const Tensor& a, const std::vector<double>& b) {
  double worst = 0.0;
  for (std::int64_t n = 0; n < a.numel(); ++n)
    worst = std::max(worst, std::abs(a.data<float>()[n] - b[static_cast<std::size_t>(n)]));
  return worst;
}

TEST(Linear, ForwardAndBackwardMatchFloat64Loops) {
  Linear layer(5, 3, true, 7);
  const Tensor x = random_float32({2, 4, 5}, 1), dy = random_float32({2, 4, 3}, 2);
  const Tensor y = layer.forward(x.view());
  const Tensor dx = layer.backward(x.view(), dy.view());
  std::vector<double> y64(24), dx64(40), dw64(15), db64(3);
  for (int r = 0; r < 8; ++r) {
    for (int o = 0; o < 3; ++o) {
      double sum = layer.bias.data<float>()[o];
      for (int i = 0; i < 5; ++i) {
        sum += double{x.data<float>()[r * 5 + i]} * layer.weight.data<float>()[o * 5 + i];
        dx64[static_cast<std::size_t>(r * 5 + i)] +=
            double{dy.data<float>()[r * 3 + o]} * layer.weight.data<float>()[o * 5 + i];
        dw64[static_cast<std::size_t>(o * 5 + i)] +=
            double{dy.data<float>()[r * 3 + o]} * x.data<float>()[r * 5 + i];
      }
      y64[static_cast<std::size_t>(r * 3 + o)] = sum;
      db64[static_cast<std::size_t>(o)] += dy.data<float>()[r * 3 + o];
    }
  }
  EXPECT_EQ(y.shape(), (std::vector<std::int64_t>{2, 4, 3}));
  EXPECT_LE(max_difference(y, y64), 1e-5);
  EXPECT_LE(max_difference(dx, dx64), 1e-5);
  EXPECT_LE(max_difference(layer.weight_grad, dw64), 1e-5);
  EXPECT_LE(max_difference(layer.bias_grad, db64), 1e-5);
  EXPECT_THAT([&] { layer.forward(dy.view()); },
              ::testing::ThrowsMessage<Error>(
                  ::testing::HasSubstr("x: expected a last dimension of 5, got shape [2, 4, 3]")));
}

MultiHeadAttentionOptions small_options(Score score) {
  MultiHeadAttentionOptions options;
  options.embed_dim = 8;
  options.num_heads = 2;
  options.score = score;
  return options;
}

// With W = I per head (the initial value) and the same projections, bilinear is scaled_dot.
TEST(MultiHeadAttention, BilinearAtIdentityIsScaledDot) {
  MultiHeadAttention dot(small_options(Score::scaled_dot), 3);
  MultiHeadAttention bilinear(small_options(Score::bilinear), 3);
  NamedTensors state = dot.parameters();
  state["score_weight"] = to_tensor(bilinear.parameters().at("score_weight").view());
  bilinear.load_state_dict(state);
  const Tensor x = random_float32({5, 2, 8}, 4);
  const MultiHeadAttentionCall call;
  const Tensor a = dot.forward(x.view(), x.view(), x.view(), call).output;
  const Tensor b = bilinear.forward(x.view(), x.view(), x.view(), call).output;
  for (std::int64_t n = 0; n < a.numel(); ++n)
    EXPECT_NEAR(a.data<float>()[n], b.data<float>()[n], 1e-5);
}

// is_causal (PyTorch 2's meaning: key j hidden from query i when j > i) equals the explicit
// boolean attn_mask PyTorch 1.13 takes for it, in the output, the weights and the gradients.
TEST(MultiHeadAttention, IsCausalEqualsTriangularAttnMask) {
  MultiHeadAttention layer(small_options(Score::scaled_dot), 9);
  const Tensor x = random_float32({5, 2, 8}, 3), dout = random_float32({5, 2, 8}, 4);
  MultiHeadAttentionCall causal;
  causal.is_causal = true;
  const MultiHeadAttentionResult a = layer.forward(x.view(), x.view(), x.view(), causal);
  const MultiHeadAttentionInputGradients da = layer.backward(dout.view());
  Tensor mask(DType::boolean, {5, 5});
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 5; ++j) mask.data<std::uint8_t>()[i * 5 + j] = j > i ? 1 : 0;
  MultiHeadAttentionCall masked;
  masked.attn_mask = mask.view();
  const MultiHeadAttentionResult b = layer.forward(x.view(), x.view(), x.view(), masked);
  const MultiHeadAttentionInputGradients db = layer.backward(dout.view());
  for (auto [left, right] : {std::pair{&a.output, &b.output}, std::pair{&a.weights, &b.weights},
                             std::pair{&da.query, &db.query}, std::pair{&da.key, &db.key}}) {
    ASSERT_EQ(left->nbytes(), right->nbytes());
    EXPECT_EQ(std::memcmp(left->raw(), right->raw(), left->nbytes()), 0);
  }
  EXPECT_EQ(a.weights.data<float>()[1], 0.0f);  // query 0 does not see key 1
  // Both at once: refused, whatever the mask (the functions' rule, PyTorch's SDPA's).
  masked.is_causal = true;
  EXPECT_THAT([&] { layer.forward(x.view(), x.view(), x.view(), masked); },
              ::testing::ThrowsMessage<Error>(
                  ::testing::HasSubstr("attn_mask, is_causal: expected at most one of them")));
}

// The loss L = Σ dout·output; the gradient of every score parameter, of the sinks, and (for
// sigmoid attention) of the input projection, against central finite differences in float32
// (step 1e-2: the truncation error is O(h²)·L''' and the rounding error O(ε·|L|/h), both near
// 1e-4 relative here).
TEST(MultiHeadAttention, ScoreParameterGradientsMatchFiniteDifferences) {
  struct Config {
    Score score;
    bool sinks, sigmoid;
  };
  for (const Config config :
       {Config{Score::bilinear, false, false}, Config{Score::additive, false, false},
        Config{Score::cosine, true, false}, Config{Score::scaled_dot, true, false},
        Config{Score::bilinear, false, true}}) {
    const Score score = config.score;
    MultiHeadAttentionOptions options = small_options(score);
    options.sinks = config.sinks;
    if (config.sigmoid) {  // sigmoid attention: the projections' gradients too
      options.normalization = Normalization::sigmoid;
      options.sigmoid_bias = -0.5;
    }
    MultiHeadAttention layer(options, 11);
    const Tensor query = random_float32({4, 2, 8}, 5), key = random_float32({6, 2, 8}, 6);
    const Tensor dout = random_float32({4, 2, 8}, 7);
    MultiHeadAttentionCall call;
    call.need_weights = false;
    call.is_causal = score == Score::additive;
    const auto loss = [&] {
      return dot_float32(layer.forward(query.view(), key.view(), key.view(), call).output, dout);
    };
    loss();
    layer.zero_grad();
    layer.backward(dout.view());
    for (const auto& [name, gradient] : layer.gradients()) {
      if (name.rfind("score_", 0) != 0 && name != "sinks" &&
          !(config.sigmoid && name == "in_proj_weight"))
        continue;
      float* values = layer.parameters().at(name).data<float>();  // the layer's, in place
      for (std::int64_t n = 0; n < gradient.numel(); n += 3) {
        const double numeric = central_difference(values[n], 1e-2f, loss);
        EXPECT_NEAR(gradient.data<float>()[n], numeric, 2e-3 * (1 + std::abs(numeric)))
            << name << "[" << n << "] of " << score_name(score);
      }
    }
  }
}

// Every score works in the layer, which learns exactly the parameters its unit lists (names,
// shapes, starting values) and passes its scale; only those are sent to the attention call.
TEST(MultiHeadAttention, LearnsTheParametersEachScoreDeclares) {
  for (const std::string_view name : score_names()) {
    const Score score = parse_score(name);
    MultiHeadAttentionOptions options = small_options(score);
    options.additive_dim = 3;
    MultiHeadAttention layer(options, 2);
    const ScoreLayer declared = score_layer(score, 2, 4, 3);
    std::size_t own = 0;
    for (const auto& [parameter, tensor] : layer.parameters()) {
      if (parameter.rfind("score_", 0) == 0) ++own;
    }
    EXPECT_EQ(own, declared.parameters.size()) << name;
    for (const ScoreLayerParameter& parameter : declared.parameters) {
      const Tensor& tensor = layer.parameters().at(parameter.name);
      EXPECT_EQ(tensor.shape(), parameter.shape) << parameter.name;
      const float first = tensor.data<float>()[0];
      switch (parameter.start) {
        case ScoreLayerParameter::Start::identity:
          EXPECT_EQ(first, 1.0f);
          EXPECT_EQ(tensor.data<float>()[1], 0.0f);
          break;
        case ScoreLayerParameter::Start::constant:
          EXPECT_EQ(first, static_cast<float>(parameter.value));
          break;
        case ScoreLayerParameter::Start::uniform:
          EXPECT_LE(std::abs(first), parameter.value);
          break;
        case ScoreLayerParameter::Start::xavier:
          EXPECT_NE(first, 0.0f);
          break;
      }
    }
    const Tensor x = random_float32({3, 2, 8}, 4);
    MultiHeadAttentionCall call;
    const Tensor out = layer.forward(x.view(), x.view(), x.view(), call).output;
    layer.backward(out.view());
    for (std::int64_t n = 0; n < out.numel(); ++n) ASSERT_TRUE(std::isfinite(out.data<float>()[n]));
  }
  EXPECT_EQ(score_layer(Score::bilinear, 2, 16).scale, 0.25);
  EXPECT_FALSE(score_layer(Score::scaled_dot, 2, 16).scale.has_value());
  EXPECT_EQ(score_layer(Score::additive, 2, 16).parameters.at(2).shape,
            (std::vector<std::int64_t>{2, 16}));
  EXPECT_THAT([] { score_layer(Score::cosine, 0, 4); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("expected >= 1")));
}

TEST(MultiHeadAttention, SavesAndLoadsStateDict) {
  MultiHeadAttention layer(small_options(Score::additive), 1);
  const auto path = std::filesystem::temp_directory_path() / "qkv_test_layer.safetensors";
  layer.save(path.string());
  MultiHeadAttention other(small_options(Score::additive), 2);
  other.load(path.string());
  std::filesystem::remove(path);
  for (const auto& [name, tensor] : layer.parameters()) {
    const Tensor& loaded = other.parameters().at(name);
    ASSERT_EQ(loaded.shape(), tensor.shape()) << name;
    EXPECT_EQ(std::memcmp(loaded.raw(), tensor.raw(), tensor.nbytes()), 0) << name;
  }
  NamedTensors missing = layer.parameters();
  missing.erase("score_v");
  EXPECT_THAT([&] { other.load_state_dict(missing); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("missing tensor 'score_v'")));
  EXPECT_THAT(
      [&] {
        MultiHeadAttention bad(MultiHeadAttentionOptions{6, 4});
      },
      ::testing::ThrowsMessage<Error>(
          ::testing::HasSubstr("embed_dim: expected a positive multiple of num_heads (4), got 6")));
  MultiHeadAttention fresh(small_options(Score::scaled_dot));
  const Tensor dout = random_float32({4, 2, 8}, 1);
  EXPECT_THAT([&] { fresh.backward(dout.view()); },
              ::testing::ThrowsMessage<Error>(::testing::HasSubstr("expected a forward call")));
}

}  // namespace
}  // namespace qkv
