// The bilinear score (Luong's "general"): qᵀ W k, W [Dq, Dk] shared or [Hq, Dq, Dk] per head.
// To the kernels a dot score of q' = Wᵀq against k.

#include <fmt/format.h>

#include <cmath>

#include "core/score_unit.hpp"
#include "qkv/error.hpp"

namespace qkv::detail {

extern const ScoreUnit kBilinearUnit{
    Score::bilinear,
    "bilinear",
    "qᵀ W k",
    "w [Dq, Dk] or [Hq, Dq, Dk]",
    [](const AttentionOptions& options, AttentionProblem& p) {
      reject_other_parameters(kBilinearUnit, options);
      if (!options.w)
        throw Error("w: expected [Dq, Dk] or [Hq, Dq, Dk] for score 'bilinear', got none");
      p.w =
          per_head_parameter(*options.w, "w", {p.q_dim, p.k_dim, 0, 0}, 2, p.q_heads,
                             fmt::format("[Dq, Dk] = [{0}, {1}] or [Hq, Dq, Dk] = [{2}, {0}, {1}]",
                                         p.q_dim, p.k_dim, p.q_heads));
    },
    [](const AttentionProblem&) { return 1.0; },
    [](const AttentionProblem& p) {
      ScoreOperands operands;
      operands.dim = p.k_dim;
      operands.query = {&p.w,    /*transposed=*/true,     p.q_dim, p.k_dim, false,
                        nullptr, &AttentionGradients::dw, nullptr};
      operands.key.in_dim = operands.key.out_dim = p.k_dim;
      return operands;
    },
    [](std::int64_t heads, std::int64_t head_dim, std::int64_t) {
      using Start = ScoreLayerParameter::Start;
      return ScoreLayer{{{"score_weight", "w", {heads, head_dim, head_dim}, Start::identity}},
                        1.0 / std::sqrt(static_cast<double>(head_dim))};
    },
};

}  // namespace qkv::detail
