// The additive score (Bahdanau's "concat"): vᵀ tanh(Wq q + Wk k), Wq [A, Dq], Wk [A, Dk], v [A],
// each shared or with a leading Hq. To the kernels the additive form over q' = Wq q, k' = Wk k.

#include <fmt/format.h>

#include <cmath>
#include <vector>

#include "core/score_unit.hpp"
#include "qkv/error.hpp"

namespace qkv::detail {

extern const ScoreUnit kAdditiveUnit{
    Score::additive,
    "additive",
    "vᵀ tanh(Wq q + Wk k)",
    "wq [A, Dq], wk [A, Dk], va [A] (each optionally with a leading Hq)",
    [](const AttentionOptions& options, AttentionProblem& p) {
      reject_other_parameters(kAdditiveUnit, options);
      if (!options.wq || !options.wk || !options.va) {
        throw Error(fmt::format(
            "{}: expected a tensor for score 'additive' (it needs wq, wk and va), got none",
            !options.wq   ? "wq"
            : !options.wk ? "wk"
                          : "va"));
      }
      require_view(*options.va, "va");
      if (options.va->rank < 1 || options.va->rank > 2) {
        throw Error(fmt::format("va: expected [A] or [Hq, A], got {}", options.va->shape_string()));
      }
      p.additive_dim = options.va->shape[options.va->rank - 1];
      if (p.additive_dim < 1) throw Error("va: expected A >= 1, got A = 0");
      const std::int64_t a = p.additive_dim;
      p.va = per_head_parameter(*options.va, "va", {a, 0, 0, 0}, 1, p.q_heads,
                                fmt::format("[A] = [{0}] or [Hq, A] = [{1}, {0}]", a, p.q_heads));
      p.wq = per_head_parameter(*options.wq, "wq", {a, p.q_dim, 0, 0}, 2, p.q_heads,
                                fmt::format("[A, Dq] = [{0}, {1}] or [Hq, A, Dq] = [{2}, {0}, {1}]",
                                            a, p.q_dim, p.q_heads));
      p.wk = per_head_parameter(*options.wk, "wk", {a, p.k_dim, 0, 0}, 2, p.q_heads,
                                fmt::format("[A, Dk] = [{0}, {1}] or [Hq, A, Dk] = [{2}, {0}, {1}]",
                                            a, p.k_dim, p.q_heads));
    },
    [](const AttentionProblem&) { return 1.0; },
    [](const AttentionProblem& p) {
      ScoreOperands operands;
      operands.form = ScoreForm::additive;
      operands.dim = p.additive_dim;
      operands.query = {
          &p.wq, false, p.q_dim, p.additive_dim, false, nullptr, &AttentionGradients::dwq, nullptr};
      operands.key = {
          &p.wk, false, p.k_dim, p.additive_dim, false, nullptr, &AttentionGradients::dwk, nullptr};
      operands.keys_per_query_head = p.wk.strides[0] != 0;
      operands.additive_v = &p.va;
      operands.additive_v_gradient = &AttentionGradients::dva;
      return operands;
    },
    [](std::int64_t heads, std::int64_t head_dim, std::int64_t additive_dim) {
      using Start = ScoreLayerParameter::Start;
      const std::vector<std::int64_t> matrix{heads, additive_dim, head_dim};
      const double v_bound = 1.0 / std::sqrt(static_cast<double>(additive_dim));
      return ScoreLayer{{{"score_wq", "wq", matrix, Start::xavier},
                         {"score_wk", "wk", matrix, Start::xavier},
                         {"score_v", "va", {heads, additive_dim}, Start::uniform, v_bound}},
                        std::nullopt};
    },
};

}  // namespace qkv::detail
