// The scores' elementwise functions that the fused forward and the fused backward must compute
// alike (the backward recomputes P from the forward's scores), per SIMD target: included by both
// after hwy/highway.h.
//
// Sigmoid attention's weights, P = 1 / (1 + e^x) with x = −b − s (SigmoidWeights below).

// Per-target include guard (Highway's convention for headers included once per target).
#if defined(QKV_KERNELS_SCORE_MATH_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_KERNELS_SCORE_MATH_INL_H_
#undef QKV_KERNELS_SCORE_MATH_INL_H_
#else
#define QKV_KERNELS_SCORE_MATH_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

// e^x for sigmoid attention, whose x = −b − s needs no more than this: a sigmoid reads e^x
// only through 1 + e^x, so below x = −87 (where 1 + e^x is 1) and above 88.4 (where P is under
// the smallest normal float) e^x itself does not matter. Clamped to [−87, 89], x = n·ln 2 + r
// with n = round(x / ln 2) (by adding 1.5·2²³, whose float then holds n in its low bits) and
// |r| ≤ ln 2 / 2 (in two steps, ln 2 split into a 9-bit part whose product with n is exact and
// the rest: exact without a fused multiply-add too); e^r by a degree-6 polynomial (fitted to a
// relative error of 4·10⁻⁹ on that interval); 2^n built in the exponent bits: for n = 128 they
// are those of +inf, so P is exactly 0 for x ≥ 88.4 and for a hidden key (s = −inf). A NaN
// stays NaN (the clamps would drop it: it is put back at the end). Unlike Highway's Exp (exact
// 0 below −104, +inf above 88.7, with the checks and the two-step scaling that takes), it needs
// no select and one scaling multiply; sigmoid attention rows run cheaper than softmax rows with
// it. The weights' error bound is swept on every target in tests/unit/test_simd.cpp.
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SigmoidExp(D d, V x) {
  namespace hn = hwy::HWY_NAMESPACE;
  const hn::RebindToSigned<D> di;
  const V clamped = hn::Min(hn::Set(d, 89.0f), hn::Max(hn::Set(d, -87.0f), x));
  const V round_to_integer = hn::Set(d, 12582912.0f);  // 1.5·2²³
  const V shifted = hn::MulAdd(clamped, hn::Set(d, 1.44269504088896341f), round_to_integer);
  const V n = hn::Sub(shifted, round_to_integer);
  V r = hn::NegMulAdd(n, hn::Set(d, 0.693359375f), clamped);
  r = hn::NegMulAdd(n, hn::Set(d, -2.12194440e-4f), r);
  V polynomial = hn::Set(d, 0.0013875303557142615f);
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 0.008379661478102207f));
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 0.04166761040687561f));
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 0.16666346788406372f));
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 0.4999999403953552f));
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 1.0f));
  polynomial = hn::MulAdd(polynomial, r, hn::Set(d, 1.0f));
  // The float `shifted` holds 0x4B400000 + n; shifted left by 23 that is n·2²³ (the constant's
  // low nine bits are zero), and + 127·2²³ makes the biased exponent of 2^n.
  const auto power_bits =
      hn::Add(hn::ShiftLeft<23>(hn::BitCast(di, shifted)), hn::Set(di, 127 << 23));
  const V power = hn::Mul(polynomial, hn::BitCast(d, power_bits));
  return hn::Or(power, hn::VecFromMask(d, hn::IsNaN(x)));  // all bits set: a NaN
}

template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SigmoidWeights(D d, V score, V negative_bias) {
  namespace hn = hwy::HWY_NAMESPACE;
  const V one = hn::Set(d, 1.0f);
  return hn::Div(one, hn::Add(one, SigmoidExp(d, hn::Sub(negative_bias, score))));
}

// The soft cap's tanh(s / c) of a vector of scores (the capped score is c times it; the backward
// keeps it for the derivative 1 − tanh²): Highway's Tanh, at most 4 ulp from std::tanh, where a
// scalar std::tanh per pair made a soft cap cost 3.7 times the rest of the forward.
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SoftCapTanh(D d, V score, V inverse_cap) {
  namespace hn = hwy::HWY_NAMESPACE;
  return hn::Tanh(d, hn::Mul(score, inverse_cap));
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#endif  // QKV_KERNELS_SCORE_MATH_INL_H_
