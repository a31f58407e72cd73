// The fused backward kernel (FlashAttention-2's backward on a CPU), float32 compute for float32
// and bfloat16 storage, every score and option.
#pragma once

#include <optional>

#include "core/problem.hpp"
#include "core/score_mod_gradients.hpp"
#include "qkv/backward.hpp"

namespace qkv::kernels {

using detail::AttentionProblem;
using detail::StridedInput;

// The tensors of one backward call beside the forward problem: dO, the forward's O and LSE, and
// dLSE (absent: zero), each read through (b, i, h, d) or (b, h, i).
struct BackwardInputs {
  StridedInput dout, out, lse, dlse;
};

// Gradients of every requested input of `p` (AttentionGradients, each view in its primal's
// shape, checked at the door). Never builds an Nq×Nk matrix; dQ, dK, dV, the score's and the
// bias's parameters bitwise the same for any thread count (a score_mod's: see
// core/score_mod_gradients.hpp).
void fused_backward(const AttentionProblem& p, const BackwardInputs& inputs,
                    const AttentionGradients& gradients);

// Operands, laid out for the kernel by fused_backward (rows padded to kBackwardPad floats, so
// that the layout is the same on every SIMD target).
inline constexpr std::int64_t kBackwardPad = 16;
inline constexpr std::int64_t kBackwardKeys = 64;  // keys of one key block; also query rows

struct BackwardOperands {
  const AttentionProblem* problem = nullptr;
  std::int64_t score_dim = 0;     // length of the compared vectors: D (A for additive)
  std::int64_t key_heads = 0;     // heads of k: Hk, or Hq for a per-head additive Wk
  std::int64_t score_stride = 0;  // score_dim padded
  std::int64_t value_stride = 0;  // Dv padded
  bool additive = false;
  bool softcap = false;
  // A problem with few query rows a head, whose statistics the backward derives itself (see
  // fused_backward): each score one dot product along D, like the forward's split-KV kernel and
  // a BLAS matrix-vector product, rather than the register tile's running sum over D.
  bool row_dot_scores = false;
  const float* q = nullptr;     // [B, Hq, Nq, ss]: scale·q, scale·Wᵀq, or Wq q (additive)
  const float* k = nullptr;     // [B, key_heads, Nk, ss]: k, or Wk k (additive)
  const float* v = nullptr;     // [B, Hk, Nk, vs]
  const float* dout = nullptr;  // [B, Hq, Nq, vs]
  // LSE [B, Hq, Nq] as two floats, lse_high = float(LSE) and lse_low = LSE − lse_high (0 when the
  // saved LSE is float32): e^((s − lse_high) − lse_low) keeps P as precise as a float64 LSE would.
  const float* lse_high = nullptr;
  const float* lse_low = nullptr;
  const float* delta = nullptr;       // [B, Hq, Nq]: rowsum(dO ∘ O) − dLSE
  const float* additive_v = nullptr;  // [Hq, A]: scale·va

  // Work items: (batch, value head, key chunk). A dimension over which a requested dbias is
  // broadcast is walked inside one item instead, so that no two items add to one dbias element.
  std::int64_t chunks = 1;  // key chunks per (batch, value head)
  bool batches_in_item = false, heads_in_item = false;
  std::int64_t items = 0;

  // Results, zero on entry:
  float* dq = nullptr;     // [chunks, B, Hq, Nq, ss]: Σ over the chunk's keys of dS·k
  float* dk = nullptr;     // [B, key_heads, Nk, ss]
  float* dv = nullptr;     // [B, Hk, Nk, vs]
  float* dva = nullptr;    // additive: [items, Hq, A], Σ dS·tanh(…) per item
  float* dbias = nullptr;  // when requested: the bias's own elements, strides dbias_strides
  std::array<std::int64_t, 4> dbias_strides{};  // (b, h, i, j), 0 where the bias broadcasts
  // The score_mod's parameter gradients: each thread sums its own, then merges them here.
  detail::ScoreModGradients* score_mod_gradients = nullptr;
};

}  // namespace qkv::kernels
