// Attention forward: scores, masks, stable softmax, and the weighted average of the values.
// The semantics are those of docs/contract.md §1–4; this header restates what a caller needs.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#include "qkv/block_mask.hpp"
#include "qkv/score_mod.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// How a query q (row i) and a key k (row j) of one head are compared.
enum class Score {
  dot,         // q·k                      default scale 1
  scaled_dot,  // q·k                      default scale 1/sqrt(Dq)
  bilinear,    // qᵀ W k   (Luong)          default scale 1
  additive,    // vᵀ tanh(Wq q + Wk k)      default scale 1 (Bahdanau)
  cosine,      // τ[h]·(q·k)/(|q||k|)       default scale 1 (a learned temperature τ)
};

// Where a causal mask puts its diagonal when Nq != Nk.
enum class CausalAlign {
  bottom_right,  // key j visible to query i iff j <= i + Nk - Nq   (FlashAttention, the default)
  top_left,      // key j visible to query i iff j <= i             (PyTorch is_causal)
};

// How a row's scores become its weights (docs/contract.md §4).
enum class Normalization {
  softmax,  // P = softmax of the row's visible scores (the default)
  sigmoid,  // P = sigmoid(s + sigmoid_bias), each pair on its own (Ramapuram et al., ICLR 2025)
};

// "dot", "scaled_dot", "bilinear", "additive", "cosine" (and back; throws qkv::Error on an unknown
// name).
const char* score_name(Score score);
Score parse_score(std::string_view name);
// Every score's name, in the order of Score (for help texts and listings).
std::vector<std::string_view> score_names();
// The score's formula as help texts print it ("q·k / √Dq", "qᵀ W k", …; qkv::Error for a value
// outside the enum).
const char* score_formula(Score score);
// What the score multiplies by when AttentionOptions::scale is unset, for queries of q_dim
// features: 1/√q_dim for scaled_dot, 1 for the others.
double default_score_scale(Score score, std::int64_t q_dim);
const char* causal_align_name(CausalAlign align);
CausalAlign parse_causal_align(std::string_view name);
// "softmax", "sigmoid" (and back; qkv::Error on an unknown name).
const char* normalization_name(Normalization normalization);
Normalization parse_normalization(std::string_view name);

// Everything besides Q, K and V. Optional float tensors are float32, float64, bfloat16 or float16.
struct AttentionOptions {
  Score score = Score::scaled_dot;

  // Multiplies every score; unset means the score's default (see Score).
  std::optional<double> scale;
  // Soft cap c > 0: s ← c·tanh(s/c) after scaling; 0 disables it.
  double softcap = 0.0;

  // bilinear: W [Dq, Dk] shared by all heads, or [Hq, Dq, Dk] one per query head.
  std::optional<TensorView> w;
  // additive: Wq [A, Dq], Wk [A, Dk], va [A] shared; or each with a leading Hq dimension.
  std::optional<TensorView> wq;
  std::optional<TensorView> wk;
  std::optional<TensorView> va;
  // cosine: the temperature τ, [Hq] (one per query head) or [1] (shared); unset means 1. A zero
  // q or k compares as the zero vector (score 0).
  std::optional<TensorView> temperature;

  // ALiBi: adds -slope[h]·|i + Nk - Nq - j|. Shape [Hq], or [B, Hq] (one set per batch).
  std::optional<TensorView> alibi_slopes;
  // Float bias added to the scores, broadcastable to [B, Hq, Nq, Nk] (numpy rules, rank <= 4,
  // aligned to the right). -inf entries hide a key, like a false mask entry.
  std::optional<TensorView> bias;
  // A score_mod (FlexAttention's): s ← fn(s, b, h, q_idx, kv_idx) after the options above, in
  // the forward and the backward (qkv/score_mod.hpp). Not owned: it must outlive the call.
  const ScoreMod* score_mod = nullptr;

  // Softmax (the default) or sigmoid attention: P_ij = sigmoid(s_ij + sigmoid_bias) over the
  // visible keys, no normalization over the row; sigmoid_bias unset means −log(Nk) (of the whole
  // problem: key_total), the paper's choice. LSE then holds log Σ_j P_ij, the log of the row's
  // total weight (−inf for a row that sees no key).
  Normalization normalization = Normalization::softmax;
  std::optional<double> sigmoid_bias;

  // Attention sinks (gpt-oss): one learned logit per query head, [Hq], that joins every row's
  // softmax as one more column with no value, P = softmax([s_i1 … s_iN, sink_h]) with that column
  // dropped, so a row's weights sum to less than one and LSE includes it; a row that sees no key
  // gets O = 0 and LSE = sink_h. "Softmax plus one" is a sink of 0 for every head. In a block of
  // a larger problem (key_offset below) the sink joins only the block whose keys start at key 0,
  // so that merge_attention over the blocks counts it once.
  std::optional<TensorView> sinks;

  // Masks; a key is visible only if every one of them lets it through.
  bool causal = false;
  CausalAlign causal_align = CausalAlign::bottom_right;
  // Prefix LM (with causal): the first prefix_length keys are visible to every query as well, so
  // the prefix attends to itself both ways. 0 = none.
  std::int64_t prefix_length = 0;
  // Visible iff i + Nk - Nq - left <= j <= i + Nk - Nq + right; -1 leaves a side unbounded.
  std::int64_t window_left = -1;
  std::int64_t window_right = -1;
  // Sink tokens (StreamingLLM, with window_left >= 0): the first sink_tokens keys stay visible to
  // every query past the window's left edge (still subject to the other masks). 0 = none.
  std::int64_t sink_tokens = 0;
  // [B], int32 or int64: keys j >= key_lengths[b] are padding. 0 <= key_lengths[b] <= Nk.
  std::optional<TensorView> key_lengths;
  // [B], int32 or int64: keys j < key_starts[b] are padding too (left padding: a batch of
  // sequences aligned at their ends, as a KV cache's ragged sequences are). 0 <= key_starts[b] <=
  // Nk; a start at or past the row's other bounds leaves it no key.
  std::optional<TensorView> key_starts;
  // Boolean, broadcastable to [B, Hq, Nq, Nk]: true = may attend (PyTorch SDPA meaning).
  std::optional<TensorView> mask;
  // A block mask (FlexAttention's): pair (b, h, i, j) visible only where it says so. Its shape is
  // [1 or B, 1 or Hq, Nq, Nk] in the whole problem's heads and positions (query_head_total,
  // query_total, key_total below).
  // Not owned: it must outlive the call. Empty blocks cost nothing.
  const BlockMask* block_mask = nullptr;

  // This call as one block of a larger problem (ring attention): the global position of its first
  // query and first key, and the global lengths (0: this call's Nq, Nk). Causal masks, windows,
  // key_lengths (compared with global key positions) and ALiBi then see global positions; a row
  // that sees no key of the block gets O = 0, LSE = -inf, which merge_attention ignores.
  std::int64_t query_offset = 0, key_offset = 0;
  std::int64_t query_total = 0, key_total = 0;
  // The same for heads (head-parallel attention): this call's query head h is head
  // query_head_offset + h of query_head_total (0: this call's Hq). Only dropout reads it.
  std::int64_t query_head_offset = 0, query_head_total = 0;

  // Dropout on the attention weights (training): each weight is zeroed with probability
  // `dropout` in [0, 1) and the survivors are scaled by 1 / (1 − dropout). The mask is a pure
  // function of (dropout_seed, b, h, i, j), in global positions (the offsets above): the same
  // seed gives the same mask in the forward, the returned weights and attention_backward, on any
  // kernel and thread count, and for a problem computed whole or in blocks. LSE is unaffected.
  // 0 (the default) costs nothing.
  double dropout = 0.0;
  std::uint64_t dropout_seed = 0;

  // Threads for this call. 0: one for a problem under 2.5 M multiply-adds (waking a thread would
  // cost more), else OpenMP's count (OMP_NUM_THREADS, or every core). Idle threads sleep after a
  // call (contract.md §8).
  int threads = 0;
};

// Where results go. `out` is required; the others are computed only when given.
struct AttentionOutputs {
  // O [B, Nq, Hq, Dv], float32, float64, bfloat16 or float16.
  MutableTensorView out;
  // LSE [B, Hq, Nq], float32 or float64 (or bfloat16): natural log of each row's softmax
  // denominator, computed in double. Keep it in float64 for attention_backward when logits are
  // large: a float32 LSE carries an error of |LSE|·2⁻²⁴ into every recomputed weight.
  std::optional<MutableTensorView> lse;
  // P [B, Hq, Nq, Nk], float32 or float64 (or bfloat16): the softmax weights (after dropout, as
  // the values were averaged with them, like PyTorch's MultiheadAttention). O(N²) memory: only on
  // request.

  std::optional<MutableTensorView> weights;
};

// Attention forward.
//   q: [B, Nq, Hq, Dq]   k: [B, Nk, Hk, Dk]   v: [B, Nk, Hk, Dv]
// q, k, v share one dtype: float32 or bfloat16 (computed and accumulated in float32) or float64
// (computed in float64). Any strides (PyTorch's [B, H, N, D] storage is the view with strides
// permuted); a unit stride in the last dimension avoids a copy.
// Hq % Hk == 0: query head h reads key/value head h / (Hq / Hk) (Hk == 1 is multi-query).
// Dk == Dq for dot and scaled_dot. Results (docs/contract.md §4):
//   P[i, j] = exp(s_ij - LSE_i) over visible keys, 0 elsewhere;  O_i = Σ_j P[i, j] V_j;
//   LSE_i = log Σ_visible exp(s_ij) (+ exp(sink_h) with sinks). A row with no visible key gets
//   O = 0, P = 0, LSE = -inf (sink_h with sinks). With normalization sigmoid:
//   P[i, j] = sigmoid(s_ij + b), O_i = Σ_j P[i, j] V_j, LSE_i = log Σ_j P[i, j].
// Never builds the Nq×Nk matrix unless `weights` is requested. Results are bitwise the same for
// any thread count. Throws qkv::Error on bad input before writing anything.
// Memory: O(N·D) working space (a packed copy of K and V), which each calling thread keeps
// between calls, at the size of the largest problem it has run, so that its pages are touched once.
void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const AttentionOutputs& outputs);

}  // namespace qkv
