// A score is one unit (docs/contract.md §2): its name, its parameters and their checks, its
// default scale, and how the kernels reach it — the vectors each query and each key become, and
// how those are compared. Every kernel, the backward, the doors, the command line and the Python
// module ask score_unit(); the float64 reference keeps its own literal formula of each score.
//
// To the kernels every score is one of two forms over compared vectors q' (per query row and
// query head) and k' (per key row and key head):
//   dot:       s = q'·k'
//   additive:  s = Σ_a v[h, a]·tanh(q'_a + k'_a)
// and each compared vector is a RowTransform of its input row.
#pragma once

#include <cstdint>
#include <optional>
#include <span>

#include "core/problem.hpp"
#include "qkv/backward.hpp"
#include "qkv/multihead_attention.hpp"

namespace qkv::detail {

// Where attention_backward writes the gradient of one parameter.
using GradientSlot = std::optional<MutableTensorView> AttentionGradients::*;

// x' = factor[h] · M_h x, or factor[h] · x / |x| (normalize; a zero x gives a zero x'): each part
// only when present. M_h is a parameter (h, r, c), or its transpose (h, c, r), out_dim × in_dim;
// shared by all heads when its head stride is 0. A transform has a matrix or normalizes, not
// both; only a query's transform has a factor. The kernels apply it (kernels/score_operands.hpp).
struct RowTransform {
  const StridedInput* matrix = nullptr;
  bool transposed = false;
  std::int64_t in_dim = 0, out_dim = 0;
  bool normalize = false;
  const StridedInput* factor = nullptr;  // (h): one per query head, or stride 0 (shared)
  GradientSlot matrix_gradient = nullptr, factor_gradient = nullptr;

  bool identity() const { return matrix == nullptr && !normalize && factor == nullptr; }
};

// What the kernels compute for a problem's score.
struct ScoreOperands {
  ScoreForm form = ScoreForm::dot;
  std::int64_t dim = 0;  // length of q' and k'
  RowTransform query, key;
  // Keys are transformed once per query head (a per-head Wk) instead of once per key head.
  bool keys_per_query_head = false;
  const StridedInput* additive_v = nullptr;  // (h, a), additive form
  GradientSlot additive_v_gradient = nullptr;
};

struct ScoreUnit {
  Score score;
  const char* name;
  const char* formula;     // for help texts, e.g. "qᵀ W k"
  const char* parameters;  // the options it reads, e.g. "w"
  // Checks the options this score reads and stores them (and additive_dim) in the problem;
  // throws qkv::Error naming the argument.
  void (*check)(const AttentionOptions& options, AttentionProblem& problem);
  double (*default_scale)(const AttentionProblem& problem);
  ScoreOperands (*operands)(const AttentionProblem& problem);
  // The parameters an attention layer learns for this score and the scale it passes
  // (qkv::score_layer; additive_dim already resolved to a positive A).
  ScoreLayer (*layer)(std::int64_t heads, std::int64_t head_dim, std::int64_t additive_dim);
};

// The layer of a score with no parameters of its own, at its default scale.
ScoreLayer no_layer_parameters(std::int64_t heads, std::int64_t head_dim,
                               std::int64_t additive_dim);

// The unit of a score (qkv::Error for a value outside the enum), and every unit in enum order.
const ScoreUnit& score_unit(Score score);
std::span<const ScoreUnit* const> score_units();

// Each score's unit (core/score_<name>.cpp).
extern const ScoreUnit kDotUnit, kScaledDotUnit, kBilinearUnit, kAdditiveUnit, kCosineUnit;

// Every AttentionOptions member that is a score's parameter: where its gradient goes, its name,
// its rank when given one per query head (a leading Hq), and the score that reads it. The doors,
// the backward's checks and the distributed runner go through this list.
struct ScoreParameterOption {
  std::optional<TensorView> AttentionOptions::*option;
  GradientSlot gradient;
  const char* name;
  const char* gradient_name;
  int per_head_rank;
  Score score;
};
std::span<const ScoreParameterOption> score_parameter_options();

// The parameter options no score but `unit` may be given: a qkv::Error naming the first one
// given (for example "w: expected none for score 'dot' (w is only used by bilinear), got …").
void reject_other_parameters(const ScoreUnit& unit, const AttentionOptions& options);

}  // namespace qkv::detail
