// The dot-product scores: dot (q·k) and scaled_dot (q·k / √Dq, Vaswani et al.).

#include <fmt/format.h>

#include <cmath>

#include "core/score_unit.hpp"
#include "qkv/error.hpp"

namespace qkv::detail {

namespace {

// q and k are compared as they are: Dk must be Dq.
void check_same_dims(const ScoreUnit& unit, const AttentionOptions& options, AttentionProblem& p) {
  reject_other_parameters(unit, options);
  if (p.k_dim != p.q_dim) {
    throw Error(fmt::format("k: expected Dk == Dq = {} for score '{}', got Dk = {}", p.q_dim,
                            unit.name, p.k_dim));
  }
}

ScoreOperands as_they_are(const AttentionProblem& p) {
  ScoreOperands operands;
  operands.dim = p.k_dim;
  operands.query.in_dim = operands.query.out_dim = p.q_dim;
  operands.key.in_dim = operands.key.out_dim = p.k_dim;
  return operands;
}

}  // namespace

extern const ScoreUnit kDotUnit{
    Score::dot,
    "dot",
    "q·k",
    "none",
    [](const AttentionOptions& options, AttentionProblem& p) {
      check_same_dims(kDotUnit, options, p);
    },
    [](const AttentionProblem&) { return 1.0; },
    as_they_are,
    no_layer_parameters,
};

extern const ScoreUnit kScaledDotUnit{
    Score::scaled_dot,
    "scaled_dot",
    "q·k / √Dq",
    "none",
    [](const AttentionOptions& options, AttentionProblem& p) {
      check_same_dims(kScaledDotUnit, options, p);
    },
    [](const AttentionProblem& p) { return 1.0 / std::sqrt(static_cast<double>(p.q_dim)); },
    as_they_are,
    no_layer_parameters,
};

}  // namespace qkv::detail
