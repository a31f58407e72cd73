// The table of score units, their names, and the rule that a score is given only its own
// parameters.

#include <fmt/format.h>

#include <array>
#include <optional>
#include <string>

#include "core/score_unit.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace detail {

namespace {

// Units in the order of the Score enum.
const std::array<const ScoreUnit*, 5> kUnits{&kDotUnit, &kScaledDotUnit, &kBilinearUnit,
                                             &kAdditiveUnit, &kCosineUnit};

}  // namespace

const ScoreUnit& score_unit(Score score) {
  const auto index = static_cast<std::size_t>(score);
  if (index >= kUnits.size() || kUnits[index]->score != score) {
    throw Error(fmt::format("score: expected one of qkv::Score, got the value {}", index));
  }
  return *kUnits[index];
}

std::span<const ScoreParameterOption> score_parameter_options() {
  static const ScoreParameterOption options[] = {
      {&AttentionOptions::w, &AttentionGradients::dw, "w", "dw", 3, Score::bilinear},
      {&AttentionOptions::wq, &AttentionGradients::dwq, "wq", "dwq", 3, Score::additive},
      {&AttentionOptions::wk, &AttentionGradients::dwk, "wk", "dwk", 3, Score::additive},
      {&AttentionOptions::va, &AttentionGradients::dva, "va", "dva", 2, Score::additive},
      {&AttentionOptions::temperature, &AttentionGradients::dtemperature, "temperature",
       "dtemperature", 1, Score::cosine},
  };
  return options;
}

ScoreLayer no_layer_parameters(std::int64_t, std::int64_t, std::int64_t) {
  return {};
}

std::span<const ScoreUnit* const> score_units() {
  return kUnits;
}

void reject_other_parameters(const ScoreUnit& unit, const AttentionOptions& options) {
  for (const ScoreParameterOption& parameter : score_parameter_options()) {
    const std::optional<TensorView>& given = options.*parameter.option;
    if (given && parameter.score != unit.score) {
      throw Error(fmt::format("{}: expected none for score '{}' ({} is only used by {}), got {}",
                              parameter.name, unit.name, parameter.name,
                              score_unit(parameter.score).name, given->shape_string()));
    }
  }
}

}  // namespace detail

const char* score_name(Score score) {
  const auto index = static_cast<std::size_t>(score);
  return index < detail::score_units().size() ? detail::score_units()[index]->name : "unknown";
}

const char* score_formula(Score score) {
  return detail::score_unit(score).formula;
}

double default_score_scale(Score score, std::int64_t q_dim) {
  detail::AttentionProblem problem;
  problem.q_dim = q_dim;
  return detail::score_unit(score).default_scale(problem);
}

std::vector<std::string_view> score_names() {
  std::vector<std::string_view> names;
  for (const detail::ScoreUnit* unit : detail::score_units()) names.emplace_back(unit->name);
  return names;
}

Score parse_score(std::string_view name) {
  std::string names;
  for (const detail::ScoreUnit* unit : detail::score_units()) {
    if (name == unit->name) return unit->score;
    names += names.empty() ? "" : ", ";
    names += unit->name;
  }
  throw Error(fmt::format("score: expected one of {}, got '{}'", names, name));
}

}  // namespace qkv
