// Storage types widened to float32, per SIMD target: the kernels keep bfloat16 and float16 inputs
// as they come and widen a vector (or a row) at a time as they read them. Included after
// hwy/highway.h by the fused and split-KV kernels.
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

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#endif  // QKV_KERNELS_WIDEN_INL_H_
