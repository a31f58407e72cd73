// Uses the installed qkv: one head, two keys; the query matches the second key far better.
#include <qkv/qkv.hpp>

#include <cmath>
#include <cstdio>

int main() {
  const float q[] = {0.0f, 4.0f};
  const float k[] = {1.0f, 0.0f, 0.0f, 1.0f};
  const float v[] = {10.0f, 20.0f};
  float out[1] = {};
  qkv::AttentionOptions options;
  options.score = qkv::Score::dot;
  qkv::attention_forward(
      qkv::TensorView::contiguous(q, qkv::DType::float32, {1, 1, 1, 2}),
      qkv::TensorView::contiguous(k, qkv::DType::float32, {1, 2, 1, 2}),
      qkv::TensorView::contiguous(v, qkv::DType::float32, {1, 2, 1, 1}), options,
      {qkv::MutableTensorView::contiguous(out, qkv::DType::float32, {1, 1, 1, 1}), {}, {}});
  // softmax([0, 4]) = [1, e^4] / (1 + e^4)
  const double expected = (10.0 + 20.0 * std::exp(4.0)) / (1.0 + std::exp(4.0));
  std::printf("consumer: O = %.5f, expected %.5f\n", out[0], expected);
  return std::abs(out[0] - expected) < 1e-4 ? 0 : 1;
}
