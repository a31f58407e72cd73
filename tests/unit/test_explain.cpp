// The walkthrough's foundations: the reference's scores output (the matrix the weights are the
// softmax of, −inf exactly where a mask hides a key) and explain_attention's argument checks.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "attention_case.hpp"
#include "qkv/error.hpp"
#include "qkv/explain.hpp"
#include "qkv/reference.hpp"

namespace qkv::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// P = exp(s − LSE) where a key is visible, and s = −inf with P = 0 where it is not, under a causal
// window, ALiBi, a soft cap and GQA.
TEST(ReferenceScores, AreWhatTheWeightsNormalize) {
  const std::int64_t b = 2, n = 7, hq = 4, hk = 2, d = 5;
  const Tensor q = random_float32({b, n, hq, d}, 1), k = random_float32({b, n, hk, d}, 2),
               v = random_float32({b, n, hk, d}, 3), slopes = random_float32({hq}, 4);
  AttentionOptions options;
  options.causal = true;
  options.window_left = 3;
  options.softcap = 2.5;
  options.alibi_slopes = slopes.view();
  Tensor out(DType::float64, {b, n, hq, d}), lse(DType::float64, {b, hq, n}),
      weights(DType::float64, {b, hq, n, n}), scores(DType::float64, {b, hq, n, n});
  AttentionOutputs outputs;
  outputs.out = out.mutable_view();
  outputs.lse = lse.mutable_view();
  outputs.weights = weights.mutable_view();
  attention_reference(q.view(), k.view(), v.view(), options, outputs, scores.mutable_view());
  int hidden = 0;
  for (std::int64_t row = 0; row < b * hq * n; ++row) {
    for (std::int64_t j = 0; j < n; ++j) {
      const double s = scores.data<double>()[row * n + j], p = weights.data<double>()[row * n + j];
      const std::int64_t i = row % n;
      if (j > i || j < i - 3) {
        EXPECT_EQ(s, -std::numeric_limits<double>::infinity()) << row << " " << j;
        EXPECT_EQ(p, 0.0);
        ++hidden;
      } else {
        EXPECT_NEAR(p, std::exp(s - lse.data<double>()[row]), 1e-15) << row << " " << j;
        EXPECT_LE(std::abs(s), 2.5 + 1e-12 + 6 * std::abs(slopes.data<float>()[row / n % hq]));
      }
    }
  }
  EXPECT_GT(hidden, 0);

  Tensor wrong(DType::float64, {b, hq, n, n + 1});
  EXPECT_THAT(
      [&] {
        attention_reference(q.view(), k.view(), v.view(), options, outputs, wrong.mutable_view());
      },
      ThrowsMessage<Error>(
          HasSubstr("scores: expected [B, Hq, Nq, Nk] = [2, 4, 7, 7], got [2, 4, 7, 8]")));
}

TEST(Explain, NamesTheArgumentItRefuses) {
  MultiHeadAttentionOptions options;
  options.embed_dim = 4;
  options.num_heads = 2;
  const MultiHeadAttention layer(options, 1);
  const Tensor x = seeded_word_embeddings({"a", "b"}, 4, 1);
  EXPECT_THAT(
      [&] {
        explain_attention({"a", "b", "c"}, x.view(), layer, false);
      },
      ThrowsMessage<Error>(HasSubstr("x: expected [words, E] = [3, 4], got [2, 4]")));
  EXPECT_THAT([&] { explain_attention({}, x.view(), layer, false); },
              ThrowsMessage<Error>(HasSubstr("words: expected at least one word, got none")));
  Tensor infinite = seeded_word_embeddings({"a", "b"}, 4, 1);
  infinite.data<double>()[5] = std::numeric_limits<double>::infinity();
  EXPECT_THAT(
      [&] {
        explain_attention({"a", "b"}, infinite.view(), layer, false);
      },
      ThrowsMessage<Error>(HasSubstr("x: expected finite values, got inf at [1, 1]")));
  options.sinks = true;
  const MultiHeadAttention with_sinks(options, 1);
  EXPECT_THAT(
      [&] {
        explain_attention({"a", "b"}, x.view(), with_sinks, false);
      },
      ThrowsMessage<Error>(HasSubstr("layer: expected softmax attention over the words")));
  EXPECT_THAT([&] { explain_attention({"a"}, Score::dot, 6, 4, false, 1); },
              ThrowsMessage<Error>(HasSubstr("dim, heads: expected dim >= 1 and heads a divisor "
                                             "of it, got 6 and 4")));
  EXPECT_THAT([&] { seeded_word_embeddings({"a"}, 0, 1); },
              ThrowsMessage<Error>(HasSubstr("dim: expected >= 1, got 0")));
}

// A repeated word gets the same row; another seed, other rows.
TEST(Explain, EmbeddingsAreAFunctionOfSeedAndWord) {
  const Tensor a = seeded_word_embeddings({"cat", "dog", "cat"}, 6, 7);
  const Tensor b = seeded_word_embeddings({"cat"}, 6, 8);
  for (int d = 0; d < 6; ++d) {
    EXPECT_EQ(a.data<double>()[d], a.data<double>()[12 + d]);
    EXPECT_NE(a.data<double>()[d], a.data<double>()[6 + d]);
    EXPECT_NE(a.data<double>()[d], b.data<double>()[d]);
  }
}

}  // namespace
}  // namespace qkv::testing
