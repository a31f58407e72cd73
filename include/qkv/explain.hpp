// Attention slowed down and laid open, for learners (qkv explain, qkv.explain): a sentence's
// rows through a MultiHeadAttention layer's four steps — (1) project the input into Q, K and V,
// (2) score each query against each key, (3) turn each row of scores into weights that sum to 1,
// (4) average V with them — every intermediate kept, in float64, from the reference evaluation.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qkv/attention.hpp"
#include "qkv/multihead_attention.hpp"
#include "qkv/safetensors.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// The steps of one self-attention call, N = the number of words, H heads of Dh = E / H features.
// Every tensor is float64, in qkv's layout without the batch: rows first, then heads.
struct ExplainedAttention {
  std::vector<std::string> words;  // the rows' (and the keys') labels
  Score score = Score::scaled_dot;
  double scale = 1.0;  // what each score was multiplied by (the layer's, else the score's default)
  bool causal = false;
  std::int64_t heads = 1, head_dim = 1;
  Tensor x;  // [N, E] the input rows
  // The layer's projections (in_proj_weight [3E, E], in_proj_bias [3E] or empty) and its
  // score's parameters by name (score_layer's list: "score_weight" …), copies in float32.
  Tensor in_proj_weight, in_proj_bias;
  NamedTensors score_parameters;
  // Step 1, [N, H, Dh]: the rows of X·Wqᵀ + bq, X·Wkᵀ + bk, X·Wvᵀ + bv (in_proj_weight's three
  // [E, E] blocks and in_proj_bias's three parts, PyTorch's packing), split into heads.
  Tensor q, k, v;
  // Step 2, [H, N, N]: s_ij = scale · score(q_i, k_j) with the layer's score parameters, every
  // pair; masked_scores the same with −inf where the causal mask hides key j from query i (j > i)
  // (equal to scores without a mask).
  Tensor scores, masked_scores;
  // Step 3, [H, N, N]: P_ij = exp(s_ij) / Σ_j' exp(s_ij'), each row summing to 1.
  Tensor weights;
  // Step 4, [N, H, Dh]: O_i = Σ_j P_ij · V_j.
  Tensor output;
  // The same q, k, v rounded to float32 through attention_forward (the fast path, on the SIMD
  // target fast_path_target): the largest |difference| from `output`.
  double fast_path_difference = 0.0;
  std::string fast_path_target;
};

// The four steps for `words`, whose input rows are x [N, E] (float32 or float64), through
// `layer`: its input projections (in_proj_weight [3E, E] and in_proj_bias [3E] when it has a
// bias; a self-attention layer, kdim = vdim = E) and its attention options (score, scale, score
// parameters; softmax without sinks), causal when asked. qkv::Error when x is not [words, E] of
// finite values, when there are no words, or when the layer is not such a layer.
ExplainedAttention explain_attention(const std::vector<std::string>& words, const TensorView& x,
                                     const MultiHeadAttention& layer, bool causal);

// The walkthrough without a trained model: a fresh MultiHeadAttention layer (embed_dim `dim`,
// `heads` heads, `score`, no bias, PyTorch's initialization drawn from `seed`) on
// seeded_word_embeddings(words, dim, seed). qkv::Error naming dim or heads for sizes the layer
// refuses (heads must divide dim).
ExplainedAttention explain_attention(const std::vector<std::string>& words, Score score,
                                     std::int64_t dim, std::int64_t heads, bool causal,
                                     std::uint64_t seed);

// Input rows for the walkthrough without a trained model: [N, dim] float64, each word's row
// drawn from N(0, 1) by a generator seeded with `seed` and the word's bytes, so a word that comes
// twice gets the same row (attention alone does not see order: only a mask or position features
// do). qkv::Error for dim < 1.
Tensor seeded_word_embeddings(const std::vector<std::string>& words, std::int64_t dim,
                              std::uint64_t seed);

}  // namespace qkv
