// The literal evaluation: for each (batch, head, query row) every score is computed on its own,
// every mask is checked on its own, and the softmax is done in two passes over the whole row.
// Nothing here is blocked, fused or clever, so it can serve as the oracle the fast paths are
// compared with.

#include "reference/naive_attention.hpp"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "core/dropout.hpp"
#include "qkv/reference.hpp"

namespace qkv::detail {

namespace {

template <class Real>
Real load(const StridedInput& input, std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
          std::int64_t i3 = 0) {
  return static_cast<Real>(input.load(i0, i1, i2, i3));
}

}  // namespace

// docs/contract.md §3, one condition at a time.
bool key_visible(const AttentionProblem& p, std::int64_t b, std::int64_t h, std::int64_t i,
                 std::int64_t j) {
  const PositionMasks& m = p.positions;
  const std::int64_t diagonal_j = i + p.diagonal();  // the key aligned with query i
  if (p.mask.present && p.mask.load(b, h, i, j) == 0.0) return false;
  if (p.block_mask != nullptr &&
      !p.block_mask->visible(b, h + p.head_offset, i + p.query_offset, j + p.key_offset))
    return false;
  if (m.causal) {
    const std::int64_t last =
        m.causal_align == CausalAlign::bottom_right ? diagonal_j : i + m.top_left_diagonal;
    const bool in_prefix = j < m.prefix_end;
    if (j > last && !in_prefix) return false;
  }
  if (m.window_left >= 0 && j < diagonal_j - m.window_left) return false;
  if (m.window_right >= 0 && j > diagonal_j + m.window_right) return false;
  if (j >= p.key_length(b)) return false;
  return true;
}

namespace {

// Rounds to bfloat16 and back when the evaluation imitates a bfloat16 pipeline.
template <bool kBfloat16Stages, class Real>
Real stage(Real value) {
  if constexpr (kBfloat16Stages) {
    return static_cast<Real>(from_bfloat16(to_bfloat16(static_cast<float>(value))));
  } else {
    return value;
  }
}

template <class Real, bool kBfloat16Stages>
void evaluate_literally(const AttentionProblem& p) {
  const Real minus_infinity = -std::numeric_limits<Real>::infinity();
  const detail::DropoutMask dropout(p);
  std::vector<Real> query(static_cast<std::size_t>(p.q_dim));
  std::vector<Real> query_projected;  // bilinear: Wᵀq [Dk]; additive: Wq q [A]
  std::vector<Real> keys_projected;   // additive: Wk k for every key [Nk, A]
  std::vector<Real> scores(static_cast<std::size_t>(p.k_len));
  std::vector<char> visible(static_cast<std::size_t>(p.k_len));
  std::vector<Real> output(static_cast<std::size_t>(p.v_dim));
  const std::int64_t A = p.additive_dim;

  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t hk = p.kv_head(h);
      if (p.score == Score::additive) {
        keys_projected.assign(static_cast<std::size_t>(p.k_len * A), Real{0});
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          for (std::int64_t a = 0; a < A; ++a) {
            Real sum = 0;
            for (std::int64_t d = 0; d < p.k_dim; ++d) {
              sum += load<Real>(p.wk, h, a, d) * load<Real>(p.k, b, j, hk, d);
            }
            keys_projected[static_cast<std::size_t>(j * A + a)] = sum;
          }
        }
      }
      for (std::int64_t i = 0; i < p.q_len; ++i) {
        for (std::int64_t d = 0; d < p.q_dim; ++d) {
          query[static_cast<std::size_t>(d)] = load<Real>(p.q, b, i, h, d);
        }
        if (p.score == Score::bilinear) {  // qᵀ W k = (Wᵀ q)·k
          query_projected.assign(static_cast<std::size_t>(p.k_dim), Real{0});
          for (std::int64_t c = 0; c < p.k_dim; ++c) {
            for (std::int64_t d = 0; d < p.q_dim; ++d) {
              query_projected[static_cast<std::size_t>(c)] +=
                  query[static_cast<std::size_t>(d)] * load<Real>(p.w, h, d, c);
            }
          }
        } else if (p.score == Score::additive) {
          query_projected.assign(static_cast<std::size_t>(A), Real{0});
          for (std::int64_t a = 0; a < A; ++a) {
            for (std::int64_t d = 0; d < p.q_dim; ++d) {
              query_projected[static_cast<std::size_t>(a)] +=
                  load<Real>(p.wq, h, a, d) * query[static_cast<std::size_t>(d)];
            }
          }
        }

        // Pass 1: every score (docs/contract.md §2, in its order) and the running maximum.
        Real row_max = minus_infinity;
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          Real s = 0;
          if (p.score == Score::additive) {
            for (std::int64_t a = 0; a < A; ++a) {
              s += load<Real>(p.va, h, a) *
                   std::tanh(query_projected[static_cast<std::size_t>(a)] +
                             keys_projected[static_cast<std::size_t>(j * A + a)]);
            }
          } else {
            const std::vector<Real>& left = p.score == Score::bilinear ? query_projected : query;
            for (std::int64_t d = 0; d < p.k_dim; ++d) {
              s += left[static_cast<std::size_t>(d)] * load<Real>(p.k, b, j, hk, d);
            }
          }
          if (p.score == Score::cosine) {  // τ[h]·(q·k)/(|q||k|); a zero vector scores 0
            Real q_norm = 0, k_norm = 0;
            for (std::int64_t d = 0; d < p.k_dim; ++d) {
              q_norm += query[static_cast<std::size_t>(d)] * query[static_cast<std::size_t>(d)];
              k_norm += load<Real>(p.k, b, j, hk, d) * load<Real>(p.k, b, j, hk, d);
            }
            const Real norms = std::sqrt(q_norm) * std::sqrt(k_norm);
            const Real tau = p.temperature.present ? load<Real>(p.temperature, h) : Real{1};
            s = norms > 0 ? tau * (s / norms) : Real{0};
          }
          s *= static_cast<Real>(p.scale);
          if (p.softcap > 0) {
            const auto cap = static_cast<Real>(p.softcap);
            s = cap * std::tanh(s / cap);
          }
          if (p.alibi_slopes.present) {
            const auto distance = static_cast<Real>(std::llabs(i + p.diagonal() - j));
            s -= load<Real>(p.alibi_slopes, b, h) * distance;
          }
          if (p.bias.present) s += load<Real>(p.bias, b, h, i, j);
          if (p.score_mod != nullptr) p.score_mod->forward(p.score_mod_row(b, h, i, j, 1), &s);
          scores[static_cast<std::size_t>(j)] = stage<kBfloat16Stages>(s);
          visible[static_cast<std::size_t>(j)] = key_visible(p, b, h, i, j) ? 1 : 0;
          if (visible[static_cast<std::size_t>(j)] && s > row_max) row_max = s;
        }

        // Pass 2: the softmax denominator; an empty row (or one whose every visible score is
        // -inf) has none, and gives O = 0, P = 0, LSE = -inf.
        Real lse = minus_infinity;
        if (row_max != minus_infinity) {
          Real denominator = 0;
          for (std::int64_t j = 0; j < p.k_len; ++j) {
            if (visible[static_cast<std::size_t>(j)]) {
              denominator += std::exp(scores[static_cast<std::size_t>(j)] - row_max);
            }
          }
          lse = row_max + std::log(denominator);
        }

        // Pass 3: weights and the weighted average of the values.
        std::fill(output.begin(), output.end(), Real{0});
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          Real weight = 0;
          if (visible[static_cast<std::size_t>(j)] && lse != minus_infinity) {
            weight = stage<kBfloat16Stages>(std::exp(scores[static_cast<std::size_t>(j)] - lse));
            if (dropout.active()) weight *= static_cast<Real>(dropout.factor(b, h, i, j));
          }

          if (p.weights.present) p.weights.store(static_cast<double>(weight), b, h, i, j);
          if (weight == 0) continue;
          for (std::int64_t d = 0; d < p.v_dim; ++d) {
            output[static_cast<std::size_t>(d)] += weight * load<Real>(p.v, b, j, hk, d);
          }
        }
        for (std::int64_t d = 0; d < p.v_dim; ++d) {
          p.out.store(
              static_cast<double>(stage<kBfloat16Stages>(output[static_cast<std::size_t>(d)])), b,
              i, h, d);
        }
        if (p.lse.present) p.lse.store(static_cast<double>(lse), b, h, i);
      }
    }
  }
}

}  // namespace

template <class Real>
void naive_attention(const AttentionProblem& p) {
  evaluate_literally<Real, false>(p);
}

template void naive_attention<float>(const AttentionProblem&);
template void naive_attention<double>(const AttentionProblem&);

void naive_attention_bfloat16(const AttentionProblem& p) {
  evaluate_literally<float, true>(p);
}

}  // namespace qkv::detail

namespace qkv {

void attention_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& options, const AttentionOutputs& outputs) {
  detail::naive_attention<double>(detail::make_problem(q, k, v, options, outputs));
}

}  // namespace qkv
