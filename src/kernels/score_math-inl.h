// The scores' elementwise functions that the fused forward and the fused backward must compute
// alike (the backward recomputes P from the forward's scores), per SIMD target: included by both
// (and by the decode kernel) after hwy/highway.h.

// Per-target include guard (Highway's convention for headers included once per target).
#if defined(QKV_KERNELS_SCORE_MATH_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_KERNELS_SCORE_MATH_INL_H_
#undef QKV_KERNELS_SCORE_MATH_INL_H_
#else
#define QKV_KERNELS_SCORE_MATH_INL_H_
#endif

#include <hwy/contrib/math/math-inl.h>
#include <hwy/highway.h>

#include <cstdint>
#include <limits>

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

// e^x for the kernels' weights: the softmax's e^(s − m) and the sigmoid's 1 / (1 + e^x). Both
// need e^x only where it is a normal float, so x is clamped to [−88, 89] and nothing is
// checked: x = n·ln 2 + r with n = round(x / ln 2) (by adding 1.5·2²³, whose float then holds n
// in its low bits) and |r| ≤ ln 2 / 2 (in two steps, ln 2 split into a 9-bit part whose product
// with n is exact and the rest, so that it is exact without a fused multiply-add too); e^r =
// 1 + r + r²·q(r), q of degree 4 (fitted to a relative error of 7·10⁻⁹ on that interval; the
// leading 1 + r added last, so that their rounding is the result's); 2^n built in the exponent
// bits. For n = 128 those are the bits of +inf (x ≥ 88.73 gives +inf, as e^x overflows), for
// n = −127 the bits of +0 (x < −87.68, e^x below the smallest normal float, gives exactly 0, as
// does −inf). A NaN stays NaN (the clamps would drop it: it is put back at the end). Against
// Highway's Exp (exact for subnormal results, with the selects and the two-step scaling that
// takes), this is a few operations shorter — a sigmoid weight for one, a softmax weight for
// one. The error bound is swept on every target in tests/unit/test_simd.cpp.
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V KernelExp(D d, V x) {
  namespace hn = hwy::HWY_NAMESPACE;
  const hn::RebindToSigned<D> di;
  const V clamped = hn::Min(hn::Set(d, 89.0f), hn::Max(hn::Set(d, -88.0f), x));
  const V round_to_integer = hn::Set(d, 12582912.0f);  // 1.5·2²³
  const V shifted = hn::MulAdd(clamped, hn::Set(d, 1.44269504088896341f), round_to_integer);
  const V n = hn::Sub(shifted, round_to_integer);
  V r = hn::NegMulAdd(n, hn::Set(d, 0.693359375f), clamped);
  r = hn::NegMulAdd(n, hn::Set(d, -2.12194440e-4f), r);
  V q = hn::Set(d, 0.0013540084473788738f);
  q = hn::MulAdd(q, r, hn::Set(d, 0.008371959440410137f));
  q = hn::MulAdd(q, r, hn::Set(d, 0.04167391359806061f));
  q = hn::MulAdd(q, r, hn::Set(d, 0.16666488349437714f));
  q = hn::MulAdd(q, r, hn::Set(d, 0.49999967217445374f));
  const V e_r = hn::Add(hn::MulAdd(q, hn::Mul(r, r), r), hn::Set(d, 1.0f));
  // The float `shifted` holds 0x4B400000 + n; shifted left by 23 that is n·2²³ (the constant's
  // low nine bits are zero), and + 127·2²³ makes the biased exponent of 2^n.
  const auto power_bits =
      hn::Add(hn::ShiftLeft<23>(hn::BitCast(di, shifted)), hn::Set(di, 127 << 23));
  const V power = hn::Mul(e_r, hn::BitCast(d, power_bits));
  return hn::Or(power, hn::VecFromMask(d, hn::IsNaN(x)));  // all bits set: a NaN
}

// Sigmoid attention's weights, P = 1 / (1 + e^x) with x = −b − s.
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SigmoidWeights(D d, V score, V negative_bias) {
  namespace hn = hwy::HWY_NAMESPACE;
  const V one = hn::Set(d, 1.0f);
  return hn::Div(one, hn::Add(one, KernelExp(d, hn::Sub(negative_bias, score))));
}

// The soft cap's tanh(s / c) of a vector of scores (the capped score is c times it; the backward
// keeps it for the derivative 1 − tanh²): Highway's Tanh, at most 4 ulp from std::tanh, where a
// scalar std::tanh per pair made a soft cap cost 3.7 times the rest of the forward.
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SoftCapTanh(D d, V score, V inverse_cap) {
  namespace hn = hwy::HWY_NAMESPACE;
  return hn::Tanh(d, hn::Mul(score, inverse_cap));
}

// The largest lane of v; −inf when every lane is −inf, which is how the kernels recognise a row
// that sees no key yet. Highway 1.0's EMU128 target (the fallback in clang's builds) starts its
// MaxOfLanes from the lowest finite float, so there all −inf reduced to −3.4·10³⁸: the row then
// counted as seen, with a sum of 0 and an output of 0 · (1 / 0) = NaN. That target alone checks
// the value (it comes back only from lanes that are all −inf or hold it themselves); every other
// target's reduction is −inf for −inf lanes and runs as it is (tests/unit/test_simd.cpp checks
// both on every target).
template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE float LargestLane(D d, V v) {
  namespace hn = hwy::HWY_NAMESPACE;
  const float largest = hn::GetLane(hn::MaxOfLanes(d, v));
  if constexpr (HWY_TARGET != HWY_EMU128) return largest;
  if (largest != hwy::LowestValue<float>()) return largest;
  const V minus_infinity = hn::Set(d, -std::numeric_limits<float>::infinity());
  return hn::AllTrue(d, hn::Eq(v, minus_infinity)) ? -std::numeric_limits<float>::infinity()
                                                   : largest;
}

// Whether any of scores[begin, end) (whole vectors) is NaN. The online softmax's
// running maximum drops a NaN (x86's max returns its second operand when either is NaN), so a row
// whose visible scores are all NaN (a NaN in its query) looked like a row that sees no key and
// came out 0; the kernels ask this on that rare path and make such a row NaN, as PyTorch does.
template <class D>
HWY_INLINE bool AnyNaN(D d, const float* HWY_RESTRICT scores, std::int64_t begin,
                       std::int64_t end) {
  namespace hn = hwy::HWY_NAMESPACE;
  for (std::int64_t t = begin; t < end; t += static_cast<std::int64_t>(hn::Lanes(d)))
    if (!hn::AllFalse(d, hn::IsNaN(hn::LoadU(d, scores + t)))) return true;
  return false;
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#endif  // QKV_KERNELS_SCORE_MATH_INL_H_
