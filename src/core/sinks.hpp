// Attention sinks (docs/contract.md §2): a sink is a softmax column with a logit and no value.
// Joining it to a row's result over the keys is merging one more part whose LSE is the sink and
// whose O is 0 (core/merge.hpp's rule), which every kernel does at the end of a row.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

namespace qkv::detail {

// A row's result with its sink: lse is log(e^keys_lse + e^sink); the row's weights over the keys
// (and so O) are scaled by keys_share = e^(keys_lse − lse). A row that saw no key (keys_lse =
// -inf) gets lse = sink and keys_share = 0.
struct SinkJoin {
  double lse;
  double keys_share;
};

inline SinkJoin join_sink(double keys_lse, double sink) {
  constexpr double kMinusInfinity = -std::numeric_limits<double>::infinity();
  if (keys_lse == kMinusInfinity) return {sink, 0.0};
  if (sink == kMinusInfinity) return {keys_lse, 1.0};
  const double largest = std::max(keys_lse, sink);
  const double lse = largest + std::log(std::exp(keys_lse - largest) + std::exp(sink - largest));
  return {lse, std::exp(keys_lse - lse)};
}

// ∂L/∂sink of one row, from its LSE (with the sink) and delta = Δ − ∂L/∂LSE, where Δ = dO·O:
// the sink's weight e^(sink − LSE) times (∂L/∂LSE − Δ), its column having dP = 0.
inline double sink_gradient(double sink, double lse, double delta) {
  return lse == -std::numeric_limits<double>::infinity() ? 0.0 : -std::exp(sink - lse) * delta;
}

}  // namespace qkv::detail
