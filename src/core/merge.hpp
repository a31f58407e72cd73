// Merging partial attention results: the primitive behind split-KV decoding, the public
// merge_attention, and (later) ring attention.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <span>

namespace qkv::detail {

// The weights of one row's parts when attention over the union of disjoint key sets is
// merged from each set's (O_p, LSE_p):
//   LSE = log Σ_p e^(LSE_p),   weights[p] = e^(LSE_p − LSE),   so that O = Σ_p weights[p] · O_p.
// Parts with LSE_p = -inf (no visible key) weigh 0; when every part is empty LSE = -inf and every
// weight is 0 (O = 0). A part with LSE_p = NaN (a NaN among its scores) makes LSE and every weight
// NaN (O = NaN). `weights` has one entry per part. Returns LSE.
template <class Real, class LseOf>
Real merge_weights(std::span<Real> weights, LseOf lse_of) {
  const auto parts = static_cast<std::int64_t>(weights.size());
  Real largest = -std::numeric_limits<Real>::infinity();
  bool any_nan = false;  // (std::max would drop it)
  for (std::int64_t p = 0; p < parts; ++p) {
    const Real lse = lse_of(p);
    any_nan |= std::isnan(lse);
    largest = std::max<Real>(largest, lse);
  }
  if (any_nan || largest == -std::numeric_limits<Real>::infinity()) {
    const Real weight = any_nan ? std::numeric_limits<Real>::quiet_NaN() : Real{0};
    for (std::int64_t p = 0; p < parts; ++p) weights[p] = weight;
    return any_nan ? weight : largest;
  }
  Real total = 0;
  for (std::int64_t p = 0; p < parts; ++p)
    total += std::exp(static_cast<Real>(lse_of(p)) - largest);
  const Real lse = largest + std::log(total);
  for (std::int64_t p = 0; p < parts; ++p)
    weights[p] = std::exp(static_cast<Real>(lse_of(p)) - lse);
  return lse;
}

// One row of attention over the union of disjoint key sets, from each set's (O_p, LSE_p), as
// merge_weights weighs them: O[d] = Σ_p weights[p] · O_p[d], the parts added in order and those
// of weight 0 skipped (a hidden part's O_p may be anything). `weights` is scratch with one entry
// per part. Returns LSE.
//   lse_of(p) → LSE_p;  out_of(p, d) → O_p[d];  store(d, value) writes O[d].
template <class Real, class LseOf, class OutOf, class Store>
Real merge_row(std::span<Real> weights, std::int64_t dim, LseOf lse_of, OutOf out_of, Store store) {
  const auto parts = static_cast<std::int64_t>(weights.size());
  const Real lse = merge_weights(weights, lse_of);
  for (std::int64_t d = 0; d < dim; ++d) {
    Real sum = 0;
    for (std::int64_t p = 0; p < parts; ++p) {
      if (weights[p] != 0) sum += weights[p] * static_cast<Real>(out_of(p, d));
    }
    store(d, sum);
  }
  return lse;
}

}  // namespace qkv::detail
