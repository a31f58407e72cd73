// The one rule by which qkv rounds a row of numbers to int8 (docs/contract.md §9): symmetric, one
// float32 scale per row. An int8 KV cache's appended key and value rows are rounded by it, and so
// are the query rows whose products are taken with such a cache's keys as they lie.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace qkv::detail {

// The float32 scale of a row of n values rounded to int8: max |x| / 127, 0 for a row of zeros;
// NaN when the row holds a NaN or an infinity.
template <class T>
float int8_row_scale(const T* row, std::int64_t n) {
  double largest = 0;
  for (std::int64_t d = 0; d < n; ++d) {
    const auto x = static_cast<double>(row[d]);
    if (!std::isfinite(x)) return std::numeric_limits<float>::quiet_NaN();
    largest = std::max(largest, std::abs(x));
  }
  return static_cast<float>(largest / 127);
}

// out[d] = round(row[d] / scale), ties to even, within ±127 (scale rounded to float32 may make
// the largest quotient 127 + a few ULP): so |row[d] − out[d] · scale| ≤ scale / 2. Zeros when
// scale is 0 or not finite (a row int8_row_scale found a NaN or an infinity in).
template <class T>
void quantize_int8_row(const T* row, std::int64_t n, float scale, std::int8_t* out) {
  const bool usable = scale > 0 && std::isfinite(scale);
  for (std::int64_t d = 0; d < n; ++d) {
    const double quotient = usable ? static_cast<double>(row[d]) / scale : 0.0;
    out[d] = static_cast<std::int8_t>(std::clamp(std::nearbyint(quotient), -127.0, 127.0));
  }
}

}  // namespace qkv::detail
