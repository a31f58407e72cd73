// The gradients of a ScoreMod's parameters while a backward runs: one dense array of doubles per
// parameter that asked for its gradient, kept per thread and summed at the end.
#pragma once

#include <mutex>
#include <optional>
#include <vector>

#include "qkv/score_mod.hpp"

namespace qkv::detail {

// Throws qkv::Error unless each target has its parameter's shape and a float dtype, and there
// are no more targets than parameters.
void check_score_mod_gradients(const ScoreMod* score_mod,
                               const std::vector<std::optional<MutableTensorView>>& targets);

class ScoreModGradients {
 public:
  // targets: where each parameter's gradient goes (AttentionGradients::dscore_mod, checked).
  ScoreModGradients(const ScoreMod* score_mod,
                    const std::vector<std::optional<MutableTensorView>>& targets);

  // What ScoreMod::backward takes: one array per listed parameter (nullptr for a parameter
  // without a gradient view), or nullptr when no parameter wants its gradient.
  double* const* arrays() { return wanted_ ? pointers_.data() : nullptr; }
  // Adds another thread's sums into these (under a lock: threads finish in any order, so the
  // sums agree across thread counts to double rounding, not bit for bit).
  void merge(const ScoreModGradients& other);
  // Writes each sum into its parameter's gradient view, rounded to its dtype.
  void store() const;
  const ScoreMod* score_mod() const { return score_mod_; }
  const std::vector<std::optional<MutableTensorView>>& targets() const { return targets_; }

 private:
  const ScoreMod* score_mod_;
  std::vector<std::optional<MutableTensorView>> targets_;
  bool wanted_ = false;
  std::vector<std::vector<double>> sums_;
  std::vector<double*> pointers_;
  std::mutex merging_;
};

}  // namespace qkv::detail
