#include "layers/dense.hpp"

#include <cblas.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include "qkv/error.hpp"

namespace qkv::layers {

Rows rows_of(const TensorView& x, std::int64_t width, const char* name) {
  if (x.dtype != DType::float32) {
    throw Error(fmt::format("{}: expected dtype float32, got {}", name, dtype_name(x.dtype)));
  }
  if (x.rank < 1 || x.shape[x.rank - 1] != width) {
    throw Error(fmt::format("{}: expected a last dimension of {}, got shape {}", name, width,
                            x.shape_string()));
  }
  Rows rows;
  rows.count = width > 0 ? x.numel() / width : 0;
  if (x.is_contiguous()) {
    rows.data = static_cast<const float*>(x.data);
  } else {
    rows.storage = to_tensor(x);
    rows.data = rows.storage.data<float>();
  }
  return rows;
}

void check_parameter(const Tensor& t, std::initializer_list<std::int64_t> shape, const char* name) {
  const bool same = t.dtype() == DType::float32 &&
                    std::equal(shape.begin(), shape.end(), t.shape().begin(), t.shape().end());
  if (!same) {
    throw Error(fmt::format("{}: expected float32 [{}], got {} [{}]", name, fmt::join(shape, ", "),
                            dtype_name(t.dtype()), fmt::join(t.shape(), ", ")));
  }
}

void affine(const float* x, std::int64_t rows, std::int64_t in, const float* w, const float* b,
            std::int64_t out, float* y) {
  if (rows == 0) return;
  if (b != nullptr) {
    for (std::int64_t r = 0; r < rows; ++r)
      for (std::int64_t c = 0; c < out; ++c) y[r * out + c] = b[c];
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows),
              static_cast<int>(out), static_cast<int>(in), 1.0f, x, static_cast<int>(in), w,
              static_cast<int>(in), b != nullptr ? 1.0f : 0.0f, y, static_cast<int>(out));
}

void affine_backward(const float* x, const float* dy, std::int64_t rows, std::int64_t in,
                     std::int64_t out, const float* w, float* dx, float* dw, float* db) {
  if (rows == 0) return;
  if (dx != nullptr) {  // dx [rows, in] = dy [rows, out] · W [out, in]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<int>(rows),
                static_cast<int>(in), static_cast<int>(out), 1.0f, dy, static_cast<int>(out), w,
                static_cast<int>(in), 0.0f, dx, static_cast<int>(in));
  }
  // dW [out, in] += dyᵀ [out, rows] · x [rows, in]
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, static_cast<int>(out), static_cast<int>(in),
              static_cast<int>(rows), 1.0f, dy, static_cast<int>(out), x, static_cast<int>(in),
              1.0f, dw, static_cast<int>(in));
  if (db != nullptr) {
    for (std::int64_t c = 0; c < out; ++c) {
      double sum = 0.0;
      for (std::int64_t r = 0; r < rows; ++r) sum += dy[r * out + c];
      db[c] += static_cast<float>(sum);
    }
  }
}

}  // namespace qkv::layers
