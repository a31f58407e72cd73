#include "qkv/tensor.hpp"

#include <fmt/format.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>

#include "qkv/error.hpp"

namespace qkv {

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
    case DType::boolean:
      return "bool";
    case DType::int32:
      return "int32";
    case DType::int64:
      return "int64";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float16:
      return "float16";
    case DType::int8:
      return "int8";
  }
  return "unknown";
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return 4;
    case DType::float64:
      return 8;
    case DType::boolean:
    case DType::int8:
      return 1;
    case DType::int32:
      return 4;
    case DType::int64:
      return 8;
    case DType::bfloat16:
    case DType::float16:
      return 2;
  }
  return 0;
}

std::uint16_t to_bfloat16(float value) {
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest, ties to even
  return static_cast<std::uint16_t>(bits >> 16);
}

float from_bfloat16(std::uint16_t bits) {
  const std::uint32_t widened = static_cast<std::uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, 4);
  return value;
}

std::uint16_t to_float16(float value) {
  const auto bits = std::bit_cast<std::uint32_t>(value);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return sign | 0x7e00u;   // NaN, quiet
  if (magnitude >= 0x477ff000u) return sign | 0x7c00u;  // from 65520 (a tie, to even): inf
  if (magnitude < 0x38800000u) {                        // below 2^-14: a subnormal or zero
    const float units = std::bit_cast<float>(magnitude) * 0x1p24f;    // in units of 2^-24, exact
    return sign | static_cast<std::uint16_t>(std::nearbyint(units));  // ties to even
  }
  // A normal: drop 13 mantissa bits, to nearest, ties to even; the exponent rebiased 127 → 15.
  const std::uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);
  return sign | static_cast<std::uint16_t>((rounded >> 13) - (112u << 10));
}

float from_float16(std::uint16_t bits) {
  const std::uint32_t sign = (bits & 0x8000u) << 16, exponent = (bits >> 10) & 0x1fu,
                      mantissa = bits & 0x3ffu;
  if (exponent == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  if (exponent == 0) {  // zero or a subnormal: mantissa · 2^-24
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return sign != 0 ? -magnitude : magnitude;
  }
  return std::bit_cast<float>(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

std::int64_t checked_numel(std::span<const std::int64_t> shape, std::size_t element_size,
                           const std::string& what) {
  constexpr auto kMax = std::numeric_limits<std::int64_t>::max();
  std::int64_t count = 1;
  bool overflow = false;
  for (std::int64_t extent : shape) {
    if (extent < 0) throw Error(fmt::format("{}: expected sizes >= 0, got {}", what, extent));
    if (extent != 0 && count > kMax / extent) overflow = true;
    count = overflow ? count : count * extent;
  }
  if (count == 0) return 0;  // an empty array is fine whatever its other sizes
  if (overflow || count > kMax / static_cast<std::int64_t>(element_size)) {
    throw Error(fmt::format("{}: expected a size that fits in memory, got shape [{}]", what,
                            fmt::join(shape, ", ")));
  }
  return count;
}

namespace {

template <class View, class Pointer>
View contiguous_view(Pointer data, DType dtype, std::span<const std::int64_t> shape) {
  if (shape.size() > static_cast<std::size_t>(kMaxRank)) {
    throw Error(fmt::format("view: expected rank <= {}, got {}", kMaxRank, shape.size()));
  }
  View view;
  view.data = data;
  view.dtype = dtype;
  view.rank = static_cast<int>(shape.size());
  std::int64_t stride = 1;
  for (int d = view.rank - 1; d >= 0; --d) {
    view.shape[d] = shape[d];
    view.strides[d] = stride;
    stride *= shape[d];
  }
  return view;
}

template <class View>
View reshape_rank(const View& view, int new_rank) {
  if (new_rank < 0 || new_rank > kMaxRank) {
    throw Error(fmt::format("view: expected rank 0..{}, got {}", kMaxRank, new_rank));
  }
  View result = view;
  result.rank = new_rank;
  result.shape.fill(1);
  result.strides.fill(0);
  if (new_rank >= view.rank) {
    const int added = new_rank - view.rank;
    for (int d = 0; d < view.rank; ++d) {
      result.shape[added + d] = view.shape[d];
      result.strides[added + d] = view.strides[d];
    }
    return result;
  }
  const int removed = view.rank - new_rank;
  for (int d = 0; d < removed; ++d) {
    if (view.shape[d] != 1) {
      throw Error(fmt::format("view: cannot drop dimension {} of size {} from shape [{}]", d,
                              view.shape[d],
                              fmt::join(view.shape.begin(), view.shape.begin() + view.rank, ", ")));
    }
  }
  for (int d = 0; d < new_rank; ++d) {
    result.shape[d] = view.shape[removed + d];
    result.strides[d] = view.strides[removed + d];
  }
  return result;
}

}  // namespace

TensorView TensorView::contiguous(const void* data, DType dtype,
                                  std::span<const std::int64_t> shape) {
  return contiguous_view<TensorView>(data, dtype, shape);
}

MutableTensorView MutableTensorView::contiguous(void* data, DType dtype,
                                                std::span<const std::int64_t> shape) {
  return contiguous_view<MutableTensorView>(data, dtype, shape);
}

std::int64_t TensorView::numel() const {
  std::int64_t count = 1;
  for (int d = 0; d < rank; ++d) count *= shape[d];
  return count;
}

bool TensorView::is_contiguous() const {
  std::int64_t stride = 1;
  for (int d = rank - 1; d >= 0; --d) {
    if (shape[d] != 1 && strides[d] != stride) return false;
    stride *= shape[d];
  }
  return true;
}

TensorView TensorView::with_rank(int new_rank) const {
  return reshape_rank(*this, new_rank);
}

MutableTensorView MutableTensorView::with_rank(int new_rank) const {
  return reshape_rank(*this, new_rank);
}

namespace {

template <class View>
View narrow_view(View view, int dim, std::int64_t begin, std::int64_t end) {
  if (dim < 0 || dim >= view.rank || begin < 0 || begin > end ||
      end > view.shape[static_cast<std::size_t>(dim)]) {
    throw Error(
        fmt::format("narrow: expected 0 <= begin <= end <= {} along dimension {} of {}, "
                    "got [{}, {})",
                    dim >= 0 && dim < view.rank ? view.shape[static_cast<std::size_t>(dim)] : 0,
                    dim, view.shape_string(), begin, end));
  }
  using Byte = std::conditional_t<std::is_same_v<View, TensorView>, const std::byte, std::byte>;
  if (end > begin) {
    view.data =
        static_cast<Byte*>(view.data) + begin * view.strides[static_cast<std::size_t>(dim)] *
                                            static_cast<std::int64_t>(dtype_size(view.dtype));
  }
  view.shape[static_cast<std::size_t>(dim)] = end - begin;
  return view;
}

}  // namespace

TensorView TensorView::narrow(int dim, std::int64_t begin, std::int64_t end) const {
  return narrow_view(*this, dim, begin, end);
}

MutableTensorView MutableTensorView::narrow(int dim, std::int64_t begin, std::int64_t end) const {
  MutableTensorView view = *this;
  const TensorView narrowed = as_const().narrow(dim, begin, end);
  view.data = const_cast<void*>(narrowed.data);
  view.shape = narrowed.shape;
  return view;
}

std::string TensorView::shape_string() const {
  return fmt::format("[{}]", fmt::join(shape.begin(), shape.begin() + rank, ", "));
}

Tensor::Tensor(DType dtype, std::vector<std::int64_t> shape)
    : dtype_(dtype), shape_(std::move(shape)) {
  numel_ = checked_numel(shape_, dtype_size(dtype_), "tensor");
  bytes_.assign(static_cast<std::size_t>(numel_) * dtype_size(dtype_), std::byte{0});
}

TensorView Tensor::view() const {
  return TensorView::contiguous(bytes_.data(), dtype_, shape_);
}

MutableTensorView Tensor::mutable_view() {
  return MutableTensorView::contiguous(bytes_.data(), dtype_, shape_);
}

Tensor to_tensor(const TensorView& view) {
  Tensor result(view.dtype,
                std::vector<std::int64_t>(view.shape.begin(), view.shape.begin() + view.rank));
  const std::size_t element = dtype_size(view.dtype);
  auto* destination = static_cast<std::byte*>(result.raw());
  const auto* source = static_cast<const std::byte*>(view.data);
  std::array<std::int64_t, kMaxRank> index{};
  for (std::int64_t n = 0; n < result.numel(); ++n) {
    std::int64_t offset = 0;
    for (int d = 0; d < view.rank; ++d) offset += index[d] * view.strides[d];
    std::memcpy(destination + n * static_cast<std::int64_t>(element),
                source + offset * static_cast<std::int64_t>(element), element);
    for (int d = view.rank - 1; d >= 0; --d) {
      if (++index[d] < view.shape[d]) break;
      index[d] = 0;
    }
  }
  return result;
}

}  // namespace qkv
