// The shape zoo: the fast path against the float64 reference over sizes, head dims, GQA ratios,
// every score and every mask, with tolerances from the error floor of the naive float32
// evaluation (STYLE.md) and the contract's bound (docs/contract.md §7).

#include <gtest/gtest.h>
#include <array>

#include <vector>

#include "attention_case.hpp"
#include "qkv/simd.hpp"

namespace qkv::testing {
namespace {

// Every score, with its per-head parameter variants.
std::vector<AttentionCase> score_variants(AttentionCase base) {
  std::vector<AttentionCase> cases;
  for (Score score :
       {Score::dot, Score::scaled_dot, Score::bilinear, Score::additive, Score::cosine}) {
    for (bool per_head : {false, true}) {
      if (per_head && (score == Score::dot || score == Score::scaled_dot)) continue;
      AttentionCase c = base;
      c.score = score;
      c.per_head_parameters = per_head;
      if (score == Score::bilinear || score == Score::additive) c.k_dim = c.q_dim + 3;
      cases.push_back(c);
    }
  }
  return cases;
}

std::vector<AttentionCase> shape_zoo() {
  std::vector<AttentionCase> zoo;
  auto add_all_scores = [&](const AttentionCase& base) {
    for (const AttentionCase& c : score_variants(base)) zoo.push_back(c);
  };
  std::uint64_t seed = 100;
  // 1. Sequence lengths, square and not.
  for (std::int64_t n : {1, 7, 63, 64, 65, 257}) {
    AttentionCase c;
    c.q_len = c.k_len = n;
    c.seed = ++seed;
    add_all_scores(c);
  }
  for (auto [nq, nk] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {7, 65}, {65, 7}, {1, 257}, {64, 1}, {63, 130}}) {
    AttentionCase c;
    c.q_len = nq;
    c.k_len = nk;
    c.causal = true;
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 2. Head dims, with Dv equal and different.
  for (std::int64_t d : {1, 8, 64, 80, 128}) {
    for (std::int64_t dv : {d, d + 5}) {
      AttentionCase c;
      c.q_len = 33;
      c.k_len = 47;
      c.q_dim = d;
      c.v_dim = dv;
      c.seed = ++seed;
      add_all_scores(c);
    }
  }
  // 3. Grouped-query ratios 1, 2, 4 and multi-query, in a batch with different key lengths.
  for (auto [hq, hk] :
       std::vector<std::pair<std::int64_t, std::int64_t>>{{4, 4}, {4, 2}, {8, 2}, {4, 1}}) {
    AttentionCase c;
    c.batch = 3;
    c.q_heads = hq;
    c.kv_heads = hk;
    c.q_len = 20;
    c.k_len = 70;
    c.key_lengths = true;
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 4. Every mask, alone and combined, under every score.
  std::vector<AttentionCase> masks;
  {
    AttentionCase c;
    c.batch = 2;
    c.q_len = 37;
    c.k_len = 70;
    c.q_heads = 4;
    c.kv_heads = 2;
    masks.push_back(c);
    AttentionCase causal = c;
    causal.causal = true;
    masks.push_back(causal);
    causal.causal_align = CausalAlign::top_left;
    masks.push_back(causal);
    AttentionCase window = c;
    window.window_left = 9;
    window.window_right = 4;
    masks.push_back(window);
    window.window_right = -1;
    masks.push_back(window);
    window.window_left = -1;
    window.window_right = 0;
    masks.push_back(window);
    AttentionCase lengths = c;
    lengths.key_lengths = true;
    masks.push_back(lengths);
    AttentionCase boolean = c;
    boolean.mask = true;
    masks.push_back(boolean);
    AttentionCase all = c;
    all.causal = true;
    all.window_left = 20;
    all.key_lengths = true;
    all.mask = true;
    masks.push_back(all);
    all.q_len = 90;  // Nq > Nk: bottom-right causal leaves the first rows empty
    masks.push_back(all);
    // Boolean masks whose rows are runs, read as intervals: alone, with the position masks, and
    // over several of the kernels' key tiles.
    AttentionCase runs = c;
    runs.mask = runs.mask_runs = true;
    masks.push_back(runs);
    all.mask_runs = true;
    masks.push_back(all);
    runs.q_len = runs.k_len = 300;
    runs.causal = true;
    masks.push_back(runs);
    AttentionCase prefix = c;  // prefix LM, both alignments, with a window
    prefix.causal = true;
    prefix.prefix_length = 23;
    masks.push_back(prefix);
    prefix.causal_align = CausalAlign::top_left;
    prefix.window_left = 30;
    masks.push_back(prefix);
    // Block masks: per batch (documents, some rows of the last see no key when Nq > Nk) and per
    // head (strided: empty blocks between non-empty ones), in blocks that match the kernels'
    // tiles and blocks that do not, alone and with the other masks.
    AttentionCase documents = c;
    documents.block_mask = BlockMaskRule::documents;
    masks.push_back(documents);
    documents.causal = true;
    documents.mask = true;
    documents.mask_block = 24;
    masks.push_back(documents);
    AttentionCase strided = c;
    strided.block_mask = BlockMaskRule::strided;
    masks.push_back(strided);
    strided.mask_block = 40;
    strided.key_lengths = true;
    strided.window_left = 33;
    masks.push_back(strided);
    AttentionCase long_documents = c;  // several of the kernels' key tiles
    long_documents.q_len = long_documents.k_len = 300;
    long_documents.block_mask = BlockMaskRule::documents;
    long_documents.mask_block = 64;
    masks.push_back(long_documents);
    long_documents.block_mask = BlockMaskRule::strided;
    long_documents.mask_block = 16;
    long_documents.causal = true;
    masks.push_back(long_documents);
    AttentionCase streaming = c;  // sink tokens and a window: two intervals, a gap between
    streaming.causal = true;
    streaming.window_left = 9;
    streaming.sink_tokens = 3;
    masks.push_back(streaming);
    streaming.q_len = streaming.k_len = 300;  // gap tiles of the kernels' skipped
    streaming.window_left = 40;
    streaming.sink_tokens = 5;
    masks.push_back(streaming);
    AttentionCase relative = c;  // score_mods, with and without other options
    relative.score_mod = ScoreModRule::relative_bias;
    masks.push_back(relative);
    relative.causal = true;
    relative.alibi = true;
    masks.push_back(relative);
    AttentionCase capped = c;
    capped.score_mod = ScoreModRule::capped_slopes;
    capped.bias = true;
    capped.block_mask = BlockMaskRule::strided;
    masks.push_back(capped);
  }
  for (AttentionCase c : masks) {
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 5. Score transforms: explicit scale, soft cap, ALiBi, float bias, alone and together; sinks
  // (with a row that sees no key, and with large logits); sigmoid attention likewise.
  for (int variant = 0; variant < 9; ++variant) {
    AttentionCase c;
    c.q_len = 29;
    c.k_len = 41;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.input_scale = 2.0;
    if (variant == 0 || variant == 4) c.scale = 0.37;
    if (variant == 1 || variant == 4) c.softcap = 5.0;
    if (variant == 2 || variant == 4) c.alibi = true;
    if (variant == 3 || variant == 4) c.bias = true;
    if (variant == 4) c.causal = true;
    if (variant == 5) {
      c.sinks = true;
      c.mask = true;
      c.causal = true;
    }
    if (variant == 6) {
      c.sinks = true;
      c.input_scale = 8.0;
    }
    if (variant == 7) {
      c.sigmoid = true;
      c.mask = true;
      c.causal = true;
    }
    if (variant == 8) {
      c.sigmoid = true;
      c.alibi = true;
      c.bias = true;
      c.input_scale = 3.0;
    }
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 6. Strided storage: PyTorch's [B, H, N, D], and a non-unit stride along D.
  for (bool spaced : {false, true}) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = 19;
    c.k_len = 66;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.head_major = true;
    c.spaced_last_dim = spaced;
    c.mask = true;
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 7. Decoding: a few query rows per key head against more keys than one split-KV chunk, with
  // every option and mask.
  for (int variant = 0; variant < 8; ++variant) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = variant == 3 ? 2 : 1;
    c.k_len = 2500;
    c.q_heads = 8;
    c.kv_heads = variant == 0 ? 8 : 2;
    c.q_dim = 32;
    c.v_dim = 24;
    c.key_lengths = variant == 1;
    c.causal = variant == 3;
    c.window_left = variant == 2 ? 1500 : -1;
    c.alibi = variant == 2;
    c.bias = variant == 3;
    c.mask = variant == 1;
    c.softcap = variant == 2 ? 4.0 : 0.0;
    if (variant == 4) {
      c.block_mask = BlockMaskRule::strided;
      c.mask_block = 128;
    }
    if (variant == 5) {  // the sink joins once, not once per split
      c.sinks = true;
      c.key_lengths = true;
    }
    if (variant == 7) {  // sink tokens and a window: the chunks between are skipped
      c.window_left = 600;
      c.sink_tokens = 5;
      c.causal = true;
    }
    if (variant == 6) {  // sigmoid: no split-KV merge, the fused kernel takes it
      c.sigmoid = true;
      c.key_lengths = true;
      c.block_mask = BlockMaskRule::strided;
      c.mask_block = 128;
    }
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 8. Left padding (key_starts): ragged sequences aligned at their ends, as a KV cache gives
  // them, with the causal diagonal and ALiBi at the end; in a masks-sized problem and a decoding
  // one. (Last, so that the seeds of the cases above stay as they were.)
  for (int variant = 0; variant < 3; ++variant) {
    AttentionCase c;
    c.batch = variant == 1 ? 3 : 2;
    c.q_len = variant == 2 ? 1 : 37;
    c.k_len = variant == 2 ? 2500 : 70;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.key_starts = true;
    c.causal = true;
    c.alibi = variant != 2;
    c.key_lengths = variant == 1;
    c.window_left = variant == 1 ? 12 : -1;
    c.seed = ++seed;
    add_all_scores(c);
  }
  // 9. Several tokens against few key/value heads (a decoding step's draft tokens, DeepSeek's
  // absorbed MLA with its one key/value head): 17 to 64 rows per key head, split-KV with a single
  // (batch, key head) pair or with wide heads (D ≥ 256, variant 5); with three pairs, the fused
  // kernel's items hold fewer positions than it would give them (Nq < 64 / group) or a ragged
  // last block of positions.
  for (int variant = 0; variant < 6; ++variant) {
    AttentionCase c;
    c.batch = variant == 3 ? 3 : variant == 5 ? 2 : 1;
    c.q_len = std::array<std::int64_t, 6>{2, 4, 8, 2, 5, 8}[variant];
    c.k_len = 1500;  // two of the split-KV's chunks
    c.q_heads = variant == 2 || variant == 5 ? 8 : 16;
    c.kv_heads = variant == 5 ? 2 : 1;
    c.q_dim = variant == 5 ? 256 : 40;
    c.v_dim = 24;
    c.causal = variant != 2;
    c.window_left = variant == 1 ? 700 : -1;
    c.sinks = variant == 1;
    c.softcap = variant == 2 ? 4.0 : 0.0;
    c.key_lengths = variant == 2 || variant == 3;
    c.seed = ++seed;
    add_all_scores(c);
  }
  return zoo;
}

class ShapeZoo : public ::testing::TestWithParam<AttentionCase> {};

// Checks one result against the reference: within twice the naive float32 error plus a small
// absolute backstop, and within the contract's 1e-5·(1 + max|ref|).
void expect_close(const Tensor& fast, const Tensor& naive, const Tensor& reference,
                  const char* what, const std::string& name) {
  const double error = max_abs_difference(fast, reference);
  const double floor = max_abs_difference(naive, reference);
  const double magnitude = 1.0 + max_abs(reference);
  EXPECT_LE(error, 2.0 * floor + 1e-6 * magnitude)
      << name << " " << what << ": naive float32 error " << floor;
  EXPECT_LE(error, 1e-5 * magnitude) << name << " " << what;
}

// On every SIMD target compiled in and supported by this CPU; with the weights requested and
// without (decoding shapes then take the split-KV kernel).
TEST_P(ShapeZoo, Float32MatchesReference) {
  const AttentionCase& c = GetParam();
  const AttentionInputs inputs = make_inputs(c, DType::float32);
  const AttentionResults reference =
      evaluate(c, inputs, Evaluator::reference, DType::float64, true);
  const AttentionResults naive =
      evaluate(c, inputs, Evaluator::naive_float32, DType::float64, true);
  for (const std::string& target : simd_targets_under_test()) {
    force_simd_target(target);
    const std::string name = c.name() + " on " + target;
    const AttentionResults fast = evaluate(c, inputs, Evaluator::fast, DType::float32, true);
    expect_close(fast.out, naive.out, reference.out, "out", name);
    expect_close(fast.lse, naive.lse, reference.lse, "lse", name);
    expect_close(fast.weights, naive.weights, reference.weights, "weights", name);
    const AttentionResults lean = evaluate(c, inputs, Evaluator::fast, DType::float32, false);
    expect_close(lean.out, naive.out, reference.out, "out without weights", name);
    expect_close(lean.lse, naive.lse, reference.lse, "lse without weights", name);
  }
  force_simd_target("");
}

// bfloat16 inputs (float32 results): against the reference on the same rounded inputs, within
// twice the error of the naive bfloat16 pipeline, and within the contract's 1e-2 relative error.
TEST_P(ShapeZoo, BFloat16MatchesReferenceOnRoundedInputs) {
  const AttentionCase& c = GetParam();
  const AttentionInputs inputs = make_inputs(c, DType::bfloat16);
  const AttentionResults reference =
      evaluate(c, inputs, Evaluator::reference, DType::float64, false);
  const AttentionResults naive =
      evaluate(c, inputs, Evaluator::naive_bfloat16, DType::float64, false);
  for (const std::string& target : simd_targets_under_test()) {
    force_simd_target(target);
    const AttentionResults fast = evaluate(c, inputs, Evaluator::fast, DType::float32, false);
    const double magnitude = 1.0 + max_abs(reference.out);
    const double error = max_abs_difference(fast.out, reference.out);
    EXPECT_LE(error, 2.0 * max_abs_difference(naive.out, reference.out) + 1e-6 * magnitude)
        << c.name() << " on " << target;
    EXPECT_LE(error, 1e-2 * magnitude) << c.name() << " on " << target;
    EXPECT_LE(max_abs_difference(fast.lse, reference.lse), 1e-2 * (1.0 + max_abs(reference.lse)))
        << c.name() << " on " << target;
  }
  force_simd_target("");
}

// float16 storage (IEEE binary16, PyTorch's half), widened to float32 as it is read: computed in
// float32 throughout, so against the reference on the same rounded inputs it must do as float32
// does — within twice the naive float32 evaluation's error on those inputs, and the contract's
// 1e-5 bound.
TEST_P(ShapeZoo, Float16MatchesReferenceOnRoundedInputs) {
  const AttentionCase& c = GetParam();
  const AttentionInputs inputs = make_inputs(c, DType::float16);
  const AttentionResults reference =
      evaluate(c, inputs, Evaluator::reference, DType::float64, false);
  const AttentionResults naive =
      evaluate(c, inputs, Evaluator::naive_float32, DType::float64, false);
  for (const std::string& target : simd_targets_under_test()) {
    force_simd_target(target);
    const std::string name = c.name() + " float16 on " + target;
    const AttentionResults fast = evaluate(c, inputs, Evaluator::fast, DType::float32, false);
    expect_close(fast.out, naive.out, reference.out, "out", name);
    expect_close(fast.lse, naive.lse, reference.lse, "lse", name);
  }
  force_simd_target("");
}

TEST_P(ShapeZoo, Float64MatchesReference) {
  const AttentionCase& c = GetParam();
  const AttentionInputs inputs = make_inputs(c, DType::float64);
  const AttentionResults reference =
      evaluate(c, inputs, Evaluator::reference, DType::float64, true);
  const AttentionResults fast = evaluate(c, inputs, Evaluator::fast, DType::float64, true);
  for (auto [got, want, what] :
       {std::tuple{&fast.out, &reference.out, "out"}, std::tuple{&fast.lse, &reference.lse, "lse"},
        std::tuple{&fast.weights, &reference.weights, "weights"}}) {
    EXPECT_LE(max_abs_difference(*got, *want), 1e-12 * (1.0 + max_abs(*want)))
        << c.name() << " " << what;
  }
}

INSTANTIATE_TEST_SUITE_P(Attention, ShapeZoo, ::testing::ValuesIn(shape_zoo()),
                         [](const ::testing::TestParamInfo<AttentionCase>& param) {
                           return std::to_string(param.index) + "_" + param.param.name();
                         });

}  // namespace
}  // namespace qkv::testing
