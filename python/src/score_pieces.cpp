// The built-in score_mods, evaluated piece by piece on dual numbers (see score_pieces.hpp).

#include "score_pieces.hpp"

#include <algorithm>
#include <cmath>
#include <string>

#include "qkv/error.hpp"

namespace qkv::python {

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
  std::vector<const ScoreParameter*> listed;
  for (const TensorView& values : parameters) {
    parameters_.emplace_back(values);
    listed.push_back(&parameters_.back());
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
  const std::vector<ScorePiece>* all = &pieces_;
  const std::deque<ScoreParameter>* values = &parameters_;
  score_mod_.emplace(
      [all, values](Dual s, std::int64_t, std::int64_t h, std::int64_t q, std::int64_t kv) {
        for (const ScorePiece& piece : *all) {
          switch (piece.kind) {
            case ScorePiece::Kind::alibi:
              s = s + (*values)[static_cast<std::size_t>(piece.parameter)](h) *
                          static_cast<double>(kv - q);
              break;
            case ScorePiece::Kind::soft_cap:
              s = piece.constant * qkv::tanh(s / piece.constant);
              break;
            case ScorePiece::Kind::relative_bias: {
              const std::int64_t at = std::clamp(q - kv, -piece.reach, piece.reach) + piece.reach;
              const ScoreParameter& table = (*values)[static_cast<std::size_t>(piece.parameter)];
              s = s + (piece.per_head ? table(h, at) : table(at));
              break;
            }
            case ScorePiece::Kind::head_scale:
              s = s * (*values)[static_cast<std::size_t>(piece.parameter)](h);
              break;
          }
        }
        return s;
      },
      listed);
}

}  // namespace qkv::python
