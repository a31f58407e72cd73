// Differential attention (Ye et al., ICLR 2025, "Differential Transformer"): a self-attention
// layer whose heads subtract two softmax maps, forward and backward, on qkv's attention (neither
// map is formed). The same parameters, names and formula as qkv.nn.DifferentialAttention.
#pragma once

#include <cstdint>
#include <memory>

#include "qkv/safetensors.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

struct DifferentialAttentionOptions {
  std::int64_t embed_dim = 0;     // E: a multiple of 2·num_heads
  std::int64_t num_heads = 1;     // H; each has two query/key pairs of E / H / 2 features
  std::int64_t num_kv_heads = 0;  // key/value heads (GQA), dividing H; 0: H
  std::int64_t depth = 0;  // the layer's index from 0: λ_init = 0.8 − 0.6·e^(−0.3·depth)
  bool causal = true;
};

// x [N, L, E] → (softmax(Q1 K1ᵀ s) − λ softmax(Q2 K2ᵀ s)) V per head (s = 1/sqrt(head_dim), V of
// 2·head_dim), each head's output normalized by its RMS (eps 1e-5) times `subln_weight` and
// 1 − λ_init, heads concatenated and projected out. λ = e^(λ_q1·λ_k1) − e^(λ_q2·λ_k2) + λ_init.
// Parameters: "q_proj.weight" [E, E], "k_proj.weight" and "v_proj.weight" [E·Hk/H, E],
// "out_proj.weight" [E, E], "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2" [head_dim],
// "subln_weight" [2·head_dim]. float32.
class DifferentialAttention {
 public:
  // Projections uniform in ±1/sqrt(E) (torch.nn.Linear's), λ vectors normal with deviation 0.1,
  // subln_weight 1; drawn from `seed`. qkv::Error for sizes that do not fit.
  explicit DifferentialAttention(const DifferentialAttentionOptions& options,
                                 std::uint64_t seed = 0);

  const DifferentialAttentionOptions& options() const { return options_; }
  const NamedTensors& parameters() const { return parameters_; }
  NamedTensors& parameters() { return parameters_; }
  const NamedTensors& gradients() const { return gradients_; }
  void zero_grad();
  double lambda_init() const;
  double lambda() const;  // λ of the current parameters

  // x [N, L, E] float32 → [N, L, E]; keeps what backward needs.
  Tensor forward(const TensorView& x);
  // For ∂L/∂output = dout of the last forward: adds every parameter's gradient to gradients()
  // and returns ∂L/∂x.
  Tensor backward(const TensorView& dout);

 private:
  struct Saved;
  DifferentialAttentionOptions options_;
  NamedTensors parameters_, gradients_;
  std::shared_ptr<Saved> saved_;
};

}  // namespace qkv
