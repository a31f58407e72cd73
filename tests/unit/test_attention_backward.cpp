// attention_backward (the fused kernel) against the float64 oracle over a zoo of shapes, every
// score, mask and option; bitwise determinism across thread counts; dropout's mask.

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "attention_case.hpp"
#include "qkv/backward.hpp"
#include "qkv/reference.hpp"

namespace qkv::testing {
namespace {

// Every gradient a case has, in one dtype, with the views attention_backward wants.
struct Gradients {
  Gradients(const AttentionCase& c, const AttentionInputs& in, DType dtype) {
    const auto like = [dtype](const TensorView& view) {
      return Tensor(dtype,
                    std::vector<std::int64_t>(view.shape.begin(), view.shape.begin() + view.rank));
    };
    dq = like(in.q);
    dk = like(in.k);
    dv = like(in.v);
    views.dq = dq.mutable_view();
    views.dk = dk.mutable_view();
    views.dv = dv.mutable_view();
    if (in.options.w) {
      dw = like(*in.options.w);
      views.dw = dw.mutable_view();
    }
    if (in.options.wq) {
      dwq = like(*in.options.wq);
      dwk = like(*in.options.wk);
      dva = like(*in.options.va);
      views.dwq = dwq.mutable_view();
      views.dwk = dwk.mutable_view();
      views.dva = dva.mutable_view();
    }
    if (in.options.bias) {
      dbias = like(*in.options.bias);
      views.dbias = dbias.mutable_view();
    }
    if (in.options.temperature) {
      dtemperature = like(*in.options.temperature);
      views.dtemperature = dtemperature.mutable_view();
    }
    if (in.options.sinks) {
      dsinks = like(*in.options.sinks);
      views.dsinks = dsinks.mutable_view();
    }
    if (in.score_parameter) {
      dscore_mod = like(in.score_parameter->values());
      views.dscore_mod = {dscore_mod.mutable_view()};
    }
    (void)c;
  }
  std::vector<std::pair<const char*, const Tensor*>> named() const {
    std::vector<std::pair<const char*, const Tensor*>> all{{"dq", &dq}, {"dk", &dk}, {"dv", &dv}};
    for (auto [name, t] :
         {std::pair{"dw", &dw}, std::pair{"dwq", &dwq}, std::pair{"dwk", &dwk},
          std::pair{"dva", &dva}, std::pair{"dbias", &dbias}, std::pair{"dscore_mod", &dscore_mod},
          std::pair{"dtemperature", &dtemperature}, std::pair{"dsinks", &dsinks}}) {
      if (t->numel() > 0) all.push_back({name, t});
    }
    return all;
  }
  Tensor dq, dk, dv, dw, dwq, dwk, dva, dbias, dscore_mod, dtemperature, dsinks;
  AttentionGradients views;
};

struct BackwardCase {
  AttentionCase attention;
  bool with_dlse = true;
  bool saved = true;  // pass the forward's O and LSE (else attention_backward runs it)
};

void PrintTo(const BackwardCase& c, std::ostream* os) {
  *os << c.attention.name();
}

std::vector<BackwardCase> backward_zoo() {
  std::vector<BackwardCase> zoo;
  std::uint64_t seed = 900;
  const auto add_all_scores = [&](AttentionCase c) {
    for (Score score :
         {Score::dot, Score::scaled_dot, Score::bilinear, Score::additive, Score::cosine}) {
      for (bool per_head : {false, true}) {
        if (per_head && (score == Score::dot || score == Score::scaled_dot)) continue;
        c.score = score;
        c.per_head_parameters = per_head;
        c.k_dim = score == Score::bilinear || score == Score::additive ? c.q_dim + 3 : 0;
        c.seed = ++seed;
        zoo.push_back({c, seed % 2 == 0, seed % 3 != 0});
      }
    }
  };
  // Lengths around the 64-key block, square and not.
  for (auto [nq, nk] : std::vector<std::pair<std::int64_t, std::int64_t>>{
           {1, 1}, {7, 7}, {64, 64}, {65, 65}, {130, 130}, {7, 65}, {65, 7}, {1, 200}}) {
    AttentionCase c;
    c.q_len = nq;
    c.k_len = nk;
    add_all_scores(c);
  }
  // Sinks on a decode-shaped problem (its LSE and Δ re-derived) and in a batch one of whose
  // sequences has no key.
  for (std::int64_t nq : {1, 3}) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = nq;
    c.k_len = 300;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.sinks = nq == 1;
    c.sigmoid = nq == 3;
    c.key_lengths = true;
    add_all_scores(c);
  }
  // Head dims, Dv equal and different.
  for (std::int64_t d : {1, 8, 64, 80}) {
    AttentionCase c;
    c.q_len = 33;
    c.k_len = 70;
    c.q_dim = d;
    c.v_dim = d == 8 ? 8 : d + 5;
    add_all_scores(c);
  }
  // GQA and MQA in a batch of different key lengths (one batch sees no key).
  for (auto [hq, hk] : std::vector<std::pair<std::int64_t, std::int64_t>>{{4, 4}, {4, 2}, {4, 1}}) {
    AttentionCase c;
    c.batch = 3;
    c.q_heads = hq;
    c.kv_heads = hk;
    c.q_len = 20;
    c.k_len = 90;
    c.key_lengths = true;
    c.key_starts = hk == 2;
    add_all_scores(c);
  }
  // Every mask and option.
  for (int variant = 0; variant < 19; ++variant) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = 70;
    c.k_len = 100;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.causal = variant == 0 || variant == 1 || variant == 7;
    if (variant == 1) c.causal_align = CausalAlign::top_left;
    if (variant == 2) {
      c.window_left = 9;
      c.window_right = 3;
    }
    c.mask = variant == 3;  // with an all-false row
    c.bias = variant == 4 || variant == 7;
    c.alibi = variant == 5 || variant == 7;
    c.softcap = variant == 6 || variant == 7 ? 2.0 : 0.0;
    if (variant == 6) c.scale = 0.7;
    c.head_major = variant == 5;
    c.spaced_last_dim = variant == 6;
    c.input_scale = variant == 6 ? 2.0 : 1.0;
    if (variant == 8) {  // prefix LM
      c.causal = true;
      c.prefix_length = 30;
    }
    if (variant == 9) {  // documents, causal, in blocks that straddle the kernel's 64-key blocks
      c.block_mask = BlockMaskRule::documents;
      c.mask_block = 24;
      c.causal = true;
    }
    if (variant == 10) c.block_mask = BlockMaskRule::strided;  // empty blocks between others
    if (variant == 11) {  // a learned relative bias table, causal
      c.score_mod = ScoreModRule::relative_bias;
      c.causal = true;
    }
    if (variant == 12) {  // a non-linear score_mod with learned slopes, and a soft cap before it
      c.score_mod = ScoreModRule::capped_slopes;
      c.softcap = 20.0;
      c.block_mask = BlockMaskRule::documents;
    }
    if (variant == 13) {  // sinks, with a row that sees no key
      c.sinks = true;
      c.mask = true;
      c.causal = true;
    }
    if (variant == 14) {  // sinks beside large logits and a bias (Δ re-derived)
      c.sinks = true;
      c.bias = true;
      c.input_scale = 3.0;
    }
    if (variant == 15) {  // sigmoid attention, with a row that sees no key
      c.sigmoid = true;
      c.mask = true;
      c.causal = true;
    }
    if (variant == 17) {  // sink tokens and a window: 64-key blocks in the gap skipped
      c.causal = true;
      c.window_left = 12;
      c.sink_tokens = 4;
    }
    if (variant == 16) {  // sigmoid attention with a bias, a soft cap and a block mask
      c.sigmoid = true;
      c.bias = true;
      c.softcap = 3.0;
      c.block_mask = BlockMaskRule::documents;
    }
    if (variant == 18) {  // a boolean mask of runs (read as intervals) under a causal mask
      c.mask = c.mask_runs = true;
      c.causal = true;
    }
    add_all_scores(c);
  }
  return zoo;
}

// Runs the fused backward on inputs of `dtype` and the float64 oracle on the same values.
void compare_with_reference(const BackwardCase& bc, DType dtype, double relative_tolerance) {
  const AttentionCase& c = bc.attention;
  const AttentionInputs in = make_inputs(c, dtype);
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, c.seed + 7);
  const Tensor dlse = random_float32({c.batch, c.q_heads, c.q_len}, c.seed + 8);
  const std::optional<TensorView> dlse_view =
      bc.with_dlse ? std::optional<TensorView>(dlse.view()) : std::nullopt;

  Gradients fast(c, in, DType::float32), exact(c, in, DType::float64);
  std::optional<SavedForward> saved;
  AttentionResults forward;
  if (bc.saved) {
    // O and LSE in float32, as FlashAttention keeps LSE (a bfloat16 LSE would shift every
    // recomputed P by up to 2^-8·|LSE|).
    forward = evaluate(c, in, Evaluator::fast, DType::float32, false);
    saved = SavedForward{forward.out.view(), forward.lse.view()};
  }
  attention_backward(in.q, in.k, in.v, in.options, dout.view(), dlse_view, fast.views, saved);
  attention_backward_reference(in.q, in.k, in.v, in.options, dout.view(), dlse_view, exact.views);

  const auto fast_all = fast.named();
  const auto exact_all = exact.named();
  ASSERT_EQ(fast_all.size(), exact_all.size());
  for (std::size_t n = 0; n < fast_all.size(); ++n) {
    const double scale = 1.0 + max_abs(*exact_all[n].second);
    const double error = max_abs_difference(*fast_all[n].second, *exact_all[n].second);
    EXPECT_LE(error, relative_tolerance * scale)
        << fast_all[n].first << " of " << c.name() << " (max |exact| " << scale - 1 << ")";
  }
}

class AttentionBackward : public ::testing::TestWithParam<BackwardCase> {};

// float32: the gradients are sums over up to Nk (or Nq) products of float32 terms that were each
// recomputed from the saved LSE: the error floor is a few float32 roundings per term, relative to
// the largest gradient entry; 2e-5 is about 170 ulp of that scale at N ≤ 200.
TEST_P(AttentionBackward, Float32MatchesReference) {
  compare_with_reference(GetParam(), DType::float32, 2e-5);
}

// bfloat16 storage (computed in float32): against the oracle on the same rounded inputs,
// docs/contract.md §7's relative bound.
TEST_P(AttentionBackward, Bfloat16MatchesReference) {
  compare_with_reference(GetParam(), DType::bfloat16, 1e-2);
}

// float16 storage, computed in float32: the float32 bound.
TEST_P(AttentionBackward, Float16MatchesReference) {
  compare_with_reference(GetParam(), DType::float16, 2e-5);
}

INSTANTIATE_TEST_SUITE_P(Zoo, AttentionBackward, ::testing::ValuesIn(backward_zoo()),
                         [](const ::testing::TestParamInfo<BackwardCase>& param) {
                           return std::to_string(param.index) + "_" + param.param.attention.name();
                         });

// Bitwise the same gradients for 1, 2 and 3 threads, with every reduction in play: GQA (dK, dV
// over a group), several key chunks (dQ), a bias broadcast over batch and heads (dbias), per-head
// parameters (dW, dWq, dWk, dva).
TEST(AttentionBackwardDeterminism, BitwiseAcrossThreadCounts) {
  for (Score score : {Score::scaled_dot, Score::bilinear, Score::additive}) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = 150;
    c.k_len = 300;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.q_dim = 16;
    c.v_dim = 16;
    c.score = score;
    c.k_dim = score == Score::scaled_dot ? 0 : 19;
    c.per_head_parameters = score == Score::additive;
    c.bias = true;
    c.causal = true;
    AttentionInputs in = make_inputs(c, DType::float32);
    const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 5);
    std::vector<Gradients> runs;
    for (int threads : {1, 2, 3}) {
      in.options.threads = threads;
      runs.emplace_back(c, in, DType::float32);
      attention_backward(in.q, in.k, in.v, in.options, dout.view(), std::nullopt,
                         runs.back().views);
    }
    for (std::size_t run = 1; run < runs.size(); ++run) {
      const auto first = runs[0].named(), other = runs[run].named();
      for (std::size_t n = 0; n < first.size(); ++n) {
        ASSERT_EQ(first[n].second->nbytes(), other[n].second->nbytes());
        EXPECT_EQ(
            std::memcmp(first[n].second->raw(), other[n].second->raw(), first[n].second->nbytes()),
            0)
            << first[n].first << " of " << score_name(score) << ", run " << run;
      }
    }
  }
}

// Dropout: the forward (fused and float64 kernels), the returned weights and the backward all
// see one mask, fixed by the seed; about p of the weights are dropped; survivors are scaled by
// 1 / (1 − p).
TEST(AttentionDropout, OneMaskEverywhereFixedBySeed) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 40;
  c.k_len = 90;
  c.q_heads = 2;
  c.kv_heads = 1;
  c.causal = true;
  AttentionInputs in = make_inputs(c, DType::float32);
  in.options.dropout = 0.25;
  in.options.dropout_seed = 1234;

  const AttentionResults fast = evaluate(c, in, Evaluator::fast, DType::float32, true);
  const AttentionResults again = evaluate(c, in, Evaluator::fast, DType::float32, true);
  const AttentionResults exact = evaluate(c, in, Evaluator::reference, DType::float64, true);
  EXPECT_EQ(std::memcmp(fast.out.raw(), again.out.raw(), fast.out.nbytes()), 0);
  EXPECT_LE(max_abs_difference(fast.out, exact.out), 1e-5 * (1 + max_abs(exact.out)));
  EXPECT_LE(max_abs_difference(fast.weights, exact.weights), 1e-5 * (1 + max_abs(exact.weights)));

  // The weights without dropout tell which are visible; with dropout each is 0 or P / (1 − p).
  AttentionInputs plain = make_inputs(c, DType::float32);
  const AttentionResults undropped = evaluate(c, plain, Evaluator::reference, DType::float64, true);
  std::int64_t visible = 0, dropped = 0;
  for (std::int64_t n = 0; n < exact.weights.numel(); ++n) {
    const double p = undropped.weights.data<double>()[n], w = exact.weights.data<double>()[n];
    if (p == 0.0) continue;
    ++visible;
    if (w == 0.0) {
      ++dropped;
    } else {
      EXPECT_NEAR(w, p / 0.75, 1e-12);
    }
  }
  const double fraction = static_cast<double>(dropped) / static_cast<double>(visible);
  // visible ≈ 5000: the binomial's standard deviation is about 0.006.
  EXPECT_NEAR(fraction, 0.25, 0.03) << dropped << " of " << visible;

  // Another seed, another mask.
  in.options.dropout_seed = 1235;
  const AttentionResults other = evaluate(c, in, Evaluator::fast, DType::float32, false);
  EXPECT_GT(max_abs_difference(fast.out, other.out), 1e-3);

  // The backward reproduces the mask: the fused backward agrees with the oracle's.
  in.options.dropout_seed = 1234;
  const Tensor dout = random_float32({c.batch, c.q_len, c.q_heads, c.v_dim}, 77);
  Gradients fused(c, in, DType::float32), oracle(c, in, DType::float64);
  attention_backward(in.q, in.k, in.v, in.options, dout.view(), std::nullopt, fused.views);
  attention_backward_reference(in.q, in.k, in.v, in.options, dout.view(), std::nullopt,
                               oracle.views);
  for (auto [name, t] : {std::pair{"dq", 0}, std::pair{"dk", 1}, std::pair{"dv", 2}}) {
    const Tensor& a = *fused.named()[static_cast<std::size_t>(t)].second;
    const Tensor& b = *oracle.named()[static_cast<std::size_t>(t)].second;
    EXPECT_LE(max_abs_difference(a, b), 2e-5 * (1 + max_abs(b))) << name;
  }
}

}  // namespace
}  // namespace qkv::testing
