// Teach one attention layer to look at the previous token, with qkv's public API only.
//
// Each input row is a token (one-hot, 8 kinds) next to its position (one-hot, 8 places); the
// target for position t is the token at t − 1 (at t = 0, which has none, its own). A causal
// MultiHeadAttention layer (PyTorch's nn.MultiheadAttention) must learn queries and keys that match
// "my position minus one", and values that carry the token. Mean squared error, plain gradient
// descent.
//
//   cmake --build build/release --target learn_previous_token
//   build/release/examples/learn_previous_token

#include <qkv/multihead_attention.hpp>

#include <cstdio>
#include <random>
#include <vector>

int main() {
  constexpr std::int64_t kTokens = 8, kLength = 8, kEmbed = kTokens + kLength, kBatch = 32;
  qkv::MultiHeadAttentionOptions options;
  options.embed_dim = kEmbed;
  options.num_heads = 1;
  options.batch_first = true;  // [batch, length, features]
  qkv::MultiHeadAttention attention(options, /*seed=*/1);

  std::mt19937_64 rng(2);
  std::uniform_int_distribution<std::int64_t> token(0, kTokens - 1);
  qkv::Tensor x(qkv::DType::float32, {kBatch, kLength, kEmbed});
  qkv::Tensor target(qkv::DType::float32, {kBatch, kLength, kEmbed});
  qkv::MultiHeadAttentionCall call;
  call.is_causal = true;  // position t sees 0 … t

  for (int step = 0; step <= 1500; ++step) {
    // A fresh batch: token one-hots and position one-hots in x; the previous token in target.
    x = qkv::Tensor(qkv::DType::float32, {kBatch, kLength, kEmbed});
    target = qkv::Tensor(qkv::DType::float32, {kBatch, kLength, kEmbed});
    for (std::int64_t b = 0; b < kBatch; ++b) {
      for (std::int64_t t = 0; t < kLength; ++t) {
        const std::int64_t kind = token(rng), row = (b * kLength + t) * kEmbed;
        x.data<float>()[row + kind] = 1.0f;
        x.data<float>()[row + kTokens + t] = 1.0f;
        if (t + 1 < kLength) target.data<float>()[row + kEmbed + kind] = 1.0f;
        if (t == 0) target.data<float>()[row + kind] = 1.0f;
      }
    }
    // Forward, the loss and its gradient, backward, a step down the gradient.
    const qkv::MultiHeadAttentionResult result =
        attention.forward(x.view(), x.view(), x.view(), call);
    qkv::Tensor d_output(qkv::DType::float32, {kBatch, kLength, kEmbed});
    double loss = 0;
    for (std::int64_t i = 0; i < d_output.numel(); ++i) {
      const float error = result.output.data<float>()[i] - target.data<float>()[i];
      loss += error * error / static_cast<double>(kBatch * kLength);
      d_output.data<float>()[i] = 2 * error / static_cast<float>(kBatch * kLength);
    }
    attention.zero_grad();
    attention.backward(d_output.view());  // query, key and value are x: their gradients unused
    for (auto& [name, parameter] : attention.parameters()) {
      const qkv::Tensor& gradient = attention.gradients().at(name);
      for (std::int64_t i = 0; i < parameter.numel(); ++i)
        parameter.data<float>()[i] -= 0.5f * gradient.data<float>()[i];
    }
    if (step % 300 == 0) std::printf("step %4d  loss %.4f\n", step, loss);
    if (step == 1500) {  // where each position of the first sequence looks
      std::printf("\nattention weights of one sequence (row: query position, column: key):\n");
      for (std::int64_t t = 0; t < kLength; ++t) {
        std::printf("%2lld ", static_cast<long long>(t));
        for (std::int64_t s = 0; s < kLength; ++s)
          std::printf(" %4.2f", result.weights.data<float>()[t * kLength + s]);
        std::printf("\n");
      }
      return loss < 0.02 ? 0 : 1;  // learned: each row's weight sits just left of the diagonal
    }
  }
}
