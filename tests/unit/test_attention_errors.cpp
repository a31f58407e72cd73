// Every bad input of attention_forward gets a qkv::Error that names the argument, what was
// expected and what was given, and nothing is written.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>

#include "qkv/attention.hpp"
#include "qkv/error.hpp"
#include "qkv/reference.hpp"

namespace qkv {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using ::testing::StrEq;

// A valid problem (B=2, Nq=3, Nk=5, Hq=4, Hk=2, Dq=Dk=8, Dv=6) whose parts each test breaks.
struct Valid {
  Tensor q{DType::float32, {2, 3, 4, 8}}, k{DType::float32, {2, 5, 2, 8}},
      v{DType::float32, {2, 5, 2, 6}};
  Tensor out{DType::float32, {2, 3, 4, 6}}, lse{DType::float32, {2, 4, 3}},
      weights{DType::float32, {2, 4, 3, 5}};
  TensorView qv = q.view(), kv = k.view(), vv = v.view();
  AttentionOptions options;
  AttentionOutputs outputs{out.mutable_view(), lse.mutable_view(), weights.mutable_view()};
  Valid() { out.data<float>()[0] = 42.0f; }
};

// Runs both entry points on the broken problem; both must throw with a message matching all of
// `pieces`, and the output must be untouched.
void expect_error(const std::function<void(Valid&)>& breakit,
                  const std::vector<std::string>& pieces) {
  for (bool reference : {false, true}) {
    Valid p;
    breakit(p);
    try {
      if (reference) {
        attention_reference(p.qv, p.kv, p.vv, p.options, p.outputs);
      } else {
        attention_forward(p.qv, p.kv, p.vv, p.options, p.outputs);
      }
      ADD_FAILURE() << "no error for " << pieces.front();
    } catch (const Error& error) {
      const std::string message = error.what();
      for (const std::string& piece : pieces) EXPECT_THAT(message, HasSubstr(piece));
      EXPECT_EQ(message.find('\n'), std::string::npos) << "one line: " << message;
      EXPECT_EQ(p.out.data<float>()[0], 42.0f) << "output written before the error";
    }
  }
}

TEST(AttentionErrors, ValidProblemRuns) {
  Valid p;
  EXPECT_NO_THROW(attention_forward(p.qv, p.kv, p.vv, p.options, p.outputs));
}

TEST(AttentionErrors, Ranks) {
  expect_error([](Valid& p) { p.qv = p.qv.with_rank(4), p.qv.rank = 3; },
               {"q: expected rank 4", "got rank 3"});
  expect_error([](Valid& p) { p.kv.rank = 2; }, {"k: expected rank 4 [B, Nk, Hk, Dk]"});
  expect_error([](Valid& p) { p.vv.rank = 1; }, {"v: expected rank 4"});
}

TEST(AttentionErrors, MismatchedDims) {
  expect_error([](Valid& p) { p.kv.shape[0] = 1; }, {"k: expected batch B = 2", "got 1"});
  expect_error([](Valid& p) { p.vv.shape[1] = 4; },
               {"v: expected [B, Nk, Hk, Dv] = [2, 5, 2, Dv]", "[2, 4, 2, 6]"});
  expect_error(
      [](Valid& p) {
        p.kv.shape[3] = 7;
        p.vv.shape[2] = 2;
      },
      {"k: expected Dk == Dq = 8 for score 'scaled_dot', got Dk = 7"});
  expect_error([](Valid& p) { p.qv.shape[2] = 3; },
               {"k: expected Hk dividing Hq = 3", "got Hk = 2"});
  expect_error([](Valid& p) { p.qv.shape[3] = 0; }, {"expected head dims >= 1"});
}

TEST(AttentionErrors, Dtypes) {
  Tensor q64(DType::float64, {2, 3, 4, 8});
  expect_error([&](Valid& p) { p.qv = q64.view(); },
               {"k, v: expected the dtype of q (float64)", "float32"});
  Tensor qi(DType::int32, {2, 3, 4, 8});
  expect_error([&](Valid& p) { p.qv = qi.view(); },
               {"q: expected dtype float32, float64, bfloat16 or float16, got int32"});
  Tensor out_int(DType::int64, {2, 3, 4, 6});
  expect_error([&](Valid& p) { p.outputs.out = out_int.mutable_view(); },
               {"out: expected dtype float32, float64, bfloat16 or float16, got int64"});
}

TEST(AttentionErrors, OutputShapes) {
  expect_error([](Valid& p) { p.outputs.out.shape[3] = 8; },
               {"out: expected [B, Nq, Hq, Dv] = [2, 3, 4, 6]", "[2, 3, 4, 8]"});
  expect_error([](Valid& p) { p.outputs.lse->rank = 2; },
               {"lse: expected [B, Hq, Nq] = [2, 4, 3]"});
  expect_error([](Valid& p) { p.outputs.weights->shape[3] = 4; },
               {"weights: expected [B, Hq, Nq, Nk] = [2, 4, 3, 5]"});
}

TEST(AttentionErrors, ScoreParameters) {
  Tensor w(DType::float32, {8, 8}), w_bad(DType::float32, {8, 7}),
      w_heads(DType::float32, {3, 8, 8});
  expect_error([](Valid& p) { p.options.score = Score::bilinear; },
               {"w: expected [Dq, Dk] or [Hq, Dq, Dk]", "got none"});
  expect_error([&](Valid& p) { p.options.score = Score::bilinear, p.options.w = w_bad.view(); },
               {"w: expected [Dq, Dk] = [8, 8] or [Hq, Dq, Dk] = [4, 8, 8], got [8, 7]"});
  expect_error([&](Valid& p) { p.options.score = Score::bilinear, p.options.w = w_heads.view(); },
               {"w: expected", "got [3, 8, 8]"});
  expect_error([&](Valid& p) { p.options.w = w.view(); },
               {"w: expected none for score 'scaled_dot'", "only used by bilinear"});
  Tensor wq(DType::float32, {16, 8}), wk(DType::float32, {16, 8}), va(DType::float32, {16}),
      va_bad(DType::float32, {15}), wq_bad(DType::float32, {16, 9});
  auto additive = [&](Valid& p) {
    p.options.score = Score::additive;
    p.options.wq = wq.view();
    p.options.wk = wk.view();
    p.options.va = va.view();
  };
  EXPECT_NO_THROW({
    Valid p;
    additive(p);
    attention_forward(p.qv, p.kv, p.vv, p.options, p.outputs);
  });
  expect_error([&](Valid& p) { additive(p), p.options.va.reset(); },
               {"va: expected a tensor for score 'additive'"});
  expect_error([&](Valid& p) { additive(p), p.options.va = va_bad.view(); },
               {"wq: expected [A, Dq] = [15, 8]", "got [16, 8]"});
  expect_error([&](Valid& p) { additive(p), p.options.wq = wq_bad.view(); },
               {"wq: expected [A, Dq] = [16, 8]", "got [16, 9]"});
  expect_error([&](Valid& p) { additive(p), p.options.w = w.view(); },
               {"w: expected none for score 'additive'"});
  expect_error([&](Valid& p) { p.options.wq = wq.view(); },
               {"wq: expected none for score 'scaled_dot'"});
  Tensor w_int(DType::int32, {8, 8});
  expect_error([&](Valid& p) { p.options.score = Score::bilinear, p.options.w = w_int.view(); },
               {"w: expected dtype float32, float64, bfloat16 or float16, got int32"});
}

TEST(AttentionErrors, ScaleAndSoftcap) {
  expect_error([](Valid& p) { p.options.scale = std::nan(""); },
               {"scale: expected a finite number"});
  expect_error([](Valid& p) { p.options.softcap = -1.0; },
               {"softcap: expected a finite number >= 0"});
  expect_error([](Valid& p) { p.options.softcap = std::numeric_limits<double>::infinity(); },
               {"softcap:"});
}

TEST(AttentionErrors, MasksAndBias) {
  Tensor mask_float(DType::float32, {3, 5}), mask_bad(DType::boolean, {2, 5}),
      bias_bad(DType::float32, {4, 3, 4}), slopes_bad(DType::float32, {3}),
      lengths(DType::int64, {2}), lengths_float(DType::float32, {2}),
      lengths_short(DType::int32, {1});
  expect_error([&](Valid& p) { p.options.mask = mask_float.view(); },
               {"mask: expected dtype bool, got float32"});
  expect_error(
      [&](Valid& p) { p.options.mask = mask_bad.view(); },
      {"mask: expected a shape broadcastable to [B, Hq, Nq, Nk] = [2, 4, 3, 5], got [2, 5]"});
  expect_error([&](Valid& p) { p.options.bias = bias_bad.view(); },
               {"bias: expected a shape broadcastable", "got [4, 3, 4]"});
  expect_error([&](Valid& p) { p.options.alibi_slopes = slopes_bad.view(); },
               {"alibi_slopes: expected [Hq] = [4] or [B, Hq] = [2, 4], got [3]"});
  lengths.data<std::int64_t>()[1] = 6;
  expect_error([&](Valid& p) { p.options.key_lengths = lengths.view(); },
               {"key_lengths: expected values in [0, Nk = 5], got 6 at [1]"});
  expect_error([&](Valid& p) { p.options.key_lengths = lengths_float.view(); },
               {"key_lengths: expected dtype int32 or int64, got float32"});
  expect_error([&](Valid& p) { p.options.key_lengths = lengths_short.view(); },
               {"key_lengths: expected [B] = [2], got [1]"});
  expect_error([&](Valid& p) { p.options.key_starts = lengths.view(); },
               {"key_starts: expected values in [0, Nk = 5], got 6 at [1]"});
  expect_error([&](Valid& p) { p.options.key_starts = lengths_float.view(); },
               {"key_starts: expected dtype int32 or int64, got float32"});
  expect_error([&](Valid& p) { p.options.key_starts = lengths_short.view(); },
               {"key_starts: expected [B] = [2], got [1]"});
  expect_error([](Valid& p) { p.options.window_left = -2; },
               {"window: expected (left, right)", "got (-2, -1)"});
  expect_error([](Valid& p) { p.options.prefix_length = 2; },
               {"prefix_length: expected 0, or a length >= 0 with causal", "got 2 without causal"});
  expect_error(
      [](Valid& p) {
        p.options.causal = true;
        p.options.prefix_length = -1;
      },
      {"prefix_length: expected", "got -1"});
  // A block mask of another problem: Nk 4 instead of 5, or 3 heads instead of 1 or 4.
  const auto all = [](std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return true; };
  const BlockMask short_keys = BlockMask::from_mask_mod(all, {1, 1, 3, 4, 2, 2});
  const BlockMask three_heads = BlockMask::from_mask_mod(all, {2, 3, 3, 5, 2, 2});
  expect_error([&](Valid& p) { p.options.block_mask = &short_keys; },
               {"block_mask: expected [1 or B, 1 or Hq, Nq, Nk] = [1 or 2, 1 or 4, 3, 5]",
                "got [1, 1, 3, 4]"});
  expect_error([&](Valid& p) { p.options.block_mask = &three_heads; }, {"got [2, 3, 3, 5]"});
  expect_error([](Valid& p) { p.options.threads = -1; }, {"threads: expected >= 0"});
}

TEST(AttentionErrors, SizesThatOverflowOrPointNowhere) {
  expect_error([](Valid& p) { p.qv.data = nullptr; },
               {"q: expected data for shape [2, 3, 4, 8], got a null pointer"});
  expect_error(
      [](Valid& p) {
        p.kv.shape[1] = std::int64_t{1} << 62;
        p.vv.shape[1] = p.kv.shape[1];
      },
      {"k: expected a size that fits in memory"});
  expect_error([](Valid& p) { p.qv.strides[0] = std::int64_t{1} << 61; },
               {"q: expected strides that address memory"});
  expect_error([](Valid& p) { p.qv.shape[1] = -3; }, {"q: expected sizes >= 0, got -3"});
}

TEST(AttentionErrors, ParsedNames) {
  // Every score's unit answers to its own enum value and name (the table is in enum order).
  for (Score score :
       {Score::dot, Score::scaled_dot, Score::bilinear, Score::additive, Score::cosine}) {
    EXPECT_EQ(parse_score(score_name(score)), score);
  }
  EXPECT_STREQ(score_name(Score::cosine), "cosine");
  EXPECT_EQ(score_names(),
            (std::vector<std::string_view>{"dot", "scaled_dot", "bilinear", "additive", "cosine"}));
  EXPECT_EQ(parse_score("bilinear"), Score::bilinear);
  EXPECT_EQ(parse_causal_align("top-left"), CausalAlign::top_left);
  EXPECT_EQ(parse_score("cosine"), Score::cosine);
  EXPECT_THAT([] { parse_score("sine"); },
              ::testing::ThrowsMessage<Error>(
                  StrEq("score: expected one of dot, scaled_dot, bilinear, additive, cosine, got "
                        "'sine'")));
  EXPECT_THAT([] { parse_causal_align("middle"); },
              ::testing::ThrowsMessage<Error>(
                  HasSubstr("causal_align: expected bottom-right or top-left")));
}

}  // namespace
}  // namespace qkv
