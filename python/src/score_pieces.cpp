// The built-in score_mods, a whole row at a time (see score_pieces.hpp): the forward applies the
// pieces in order to the row; the backward recomputes each piece's input and goes back through
// them in reverse, adding each parameter's gradient.

#include "score_pieces.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "qkv/error.hpp"

namespace qkv::python {

namespace {

// The row interface ScoreMod::from_rows calls.
struct PieceRows {
  const ScorePieces* pieces;
  template <class T>
  void forward(const ScoreMod::Row& row, T* scores) const {
    pieces->Forward(row, scores);
  }
  template <class T>
  void backward(const ScoreMod::Row& row, const T* scores, T* d_scores,
                double* const* gradients) const {
    pieces->Backward(row, scores, d_scores, gradients);
  }
};

// The dense values of a float view (any strides), row-major.
std::vector<double> dense_values(const TensorView& view) {
  std::vector<double> values(static_cast<std::size_t>(view.numel()));
  for (std::int64_t n = 0; n < view.numel(); ++n) {
    std::int64_t offset = 0, rest = n;
    for (int d = view.rank - 1; d >= 0; --d) {
      offset += (rest % view.shape[d]) * view.strides[d];
      rest /= view.shape[d];
    }
    switch (view.dtype) {
      case DType::float32:
        values[static_cast<std::size_t>(n)] = static_cast<const float*>(view.data)[offset];
        break;
      case DType::float64:
        values[static_cast<std::size_t>(n)] = static_cast<const double*>(view.data)[offset];
        break;
      case DType::bfloat16:
        values[static_cast<std::size_t>(n)] =
            from_bfloat16(static_cast<const std::uint16_t*>(view.data)[offset]);
        break;
      default:
        throw Error("score_mod parameter: expected float32, float64 or bfloat16, got " +
                    std::string(dtype_name(view.dtype)));
    }
  }
  return values;
}

}  // namespace

ScorePiece::Kind parse_piece_kind(const std::string& name) {
  if (name == "alibi") return ScorePiece::Kind::alibi;
  if (name == "soft_cap") return ScorePiece::Kind::soft_cap;
  if (name == "relative_bias") return ScorePiece::Kind::relative_bias;
  if (name == "head_scale") return ScorePiece::Kind::head_scale;
  throw Error("score_mod piece: expected alibi, soft_cap, relative_bias or head_scale, got '" +
              name + "'");
}

ScorePieces::ScorePieces(std::vector<ScorePiece> pieces, const std::vector<TensorView>& parameters)
    : pieces_(std::move(pieces)) {
  parameters_.reserve(parameters.size());
  for (const TensorView& view : parameters) {
    parameters_.emplace_back(view);  // checks dtype and rank
    values_.push_back(dense_values(view));
  }
  for (ScorePiece& piece : pieces_) {
    if (piece.kind == ScorePiece::Kind::soft_cap) {
      if (!(piece.constant > 0) || !std::isfinite(piece.constant))
        throw Error("soft_cap: expected a finite cap > 0, got " + std::to_string(piece.constant));
      continue;
    }
    if (piece.parameter < 0 || piece.parameter >= static_cast<int>(parameters.size()))
      throw Error("score_mod piece: expected a parameter, got none");
    const TensorView& values = parameters[static_cast<std::size_t>(piece.parameter)];
    if (piece.kind == ScorePiece::Kind::relative_bias) {
      const std::int64_t length = values.shape[values.rank - 1];
      if (values.rank > 2 || length % 2 == 0) {
        throw Error("relative_bias table: expected [H, 2M - 1] or [2M - 1] (odd length), got " +
                    values.shape_string());
      }
      piece.per_head = values.rank == 2;
      piece.reach = (length - 1) / 2;
    } else if (values.rank != 1) {
      throw Error("score_mod piece: expected a parameter [H], got " + values.shape_string());
    }
  }
  std::vector<const ScoreParameter*> listed;
  for (const ScoreParameter& parameter : parameters_) listed.push_back(&parameter);
  score_mod_.emplace(ScoreMod::from_rows(PieceRows{this}, listed));
}

std::int64_t ScorePieces::TableElement(const ScorePiece& piece, std::int64_t h,
                                       std::int64_t distance) const {
  const std::int64_t at = std::clamp(distance, -piece.reach, piece.reach) + piece.reach;
  return piece.per_head ? h * (2 * piece.reach + 1) + at : at;
}

void ScorePieces::Apply(const ScorePiece& piece, const ScoreMod::Row& row, double* s) const {
  const std::vector<double>* values =
      piece.parameter >= 0 ? &values_[static_cast<std::size_t>(piece.parameter)] : nullptr;
  const auto h = static_cast<std::size_t>(row.h);
  switch (piece.kind) {
    case ScorePiece::Kind::alibi: {
      const double slope = (*values)[h];
      const auto first = static_cast<double>(row.kv_begin - row.q_idx);
      for (std::int64_t t = 0; t < row.count; ++t) s[t] += slope * (first + static_cast<double>(t));
      return;
    }
    case ScorePiece::Kind::soft_cap:
      for (std::int64_t t = 0; t < row.count; ++t)
        s[t] = piece.constant * std::tanh(s[t] / piece.constant);
      return;
    case ScorePiece::Kind::relative_bias:
      for (std::int64_t t = 0; t < row.count; ++t)
        s[t] += (*values)[static_cast<std::size_t>(
            TableElement(piece, row.h, row.q_idx - row.kv_begin - t))];
      return;
    case ScorePiece::Kind::head_scale: {
      const double scale = (*values)[h];
      for (std::int64_t t = 0; t < row.count; ++t) s[t] *= scale;
      return;
    }
  }
}

template <class T>
void ScorePieces::Forward(const ScoreMod::Row& row, T* scores) const {
  thread_local std::vector<double> row_scores;
  row_scores.assign(scores, scores + row.count);
  for (const ScorePiece& piece : pieces_) Apply(piece, row, row_scores.data());
  for (std::int64_t t = 0; t < row.count; ++t)
    scores[t] = static_cast<T>(row_scores[static_cast<std::size_t>(t)]);
}

template <class T>
void ScorePieces::Backward(const ScoreMod::Row& row, const T* scores, T* d_scores,
                           double* const* gradients) const {
  // stages[k]: the input of piece k (stages[0] the scores given), one row each.
  const auto n = static_cast<std::size_t>(row.count);
  thread_local std::vector<double> stages, d;
  stages.resize(n * (pieces_.size() + 1));
  std::copy(scores, scores + row.count, stages.begin());
  for (std::size_t k = 0; k < pieces_.size(); ++k) {
    std::copy(stages.begin() + static_cast<std::ptrdiff_t>(k * n),
              stages.begin() + static_cast<std::ptrdiff_t>((k + 1) * n),
              stages.begin() + static_cast<std::ptrdiff_t>((k + 1) * n));
    Apply(pieces_[k], row, stages.data() + (k + 1) * n);
  }
  d.assign(d_scores, d_scores + row.count);
  for (std::size_t k = pieces_.size(); k-- > 0;) {
    const ScorePiece& piece = pieces_[k];
    const double* input = stages.data() + k * n;
    double* gradient = gradients != nullptr && piece.parameter >= 0
                           ? gradients[static_cast<std::size_t>(piece.parameter)]
                           : nullptr;
    const auto h = static_cast<std::size_t>(row.h);
    switch (piece.kind) {
      case ScorePiece::Kind::alibi:  // s + P[h]·(kv − q): ∂/∂s = 1, ∂/∂P[h] = kv − q
        if (gradient != nullptr) {
          double sum = 0.0;
          for (std::size_t t = 0; t < n; ++t)
            sum +=
                d[t] * static_cast<double>(row.kv_begin + static_cast<std::int64_t>(t) - row.q_idx);
          gradient[h] += sum;
        }
        break;
      case ScorePiece::Kind::soft_cap:  // c·tanh(s / c): ∂/∂s = 1 − tanh²
        for (std::size_t t = 0; t < n; ++t) {
          const double tanh = std::tanh(input[t] / piece.constant);
          d[t] *= 1.0 - tanh * tanh;
        }
        break;
      case ScorePiece::Kind::relative_bias:  // s + P[…]: ∂/∂s = 1, ∂/∂P[element] = 1
        if (gradient != nullptr) {
          for (std::size_t t = 0; t < n; ++t)
            gradient[TableElement(piece, row.h,
                                  row.q_idx - row.kv_begin - static_cast<std::int64_t>(t))] += d[t];
        }
        break;
      case ScorePiece::Kind::head_scale: {  // s·P[h]: ∂/∂s = P[h], ∂/∂P[h] = s
        const double scale = values_[static_cast<std::size_t>(piece.parameter)][h];
        double sum = 0.0;
        for (std::size_t t = 0; t < n; ++t) {
          sum += d[t] * input[t];
          d[t] *= scale;
        }
        if (gradient != nullptr) gradient[h] += sum;
        break;
      }
    }
  }
  for (std::size_t t = 0; t < n; ++t) d_scores[t] = static_cast<T>(d[t]);
}

template void ScorePieces::Forward(const ScoreMod::Row&, float*) const;
template void ScorePieces::Forward(const ScoreMod::Row&, double*) const;
template void ScorePieces::Backward(const ScoreMod::Row&, const float*, float*,
                                    double* const*) const;
template void ScorePieces::Backward(const ScoreMod::Row&, const double*, double*,
                                    double* const*) const;

}  // namespace qkv::python
