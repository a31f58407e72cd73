// Linear on OpenBLAS: the projections are plain GEMMs, the one thing qkv does not write itself.

#include "qkv/linear.hpp"

#include <cblas.h>
#include <fmt/format.h>

#include <cmath>
#include <random>

#include "layers/dense.hpp"
#include "qkv/error.hpp"

namespace qkv {

Linear::Linear(std::int64_t in_features, std::int64_t out_features, bool has_bias,
               std::uint64_t seed)
    : in_features_(in_features), out_features_(out_features) {
  if (in_features <= 0 || out_features <= 0) {
    throw Error(fmt::format("Linear: expected in_features and out_features > 0, got {} and {}",
                            in_features, out_features));
  }
  std::mt19937_64 rng(seed);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
  std::uniform_real_distribution<float> uniform(static_cast<float>(-bound),
                                                static_cast<float>(bound));
  weight = Tensor(DType::float32, {out_features, in_features});
  for (std::int64_t n = 0; n < weight.numel(); ++n) weight.data<float>()[n] = uniform(rng);
  if (has_bias) {
    bias = Tensor(DType::float32, {out_features});
    for (std::int64_t n = 0; n < bias.numel(); ++n) bias.data<float>()[n] = uniform(rng);
  }
  zero_grad();
}

void Linear::zero_grad() {
  weight_grad = Tensor(DType::float32, {out_features_, in_features_});
  if (bias.numel() > 0) bias_grad = Tensor(DType::float32, {out_features_});
}

Tensor Linear::forward(const TensorView& x) const {
  const layers::Rows input = layers::rows_of(x, in_features_, "x");
  layers::check_parameter(weight, {out_features_, in_features_}, "weight");
  if (bias.numel() > 0) layers::check_parameter(bias, {out_features_}, "bias");
  std::vector<std::int64_t> shape(x.shape.begin(), x.shape.begin() + x.rank);
  shape.back() = out_features_;
  Tensor y(DType::float32, shape);
  layers::affine(input.data, input.count, in_features_, weight.data<float>(),
                 bias.numel() > 0 ? bias.data<float>() : nullptr, out_features_, y.data<float>());
  return y;
}

Tensor Linear::backward(const TensorView& x, const TensorView& dy) {
  const layers::Rows input = layers::rows_of(x, in_features_, "x");
  const layers::Rows d_output = layers::rows_of(dy, out_features_, "dy");
  if (d_output.count != input.count) {
    throw Error(fmt::format("dy: expected {} rows of {} (those of x), got {}", input.count,
                            out_features_, d_output.count));
  }
  std::vector<std::int64_t> shape(x.shape.begin(), x.shape.begin() + x.rank);
  Tensor dx(DType::float32, shape);
  layers::affine_backward(input.data, d_output.data, input.count, in_features_, out_features_,
                          weight.data<float>(), dx.data<float>(), weight_grad.data<float>(),
                          bias.numel() > 0 ? bias_grad.data<float>() : nullptr);
  return dx;
}

}  // namespace qkv
