// The fused kernel: FlashAttention-2 style tiled attention with SIMD micro-kernels (Highway,
// dispatched at run time) for float32 inputs and every score.
#pragma once

#include <cstdint>
#include <vector>

#include "kernels/operands.hpp"

namespace qkv::kernels {

// True when fused_attention computes this problem: float32 q, k, v (every score, mask and option
// is supported).
bool fused_attention_supports(const AttentionProblem& problem);

// Computes problem.out (and lse, weights when present). Requires fused_attention_supports().
void fused_attention(const AttentionProblem& problem);

// The operands as the SIMD code reads them: the score unit's compared vectors q' and k'
// (kernels/score_operands.hpp) with unit stride along their dim. A dot-form score compares q'·k';
// the additive form Σ_a additive_v[h, a] · tanh(q'_a + k'_a), the scale folded into v.
struct FusedOperands {
  const AttentionProblem* problem = nullptr;
  RowMajorOperand<float> q, k, v;
  std::int64_t score_dim = 0;  // length of the q and k rows a score compares (D, or A)
  // Heads of k: Hk, or Hq for an additive score with a Wk per query head (keys projected per
  // query head). Query head h reads k head h / (Hq / key_heads).
  std::int64_t key_heads = 0;
  bool additive = false;
  std::vector<float> additive_v;  // [Hq, A]: scale · v
  // bfloat16 inputs on a CPU with the AVX-512 BF16 dot product (dot and scaled_dot scores): q, k,
  // v stay bfloat16 (q16, k16, v16, unit stride along D) and both products run on vdpbf16ps.
  // Otherwise the inputs a score compares as they are stay bfloat16 too and are widened a tile
  // (K, V) or an item's rows (Q) at a time (bf16_keys_and_values, bf16_queries); the rest (a
  // projected q' or k') is computed into float32 q, k.
  // float16 inputs take the same path as bfloat16 without the products: kept, and widened as
  // they are packed (F16C where present); `half` says which of the two q16, k16, v16 hold.
  bool bf16_products = false;
  bool bf16_keys_and_values = false;  // k16 and v16 hold K and V; q is float32 …
  bool bf16_queries = false;          // … or q16 holds Q too (converted as it is read)
  DType half = DType::bfloat16;       // bfloat16 or float16
  RowMajorOperand<std::uint16_t> q16, k16, v16;
  // An int8 KV cache (qkv/kv_cache.hpp): V stays int8 (v8), and K too (k8) when the score
  // compares the keys as they are; each row is widened and multiplied by its scale as it is read.
  // row(b, n, h) of k_scale, v_scale points at the float32 scale of that row of k8, v8.
  bool int8_keys = false, int8_values = false;
  RowMajorOperand<std::int8_t> k8, v8;
  RowMajorOperand<float> k_scale, v_scale;
  // With int8_keys the query rows are rounded to int8 by the cache's own rule
  // (core/int8_rows.hpp), so that a score is an integer dot product times two scales: q8 holds
  // them [B, Nq, Hq, D] and q_scale their scales [B, Nq, Hq] (row(b, i, h) points at row (b, i,
  // h)'s); q holds q8 · q_scale in float32 for the kernels that multiply in float32.
  RowMajorOperand<std::int8_t> q8;
  RowMajorOperand<float> q_scale;
};

// What happens to bfloat16 inputs: widened to float32 (q, k, v); kept for the bf16 products
// where the CPU and score allow (q16, k16, v16, bf16_products), else kept as far as the score
// compares them as they are and converted by the fused kernel as it packs its tiles (k16, v16,
// and q16 with bf16_queries: no float32 copy of the inputs); or K and V kept (k16, v16) with q
// widened, for kernels that read K and V once and convert on the fly; or, for such a kernel that
// also has the products, the products' operands where they run, else keys_and_values.
enum class Bfloat16Operands { widen, products, keys_and_values, products_or_keys_and_values };

// Packs q, k, v to unit stride where needed and applies the bilinear / additive projections.
FusedOperands prepare_fused_operands(const AttentionProblem& problem, Bfloat16Operands bf16);

// The softmax's exp as the kernels compute it (KernelExp, kernels/score_math-inl.h), on the SIMD
// target in use (for the test that sweeps its range): out[i] = e^in[i]. Max error 1 ULP where
// e^x is a normal float below 2^127.5 (in ∈ [-87.33, 88.37]); exactly 0 for in < -87.68
// (-inf included), +inf from 88.4; NaN for NaN.
void softmax_exp(const float* in, float* out, std::int64_t count);

// Sigmoid attention's weights as the fused kernels compute them (kernels/score_math-inl.h), on
// the SIMD target in use, for the test that sweeps their range: out[i] = 1 / (1 + e^(−bias −
// scores[i])). Max error 2 ULP; exactly 0 where −bias − scores[i] ≥ 88.4 (scores[i] = −inf
// included); NaN for a NaN score.
void sigmoid_weights(const float* scores, float bias, float* out, std::int64_t count);

// The largest of in[0, count) as the kernels reduce a row's scores (a running maximum of
// vectors, then LargestLane, kernels/score_math-inl.h), on the SIMD target in use, for the test
// that checks it on every target. −inf when every score is −inf, or count is 0: how the online
// softmax tells a row that sees no key yet.
float largest_score(const float* in, std::int64_t count);

}  // namespace qkv::kernels
