// Block masks: built from a mask_mod (or from blocks), each block classified from its pairs, each
// pair kept; the combinators; bad blocks refused; and a block-masked attention that equals the
// same mask given as a boolean tensor.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

#include "attention_case.hpp"
#include "qkv/attention.hpp"
#include "qkv/block_mask.hpp"
#include "qkv/error.hpp"

namespace qkv::testing {
namespace {

using ::testing::HasSubstr;

// Visible pairs of a rule with documents, per-head strides and a causal part, on odd sizes.
bool rule(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
  return (i / (7 + b) == j / (7 + b) || (j + h) % 4 == 0) && j <= i + 3;
}

TEST(BlockMask, KeepsEveryPairAndClassifiesEveryBlock) {
  constexpr std::int64_t kQ = 4, kK = 5;  // blocks of 4 × 5 pairs
  const BlockMaskShape shape{2, 3, 45, 61, kQ, kK};
  const BlockMask mask = BlockMask::from_mask_mod(rule, shape);
  EXPECT_EQ(mask.q_blocks(), 12);
  EXPECT_EQ(mask.kv_blocks(), 13);
  int kinds_seen[3] = {0, 0, 0};
  for (std::int64_t b = 0; b < 2; ++b) {
    for (std::int64_t h = 0; h < 3; ++h) {
      for (std::int64_t qb = 0; qb < mask.q_blocks(); ++qb) {
        std::int64_t first = -1, last = -1;
        for (std::int64_t kb = 0; kb < mask.kv_blocks(); ++kb) {
          std::int64_t visible = 0, pairs = 0;
          for (std::int64_t i = qb * kQ; i < std::min<std::int64_t>(45, qb * kQ + kQ); ++i) {
            for (std::int64_t j = kb * kK; j < std::min<std::int64_t>(61, kb * kK + kK); ++j) {
              ASSERT_EQ(mask.visible(b, h, i, j), rule(b, h, i, j)) << b << h << i << " " << j;
              visible += rule(b, h, i, j) ? 1 : 0;
              ++pairs;
            }
          }
          const BlockKind want = visible == 0       ? BlockKind::empty
                                 : visible == pairs ? BlockKind::full
                                                    : BlockKind::partial;
          EXPECT_EQ(mask.kind(b, h, qb, kb), want);
          ++kinds_seen[static_cast<int>(want)];
          if (want != BlockKind::empty) {
            if (first < 0) first = kb * kK;
            last = std::min<std::int64_t>(61, kb * kK + kK);
          }
        }
        EXPECT_EQ(mask.first_key(b, h, qb), std::max<std::int64_t>(first, 0));
        EXPECT_EQ(mask.last_key(b, h, qb), std::max<std::int64_t>(last, 0));
      }
    }
  }
  // The rule makes blocks of all three kinds, so each branch above was taken.
  EXPECT_GT(kinds_seen[0], 0);
  EXPECT_GT(kinds_seen[1], 0);
  EXPECT_GT(kinds_seen[2], 0);
}

TEST(BlockMask, BroadcastsBatchAndHeadsOfOne) {
  const BlockMask mask = BlockMask::from_mask_mod(
      [](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) { return j <= i; },
      {1, 1, 20, 20, 8, 8});
  for (std::int64_t b : {0, 5})
    for (std::int64_t h : {0, 7}) EXPECT_EQ(mask.kind(b, h, 0, 1), BlockKind::empty);
  EXPECT_EQ(mask.kind(3, 2, 1, 0), BlockKind::full);
  EXPECT_EQ(mask.kind(3, 2, 1, 1), BlockKind::partial);
  EXPECT_DOUBLE_EQ(mask.density(), 6.0 / 9.0);
}

TEST(BlockMask, CombinatorsAreFlexAttentions) {
  const auto causal = [](std::int64_t, std::int64_t, std::int64_t i, std::int64_t j) {
    return j <= i;
  };
  const auto prefix = [](std::int64_t, std::int64_t, std::int64_t, std::int64_t j) {
    return j < 5;
  };
  const auto both = and_masks(causal, prefix);
  const auto either = or_masks(causal, prefix);
  for (std::int64_t i = 0; i < 12; ++i) {
    for (std::int64_t j = 0; j < 12; ++j) {
      EXPECT_EQ(both(0, 0, i, j), j <= i && j < 5);
      EXPECT_EQ(either(0, 0, i, j), j <= i || j < 5);
      EXPECT_TRUE(noop_mask(0, 0, i, j));
    }
  }
}

TEST(BlockMask, FromBlocksEqualsFromMaskMod) {
  const BlockMaskShape shape{1, 2, 30, 37, 8, 16};
  const BlockMask built = BlockMask::from_mask_mod(rule, shape);
  std::vector<BlockKind> kinds;
  std::vector<std::uint8_t> partial;
  for (std::int64_t h = 0; h < 2; ++h) {
    for (std::int64_t qb = 0; qb < built.q_blocks(); ++qb) {
      for (std::int64_t kb = 0; kb < built.kv_blocks(); ++kb) {
        kinds.push_back(built.kind(0, h, qb, kb));
        if (kinds.back() != BlockKind::partial) continue;
        for (std::int64_t r = 0; r < 8; ++r)
          for (std::int64_t t = 0; t < 16; ++t)
            partial.push_back(rule(0, h, qb * 8 + r, kb * 16 + t) ? 1 : 0);
      }
    }
  }
  const BlockMask given(shape, kinds, partial);
  for (std::int64_t h = 0; h < 2; ++h)
    for (std::int64_t i = 0; i < 30; ++i)
      for (std::int64_t j = 0; j < 37; ++j) EXPECT_EQ(given.visible(0, h, i, j), rule(0, h, i, j));
}

TEST(BlockMask, RefusesWhatDoesNotFit) {
  const BlockMaskShape shape{1, 1, 10, 10, 4, 4};  // 3 × 3 blocks
  const std::vector<std::uint8_t> partial_none;
  EXPECT_THAT(
      [&] { BlockMask(shape, std::vector<BlockKind>(8), partial_none); },
      ::testing::ThrowsMessage<Error>(HasSubstr("expected batch·heads·q_blocks·kv_blocks = 9")));
  std::vector<BlockKind> kinds(9, BlockKind::empty);
  kinds[4] = BlockKind::partial;
  EXPECT_THAT([&] { BlockMask(shape, kinds, std::vector<std::uint8_t>(15)); },
              ::testing::ThrowsMessage<Error>(HasSubstr("expected 1 partial blocks × 16 pairs")));
  kinds[4] = static_cast<BlockKind>(7);
  EXPECT_THAT([&] { BlockMask(shape, kinds, partial_none); },
              ::testing::ThrowsMessage<Error>(HasSubstr("got 7")));
  EXPECT_THAT(
      [&] {
        BlockMask(BlockMaskShape{1, 1, 10, 10, 0, 4}, kinds, partial_none);
      },
      ::testing::ThrowsMessage<Error>(HasSubstr("block sizes in [1, 65536]")));
}

// The block mask of a rule and the boolean tensor of the same rule give the same attention, on
// the fused kernel (float32) and in the reference.
TEST(BlockMask, AttentionEqualsTheSameMaskAsATensor) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 45;
  c.k_len = 61;
  c.q_heads = 3;
  c.kv_heads = 1;
  const AttentionInputs inputs = make_inputs(c, DType::float32);
  const BlockMask mask = BlockMask::from_mask_mod(rule, {2, 3, 45, 61, 8, 16});
  Tensor dense(DType::boolean, {2, 3, 45, 61});
  for (std::int64_t n = 0; n < dense.numel(); ++n) {
    const std::int64_t j = n % 61, i = n / 61 % 45, h = n / (61 * 45) % 3, b = n / (61 * 45 * 3);
    dense.data<bool>()[n] = rule(b, h, i, j);
  }
  AttentionInputs by_blocks = inputs, by_tensor = inputs;
  by_blocks.options.block_mask = &mask;
  by_tensor.options.mask = dense.view();
  for (Evaluator evaluator : {Evaluator::fast, Evaluator::reference}) {
    const AttentionResults a = evaluate(c, by_blocks, evaluator, DType::float32, true);
    const AttentionResults b = evaluate(c, by_tensor, evaluator, DType::float32, true);
    EXPECT_EQ(max_abs_difference(a.out, b.out), 0.0);
    EXPECT_EQ(max_abs_difference(a.lse, b.lse), 0.0);
    EXPECT_EQ(max_abs_difference(a.weights, b.weights), 0.0);
  }
}

}  // namespace
}  // namespace qkv::testing
