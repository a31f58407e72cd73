// Attention computed block by block — query rows and keys split at arbitrary points, each block
// told its global offsets — equals attention computed at once: forward through merge_attention,
// backward by summing each block's gradients with the global O and LSE. This is what ring
// attention does across processes, checked here within one.

#include <gtest/gtest.h>

#include <vector>

#include "attention_case.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/merge.hpp"

namespace qkv::testing {
namespace {

struct BlockCase {
  bool causal = false;
  CausalAlign align = CausalAlign::bottom_right;
  std::int64_t window_left = -1, window_right = -1;
  bool alibi = false, key_lengths = false;
  std::int64_t q_len = 37, k_len = 53;
  double dropout = 0.0;  // the mask hashes global positions: blocks see the whole problem's
  // A block mask and a score_mod read global positions too (and the prefix of a prefix LM).
  BlockMaskRule block_mask = BlockMaskRule::none;
  ScoreModRule score_mod = ScoreModRule::none;
  std::int64_t prefix_length = 0;
};

class AttentionBlocks : public ::testing::TestWithParam<BlockCase> {};

TEST_P(AttentionBlocks, EqualWholeForwardAndBackward) {
  const BlockCase& bc = GetParam();
  AttentionCase c;
  c.batch = 2;
  c.q_len = bc.q_len;
  c.k_len = bc.k_len;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.causal = bc.causal;
  c.causal_align = bc.align;
  c.window_left = bc.window_left;
  c.window_right = bc.window_right;
  c.alibi = bc.alibi;
  c.key_lengths = bc.key_lengths;
  c.block_mask = bc.block_mask;
  c.score_mod = bc.score_mod;
  c.prefix_length = bc.prefix_length;
  c.v_dim = 6;
  AttentionInputs in = make_inputs(c, DType::float64);
  in.options.dropout = bc.dropout;
  in.options.dropout_seed = 21;
  const AttentionResults whole = evaluate(c, in, Evaluator::fast, DType::float64, false);
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 4);
  Tensor dq(DType::float64, {c.batch, c.q_len, c.q_heads, c.q_dim});
  Tensor dk(DType::float64, {c.batch, c.k_len, c.kv_heads, c.q_dim});
  Tensor dv(DType::float64, {c.batch, c.k_len, c.kv_heads, c.v_dim});
  AttentionGradients grads;
  grads.dq = dq.mutable_view();
  grads.dk = dk.mutable_view();
  grads.dv = dv.mutable_view();
  attention_backward(in.q, in.k, in.v, in.options, dout.view(), std::nullopt, grads);

  // Uneven blocks, one of a single key.
  const std::vector<std::int64_t> q_cuts{0, c.q_len / 3, c.q_len},
      k_cuts{0, c.k_len / 3, c.k_len / 3 + 1, 2 * c.k_len / 3, c.k_len};
  Tensor merged_out(DType::float64, whole.out.shape()),
      merged_lse(DType::float64, whole.lse.shape());
  Tensor dq_sum(DType::float64, dq.shape()), dk_sum(DType::float64, dk.shape()),
      dv_sum(DType::float64, dv.shape());
  for (std::size_t a = 0; a + 1 < q_cuts.size(); ++a) {
    const std::int64_t q0 = q_cuts[a], q1 = q_cuts[a + 1];
    std::vector<Tensor> outs, lses;
    for (std::size_t e = 0; e + 1 < k_cuts.size(); ++e) {
      const std::int64_t k0 = k_cuts[e], k1 = k_cuts[e + 1];
      AttentionOptions options = in.options;
      options.query_offset = q0;
      options.key_offset = k0;
      options.query_total = c.q_len;
      options.key_total = c.k_len;
      const TensorView q = in.q.narrow(1, q0, q1), k = in.k.narrow(1, k0, k1),
                       v = in.v.narrow(1, k0, k1);
      outs.emplace_back(DType::float64,
                        std::vector<std::int64_t>{c.batch, q1 - q0, c.q_heads, c.v_dim});
      lses.emplace_back(DType::float64, std::vector<std::int64_t>{c.batch, c.q_heads, q1 - q0});
      attention_forward(q, k, v, options,
                        {outs.back().mutable_view(), lses.back().mutable_view(), {}});
      // The block's gradients from the whole problem's O and LSE.
      Tensor bq(DType::float64, {c.batch, q1 - q0, c.q_heads, c.q_dim});
      Tensor bk(DType::float64, {c.batch, k1 - k0, c.kv_heads, c.q_dim});
      Tensor bv(DType::float64, {c.batch, k1 - k0, c.kv_heads, c.v_dim});
      AttentionGradients block;
      block.dq = bq.mutable_view();
      block.dk = bk.mutable_view();
      block.dv = bv.mutable_view();
      attention_backward(
          q, k, v, options, dout.view().narrow(1, q0, q1), std::nullopt, block,
          SavedForward{whole.out.view().narrow(1, q0, q1), whole.lse.view().narrow(2, q0, q1)});
      const auto add = [](Tensor& total, const Tensor& part, std::int64_t offset) {
        const std::int64_t n = total.shape()[1], m = part.shape()[1];
        const std::int64_t inner = total.numel() / (total.shape()[0] * n);
        for (std::int64_t b = 0; b < total.shape()[0]; ++b)
          for (std::int64_t r = 0; r < m; ++r)
            for (std::int64_t x = 0; x < inner; ++x)
              total.data<double>()[(b * n + offset + r) * inner + x] +=
                  part.data<double>()[(b * m + r) * inner + x];
      };
      add(dq_sum, bq, q0);
      add(dk_sum, bk, k0);
      add(dv_sum, bv, k0);
    }
    std::vector<TensorView> out_views, lse_views;
    for (std::size_t e = 0; e < outs.size(); ++e) {
      out_views.push_back(outs[e].view());
      lse_views.push_back(lses[e].view());
    }
    merge_attention(out_views, lse_views, merged_out.mutable_view().narrow(1, q0, q1),
                    merged_lse.mutable_view().narrow(2, q0, q1));
  }
  EXPECT_LE(max_abs_difference(merged_out, whole.out), 1e-12);
  EXPECT_LE(max_abs_difference(merged_lse, whole.lse), 1e-12);
  EXPECT_LE(max_abs_difference(dq_sum, dq), 1e-10);
  EXPECT_LE(max_abs_difference(dk_sum, dk), 1e-10);
  EXPECT_LE(max_abs_difference(dv_sum, dv), 1e-10);
}

INSTANTIATE_TEST_SUITE_P(
    Positions, AttentionBlocks,
    ::testing::Values(BlockCase{}, BlockCase{true}, BlockCase{true, CausalAlign::top_left},
                      BlockCase{false, CausalAlign::bottom_right, 7, 2},
                      BlockCase{true, CausalAlign::bottom_right, 5, -1, true},
                      BlockCase{false, CausalAlign::bottom_right, -1, -1, false, true},
                      BlockCase{true, CausalAlign::top_left, -1, -1, true, true, 53, 37},
                      BlockCase{true, CausalAlign::bottom_right, -1, -1, false, false, 37, 53, 0.3},
                      BlockCase{false, CausalAlign::bottom_right, -1, -1, false, false, 37, 53, 0.0,
                                BlockMaskRule::strided, ScoreModRule::capped_slopes},
                      BlockCase{true, CausalAlign::top_left, -1, -1, false, true, 53, 53, 0.0,
                                BlockMaskRule::documents, ScoreModRule::relative_bias, 9}));

// Head blocks (head-parallel attention): query_head_offset gives dropout, a per-head block mask
// (tested bit by bit, or taken as each row's run) and a score_mod's parameters the global head.
class HeadBlocks : public ::testing::TestWithParam<int> {};

TEST_P(HeadBlocks, EqualWhole) {
  AttentionCase c;
  c.q_len = 19;
  c.k_len = 23;
  c.q_heads = 4;
  c.kv_heads = 2;
  if (GetParam() == 1) {
    c.block_mask = BlockMaskRule::strided;  // one block mask per head
    c.score_mod = ScoreModRule::capped_slopes;
  }
  if (GetParam() == 2) c.block_mask = BlockMaskRule::head_windows;  // per head, rows are runs
  AttentionInputs in = make_inputs(c, DType::float64);
  if (GetParam() == 0) {
    in.options.dropout = 0.4;
    in.options.dropout_seed = 3;
  }
  const AttentionResults whole = evaluate(c, in, Evaluator::fast, DType::float64, false);
  for (std::int64_t first = 0; first < 4; first += 2) {  // query heads [first, first + 2)
    AttentionOptions options = in.options;
    options.query_head_offset = first;
    options.query_head_total = 4;
    Tensor out(DType::float64, {c.batch, c.q_len, 2, c.v_dim});
    attention_forward(in.q.narrow(2, first, first + 2), in.k.narrow(2, first / 2, first / 2 + 1),
                      in.v.narrow(2, first / 2, first / 2 + 1), options,
                      {out.mutable_view(), std::nullopt, std::nullopt});
    Tensor expected(DType::float64, out.shape());
    for (std::int64_t b = 0; b < c.batch; ++b)
      for (std::int64_t i = 0; i < c.q_len; ++i)
        for (std::int64_t h = 0; h < 2; ++h)
          for (std::int64_t d = 0; d < c.v_dim; ++d)
            expected.data<double>()[((b * c.q_len + i) * 2 + h) * c.v_dim + d] =
                whole.out.data<double>()[((b * c.q_len + i) * 4 + first + h) * c.v_dim + d];
    EXPECT_LE(max_abs_difference(out, expected), 1e-12) << "heads from " << first;
  }
}

INSTANTIATE_TEST_SUITE_P(DropoutAndPerHeadMasks, HeadBlocks, ::testing::Values(0, 1, 2));

TEST(AttentionBlocks, OffsetsAreChecked) {
  AttentionCase c;
  AttentionInputs in = make_inputs(c, DType::float32);
  in.options.query_offset = 3;
  in.options.query_total = 9;  // 3 + Nq = 11 > 9
  EXPECT_THROW(evaluate(c, in, Evaluator::fast, DType::float32, false), Error);
  in.options.query_offset = 0;
  in.options.query_total = 0;
  in.options.query_head_offset = 1;
  in.options.query_head_total = c.q_heads;  // 1 + Hq > total
  EXPECT_THROW(evaluate(c, in, Evaluator::fast, DType::float32, false), Error);
}

}  // namespace
}  // namespace qkv::testing
