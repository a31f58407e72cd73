// merge_attention: attention over disjoint key sets, merged by LSE, equals attention over all
// keys at once.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "attention_case.hpp"
#include "qkv/error.hpp"
#include "qkv/merge.hpp"

namespace qkv::testing {
namespace {

// Keys [first, last) of a [B, N, H, D] view.
TensorView key_slice(const TensorView& view, std::int64_t first, std::int64_t last) {
  TensorView slice = view;
  slice.data = static_cast<const float*>(view.data) + first * view.strides[1];
  slice.shape[1] = last - first;
  return slice;
}

TEST(Merge, PartsOverDisjointKeysEqualTheWhole) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 9;
  c.k_len = 300;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.q_dim = 16;
  c.v_dim = 12;
  for (Score score : {Score::scaled_dot, Score::additive}) {
    c.score = score;
    c.k_dim = score == Score::additive ? 10 : 0;
    // Parts: keys [0, 1), [1, 130), [130, 300); a mask hides every key of the middle part from
    // query row 4, so that part is empty for that row.
    const std::vector<std::int64_t> cuts = {0, 1, 130, 300};
    AttentionInputs in = make_inputs(c, DType::float32);
    Tensor whole_mask(DType::boolean, {c.q_len, c.k_len});
    for (std::int64_t i = 0; i < c.q_len; ++i)
      for (std::int64_t j = 0; j < c.k_len; ++j)
        whole_mask.data<bool>()[i * c.k_len + j] = !(i == 4 && j >= 1 && j < 130);
    in.options.mask = whole_mask.view();
    const AttentionResults whole = evaluate(c, in, Evaluator::reference, DType::float64, false);
    std::vector<Tensor> part_outs, part_lses, part_masks;
    for (std::size_t p = 0; p + 1 < cuts.size(); ++p) {
      const std::int64_t first = cuts[p], last = cuts[p + 1];
      AttentionOptions options = in.options;
      Tensor mask(DType::boolean, {c.q_len, last - first});
      for (std::int64_t i = 0; i < c.q_len; ++i)
        for (std::int64_t j = 0; j < last - first; ++j)
          mask.data<bool>()[i * (last - first) + j] = !(p == 1 && i == 4);
      options.mask = mask.view();
      part_masks.push_back(std::move(mask));
      part_outs.emplace_back(DType::float32,
                             std::vector<std::int64_t>{c.batch, c.q_len, c.q_heads, c.v_dim});
      part_lses.emplace_back(DType::float32,
                             std::vector<std::int64_t>{c.batch, c.q_heads, c.q_len});
      attention_forward(in.q, key_slice(in.k, first, last), key_slice(in.v, first, last), options,
                        {part_outs.back().mutable_view(), part_lses.back().mutable_view(), {}});
    }
    std::vector<TensorView> outs, lses;
    for (std::size_t p = 0; p < part_outs.size(); ++p) {
      outs.push_back(part_outs[p].view());
      lses.push_back(part_lses[p].view());
    }
    Tensor out(DType::float32, {c.batch, c.q_len, c.q_heads, c.v_dim});
    Tensor lse(DType::float32, {c.batch, c.q_heads, c.q_len});
    merge_attention(outs, lses, out.mutable_view(), lse.mutable_view());
    EXPECT_LE(max_abs_difference(out, whole.out), 1e-5 * (1 + max_abs(whole.out)))
        << score_name(score);
    EXPECT_LE(max_abs_difference(lse, whole.lse), 1e-5 * (1 + max_abs(whole.lse)))
        << score_name(score);
    // In place: the merged result may overwrite a part.
    merge_attention(outs, lses, part_outs[0].mutable_view(), part_lses[0].mutable_view());
    EXPECT_EQ(max_abs_difference(part_outs[0], out), 0.0);
  }
}

TEST(Merge, EmptyPartsAndEmptyRows) {
  const float minus_infinity = -std::numeric_limits<float>::infinity();
  // One row (B = Nq = Hq = 1), Dv = 2; part 0 saw nothing, part 1 saw something.
  const float out0[] = {5.0f, 5.0f}, out1[] = {1.0f, 2.0f};
  const float lse0[] = {minus_infinity}, lse1[] = {0.5f};
  const TensorView outs[] = {TensorView::contiguous(out0, DType::float32, {1, 1, 1, 2}),
                             TensorView::contiguous(out1, DType::float32, {1, 1, 1, 2})};
  const TensorView lses[] = {TensorView::contiguous(lse0, DType::float32, {1, 1, 1}),
                             TensorView::contiguous(lse1, DType::float32, {1, 1, 1})};
  float out[2], lse[1];
  merge_attention(outs, lses, MutableTensorView::contiguous(out, DType::float32, {1, 1, 1, 2}),
                  MutableTensorView::contiguous(lse, DType::float32, {1, 1, 1}));
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], 2.0f);
  EXPECT_EQ(lse[0], 0.5f);
  const TensorView empty_lses[] = {lses[0], lses[0]};
  merge_attention(outs, empty_lses,
                  MutableTensorView::contiguous(out, DType::float32, {1, 1, 1, 2}),
                  MutableTensorView::contiguous(lse, DType::float32, {1, 1, 1}));
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_EQ(lse[0], minus_infinity);
}

TEST(Merge, BadArguments) {
  Tensor o(DType::float32, {1, 2, 3, 4}), l(DType::float32, {1, 3, 2}),
      l_bad(DType::float32, {1, 2, 3}), o_int(DType::int32, {1, 2, 3, 4});
  const TensorView outs[] = {o.view(), o.view()};
  const TensorView lses[] = {l.view(), l_bad.view()};
  const auto message = [](auto call) {
    try {
      call();
    } catch (const Error& error) {
      return std::string(error.what());
    }
    return std::string("no error");
  };
  EXPECT_THAT(
      message([&] { merge_attention(std::span(outs, 2), std::span(lses, 1), o.mutable_view()); }),
      ::testing::HasSubstr("outs, lses: expected the same number (>= 1) of parts, got 2 and 1"));
  EXPECT_THAT(message([&] { merge_attention(outs, lses, o.mutable_view()); }),
              ::testing::HasSubstr("lses[1]: expected [1, 3, 2] (from out), got [1, 2, 3]"));
  const TensorView int_outs[] = {o_int.view()};
  EXPECT_THAT(message([&] { merge_attention(int_outs, std::span(lses, 1), o.mutable_view()); }),
              ::testing::HasSubstr(
                  "outs[0]: expected dtype float32, float64, bfloat16 or float16, got int32"));
}

}  // namespace
}  // namespace qkv::testing
