// The cosine score with a learned temperature: τ[h]·(q·k)/(|q||k|), τ [Hq] or [1] (shared), 1 when
// not given; a zero q or k compares as the zero vector. To the kernels a dot score of
// q' = τ[h]·q/|q| against k' = k/|k|.

#include <fmt/format.h>

#include "core/score_unit.hpp"
#include "qkv/error.hpp"

namespace qkv::detail {

extern const ScoreUnit kCosineUnit{
    Score::cosine,
    "cosine",
    "τ[h]·(q·k)/(|q||k|)",
    "temperature [Hq] or [1] (optional)",
    [](const AttentionOptions& options, AttentionProblem& p) {
      reject_other_parameters(kCosineUnit, options);
      if (p.k_dim != p.q_dim) {
        throw Error(fmt::format("k: expected Dk == Dq = {} for score 'cosine', got Dk = {}",
                                p.q_dim, p.k_dim));
      }
      if (!options.temperature) return;
      const TensorView& tau = *options.temperature;
      require_view(tau, "temperature");
      require_float(tau, "temperature");
      if (tau.rank != 1 || (tau.shape[0] != 1 && tau.shape[0] != p.q_heads)) {
        throw Error(fmt::format("temperature: expected [Hq] = [{}] or [1], got {}", p.q_heads,
                                tau.shape_string()));
      }
      p.temperature = input_of(tau);
      if (tau.shape[0] == 1) p.temperature.strides[0] = 0;
    },
    [](const AttentionProblem&) { return 1.0; },
    [](const AttentionProblem& p) {
      ScoreOperands operands;
      operands.dim = p.k_dim;
      operands.query = {nullptr,
                        false,
                        p.q_dim,
                        p.q_dim,
                        /*normalize=*/true,
                        p.temperature.present ? &p.temperature : nullptr,
                        nullptr,
                        &AttentionGradients::dtemperature};
      operands.key.in_dim = operands.key.out_dim = p.k_dim;
      operands.key.normalize = true;
      return operands;
    },
    // Swin Transformer V2's cosine attention starts its learned scale at 10.
    [](std::int64_t heads, std::int64_t, std::int64_t) {
      using Start = ScoreLayerParameter::Start;
      return ScoreLayer{{{"score_temperature", "temperature", {heads}, Start::constant, 10.0}},
                        std::nullopt};
    },
};

}  // namespace qkv::detail
