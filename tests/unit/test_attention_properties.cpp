// Properties of attention that hold whatever the inputs: they check the fast path against facts,
// not against another implementation.

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "attention_case.hpp"
#include "qkv/attention.hpp"
#include "qkv/error.hpp"
#include "qkv/reference.hpp"
#include "qkv/simd.hpp"

namespace qkv::testing {
namespace {

AttentionCase masked_case() {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 40;
  c.k_len = 75;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.q_dim = 16;
  c.v_dim = 12;
  c.causal = true;
  c.window_left = 30;
  c.key_lengths = true;
  c.mask = true;
  return c;
}

TEST(AttentionProperties, WeightRowsSumToOneOverVisibleKeys) {
  for (Score score : {Score::scaled_dot, Score::bilinear, Score::additive}) {
    AttentionCase c = masked_case();
    c.score = score;
    const AttentionInputs in = make_inputs(c, DType::float32);
    const AttentionResults r = evaluate(c, in, Evaluator::fast, DType::float64, true);
    const AttentionResults reference = evaluate(c, in, Evaluator::reference, DType::float64, true);
    std::int64_t empty_rows = 0;
    for (std::int64_t row = 0; row < c.batch * c.q_heads * c.q_len; ++row) {
      double sum = 0.0;
      for (std::int64_t j = 0; j < c.k_len; ++j) {
        const double p = element(r.weights, row * c.k_len + j);
        ASSERT_GE(p, 0.0);
        // Hidden keys (weight exactly 0 in the reference) get exactly 0.
        if (element(reference.weights, row * c.k_len + j) == 0.0) {
          ASSERT_EQ(p, 0.0);
        }
        sum += p;
      }
      if (std::isinf(element(r.lse, row))) {
        ++empty_rows;
        EXPECT_EQ(sum, 0.0);
      } else {
        EXPECT_NEAR(sum, 1.0, 1e-5) << score_name(score) << " row " << row;
      }
    }
    EXPECT_GT(empty_rows, 0) << "the case is meant to contain rows with no visible key";
  }
}

// LSE is log Σ exp(s) over the visible keys, with s = scale·q·k computed here directly.
TEST(AttentionProperties, LseIsLogSumExpOfScores) {
  AttentionCase c;
  c.batch = 2;
  c.q_len = 9;
  c.k_len = 31;
  c.q_heads = 2;
  c.kv_heads = 1;
  c.q_dim = 5;
  c.causal = true;
  c.causal_align = CausalAlign::top_left;
  const AttentionInputs in = make_inputs(c, DType::float64);
  const AttentionResults r = evaluate(c, in, Evaluator::fast, DType::float64, false);
  const auto* q = static_cast<const double*>(in.q.data);
  const auto* k = static_cast<const double*>(in.k.data);
  const double scale = 1.0 / std::sqrt(5.0);
  for (std::int64_t b = 0; b < c.batch; ++b) {
    for (std::int64_t h = 0; h < c.q_heads; ++h) {
      for (std::int64_t i = 0; i < c.q_len; ++i) {
        double sum = 0.0;
        for (std::int64_t j = 0; j <= i; ++j) {
          double s = 0.0;
          for (std::int64_t d = 0; d < c.q_dim; ++d) {
            s += q[((b * c.q_len + i) * c.q_heads + h) * c.q_dim + d] *
                 k[((b * c.k_len + j) * c.kv_heads + 0) * c.q_dim + d];
          }
          sum += std::exp(scale * s);
        }
        EXPECT_NEAR(element(r.lse, (b * c.q_heads + h) * c.q_len + i), std::log(sum), 1e-12);
      }
    }
  }
}

// Permuting keys and values together (and the columns of the mask and bias with them) leaves O
// unchanged.
TEST(AttentionProperties, PermutingKeysAndValuesTogetherKeepsOutput) {
  for (Score score : {Score::dot, Score::bilinear, Score::additive}) {
    AttentionCase c;
    c.batch = 2;
    c.q_len = 11;
    c.k_len = 50;
    c.q_heads = 4;
    c.kv_heads = 2;
    c.score = score;
    c.k_dim = score == Score::dot ? 0 : 6;
    c.mask = true;
    c.bias = true;
    AttentionInputs in = make_inputs(c, DType::float64);
    const AttentionResults before = evaluate(c, in, Evaluator::fast, DType::float64, false);

    std::vector<std::int64_t> order(static_cast<std::size_t>(c.k_len));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937_64(7));
    Tensor k(DType::float64, {c.batch, c.k_len, c.kv_heads, c.key_dim()});
    Tensor v(DType::float64, {c.batch, c.k_len, c.kv_heads, c.v_dim});
    Tensor mask(DType::boolean, {1, c.q_heads, c.q_len, c.k_len});
    Tensor bias(DType::float32, {c.batch, 1, c.q_len, c.k_len});
    const std::int64_t k_row = c.kv_heads * c.key_dim(), v_row = c.kv_heads * c.v_dim;
    for (std::int64_t b = 0; b < c.batch; ++b) {
      for (std::int64_t j = 0; j < c.k_len; ++j) {
        const std::int64_t from = order[static_cast<std::size_t>(j)];
        for (std::int64_t e = 0; e < k_row; ++e) {
          k.data<double>()[(b * c.k_len + j) * k_row + e] =
              in.k_storage.data<double>()[(b * c.k_len + from) * k_row + e];
        }
        for (std::int64_t e = 0; e < v_row; ++e) {
          v.data<double>()[(b * c.k_len + j) * v_row + e] =
              in.v_storage.data<double>()[(b * c.k_len + from) * v_row + e];
        }
      }
    }
    for (std::int64_t row = 0; row < c.q_heads * c.q_len; ++row) {
      for (std::int64_t j = 0; j < c.k_len; ++j) {
        mask.data<bool>()[row * c.k_len + j] =
            in.mask.data<bool>()[row * c.k_len + order[static_cast<std::size_t>(j)]];
      }
    }
    for (std::int64_t row = 0; row < c.batch * c.q_len; ++row) {
      for (std::int64_t j = 0; j < c.k_len; ++j) {
        bias.data<float>()[row * c.k_len + j] =
            in.bias.data<float>()[row * c.k_len + order[static_cast<std::size_t>(j)]];
      }
    }
    in.k = k.view();
    in.v = v.view();
    in.options.mask = mask.view();
    in.options.bias = bias.view();
    const AttentionResults after = evaluate(c, in, Evaluator::fast, DType::float64, false);
    EXPECT_LE(max_abs_difference(before.out, after.out), 1e-12) << score_name(score);
    EXPECT_LE(max_abs_difference(before.lse, after.lse), 1e-12) << score_name(score);
  }
}

// causal equals an explicit boolean mask of the same shape, for both alignments.
TEST(AttentionProperties, CausalEqualsExplicitTriangularMask) {
  for (auto [nq, nk, align] : std::vector<std::tuple<std::int64_t, std::int64_t, CausalAlign>>{
           {48, 48, CausalAlign::bottom_right},
           {48, 48, CausalAlign::top_left},
           {20, 90, CausalAlign::bottom_right},
           {90, 20, CausalAlign::bottom_right},
           {20, 90, CausalAlign::top_left}}) {
    AttentionCase c;
    c.q_len = nq;
    c.k_len = nk;
    c.causal = true;
    c.causal_align = align;
    AttentionInputs in = make_inputs(c, DType::float32);
    const AttentionResults causal = evaluate(c, in, Evaluator::fast, DType::float32, true);
    Tensor mask(DType::boolean, {nq, nk});
    for (std::int64_t i = 0; i < nq; ++i) {
      for (std::int64_t j = 0; j < nk; ++j) {
        const std::int64_t last = align == CausalAlign::bottom_right ? i + nk - nq : i;
        mask.data<bool>()[i * nk + j] = j <= last;
      }
    }
    in.options.causal = false;
    in.options.mask = mask.view();
    const AttentionResults masked = evaluate(c, in, Evaluator::fast, DType::float32, true);
    EXPECT_LE(max_abs_difference(causal.out, masked.out), 1e-6);
    EXPECT_LE(max_abs_difference(causal.lse, masked.lse), 1e-6);
    EXPECT_LE(max_abs_difference(causal.weights, masked.weights), 1e-6);
  }
}

TEST(AttentionProperties, BilinearWithIdentityEqualsDot) {
  AttentionCase c;
  c.q_len = 30;
  c.k_len = 45;
  c.q_dim = 12;
  c.q_heads = 4;
  c.kv_heads = 2;
  c.causal = true;
  c.score = Score::dot;
  AttentionInputs in = make_inputs(c, DType::float32);
  const AttentionResults dot = evaluate(c, in, Evaluator::fast, DType::float32, true);
  Tensor identity(DType::float32, {c.q_dim, c.q_dim});
  for (std::int64_t d = 0; d < c.q_dim; ++d) identity.data<float>()[d * c.q_dim + d] = 1.0f;
  in.options.score = Score::bilinear;
  in.options.w = identity.view();
  const AttentionResults bilinear = evaluate(c, in, Evaluator::fast, DType::float32, true);
  EXPECT_EQ(max_abs_difference(dot.out, bilinear.out), 0.0);
  EXPECT_EQ(max_abs_difference(dot.weights, bilinear.weights), 0.0);
}

// Asking for the weights changes nothing else.
TEST(AttentionProperties, WeightsRequestDoesNotChangeOutput) {
  const AttentionCase c = masked_case();
  const AttentionInputs in = make_inputs(c, DType::float32);
  const AttentionResults with = evaluate(c, in, Evaluator::fast, DType::float32, true);
  const AttentionResults without = evaluate(c, in, Evaluator::fast, DType::float32, false);
  EXPECT_EQ(max_abs_difference(with.out, without.out), 0.0);
  EXPECT_EQ(max_abs_difference(with.lse, without.lse), 0.0);
}

// Bitwise the same results for 1, 2 and 3 threads: prefill (fused), decode (split-KV, one token
// and two), additive, and bfloat16 prefill (the BF16 tiles where the CPU has them) and decode.
TEST(AttentionProperties, ThreadCountDoesNotChangeResults) {
  AttentionCase prefill = masked_case();
  prefill.q_len = 130;
  AttentionCase decode;
  decode.q_len = 1;
  decode.k_len = 5000;
  decode.q_heads = 4;
  decode.kv_heads = 1;
  AttentionCase several_tokens = decode;  // 32 rows on the one key head: split-KV as well
  several_tokens.q_len = 2;
  several_tokens.q_heads = 16;
  several_tokens.causal = true;
  AttentionCase additive = masked_case();
  additive.score = Score::additive;
  for (const auto& [c, dtype] :
       std::vector<std::pair<AttentionCase, DType>>{{prefill, DType::float32},
                                                    {decode, DType::float32},
                                                    {several_tokens, DType::float32},
                                                    {additive, DType::float32},
                                                    {prefill, DType::bfloat16},
                                                    {decode, DType::bfloat16}}) {
    const AttentionInputs in = make_inputs(c, dtype);
    std::vector<AttentionResults> results;
    for (int threads : {1, 2, 3}) {
      AttentionInputs run = in;
      run.options.threads = threads;
      results.push_back(evaluate(c, run, Evaluator::fast, DType::float32, c.q_len > 1));
    }
    for (std::size_t n = 1; n < results.size(); ++n) {
      EXPECT_EQ(max_abs_difference(results[0].out, results[n].out), 0.0) << c.name();
      EXPECT_EQ(max_abs_difference(results[0].lse, results[n].lse), 0.0) << c.name();
      EXPECT_EQ(max_abs_difference(results[0].weights, results[n].weights), 0.0) << c.name();
    }
  }
}

// Rows that see no key: O = 0, P = 0, LSE = -inf, and never NaN, for every way a row can end up
// empty: padding, a false mask row, causal with Nq > Nk, a window beyond the keys, a -inf bias.
TEST(AttentionEdges, FullyMaskedRowsGiveZerosNotNaN) {
  struct Way {
    const char* name;
    std::function<void(AttentionCase&)> set_case;
    std::function<void(AttentionInputs&, Tensor&)> set_inputs;
  };
  const std::vector<Way> ways = {
      {"key_lengths 0", [](AttentionCase& c) { c.batch = 2, c.key_lengths = true; }, nullptr},
      {"false mask row", [](AttentionCase& c) { c.mask = true; }, nullptr},
      {"causal Nq > Nk", [](AttentionCase& c) { c.q_len = 20, c.k_len = 8, c.causal = true; },
       nullptr},
      {"window past the keys",
       [](AttentionCase& c) { c.window_left = 0, c.window_right = 0, c.k_len = 4, c.q_len = 9; },
       nullptr},
      {"-inf bias", [](AttentionCase&) {},
       [](AttentionInputs& in, Tensor& bias) {
         bias = Tensor(DType::float32, {1});
         bias.data<float>()[0] = -std::numeric_limits<float>::infinity();
         in.options.bias = bias.view();
       }},
      {"no keys at all", [](AttentionCase& c) { c.k_len = 0; }, nullptr},
  };
  for (const Way& way : ways) {
    for (Score score : {Score::scaled_dot, Score::bilinear, Score::additive}) {
      for (DType dtype : {DType::float32, DType::float64}) {
        AttentionCase c;
        c.q_len = 12;
        c.k_len = 10;
        c.score = score;
        way.set_case(c);
        AttentionInputs in = make_inputs(c, dtype);
        Tensor keep_alive;
        if (way.set_inputs) way.set_inputs(in, keep_alive);
        for (Evaluator evaluator : {Evaluator::fast, Evaluator::reference}) {
          const AttentionResults r = evaluate(c, in, evaluator, dtype, true);
          std::int64_t empty_rows = 0;
          for (std::int64_t row = 0; row < r.lse.numel(); ++row) {
            const double lse = element(r.lse, row);
            ASSERT_FALSE(std::isnan(lse)) << way.name;
            if (lse != -std::numeric_limits<double>::infinity()) continue;
            ++empty_rows;
            const std::int64_t b = row / (c.q_heads * c.q_len), h = (row / c.q_len) % c.q_heads,
                               i = row % c.q_len;
            for (std::int64_t d = 0; d < c.v_dim; ++d) {
              ASSERT_EQ(element(r.out, ((b * c.q_len + i) * c.q_heads + h) * c.v_dim + d), 0.0)
                  << way.name;
            }
            for (std::int64_t j = 0; j < c.k_len; ++j) {
              ASSERT_EQ(element(r.weights, row * c.k_len + j), 0.0) << way.name;
            }
          }
          EXPECT_GT(empty_rows, 0) << way.name;
          for (std::int64_t n = 0; n < r.out.numel(); ++n)
            ASSERT_TRUE(std::isfinite(element(r.out, n)));
        }
      }
    }
  }
}

// A NaN in a query row makes that row's output and LSE NaN, as PyTorch's, on every path (the
// split-KV decode for one row, the fused kernel, the float64 kernel, the reference), and leaves
// the other rows finite. (The online softmax's maximum drops a NaN: such a row once came out as
// a row that sees no key, O = 0.)
TEST(AttentionEdges, NaNInAQueryRowMakesThatRowNaN) {
  for (const std::int64_t q_len : {1, 40}) {
    for (DType dtype : {DType::float32, DType::float64, DType::bfloat16, DType::float16}) {
      AttentionCase c;
      c.q_len = q_len;
      c.k_len = 300;  // (the decode's chunks: more than one would merge; one here)
      c.causal = true;
      AttentionInputs in = make_inputs(c, dtype);
      // Element 0 of query row (b 0, i Nq − 1, h 0).
      auto* q = static_cast<unsigned char*>(const_cast<void*>(in.q.data)) +
                (q_len - 1) * in.q.strides[1] * static_cast<std::int64_t>(dtype_size(dtype));
      if (dtype == DType::float32) {
        *reinterpret_cast<float*>(q) = std::numeric_limits<float>::quiet_NaN();
      } else if (dtype == DType::float64) {
        *reinterpret_cast<double*>(q) = std::numeric_limits<double>::quiet_NaN();
      } else {
        *reinterpret_cast<std::uint16_t*>(q) = dtype == DType::bfloat16 ? 0x7FC0 : 0x7E00;
      }
      for (Evaluator evaluator : {Evaluator::fast, Evaluator::reference}) {
        const AttentionResults r = evaluate(c, in, evaluator, dtype, false);
        for (std::int64_t row = 0; row < r.lse.numel(); ++row) {
          const std::int64_t b = row / (c.q_heads * c.q_len), h = (row / c.q_len) % c.q_heads,
                             i = row % c.q_len;
          const bool nan_row = b == 0 && h == 0 && i == q_len - 1;
          EXPECT_EQ(std::isnan(element(r.lse, row)), nan_row)
              << dtype_name(dtype) << " Nq " << q_len << " row " << row;
          for (std::int64_t d = 0; d < c.v_dim; ++d) {
            const double o = element(r.out, ((b * c.q_len + i) * c.q_heads + h) * c.v_dim + d);
            ASSERT_EQ(std::isnan(o), nan_row) << dtype_name(dtype) << " Nq " << q_len;
            ASSERT_TRUE(nan_row || std::isfinite(o));
          }
        }
      }
    }
  }
}

// Logits of ±1e4: exact in float32 (q = ±100, k = ±100, D = 1), and the softmax must neither
// overflow nor lose the row.
TEST(AttentionEdges, ExtremeLogitsStayFinite) {
  const float q[] = {100.0f, -100.0f, 100.0f};
  const float k[] = {100.0f, -100.0f, 99.0f, -99.0f};
  const float v[] = {1.0f, 2.0f, 3.0f, 4.0f};
  for (float bias_value : {0.0f, 1e4f, -1e4f}) {
    Tensor out(DType::float32, {1, 3, 1, 1}), lse(DType::float32, {1, 1, 3});
    Tensor reference_out(DType::float64, {1, 3, 1, 1}), reference_lse(DType::float64, {1, 1, 3});
    AttentionOptions options;
    options.score = Score::dot;
    const float bias[] = {bias_value, 0.0f, 0.0f, 0.0f};
    options.bias = TensorView::contiguous(bias, DType::float32, {4});
    const auto qv = TensorView::contiguous(q, DType::float32, {1, 3, 1, 1});
    const auto kv = TensorView::contiguous(k, DType::float32, {1, 4, 1, 1});
    const auto vv = TensorView::contiguous(v, DType::float32, {1, 4, 1, 1});
    attention_forward(qv, kv, vv, options, {out.mutable_view(), lse.mutable_view(), {}});
    attention_reference(qv, kv, vv, options,
                        {reference_out.mutable_view(), reference_lse.mutable_view(), {}});
    for (std::int64_t i = 0; i < 3; ++i) {
      EXPECT_TRUE(std::isfinite(out.data<float>()[i]));
      EXPECT_TRUE(std::isfinite(lse.data<float>()[i]));
      EXPECT_NEAR(out.data<float>()[i], reference_out.data<double>()[i], 1e-5);
      // LSE of ~1e4 carries float32's spacing there (~1e-3).
      EXPECT_NEAR(lse.data<float>()[i], reference_lse.data<double>()[i], 2e-3);
    }
  }
}

}  // namespace
}  // namespace qkv::testing

namespace qkv::testing {
namespace {

// A bfloat16 or float16 output is the float32 result rounded once: the kernels accumulate in
// float32 and round only when they store (the fused kernel, and the split-KV decode's merge of one
// chunk or of several).
TEST(AttentionProperties, SixteenBitOutputIsTheFloat32ResultRounded) {
  AttentionCase prefill = masked_case();
  AttentionCase decode;
  decode.q_len = 1;
  decode.k_len = 3000;
  decode.q_heads = 4;
  decode.kv_heads = 2;
  AttentionCase one_chunk = decode;
  one_chunk.k_len = 500;
  for (DType dtype : {DType::bfloat16, DType::float16}) {
    for (const AttentionCase& c : {prefill, decode, one_chunk}) {
      const AttentionInputs in = make_inputs(c, dtype);
      const AttentionResults wide = evaluate(c, in, Evaluator::fast, DType::float32, false);
      Tensor narrow(dtype, {c.batch, c.q_len, c.q_heads, c.v_dim});
      attention_forward(in.q, in.k, in.v, in.options, {narrow.mutable_view(), {}, {}});
      for (std::int64_t n = 0; n < narrow.numel(); ++n) {
        const float x = wide.out.data<float>()[n];
        ASSERT_EQ(narrow.data<std::uint16_t>()[n],
                  dtype == DType::bfloat16 ? to_bfloat16(x) : to_float16(x))
            << c.name() << " " << dtype_name(dtype);
      }
    }
  }
}

// The kernels round a row of O to bfloat16 or float16 a vector at a time where the target can
// (kernels/widen-inl.h): bit for bit as to_bfloat16 and to_float16 round, for every kind of
// float32, on every target. With one key, each row of O is its value row: the values hold ties
// of both roundings, the ends of float16's range and of its subnormals, float32 subnormals,
// infinities, NaNs with payloads, and random bit patterns; 75 of them a row (whole vectors and a
// tail).
TEST(AttentionProperties, NarrowOutputsRoundAsTheScalarConversionsOnEveryTarget) {
  constexpr std::int64_t kBatch = 8, kQueries = 40, kValueDim = 75;
  std::vector<std::uint32_t> bits = {
      0x3f808000u, 0x3f818000u, 0xbf808000u, 0x3f801000u, 0x3f803000u,  // ties, to even
      0x477fe000u, 0x477ff000u, 0x477fefffu, 0xc77ff000u, 0x47800000u,  // float16's largest
      0x38800000u, 0x387fffffu, 0x33800000u, 0x33c00000u, 0x33000000u,  // its subnormals
      0x00000001u, 0x80400000u, 0x00000000u, 0x80000000u, 0x7f7fffffu,  // float32's ends
      0x7f800000u, 0xff800000u, 0x7f800001u, 0xffc12345u, 0x7fbfffffu,  // infinities, NaNs
      0x7fc00000u, 0x3f7fffffu, 0x3f7f8000u, 0x477f8000u, 0x37fff000u};
  std::mt19937 random(7);
  while (bits.size() < static_cast<std::size_t>(kBatch * kValueDim)) bits.push_back(random());
  Tensor q(DType::float32, {kBatch, kQueries, 1, 4}), k(DType::float32, {kBatch, 1, 1, 4});
  Tensor v(DType::float32, {kBatch, 1, 1, kValueDim});
  std::fill(q.data<float>(), q.data<float>() + q.numel(), 0.5f);
  std::fill(k.data<float>(), k.data<float>() + k.numel(), 0.25f);
  std::memcpy(v.data<float>(), bits.data(), v.nbytes());
  std::vector<std::string> mismatches;  // the first of each target and dtype
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    Tensor wide(DType::float32, {kBatch, kQueries, 1, kValueDim});
    attention_forward(q.view(), k.view(), v.view(), {}, {wide.mutable_view(), {}, {}});
    for (DType narrow_dtype : {DType::bfloat16, DType::float16}) {
      Tensor narrow(narrow_dtype, {kBatch, kQueries, 1, kValueDim});
      attention_forward(q.view(), k.view(), v.view(), {}, {narrow.mutable_view(), {}, {}});
      for (std::int64_t n = 0; n < narrow.numel(); ++n) {
        const float x = wide.data<float>()[n];
        const std::uint16_t expected =
            narrow_dtype == DType::bfloat16 ? to_bfloat16(x) : to_float16(x);
        if (narrow.data<std::uint16_t>()[n] != expected) {
          mismatches.push_back(target + " " + dtype_name(narrow_dtype) + ": element " +
                               std::to_string(n) + " of O, float32 bits " +
                               std::to_string(std::bit_cast<std::uint32_t>(x)));
          break;
        }
      }
    }
  }
  force_simd_target("");
  EXPECT_TRUE(mismatches.empty()) << ::testing::PrintToString(mismatches);
}

}  // namespace
}  // namespace qkv::testing
