// The built-in score_mods of qkv.flex_attention (qkv.score_mods): ALiBi, soft cap, a relative
// position bias table and per-head scales, composed in order into one qkv::ScoreMod that the
// kernels run natively, a whole row at a time, forward and backward, with the gradients of the
// learned tensors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qkv/score_mod.hpp"

namespace qkv::python {

// One piece: what it does to the score s of (b, h, q_idx, kv_idx), with P its parameter:
//   alibi:         s + P[h]·(kv_idx − q_idx)
//   soft_cap:      c·tanh(s / c)                         (c = constant)
//   relative_bias: s + P[h, d + M − 1] (or P[d + M − 1]), d = q_idx − kv_idx clamped to
//                  [−(M − 1), M − 1], the table's last dimension 2M − 1
//   head_scale:    s·P[h]
struct ScorePiece {
  enum class Kind { alibi, soft_cap, relative_bias, head_scale };
  Kind kind = Kind::soft_cap;
  int parameter = -1;      // index into the parameters, or -1
  double constant = 0.0;   // soft_cap's c
  bool per_head = true;    // relative_bias: a table per head ([H, 2M − 1]) or shared
  std::int64_t reach = 0;  // relative_bias: M − 1
};

// Parses "alibi", "soft_cap", "relative_bias", "head_scale" (qkv::Error otherwise).
ScorePiece::Kind parse_piece_kind(const std::string& name);

// The pieces with their parameters, as one ScoreMod.
class ScorePieces {
 public:
  // Each piece's parameter index refers to `parameters` (read once, here). Throws qkv::Error for
  // a parameter of the wrong rank, an even-length table or a cap that is not > 0.
  ScorePieces(std::vector<ScorePiece> pieces, const std::vector<TensorView>& parameters);
  ScorePieces(const ScorePieces&) = delete;  // the ScoreMod points into this object
  ScorePieces& operator=(const ScorePieces&) = delete;
  const ScoreMod& score_mod() const { return *score_mod_; }

  // ScoreMod's row interface (ScoreMod::from_rows).
  template <class T>
  void Forward(const ScoreMod::Row& row, T* scores) const;
  template <class T>
  void Backward(const ScoreMod::Row& row, const T* scores, T* d_scores,
                double* const* gradients) const;

 private:
  // Piece k on the row's scores in place (double).
  void Apply(const ScorePiece& piece, const ScoreMod::Row& row, double* scores) const;
  // The element of piece k's parameter read by (h, q_idx − kv_idx).
  std::int64_t TableElement(const ScorePiece& piece, std::int64_t h, std::int64_t distance) const;

  std::vector<ScorePiece> pieces_;
  std::vector<std::vector<double>> values_;  // each parameter, dense
  std::vector<ScoreParameter> parameters_;   // for the ScoreMod's list (and its numbering)
  std::optional<ScoreMod> score_mod_;
};

}  // namespace qkv::python
