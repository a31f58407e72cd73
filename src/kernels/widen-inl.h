// Storage types widened to float32, per SIMD target: the kernels keep bfloat16 and float16 inputs
// as they come and widen a vector (or a row) at a time as they read them, and round rows of
// float32 results back to those types a vector at a time as they write them (StoreRow). Included
// after hwy/highway.h by the fused and split-KV kernels.
//   float:           as it is;
//   std::uint16_t:   bfloat16, the upper half of a float32: a 16-bit shift;
//   hwy::float16_t:  IEEE binary16: Highway's PromoteTo (F16C's vcvtph2ps on x86);
//   std::int8_t:     an int8 KV cache's integers (their scale is applied by the caller).

// Per-target include guard (Highway's convention for headers included once per target).
#if defined(QKV_KERNELS_WIDEN_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_KERNELS_WIDEN_INL_H_
#undef QKV_KERNELS_WIDEN_INL_H_
#else
#define QKV_KERNELS_WIDEN_INL_H_
#endif

#include <hwy/highway.h>

#include <bit>
#include <cstdint>
#include <type_traits>

#include "core/problem.hpp"
#include "qkv/tensor.hpp"

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

// One vector of float32 from p.
template <class D>
HWY_INLINE hn::Vec<D> LoadWidened(D d, const float* p) {
  return hn::LoadU(d, p);
}
template <class D>
HWY_INLINE hn::Vec<D> LoadWidened(D d, const std::uint16_t* p) {
  const hn::RebindToUnsigned<D> du32;
  const hn::Rebind<std::uint16_t, D> du16;
  return hn::BitCast(d, hn::ShiftLeft<16>(hn::PromoteTo(du32, hn::LoadU(du16, p))));
}
template <class D>
HWY_INLINE hn::Vec<D> LoadWidened(D d, const hwy::float16_t* p) {
  const auto widened = hn::PromoteTo(d, hn::LoadU(hn::Rebind<hwy::float16_t, D>(), p));
#if HWY_TARGET == HWY_SSE4 || HWY_TARGET == HWY_SSSE3 || HWY_TARGET == HWY_EMU128 || \
    HWY_TARGET == HWY_SCALAR
  // Without F16C, Highway 1.0.3 widens the exponent 31 (infinity, NaN) as an ordinary one, to a
  // finite 2^16 · (1 + m / 1024): those are put back, the sign and mantissa kept.
  const hn::RebindToUnsigned<D> du32;
  const auto bits = hn::PromoteTo(
      du32, hn::LoadU(hn::Rebind<std::uint16_t, D>(), reinterpret_cast<const std::uint16_t*>(p)));
  const auto exponent_bits = hn::Set(du32, 0x7C00);
  const auto special = hn::Eq(hn::And(bits, exponent_bits), exponent_bits);
  const auto restored = hn::Or(
      hn::Or(hn::ShiftLeft<16>(hn::And(bits, hn::Set(du32, 0x8000))), hn::Set(du32, 0x7F800000)),
      hn::ShiftLeft<13>(hn::And(bits, hn::Set(du32, 0x3FF))));
  return hn::IfThenElse(hn::RebindMask(d, special), hn::BitCast(d, restored), widened);
#else
  return widened;
#endif
}

template <class D>
HWY_INLINE hn::Vec<D> LoadWidened(D d, const std::int8_t* p) {
  const hn::RebindToSigned<D> di32;
  return hn::ConvertTo(d, hn::PromoteTo(di32, hn::LoadU(hn::Rebind<std::int8_t, D>(), p)));
}

// One element as float32.
HWY_INLINE float Widened(float x) {
  return x;
}
HWY_INLINE float Widened(std::uint16_t x) {
  return std::bit_cast<float>(static_cast<std::uint32_t>(x) << 16);
}
HWY_INLINE float Widened(hwy::float16_t x) {
  return from_float16(std::bit_cast<std::uint16_t>(x));
}
HWY_INLINE float Widened(std::int8_t x) {
  return static_cast<float>(x);
}

// out[0 … n) = in[0 … n) as float32: whole vectors, then one element at a time.
template <class Stored>
HWY_INLINE void WidenRow(const Stored* in, float* out, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes) hn::StoreU(LoadWidened(d, in + i), d, out + i);
  for (; i < n; ++i) out[i] = Widened(in[i]);
}

// out[0 … n) = in[0 … n) · scale: a row of an int8 KV cache as the float32 values it stands for.
HWY_INLINE void DequantizeRow(const std::int8_t* in, float scale, float* out, std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  const auto factor = hn::Set(d, scale);
  std::int64_t i = 0;
  for (; i + lanes <= n; i += lanes)
    hn::StoreU(hn::Mul(LoadWidened(d, in + i), factor), d, out + i);
  for (; i < n; ++i) out[i] = Widened(in[i]) * scale;
}

// Whether the target converts float32 to float16 in hardware (F16C's vcvtps2ph on x86), rounding
// to nearest, ties to even, as to_float16 does. Highway 1.0.3 emulates the conversion elsewhere
// and truncates: those targets (and NEON and SVE, whose rounding cannot be checked here) round
// with to_float16, an element at a time.
constexpr bool kNativeFloat16Rounding =
    HWY_TARGET == HWY_AVX2 || HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL;

// p[0 … lanes) = x rounded to bfloat16 as to_bfloat16 rounds: to nearest, ties to even (the
// rounding increment 0x7FFF plus the lowest kept bit), a NaN made quiet with its sign and upper
// payload kept.
template <class D>
HWY_INLINE void StoreNarrowed(D /*d*/, hn::Vec<D> x, std::uint16_t* HWY_RESTRICT p) {
  const hn::RebindToUnsigned<D> du32;
  const hn::RebindToSigned<D> di32;
  const hn::Rebind<std::uint16_t, D> du16;
  const auto bits = hn::BitCast(du32, x);
  const auto rounded = hn::Add(
      bits, hn::Add(hn::Set(du32, 0x7FFFu), hn::And(hn::ShiftRight<16>(bits), hn::Set(du32, 1u))));
  const auto quiet = hn::Or(bits, hn::Set(du32, 0x400000u));
  const auto upper =
      hn::ShiftRight<16>(hn::IfThenElse(hn::RebindMask(du32, hn::IsNaN(x)), quiet, rounded));
  hn::StoreU(hn::DemoteTo(du16, hn::BitCast(di32, upper)), du16, p);
}

// p[0 … lanes) = x rounded to float16 as to_float16 rounds, for kNativeFloat16Rounding only: the
// hardware's rounding is the same for every number; a NaN, whose payload the hardware keeps, is
// first made the quiet NaN of its sign that to_float16 gives.
template <class D>
HWY_INLINE void StoreNarrowed(D d, hn::Vec<D> x, hwy::float16_t* HWY_RESTRICT p) {
  static_assert(kNativeFloat16Rounding || !std::is_same_v<D, D>,
                "Highway's emulated float16 conversion truncates: round with to_float16");
  const hn::RebindToUnsigned<D> du32;
  const auto quiet_nan =
      hn::BitCast(d, hn::Or(hn::And(hn::BitCast(du32, x), hn::Set(du32, 0x80000000u)),
                            hn::Set(du32, 0x7FC00000u)));
  const hn::Rebind<hwy::float16_t, D> df16;
  hn::StoreU(hn::DemoteTo(df16, hn::IfThenElse(hn::IsNaN(x), quiet_nan, x)), df16, p);
}

// One element rounded to the storage type, as to_bfloat16 and to_float16 round.
HWY_INLINE void StoreNarrowed(float x, float* p) {
  *p = x;
}
HWY_INLINE void StoreNarrowed(float x, std::uint16_t* p) {
  *p = to_bfloat16(x);
}
HWY_INLINE void StoreNarrowed(float x, hwy::float16_t* p) {
  *p = std::bit_cast<hwy::float16_t>(to_float16(x));
}

// out[0 … n) = in[0 … n) · factor rounded to Stored (float, bfloat16 as std::uint16_t, or
// hwy::float16_t): whole vectors where the target rounds them as the scalar functions do, then one
// element at a time. (Element by element through StridedOutput::store's dtype switch, the writing
// of a bfloat16 or float16 O was 6% of a prefill of N = 1024 on Zen 3.)
template <class Stored>
HWY_INLINE void NarrowRow(const float* HWY_RESTRICT in, float factor, Stored* HWY_RESTRICT out,
                          std::int64_t n) {
  const hn::ScalableTag<float> d;
  const auto lanes = static_cast<std::int64_t>(hn::Lanes(d));
  std::int64_t i = 0;
  if constexpr (!std::is_same_v<Stored, hwy::float16_t> || kNativeFloat16Rounding) {
    const auto scale = hn::Set(d, factor);
    for (; i + lanes <= n; i += lanes) {
      const auto x = hn::Mul(hn::LoadU(d, in + i), scale);
      if constexpr (std::is_same_v<Stored, float>) {
        hn::StoreU(x, d, out + i);
      } else {
        StoreNarrowed(d, x, out + i);
      }
    }
  }
  for (; i < n; ++i) StoreNarrowed(in[i] * factor, out + i);
}

// Row (b, i, h) of out = row[0 … n) · factor: NarrowRow where out has unit stride along its last
// dimension and is float32, bfloat16 or float16; else through StridedOutput::store, element by
// element (float64, or a strided view).
HWY_INLINE void StoreRow(const detail::StridedOutput& out, const float* row, float factor,
                         std::int64_t n, std::int64_t b, std::int64_t i, std::int64_t h) {
  std::byte* first =
      out.data + out.offset(b, i, h) * static_cast<std::int64_t>(dtype_size(out.dtype));
  if (out.strides[3] != 1 || out.dtype == DType::float64) {
    for (std::int64_t d = 0; d < n; ++d) out.store(row[d] * factor, b, i, h, d);
  } else if (out.dtype == DType::float32) {
    NarrowRow(row, factor, reinterpret_cast<float*>(first), n);
  } else if (out.dtype == DType::bfloat16) {
    NarrowRow(row, factor, reinterpret_cast<std::uint16_t*>(first), n);
  } else {
    NarrowRow(row, factor, reinterpret_cast<hwy::float16_t*>(first), n);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#endif  // QKV_KERNELS_WIDEN_INL_H_
