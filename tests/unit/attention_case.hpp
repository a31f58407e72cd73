// Test cases for attention: random inputs for a described problem, and runs of the fast path,
// the float64 reference and the naive float32 evaluation on them.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

#include "qkv/attention.hpp"
#include "qkv/tensor.hpp"

namespace qkv::testing {

// Block masks of the tests, as mask_mods on global positions (blocks of mask_block × mask_block):
//   documents: batch b is cut into documents of 11 + 5b positions; a query sees its document;
//   strided:   per head h, key blocks kb ≡ −h (mod 3) are hidden whole (empty blocks between
//              non-empty ones) and pairs with (q_idx + kv_idx) % 5 == 0 too (partial blocks);
//   head_windows: per head h, a causal window of 3 + 3h keys (each row one run: the kernels take
//              it as the row's interval, BlockMask::rows_are_runs).
enum class BlockMaskRule { none, documents, strided, head_windows };

// score_mods of the tests, each reading a learned parameter:
//   relative_bias: s + table(h, q_idx − kv_idx + Nk − 1), table [Hq, Nq + Nk − 1];
//   capped_slopes: 6·tanh(s / 6) − slopes(h)·|q_idx − kv_idx| / 8, slopes [Hq].
enum class ScoreModRule { none, relative_bias, capped_slopes };

struct AttentionCase {
  std::int64_t batch = 1, q_len = 8, k_len = 8, q_heads = 2, kv_heads = 1;
  std::int64_t q_dim = 8, k_dim = 0 /* 0: same as q_dim */, v_dim = 8, additive_dim = 8;
  Score score = Score::scaled_dot;
  bool per_head_parameters = false;  // W / Wq, Wk, v with a leading Hq; cosine: τ [Hq], not [1]
  std::optional<double> scale;
  double softcap = 0.0;
  bool alibi = false;
  bool bias = false;     // a [B, 1, Nq, Nk] float bias
  bool sinks = false;    // attention sinks [Hq], from −1.5 up in steps of 1.1 (large and small)
  bool sigmoid = false;  // normalization sigmoid (its default bias −log Nk)
  bool causal = false;
  CausalAlign causal_align = CausalAlign::bottom_right;
  std::int64_t prefix_length = 0;  // prefix LM, with causal
  std::int64_t window_left = -1, window_right = -1;
  std::int64_t sink_tokens = 0;  // StreamingLLM's, with window_left
  BlockMaskRule block_mask = BlockMaskRule::none;
  std::int64_t mask_block = 16;  // the block mask's q_block and kv_block
  ScoreModRule score_mod = ScoreModRule::none;
  bool key_lengths = false;      // batch b keeps (b + 1)·Nk / (B + 1) keys, one batch keeps none
  bool key_starts = false;       // batch b starts at b·Nk / (2B) (left padding); the last of 3+
                                 // batches starts past every key
  bool mask = false;             // a random [1, Hq, Nq, Nk] boolean mask with one all-false row
  bool mask_runs = false;        // with mask: each of its rows one random run of keys instead
                                 // (read as intervals, core/mask_runs.hpp); one row full
  bool head_major = false;       // q, k, v stored as PyTorch's [B, H, N, D], read through strides
  bool spaced_last_dim = false;  // q, k, v with stride 2 along D (forces a packed copy)
  double input_scale = 1.0;      // standard deviation of q and k entries
  std::uint64_t seed = 1;

  std::int64_t key_dim() const { return k_dim > 0 ? k_dim : q_dim; }
  std::string name() const;
};

// How GoogleTest prints a case: its name, not its bytes.
void PrintTo(const AttentionCase& c, std::ostream* os);

// Owns the tensors of a case and the views and options that point into them.
struct AttentionInputs {
  Tensor q_storage, k_storage, v_storage;
  Tensor w, wq, wk, va, temperature, alibi_slopes, bias, sinks, mask, key_lengths, key_starts;
  std::shared_ptr<BlockMask> block_mask;  // on the heap: options point at it across moves
  Tensor score_values;                    // the score_mod's parameter
  std::shared_ptr<ScoreParameter> score_parameter;
  std::shared_ptr<ScoreMod> score_mod;
  TensorView q, k, v;
  AttentionOptions options;
};

// Builds the inputs of `c` in dtype float32, float64 or bfloat16 (the float32 values rounded;
// parameters stay float32).
AttentionInputs make_inputs(const AttentionCase& c, DType dtype);

// Dense results in one dtype.
struct AttentionResults {
  Tensor out, lse, weights;
  AttentionOutputs outputs(bool with_weights);
};
AttentionResults allocate_results(const AttentionCase& c, DType dtype);

enum class Evaluator { fast, reference, naive_float32, naive_bfloat16 };
AttentionResults evaluate(const AttentionCase& c, const AttentionInputs& inputs,
                          Evaluator evaluator, DType result_dtype, bool with_weights);

// Whether the block mask rule lets query q_idx see key kv_idx of (b, h).
bool block_mask_rule_visible(BlockMaskRule rule, std::int64_t b, std::int64_t h, std::int64_t q_idx,
                             std::int64_t kv_idx);

// A float32 tensor of standard normal entries drawn from `seed`.
Tensor random_float32(std::vector<std::int64_t> shape, std::uint64_t seed);

// max |a - b| over all elements; equal infinities count as 0, a NaN anywhere as +inf.
double max_abs_difference(const Tensor& a, const Tensor& b);
// max |x|, ignoring infinities.
double max_abs(const Tensor& a);
// Element i widened to double.
double element(const Tensor& t, std::int64_t i);

// Σ a·b over two float32 tensors of one size, in double: with b = dout, the loss whose gradient
// with respect to a is dout (the layers' finite-difference tests).
double dot_float32(const Tensor& a, const Tensor& b);
// (loss() at value + step − loss() at value − step) / 2·step, the value restored afterwards:
// a central difference in one float the loss reads.
double central_difference(float& value, float step, const std::function<double()>& loss);

// The SIMD targets the shape zoo checks: every one compiled in and supported by this CPU, or only
// those of them named in the environment variable QKV_TEST_SIMD_TARGETS (comma-separated), as the
// aarch64 runs at other SVE vector lengths ask for the one target that length brings.
std::vector<std::string> simd_targets_under_test();

}  // namespace qkv::testing
