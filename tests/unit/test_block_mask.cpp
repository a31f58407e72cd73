// Block masks: built from a mask_mod (or from blocks), each block classified from its pairs, each
// pair kept, each row's run kept when every row is one; the combinators; bad blocks refused; and a
// block-masked attention that equals the same mask given as a boolean tensor.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
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

// The visible keys [first, last) of row i of (b, h) under a rule when they are one run (or none:
// first == last), else nullopt.
template <class Rule>
std::optional<std::pair<std::int64_t, std::int64_t>> run_of(const Rule& rule, std::int64_t b,
                                                            std::int64_t h, std::int64_t i,
                                                            std::int64_t kv_len) {
  std::int64_t first = -1, last = -1;
  for (std::int64_t j = 0; j < kv_len; ++j) {
    if (!rule(b, h, i, j)) continue;
    if (first >= 0 && last != j) return std::nullopt;  // a hidden key inside the row
    if (first < 0) first = j;
    last = j + 1;
  }
  if (first < 0) return std::pair<std::int64_t, std::int64_t>{0, 0};
  return std::pair{first, last};
}

// Masks whose rows are each one run (causal, a sliding window, documents, prefix LM, on blocks
// that cut their edges) keep each row's run; one hidden key inside one row, or the rule above,
// keeps none (the kernels then test the bits); so does a mask without partial blocks.
TEST(BlockMask, KeepsEachRowsRunWhenEveryRowIsOne) {
  using I = std::int64_t;
  const auto causal = [](I, I, I i, I j) { return j <= i; };
  const auto window = [](I, I h, I i, I j) { return j <= i && i - j <= 9 + h; };
  const auto documents = [](I b, I, I i, I j) { return i / (7 + b) == j / (7 + b); };
  const auto prefix_lm = or_masks(causal, [](I, I, I, I j) { return j < 21; });
  const auto holed = [](I, I, I i, I j) { return j <= i && !(i == 30 && j == 3); };
  const BlockMaskShape shape{2, 2, 45, 61, 8, 16};
  const auto check = [&](const auto& rule, bool runs) {
    const BlockMask mask = BlockMask::from_mask_mod(rule, shape);
    ASSERT_EQ(mask.rows_are_runs(), runs);
    if (!runs) return;
    for (I b = 0; b < 2; ++b)
      for (I h = 0; h < 2; ++h)
        for (I i = 0; i < 45; ++i) {
          const auto want = run_of(rule, b, h, i, 61);
          ASSERT_TRUE(want.has_value());
          if (want->first == want->second) {
            EXPECT_EQ(mask.run_first(b, h, i), mask.run_last(b, h, i)) << b << h << " " << i;
          } else {
            EXPECT_EQ(mask.run_first(b, h, i), want->first) << b << h << " " << i;
            EXPECT_EQ(mask.run_last(b, h, i), want->second) << b << h << " " << i;
          }
        }
  };
  check(causal, true);
  check(window, true);
  check(documents, true);
  check(prefix_lm, true);
  check(holed, false);
  check(rule, false);
  // Documents of 16 on blocks of 16: every block empty or full, nothing to keep.
  check([](I, I, I i, I j) { return i / 16 == j / 16; }, false);
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
// the fused kernel (float32) and in the reference: a rule with hidden keys inside rows (the
// partial blocks' bits tested) and one whose rows are runs (their runs taken as the intervals).
class BlockMaskAttention : public ::testing::TestWithParam<bool> {};

TEST_P(BlockMaskAttention, EqualsTheSameMaskAsATensor) {
  const bool runs = GetParam();
  const auto window = [](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return j <= i && i - j <= 5 + 3 * h + b;
  };
  const auto visible = [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) {
    return runs ? window(b, h, i, j) : rule(b, h, i, j);
  };
  AttentionCase c;
  c.batch = 2;
  c.q_len = 45;
  c.k_len = 61;
  c.q_heads = 3;
  c.kv_heads = 1;
  const AttentionInputs inputs = make_inputs(c, DType::float32);
  const BlockMask mask = BlockMask::from_mask_mod(visible, {2, 3, 45, 61, 8, 16});
  ASSERT_EQ(mask.rows_are_runs(), runs);
  Tensor dense(DType::boolean, {2, 3, 45, 61});
  for (std::int64_t n = 0; n < dense.numel(); ++n) {
    const std::int64_t j = n % 61, i = n / 61 % 45, h = n / (61 * 45) % 3, b = n / (61 * 45 * 3);
    dense.data<bool>()[n] = visible(b, h, i, j);
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

INSTANTIATE_TEST_SUITE_P(HolesAndRuns, BlockMaskAttention, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& param) {
                           return param.param ? std::string("Runs") : std::string("Holes");
                         });

}  // namespace
}  // namespace qkv::testing
