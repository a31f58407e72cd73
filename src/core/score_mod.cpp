// ScoreParameter's checks, and the parameter gradients of a ScoreMod during a backward.

#include <fmt/format.h>

#include "core/backward_arguments.hpp"
#include "core/score_mod_gradients.hpp"
#include "qkv/error.hpp"
#include "qkv/score_mod.hpp"

namespace qkv {

namespace {

bool readable(DType dtype) {
  return dtype == DType::float32 || dtype == DType::float64 || dtype == DType::bfloat16;
}

}  // namespace

ScoreParameter::ScoreParameter(const TensorView& values) : values_(values) {
  if (values.rank < 1 || values.rank > kMaxRank || !readable(values.dtype)) {
    throw Error(fmt::format(
        "score_mod parameter: expected float32, float64 or bfloat16 of rank 1 to 4, got {} {}",
        dtype_name(values.dtype), values.shape_string()));
  }
  if (values.numel() > 0 && values.data == nullptr) {
    throw Error("score_mod parameter: expected data for its elements, got a null pointer");
  }
}

namespace detail {

ScoreModGradients::ScoreModGradients(const ScoreMod* score_mod,
                                     const std::vector<std::optional<MutableTensorView>>& targets)
    : score_mod_(score_mod), targets_(targets) {
  if (score_mod == nullptr) return;
  const std::vector<const ScoreParameter*>& parameters = score_mod->parameters();
  for (std::size_t n = 0; n < parameters.size(); ++n) {
    const bool wanted = n < targets.size() && targets[n].has_value();
    sums_.emplace_back(wanted ? static_cast<std::size_t>(parameters[n]->values().numel()) : 0, 0.0);
    wanted_ = wanted_ || wanted;
  }
  for (std::vector<double>& sum : sums_) pointers_.push_back(sum.empty() ? nullptr : sum.data());
}

void check_score_mod_gradients(const ScoreMod* score_mod,
                               const std::vector<std::optional<MutableTensorView>>& targets) {
  if (targets.empty()) return;
  const std::size_t count = score_mod == nullptr ? 0 : score_mod->parameters().size();
  if (targets.size() > count) {
    throw Error(fmt::format(
        "dscore_mod: expected at most one gradient per parameter of the score_mod ({}), got {}",
        count, targets.size()));
  }
  for (std::size_t n = 0; n < targets.size(); ++n) {
    if (!targets[n]) continue;
    const TensorView& values = score_mod->parameters()[n]->values();
    const TensorView target = targets[n]->as_const();
    bool same = target.rank == values.rank;
    for (int d = 0; same && d < values.rank; ++d) same = target.shape[d] == values.shape[d];
    if (!same || (target.dtype != DType::float32 && target.dtype != DType::float64) ||
        (target.numel() > 0 && target.data == nullptr)) {
      throw Error(fmt::format(
          "dscore_mod[{}]: expected float32 or float64 {} (the parameter's shape), got {} {}", n,
          values.shape_string(), dtype_name(target.dtype), target.shape_string()));
    }
  }
}

void ScoreModGradients::merge(const ScoreModGradients& other) {
  const std::lock_guard<std::mutex> lock(merging_);
  for (std::size_t n = 0; n < sums_.size(); ++n)
    for (std::size_t e = 0; e < sums_[n].size(); ++e) sums_[n][e] += other.sums_[n][e];
}

void ScoreModGradients::store() const {
  if (score_mod_ == nullptr) return;
  for (std::size_t n = 0; n < sums_.size(); ++n) {
    if (!sums_[n].empty()) store_dense(sums_[n].data(), *targets_[n]);
  }
}

}  // namespace detail
}  // namespace qkv
