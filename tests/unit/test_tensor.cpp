// Tensors: views, dense copies, and the bfloat16 and float16 conversions.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <sstream>

#include "qkv/error.hpp"
#include "qkv/npy.hpp"
#include "qkv/tensor.hpp"

namespace qkv {
namespace {

TEST(Tensor, BFloat16RoundsToNearestEven) {
  EXPECT_EQ(to_bfloat16(1.0f), 0x3f80);
  EXPECT_EQ(from_bfloat16(0x3f80), 1.0f);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1).
  EXPECT_EQ(to_bfloat16(1.0f + 0x1p-8f), 0x3f80);
  // 1 + 3·2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
  EXPECT_EQ(to_bfloat16(1.0f + 3 * 0x1p-8f), 0x3f82);
  // Just above halfway rounds up.
  EXPECT_EQ(to_bfloat16(std::nextafter(1.0f + 0x1p-8f, 2.0f)), 0x3f81);
  EXPECT_EQ(to_bfloat16(-2.5f), 0xc020);
  EXPECT_TRUE(std::isnan(from_bfloat16(to_bfloat16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(from_bfloat16(to_bfloat16(std::numeric_limits<float>::infinity())),
            std::numeric_limits<float>::infinity());
  // The largest finite float rounds up to infinity, as IEEE rounding does.
  EXPECT_TRUE(std::isinf(from_bfloat16(to_bfloat16(std::numeric_limits<float>::max()))));
}

// float16 against its definition: every one of the 65 536 bit patterns widens to the value
// (−1)^s·2^(e−15)·(1 + m/1024) (subnormals m·2^-24) and narrows back to itself (NaN stays NaN);
// a float halfway between two neighbours goes to the even one, and just off halfway to the
// nearer; the largest finite float16 and the edge of infinity.
TEST(Tensor, Float16IsExactAndRoundsToNearestEven) {
  for (std::uint32_t bits = 0; bits < 0x10000; ++bits) {
    const auto h = static_cast<std::uint16_t>(bits);
    const std::uint32_t e = (bits >> 10) & 0x1f, m = bits & 0x3ff;
    const float value = from_float16(h);
    if (e == 0x1f) {
      EXPECT_TRUE(m != 0 ? std::isnan(value) : std::isinf(value)) << bits;
      if (m != 0) continue;
    } else {
      const double magnitude = e == 0 ? std::ldexp(m, -24) : std::ldexp(1024 + m, int(e) - 25);
      EXPECT_EQ(value, (bits & 0x8000) != 0 ? -magnitude : magnitude) << bits;
    }
    ASSERT_EQ(to_float16(value), h) << bits;
    if (e < 0x1e || (e == 0x1e && m < 0x3ff)) {  // the midpoint to the next value up
      const float next = from_float16(static_cast<std::uint16_t>(h + 1));
      const float halfway = value + (next - value) / 2;  // exact in float32
      const auto even = (h & 1) == 0 ? h : static_cast<std::uint16_t>(h + 1);
      EXPECT_EQ(to_float16(halfway), even) << bits;
      EXPECT_EQ(to_float16(std::nextafter(halfway, value)), h) << bits;
      EXPECT_EQ(to_float16(std::nextafter(halfway, next)), static_cast<std::uint16_t>(h + 1))
          << bits;
    }
  }
  EXPECT_EQ(from_float16(0x7bff), 65504.0f);
  EXPECT_EQ(to_float16(65519.996f), 0x7bff);  // below halfway to 65536: the largest finite
  EXPECT_EQ(to_float16(65520.0f), 0x7c00);    // halfway, ties to even: infinity
  EXPECT_EQ(to_float16(-1e30f), 0xfc00);
  EXPECT_TRUE(std::isnan(from_float16(to_float16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_EQ(to_float16(0x1p-25f), 0);    // half the smallest subnormal: to even, zero
  EXPECT_EQ(to_float16(0x1.8p-25f), 1);  // above it: the smallest subnormal
}

TEST(Tensor, ViewsChangeRankAndCopyDensely) {
  Tensor t(DType::int32, {2, 3});
  for (int i = 0; i < 6; ++i) t.data<std::int32_t>()[i] = i;
  const TensorView four = t.view().with_rank(4);
  EXPECT_EQ(four.shape_string(), "[1, 1, 2, 3]");
  EXPECT_EQ(four.with_rank(2).shape_string(), "[2, 3]");
  EXPECT_THAT(
      [&] { t.view().with_rank(1); },
      ::testing::ThrowsMessage<Error>(::testing::HasSubstr("cannot drop dimension 0 of size 2")));
  TensorView transposed = TensorView::contiguous(t.raw(), DType::int32, {3, 2});
  transposed.strides = {1, 3};
  EXPECT_FALSE(transposed.is_contiguous());
  const Tensor dense = to_tensor(transposed);
  const std::int32_t expected[] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(dense.data<std::int32_t>()[i], expected[i]);
  EXPECT_THAT(
      [] {
        Tensor(DType::float32, {std::int64_t{1} << 40, std::int64_t{1} << 40});
      },
      ::testing::ThrowsMessage<Error>(::testing::HasSubstr("expected a size that fits in memory")));
}

TEST(Tensor, BFloat16HasNoNpyType) {
  Tensor t(DType::bfloat16, {2});
  std::ostringstream out;
  EXPECT_THAT([&] { write_npy(out, t.view()); },
              ::testing::ThrowsMessage<Error>(
                  ::testing::HasSubstr("got bfloat16; convert it to float32 first")));
}

// narrow: a range of one dimension over the same memory, checked.
TEST(TensorViews, NarrowSelectsARangeOfOneDimension) {
  Tensor t(DType::float32, {2, 5, 3});
  for (std::int64_t n = 0; n < t.numel(); ++n) t.data<float>()[n] = static_cast<float>(n);
  const TensorView middle = t.view().narrow(1, 1, 4);
  EXPECT_EQ(middle.shape_string(), "[2, 3, 3]");
  EXPECT_EQ(static_cast<const float*>(middle.data)[0], 3.0f);  // element (0, 1, 0)
  const Tensor dense = to_tensor(middle);
  EXPECT_EQ(dense.data<float>()[9], 18.0f);  // element (1, 1, 0) of the original
  MutableTensorView written = t.mutable_view().narrow(2, 2, 3);
  static_cast<float*>(written.data)[0] = -1.0f;
  EXPECT_EQ(t.data<float>()[2], -1.0f);
  EXPECT_THROW(t.view().narrow(1, 2, 6), Error);
  EXPECT_THROW(t.view().narrow(3, 0, 1), Error);
}

}  // namespace
}  // namespace qkv
