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
  const bool sink_token = j < m.sink_end;  // kept past the window's left edge
  if (m.window_left >= 0 && j < diagonal_j - m.window_left && !sink_token) return false;
  if (m.window_right >= 0 && j > diagonal_j + m.window_right) return false;
  if (j >= p.key_length(b) || j < p.key_start(b)) return false;
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

// The literal evaluation of one problem, a (batch, head, query row) at a time, in named steps:
// the head's projected keys (additive), the row's query and its projection, each score by the
// contract's formula, then the row's softmax and average in three passes.
template <class Real, bool kBfloat16Stages>
class LiteralForward {
 public:
  // scores: where to write each row's scores as the softmax sees them (−inf where hidden), when
  // present.
  explicit LiteralForward(const AttentionProblem& p, StridedOutput scores = {})
      : p_(p),
        scores_out_(scores),
        dropout_(p),
        query_(static_cast<std::size_t>(p.q_dim)),
        scores_(static_cast<std::size_t>(p.k_len)),
        visible_(static_cast<std::size_t>(p.k_len)),
        output_(static_cast<std::size_t>(p.v_dim)) {}

  void run() {
    for (std::int64_t b = 0; b < p_.batch; ++b) {
      for (std::int64_t h = 0; h < p_.q_heads; ++h) {
        if (p_.score == Score::additive) project_keys(b, h);
        for (std::int64_t i = 0; i < p_.q_len; ++i) attend_row(b, h, i);
      }
    }
  }

 private:
  static constexpr Real kMinusInfinity = -std::numeric_limits<Real>::infinity();

  Real k(std::int64_t b, std::int64_t j, std::int64_t h, std::int64_t d) const {
    return load<Real>(p_.k, b, j, p_.kv_head(h), d);
  }

  // Additive: Wk k for every key of head h [Nk, A].
  void project_keys(std::int64_t b, std::int64_t h) {
    const std::int64_t A = p_.additive_dim;
    keys_projected_.assign(static_cast<std::size_t>(p_.k_len * A), Real{0});
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      for (std::int64_t a = 0; a < A; ++a) {
        Real sum = 0;
        for (std::int64_t d = 0; d < p_.k_dim; ++d)
          sum += load<Real>(p_.wk, h, a, d) * k(b, j, h, d);
        keys_projected_[static_cast<std::size_t>(j * A + a)] = sum;
      }
    }
  }

  // The row's query, and its projection: bilinear Wᵀq [Dk] (qᵀ W k = (Wᵀq)·k), additive Wq q [A].
  void load_query(std::int64_t b, std::int64_t h, std::int64_t i) {
    for (std::int64_t d = 0; d < p_.q_dim; ++d)
      query_[static_cast<std::size_t>(d)] = load<Real>(p_.q, b, i, h, d);
    if (p_.score == Score::bilinear) {
      query_projected_.assign(static_cast<std::size_t>(p_.k_dim), Real{0});
      for (std::int64_t c = 0; c < p_.k_dim; ++c)
        for (std::int64_t d = 0; d < p_.q_dim; ++d)
          query_projected_[static_cast<std::size_t>(c)] +=
              query_[static_cast<std::size_t>(d)] * load<Real>(p_.w, h, d, c);
    } else if (p_.score == Score::additive) {
      query_projected_.assign(static_cast<std::size_t>(p_.additive_dim), Real{0});
      for (std::int64_t a = 0; a < p_.additive_dim; ++a)
        for (std::int64_t d = 0; d < p_.q_dim; ++d)
          query_projected_[static_cast<std::size_t>(a)] +=
              load<Real>(p_.wq, h, a, d) * query_[static_cast<std::size_t>(d)];
    }
  }

  // The score of query i and key j (docs/contract.md §2, its steps in their order).
  Real score(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    Real s = 0;
    if (p_.score == Score::additive) {
      const std::int64_t A = p_.additive_dim;
      for (std::int64_t a = 0; a < A; ++a) {
        s += load<Real>(p_.va, h, a) *
             std::tanh(query_projected_[static_cast<std::size_t>(a)] +
                       keys_projected_[static_cast<std::size_t>(j * A + a)]);
      }
    } else {
      const std::vector<Real>& left = p_.score == Score::bilinear ? query_projected_ : query_;
      for (std::int64_t d = 0; d < p_.k_dim; ++d)
        s += left[static_cast<std::size_t>(d)] * k(b, j, h, d);
    }
    if (p_.score == Score::cosine) {  // τ[h]·(q·k)/(|q||k|); a zero vector scores 0
      Real q_norm = 0, k_norm = 0;
      for (std::int64_t d = 0; d < p_.k_dim; ++d) {
        q_norm += query_[static_cast<std::size_t>(d)] * query_[static_cast<std::size_t>(d)];
        k_norm += k(b, j, h, d) * k(b, j, h, d);
      }
      const Real norms = std::sqrt(q_norm) * std::sqrt(k_norm);
      const Real tau = p_.temperature.present ? load<Real>(p_.temperature, h) : Real{1};
      s = norms > 0 ? tau * (s / norms) : Real{0};
    }
    s *= static_cast<Real>(p_.scale);
    if (p_.softcap > 0) {
      const auto cap = static_cast<Real>(p_.softcap);
      s = cap * std::tanh(s / cap);
    }
    if (p_.alibi_slopes.present) {
      const auto distance = static_cast<Real>(std::llabs(i + p_.diagonal() - j));
      s -= load<Real>(p_.alibi_slopes, b, h) * distance;
    }
    if (p_.bias.present) s += load<Real>(p_.bias, b, h, i, j);
    if (p_.score_mod != nullptr) p_.score_mod->forward(p_.score_mod_row(b, h, i, j, 1), &s);
    return s;
  }

  void attend_row(std::int64_t b, std::int64_t h, std::int64_t i) {
    load_query(b, h, i);
    // Pass 1: every score and the maximum of the visible ones.
    Real row_max = kMinusInfinity;
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      const Real s = score(b, h, i, j);
      scores_[static_cast<std::size_t>(j)] = stage<kBfloat16Stages>(s);
      visible_[static_cast<std::size_t>(j)] = key_visible(p_, b, h, i, j) ? 1 : 0;
      // (A NaN score makes the maximum NaN, and so the row: s > row_max would drop it.)
      if (visible_[static_cast<std::size_t>(j)] && (s > row_max || std::isnan(s))) row_max = s;
      if (scores_out_.present)
        scores_out_.store(visible_[static_cast<std::size_t>(j)]
                              ? static_cast<double>(s)
                              : -std::numeric_limits<double>::infinity(),
                          b, h, i, j);
    }

    if (p_.sigmoid) {  // each weight on its own: P = 1 / (1 + e^−(s + b)); LSE = log Σ P
      Real total = 0;
      std::fill(output_.begin(), output_.end(), Real{0});
      for (std::int64_t j = 0; j < p_.k_len; ++j) {
        Real weight = 0;
        if (visible_[static_cast<std::size_t>(j)]) {
          const Real shifted =
              scores_[static_cast<std::size_t>(j)] + static_cast<Real>(p_.sigmoid_bias);
          weight = stage<kBfloat16Stages>(Real{1} / (Real{1} + std::exp(-shifted)));
        }
        total += weight;
        if (dropout_.active() && weight != 0)
          weight *= static_cast<Real>(dropout_.factor(b, h, i, j));
        if (p_.weights.present) p_.weights.store(static_cast<double>(weight), b, h, i, j);
        for (std::int64_t d = 0; d < p_.v_dim && weight != 0; ++d)
          output_[static_cast<std::size_t>(d)] += weight * load<Real>(p_.v, b, j, p_.kv_head(h), d);
      }
      Write(b, h, i, total > 0 ? std::log(total) : kMinusInfinity);
      return;
    }

    // A sink is one more column of the softmax, after the keys, with a logit and no value.
    const Real sink = p_.sinks.present ? load<Real>(p_.sinks, h) : kMinusInfinity;
    row_max = std::max(row_max, sink);

    // Pass 2: the softmax denominator; an empty row (or one whose every visible score is -inf)
    // has none, and gives O = 0, P = 0, LSE = -inf (the sink, with one).
    Real lse = kMinusInfinity;
    if (row_max != kMinusInfinity) {
      Real denominator = 0;
      for (std::int64_t j = 0; j < p_.k_len; ++j) {
        if (visible_[static_cast<std::size_t>(j)])
          denominator += std::exp(scores_[static_cast<std::size_t>(j)] - row_max);
      }
      if (sink != kMinusInfinity) denominator += std::exp(sink - row_max);
      lse = row_max + std::log(denominator);
    }

    // Pass 3: weights and the weighted average of the values.
    std::fill(output_.begin(), output_.end(), Real{0});
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      Real weight = 0;
      if (visible_[static_cast<std::size_t>(j)] && lse != kMinusInfinity) {
        weight = stage<kBfloat16Stages>(std::exp(scores_[static_cast<std::size_t>(j)] - lse));
        if (dropout_.active()) weight *= static_cast<Real>(dropout_.factor(b, h, i, j));
      }
      if (p_.weights.present) p_.weights.store(static_cast<double>(weight), b, h, i, j);
      if (weight == 0) continue;
      for (std::int64_t d = 0; d < p_.v_dim; ++d)
        output_[static_cast<std::size_t>(d)] += weight * load<Real>(p_.v, b, j, p_.kv_head(h), d);
    }
    Write(b, h, i, lse);
  }

  // The row's O (from output_) and LSE.
  void Write(std::int64_t b, std::int64_t h, std::int64_t i, Real lse) {
    for (std::int64_t d = 0; d < p_.v_dim; ++d) {
      p_.out.store(
          static_cast<double>(stage<kBfloat16Stages>(output_[static_cast<std::size_t>(d)])), b, i,
          h, d);
    }
    if (p_.lse.present) p_.lse.store(static_cast<double>(lse), b, h, i);
  }

  const AttentionProblem& p_;
  const StridedOutput scores_out_;
  const DropoutMask dropout_;
  std::vector<Real> query_;
  std::vector<Real> query_projected_;  // bilinear: Wᵀq [Dk]; additive: Wq q [A]
  std::vector<Real> keys_projected_;   // additive: Wk k for every key [Nk, A]
  std::vector<Real> scores_;
  std::vector<char> visible_;
  std::vector<Real> output_;
};

}  // namespace

template <class Real>
void naive_attention(const AttentionProblem& p) {
  LiteralForward<Real, false>(p).run();
}

template void naive_attention<float>(const AttentionProblem&);
template void naive_attention<double>(const AttentionProblem&);

void naive_attention_bfloat16(const AttentionProblem& p) {
  LiteralForward<float, true>(p).run();
}

}  // namespace qkv::detail

namespace qkv {

void attention_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& options, const AttentionOutputs& outputs) {
  detail::naive_attention<double>(detail::make_problem(q, k, v, options, outputs));
}

void attention_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                         const AttentionOptions& options, const AttentionOutputs& outputs,
                         const MutableTensorView& scores) {
  const detail::AttentionProblem p = detail::make_problem(q, k, v, options, outputs);
  const detail::StridedOutput scores_out = detail::checked_output_of(
      scores, "scores", {p.batch, p.q_heads, p.q_len, p.k_len}, 4, "[B, Hq, Nq, Nk]");
  detail::LiteralForward<double, false>(p, scores_out).run();
}

}  // namespace qkv
