// The SIMD layer: target selection, and the stated error bounds of the softmax exp and of
// sigmoid attention's weights, swept over their whole range on every target.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/fused_attention.hpp"
#include "qkv/error.hpp"
#include "qkv/simd.hpp"

namespace qkv {
namespace {

TEST(Simd, TargetsCanBeForcedAndRestored) {
  const std::vector<std::string> targets = simd_targets();
  ASSERT_FALSE(targets.empty());
  const std::string best = simd_target();
  EXPECT_EQ(best, targets.front());
  for (const std::string& target : targets) {
    force_simd_target(target);
    EXPECT_EQ(simd_target(), target);
  }
  force_simd_target("");
  EXPECT_EQ(simd_target(), best);
  EXPECT_THAT(
      [] { force_simd_target("NO_SUCH_TARGET"); },
      ::testing::ThrowsMessage<Error>(::testing::HasSubstr("simd target: expected one of")));
}

// Distance in units in the last place between two finite floats of the same sign.
std::int64_t ulp_distance(float a, float b) {
  std::int32_t ia, ib;
  std::memcpy(&ia, &a, 4);
  std::memcpy(&ib, &b, 4);
  return std::abs(static_cast<std::int64_t>(ia) - static_cast<std::int64_t>(ib));
}

// softmax_exp (the kernels' exp): within 1 ULP of e^x wherever that is a normal float below
// 2^127.5 (x in [-87.33, 88.37]); within one subnormal ULP on the way down to -87.68; exactly 0
// below (e^x under the smallest normal float, -inf included); +inf from 88.4 (e^x within a
// factor 2 of overflowing, or past it); NaN for NaN.
TEST(Simd, SoftmaxExpErrorBoundOverItsRange) {
  std::vector<float> inputs;
  for (float x = -87.33f; x <= 88.37f;
       x = std::nextafter(x + 3e-4f * std::max(1.0f, std::abs(x)), 100.0f)) {
    inputs.push_back(x);
  }
  for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 0.34657f, -0.34657f})
    inputs.push_back(x);
  const std::size_t normal_count = inputs.size();
  for (float x = -87.67f; x < -87.33f; x += 1e-3f) inputs.push_back(x);
  const std::size_t subnormal_end = inputs.size();
  for (float x : {-87.7f, -88.0f, -104.5f, -200.0f, -1e30f, -std::numeric_limits<float>::max(),
                  -std::numeric_limits<float>::infinity()}) {
    inputs.push_back(x);
  }
  const std::size_t zero_end = inputs.size();
  for (float x : {88.4f, 88.7f, 89.0f, 1e30f, std::numeric_limits<float>::infinity()})
    inputs.push_back(x);
  inputs.push_back(std::numeric_limits<float>::quiet_NaN());
  std::vector<float> outputs(inputs.size());
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    kernels::softmax_exp(inputs.data(), outputs.data(), static_cast<std::int64_t>(inputs.size()));
    std::int64_t worst = 0;
    for (std::size_t n = 0; n < normal_count; ++n) {
      const auto exact = static_cast<float>(std::exp(static_cast<double>(inputs[n])));
      worst = std::max(worst, ulp_distance(outputs[n], exact));
    }
    EXPECT_LE(worst, 1) << target;
    const float smallest_subnormal = std::numeric_limits<float>::denorm_min();
    for (std::size_t n = normal_count; n < subnormal_end; ++n) {
      const double exact = std::exp(static_cast<double>(inputs[n]));
      ASSERT_LE(std::abs(outputs[n] - exact), smallest_subnormal) << target << " x=" << inputs[n];
    }
    for (std::size_t n = subnormal_end; n < zero_end; ++n)
      ASSERT_EQ(outputs[n], 0.0f) << target << " x=" << inputs[n];
    for (std::size_t n = zero_end; n + 1 < inputs.size(); ++n)
      ASSERT_EQ(outputs[n], std::numeric_limits<float>::infinity()) << target << " x=" << inputs[n];
    EXPECT_TRUE(std::isnan(outputs.back())) << target;
  }
  force_simd_target("");
}

// The kernels' reduction of a row's scores to the largest: −inf when all are −inf (a
// row that sees no key yet), on every target. Highway 1.0's EMU128 target (clang's fallback)
// reduced it to the lowest finite float, and such rows came out NaN; the lowest finite float
// itself, beside −inf, must still come back as it is.
TEST(Simd, LargestLaneOfHiddenScoresIsMinusInfinity) {
  constexpr float kMinusInfinity = -std::numeric_limits<float>::infinity();
  constexpr float kLowest = std::numeric_limits<float>::lowest();
  const std::vector<float> all_hidden(40, kMinusInfinity);
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    for (const std::int64_t count : {1, 3, 4, 16, 40})
      EXPECT_EQ(kernels::largest_score(all_hidden.data(), count), kMinusInfinity) << target;
    EXPECT_EQ(kernels::largest_score(all_hidden.data(), 0), kMinusInfinity) << target;
    const float lowest_first[] = {kLowest, kMinusInfinity};
    EXPECT_EQ(kernels::largest_score(lowest_first, 2), kLowest) << target;
    const float mixed[] = {kMinusInfinity, -3.5f};
    EXPECT_EQ(kernels::largest_score(mixed, 2), -3.5f) << target;
  }
  force_simd_target("");
}

// sigmoid_weights: P = 1 / (1 + e^x), x = −bias − score, within 2 ULP of the double-precision
// value wherever that is a normal float (x < 87.3), from x = −120 (P = 1) up; exactly 0 from
// x = 88.4 on and for a hidden key (score = −inf); NaN for a NaN score. The bias is swept too,
// since the kernels subtract it before the exponential.
TEST(Simd, SigmoidWeightsErrorBoundOverTheirRange) {
  std::vector<float> exponents;
  for (float x = -120.0f; x <= 87.3f;
       x = std::nextafter(x + 3e-4f * std::max(1.0f, std::abs(x)), 100.0f)) {
    exponents.push_back(x);
  }
  for (float x : {0.0f, -0.0f, 1e-30f, -1e-30f, 1.0f, -1.0f, 16.6f, -16.6f}) exponents.push_back(x);
  const std::size_t normal_count = exponents.size();
  for (float x : {88.4f, 88.7f, 89.0f, 100.0f, 1e30f, std::numeric_limits<float>::infinity()})
    exponents.push_back(x);
  for (const float bias : {0.0f, -8.317766f, 3.5f}) {
    std::vector<float> scores(exponents.size()), weights(exponents.size());
    for (std::size_t n = 0; n < exponents.size(); ++n) scores[n] = -bias - exponents[n];
    scores.push_back(std::numeric_limits<float>::quiet_NaN());
    weights.push_back(0.0f);
    const auto count = static_cast<std::int64_t>(scores.size());
    for (const std::string& target : simd_targets()) {
      force_simd_target(target);
      kernels::sigmoid_weights(scores.data(), bias, weights.data(), count);
      std::int64_t worst = 0;
      for (std::size_t n = 0; n < normal_count; ++n) {
        // The exponent the kernel sees is −bias − score in float, which may differ from the
        // swept x by a rounding; the exact value is taken at that exponent.
        const double x = static_cast<double>(-bias - scores[n]);
        const auto exact = static_cast<float>(1.0 / (1.0 + std::exp(x)));
        worst = std::max(worst, ulp_distance(weights[n], exact));
      }
      EXPECT_LE(worst, 2) << target << " bias " << bias;
      for (std::size_t n = normal_count; n < exponents.size(); ++n)
        ASSERT_EQ(weights[n], 0.0f) << target << " x=" << exponents[n] << " bias " << bias;
      EXPECT_TRUE(std::isnan(weights.back())) << target << " bias " << bias;
    }
  }
  force_simd_target("");
}

}  // namespace
}  // namespace qkv
