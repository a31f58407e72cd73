// Tensors: element types, non-owning strided views, and an owning dense array.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <vector>

namespace qkv {

// Element types qkv reads and writes. `boolean` is one byte per element (0 = false), as numpy.
// `bfloat16` is the upper half of a float32 (8 exponent bits, 7 mantissa bits) and `float16` is
// IEEE 754 binary16 (5 exponent bits, 10 mantissa bits; PyTorch's `half`), each stored as
// std::uint16_t: storage types, computed with in float32.
enum class DType : std::uint8_t {
  float32,
  float64,
  boolean,
  int32,
  int64,
  bfloat16,
  float16,
  int8,  // the quantized KV caches (qkv/kv_cache.hpp), with their scales
};

// bfloat16 ↔ float32. to_bfloat16 rounds to nearest, ties to even; NaN stays NaN.
std::uint16_t to_bfloat16(float value);
float from_bfloat16(std::uint16_t bits);
// float16 ↔ float32. to_float16 rounds to nearest, ties to even (subnormals too; magnitudes from
// 65520 up become infinity); NaN stays NaN. from_float16 is exact.
std::uint16_t to_float16(float value);
float from_float16(std::uint16_t bits);

// "float32", "float64", "bool", "int32", "int64".
const char* dtype_name(DType dtype);

// Bytes per element.
std::size_t dtype_size(DType dtype);

inline constexpr int kMaxRank = 4;

// A non-owning view of a strided array of at most kMaxRank dimensions.
// shape[d] >= 0; strides are in elements (not bytes) and may be zero (broadcast) or negative.
// Element (i0, …, i{rank-1}) lives at data + Σ i_d·strides[d] elements.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::float32;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};

  // A view of dense row-major (C order) storage.
  static TensorView contiguous(const void* data, DType dtype, std::span<const std::int64_t> shape);
  static TensorView contiguous(const void* data, DType dtype,
                               std::initializer_list<std::int64_t> shape) {
    return contiguous(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size()));
  }

  // Number of elements (the product of the shape).
  std::int64_t numel() const;
  // True when the strides are those of dense row-major storage.
  bool is_contiguous() const;
  // The same elements seen with `new_rank` dimensions: leading dimensions of size 1 are added
  // (new_rank > rank) or removed (new_rank < rank, only dimensions of size 1).
  TensorView with_rank(int new_rank) const;
  // The elements [begin, end) along dimension `dim`, over the same memory (PyTorch's narrow).
  // Throws qkv::Error when dim or the range is out of bounds.
  TensorView narrow(int dim, std::int64_t begin, std::int64_t end) const;
  // "[2, 3, 4]".
  std::string shape_string() const;
};

// A view through which results are written. Same layout rules as TensorView.
struct MutableTensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  int rank = 0;
  std::array<std::int64_t, kMaxRank> shape{};
  std::array<std::int64_t, kMaxRank> strides{};

  static MutableTensorView contiguous(void* data, DType dtype, std::span<const std::int64_t> shape);
  static MutableTensorView contiguous(void* data, DType dtype,
                                      std::initializer_list<std::int64_t> shape) {
    return contiguous(data, dtype, std::span<const std::int64_t>(shape.begin(), shape.size()));
  }

  TensorView as_const() const { return {data, dtype, rank, shape, strides}; }
  MutableTensorView with_rank(int new_rank) const;
  MutableTensorView narrow(int dim, std::int64_t begin, std::int64_t end) const;
};

// A dense, row-major array that owns its zero-initialized storage (any rank, not only ≤ 4).
class Tensor {
 public:
  Tensor() = default;
  Tensor(DType dtype, std::vector<std::int64_t> shape);

  DType dtype() const { return dtype_; }
  const std::vector<std::int64_t>& shape() const { return shape_; }
  int rank() const { return static_cast<int>(shape_.size()); }
  std::int64_t numel() const { return numel_; }
  std::size_t nbytes() const { return bytes_.size(); }

  void* raw() { return bytes_.data(); }
  const void* raw() const { return bytes_.data(); }
  template <class T>
  T* data() {
    return reinterpret_cast<T*>(bytes_.data());
  }
  template <class T>
  const T* data() const {
    return reinterpret_cast<const T*>(bytes_.data());
  }

  // Views of the whole array; the rank must be at most kMaxRank.
  TensorView view() const;
  MutableTensorView mutable_view();

 private:
  DType dtype_ = DType::float32;
  std::vector<std::int64_t> shape_;
  std::int64_t numel_ = 0;
  // operator new aligns this to 16 bytes, enough for every dtype.
  std::vector<std::byte> bytes_;
};

// A dense copy of any view, in the view's dtype.
Tensor to_tensor(const TensorView& view);

// Product of `shape`, throwing qkv::Error naming `what` if it (times `element_size`) overflows
// int64 or a dimension is negative.
std::int64_t checked_numel(std::span<const std::int64_t> shape, std::size_t element_size,
                           const std::string& what);

}  // namespace qkv
