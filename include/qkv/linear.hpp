// Linear: y = x Wᵀ + b, torch.nn.Linear's layer (docs/contract.md §5), with its backward.
#pragma once

#include <cstdint>

#include "qkv/tensor.hpp"

namespace qkv {

class Linear {
 public:
  // weight [out_features, in_features] drawn as PyTorch does by default (uniform in
  // ±1/sqrt(in_features)), from `seed`; bias [out_features] likewise, or none.
  Linear(std::int64_t in_features, std::int64_t out_features, bool bias = true,
         std::uint64_t seed = 0);

  std::int64_t in_features() const { return in_features_; }
  std::int64_t out_features() const { return out_features_; }

  // The parameters (float32), in PyTorch's layout; bias is empty when the layer has none.
  // Assign to load: shapes are checked on use.
  Tensor weight, bias;
  // Their gradients, summed over backward calls until zero_grad (like PyTorch's .grad).
  Tensor weight_grad, bias_grad;

  // y [..., out] = x [..., in] Wᵀ + b. x is float32 (any strides; a dense copy is made when it
  // is not dense). Throws qkv::Error when the last dimension of x is not in_features.
  Tensor forward(const TensorView& x) const;

  // For ∂L/∂y = dy [..., out] at input x: adds ∂L/∂W = Σ dyᵀx and ∂L/∂b = Σ dy to the gradients
  // and returns ∂L/∂x = dy W [..., in].
  Tensor backward(const TensorView& x, const TensorView& dy);

  void zero_grad();

 private:
  std::int64_t in_features_, out_features_;
};

}  // namespace qkv
