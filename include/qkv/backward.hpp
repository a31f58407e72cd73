// Attention backward: gradients of every input and parameter of attention_forward.
#pragma once

#include <optional>
#include <vector>

#include "qkv/attention.hpp"

namespace qkv {

// Where gradients go; each is computed only when given, and each has the shape of what it is the
// gradient of (float32, float64, bfloat16 or float16 storage). With GQA, dk and dv sum over the
// query heads of a group; a parameter shared by all heads (W, Wq, Wk, va without a leading Hq) gets
// the sum over heads; dbias has the bias's own shape and sums over its broadcast dimensions.
struct AttentionGradients {
  std::optional<MutableTensorView> dq;            // [B, Nq, Hq, Dq]
  std::optional<MutableTensorView> dk;            // [B, Nk, Hk, Dk]
  std::optional<MutableTensorView> dv;            // [B, Nk, Hk, Dv]
  std::optional<MutableTensorView> dw;            // bilinear: the shape of options.w
  std::optional<MutableTensorView> dwq;           // additive: the shape of options.wq
  std::optional<MutableTensorView> dwk;           // additive: the shape of options.wk
  std::optional<MutableTensorView> dva;           // additive: the shape of options.va
  std::optional<MutableTensorView> dtemperature;  // cosine: the shape of options.temperature
  std::optional<MutableTensorView> dbias;         // the shape of options.bias
  std::optional<MutableTensorView> dsinks;        // [Hq], the shape of options.sinks
  // The parameters of options.score_mod, in its list's order (fewer: the rest not computed);
  // float32 or float64, each its parameter's shape.
  std::vector<std::optional<MutableTensorView>> dscore_mod;
};

// What a forward call returned, kept for its backward: O [B, Nq, Hq, Dv] and LSE [B, Hq, Nq]
// (float32, float64, bfloat16 or float16), from attention_forward on the same inputs and options.
struct SavedForward {
  TensorView out;
  TensorView lse;
};

// The backward pass. For the loss L with ∂L/∂O = dout [B, Nq, Hq, Dv] and ∂L/∂LSE = dlse
// [B, Hq, Nq] (absent: zero), writes ∂L/∂x for every requested x (see AttentionGradients), for
// every score, mask and option of attention_forward, dropout included (the same seed gives the
// same mask). Fully masked rows give zero gradients, never NaN.
// float32 and bfloat16 run the fused kernel (FlashAttention-2's backward): P is recomputed from
// the saved LSE tile by tile, never as an Nq×Nk matrix; O(N·D) working memory; results bitwise
// the same for any thread count. float64 runs the oracle below (P from the saved LSE when given).
// With `saved` from the whole problem, a call on a block of it (AttentionOptions::query_offset …)
// gives that block's share of every gradient: summed over blocks, the whole problem's. Without
// `saved`, the forward is
// run first to get O and a float64 LSE. P is recomputed as e^(s − LSE): save LSE in float64 to
// keep every gradient as precise as PyTorch's float32 (contract.md §7; a float32 LSE costs up to
// |LSE|·2⁻²⁴, a bfloat16 one 2⁻⁸·|LSE|). For a problem with few query rows per head (the split-KV
// decoding kernel's), the backward re-derives LSE and dO·O from its own scores when the call
// holds every key.
// Memory: O(N·D) working space (packed operands, one dQ per key chunk), which the calling thread
// keeps between calls at the size of the largest problem it has run.
// Validates like attention_forward, plus the shapes of dout, dlse, saved and every gradient.
void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionOptions& options, const TensorView& dout,
                        const std::optional<TensorView>& dlse, const AttentionGradients& gradients,
                        const std::optional<SavedForward>& saved = std::nullopt);

// The float64 oracle of the backward pass. For the loss L with ∂L/∂O = dout [B, Nq, Hq, Dv] and
// ∂L/∂LSE = dlse [B, Hq, Nq] (absent: zero), writes ∂L/∂x for every requested x. It recomputes
// the forward literally and applies, per row i (docs/contract.md §4):
//   dP_ij = dO_i · V_j,   Δ_i = Σ_j P_ij dP_ij,   dS_ij = P_ij (dP_ij − Δ_i + dLSE_i),
//   dV_j += P_ij dO_i,   dbias_ij += dS_ij,
// then back through the soft cap (1 − tanh²), the scale, and the score's own parameters.
// Hidden keys and rows that see no key contribute nothing: their gradients are 0, never NaN.
// Validates like attention_forward, plus the shapes of dout, dlse and every gradient.
void attention_backward_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AttentionOptions& options, const TensorView& dout,
                                  const std::optional<TensorView>& dlse,
                                  const AttentionGradients& gradients);

}  // namespace qkv
