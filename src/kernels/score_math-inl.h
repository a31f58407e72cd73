// The scores' elementwise functions that the fused forward and the fused backward must compute
// alike (the backward recomputes P from the forward's scores), per SIMD target: included by both
// after hwy/highway.h.
//
// Sigmoid attention's weights, P = 1 / (1 + e^(−b − s)). The exponent is clamped at 100:
// Highway's Exp gives +inf from just past 88.7 up to about 176 (and wraps beyond), so P is then
// exactly 0 — for a hidden key (s = −inf) too, without a select. (A reciprocal estimate with a
// Newton step in place of the division measured no faster.)

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

template <class D, class V = hwy::HWY_NAMESPACE::Vec<D>>
HWY_INLINE V SigmoidWeights(D d, V score, V negative_bias) {
  namespace hn = hwy::HWY_NAMESPACE;
  const V e = hn::Exp(d, hn::Min(hn::Sub(negative_bias, score), hn::Set(d, 100.0f)));
  const V one = hn::Set(d, 1.0f);
  return hn::Div(one, hn::Add(one, e));
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
