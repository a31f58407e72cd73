// Dense float32 rows and the GEMMs of the layers (OpenBLAS).
#pragma once

#include <cstdint>
#include <initializer_list>

#include "qkv/tensor.hpp"

namespace qkv::layers {

// A float32 tensor seen as `count` dense rows of `width`: the caller's storage when it is dense,
// else a copy (kept in `storage`).
struct Rows {
  const float* data = nullptr;
  std::int64_t count = 0;
  Tensor storage;
};
// Throws qkv::Error naming `name` unless x is float32 with last dimension `width`.
Rows rows_of(const TensorView& x, std::int64_t width, const char* name);

// Throws qkv::Error unless the parameter has exactly this shape (and is float32).
void check_parameter(const Tensor& t, std::initializer_list<std::int64_t> shape, const char* name);

// y [rows, out] = x [rows, in] Wᵀ + b  (W [out, in]; b may be null).
void affine(const float* x, std::int64_t rows, std::int64_t in, const float* w, const float* b,
            std::int64_t out, float* y);

// The backward of affine: dx = dy W (when dx is not null), dW += dyᵀ x, db += Σ_rows dy (when
// db is not null).
void affine_backward(const float* x, const float* dy, std::int64_t rows, std::int64_t in,
                     std::int64_t out, const float* w, float* dx, float* dw, float* db);

}  // namespace qkv::layers
