// The float64 oracle of the backward pass.
//
// Every input is first copied densely into float64, and the forward problem is built on those
// copies: each operand's four-index view then has dense strides, with stride 0 where it is
// broadcast (bias) or shared across heads (W, Wq, Wk, va). A gradient is accumulated in a float64
// buffer the size of its primal, at the primal's own offset for each index: shared and broadcast
// dimensions sum by themselves. Then, per (batch, head, query row), the forward is recomputed
// literally and differentiated step by step, each step quoting the forward line it undoes.

#include <cmath>
#include <cstdlib>
#include <limits>
#include <vector>

#include "core/backward_arguments.hpp"
#include "core/dropout.hpp"
#include "core/problem.hpp"
#include "core/score_mod_gradients.hpp"
#include "reference/naive_attention.hpp"
#include "reference/naive_backward.hpp"

#include "qkv/backward.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace {

using detail::AttentionProblem;
using detail::StridedInput;

// A float64 accumulator the size of a primal, indexed like the primal's four-index view.
struct Gradient {
  Gradient(const StridedInput& primal_view, std::int64_t size, bool wanted)
      : view(primal_view), values(wanted ? static_cast<std::size_t>(size) : 0) {}
  void add(double value, std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
           std::int64_t i3 = 0) {
    if (!values.empty()) values[static_cast<std::size_t>(view.offset(i0, i1, i2, i3))] += value;
  }
  StridedInput view;
  std::vector<double> values;
};

// |x[b, n, h, :]|.
double norm_of(const StridedInput& x, std::int64_t b, std::int64_t n, std::int64_t h,
               std::int64_t dim) {
  double sum = 0.0;
  for (std::int64_t d = 0; d < dim; ++d) sum += x.load(b, n, h, d) * x.load(b, n, h, d);
  return std::sqrt(sum);
}

}  // namespace

void attention_backward_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                                  const AttentionOptions& options, const TensorView& dout,
                                  const std::optional<TensorView>& dlse,
                                  const AttentionGradients& gradients) {
  detail::backward_reference(q, k, v, options, dout, dlse, gradients, std::nullopt);
}

namespace {

// The oracle's state: float64 copies of every input, the problem built on them, and a float64
// accumulator per gradient. Each query row is recomputed literally (RecomputeRow), then
// differentiated one step of docs/contract.md §2–4 at a time (DifferentiateRow), each score by
// its own chain rule (AddScoreGradients).
class LiteralBackward {
 public:
  LiteralBackward(const TensorView& q, const TensorView& k, const TensorView& v,
                  const AttentionOptions& options, const TensorView& dout,
                  const std::optional<TensorView>& dlse, const AttentionGradients& gradients,
                  const std::optional<SavedForward>& saved)
      : q64_(detail::dense_copy(q)),
        k64_(detail::dense_copy(k)),
        v64_(detail::dense_copy(v)),
        dout64_(detail::dense_copy(dout)),
        dlse64_(dlse ? detail::dense_copy(*dlse) : Tensor()),
        saved_out_(saved ? detail::dense_copy(saved->out) : Tensor()),
        saved_lse_(saved ? detail::dense_copy(saved->lse) : Tensor()),
        saved_(saved.has_value()),
        has_dlse_(dlse.has_value()),
        dense_(DenseOptions(options)),
        out64_(DType::float64, {q.shape[0], q.shape[1], q.shape[2], v.shape[3]}),
        p_(detail::make_problem(q64_.view(), k64_.view(), v64_.view(), dense_,
                                {out64_.mutable_view(), {}, {}})),
        gradients_(gradients),
        dropout_(p_),
        grad_q_(p_.q, q64_.numel(), gradients.dq.has_value()),
        grad_k_(p_.k, k64_.numel(), gradients.dk.has_value()),
        grad_v_(p_.v, v64_.numel(), gradients.dv.has_value()),
        grad_w_(p_.w, SizeOf(dense_.w), gradients.dw.has_value()),
        grad_wq_(p_.wq, SizeOf(dense_.wq), gradients.dwq.has_value()),
        grad_wk_(p_.wk, SizeOf(dense_.wk), gradients.dwk.has_value()),
        grad_va_(p_.va, SizeOf(dense_.va), gradients.dva.has_value()),
        grad_bias_(p_.bias, SizeOf(dense_.bias), gradients.dbias.has_value()),
        grad_temperature_(p_.temperature, SizeOf(dense_.temperature),
                          gradients.dtemperature.has_value()),
        grad_sinks_(p_.sinks, SizeOf(dense_.sinks), gradients.dsinks.has_value()),
        score_mod_gradients_(p_.score_mod, gradients.dscore_mod) {
    d_out_ = detail::input_of(dout64_.view());
    const auto keys = static_cast<std::size_t>(p_.k_len);
    for (std::vector<double>* row :
         {&raw_, &scaled_, &unmodified_, &scores_, &weights_, &d_weights_})
      row->resize(keys);
    visible_.resize(keys);
  }

  void Run() {
    for (std::int64_t b = 0; b < p_.batch; ++b) {
      for (std::int64_t h = 0; h < p_.q_heads; ++h) {
        ProjectKeys(b, h);
        for (std::int64_t i = 0; i < p_.q_len; ++i) {
          ProjectQuery(b, h, i);
          const double lse = RecomputeRow(b, h, i);
          if (lse == -std::numeric_limits<double>::infinity()) continue;  // no key: no gradient
          DifferentiateRow(b, h, i, lse);
        }
      }
    }
    Write();
  }

 private:
  // The caller's options with every tensor copied to dense float64 (kept by this object).
  AttentionOptions DenseOptions(const AttentionOptions& options) {
    AttentionOptions dense = options;
    for (std::optional<TensorView>* slot :
         {&dense.w, &dense.wq, &dense.wk, &dense.va, &dense.temperature, &dense.alibi_slopes,
          &dense.bias, &dense.key_lengths, &dense.key_starts, &dense.mask, &dense.sinks}) {
      if (*slot) {
        keep_.push_back(detail::dense_copy(**slot));
        *slot = keep_.back().view();
      }
    }
    return dense;
  }
  static std::int64_t SizeOf(const std::optional<TensorView>& view) {
    return view ? view->numel() : std::int64_t{0};
  }
  double Sink(std::int64_t h) const {
    return p_.sinks.present ? p_.sinks.load(h) : -std::numeric_limits<double>::infinity();
  }
  double Temperature(std::int64_t h) const {
    return p_.temperature.present ? p_.temperature.load(h) : 1.0;
  }

  // The additive score's Wk k for every key of head h [Nk, A].
  void ProjectKeys(std::int64_t b, std::int64_t h) {
    if (p_.score != Score::additive) return;
    const std::int64_t A = p_.additive_dim, hk = p_.kv_head(h);
    projected_k_.assign(static_cast<std::size_t>(p_.k_len * A), 0.0);
    for (std::int64_t j = 0; j < p_.k_len; ++j)
      for (std::int64_t a = 0; a < A; ++a)
        for (std::int64_t d = 0; d < p_.k_dim; ++d)
          projected_k_[static_cast<std::size_t>(j * A + a)] +=
              p_.wk.load(h, a, d) * p_.k.load(b, j, hk, d);
  }

  // Bilinear: Wᵀq [Dk]; additive: Wq q [A].
  void ProjectQuery(std::int64_t b, std::int64_t h, std::int64_t i) {
    if (p_.score == Score::bilinear) {
      projected_q_.assign(static_cast<std::size_t>(p_.k_dim), 0.0);
      for (std::int64_t c = 0; c < p_.k_dim; ++c)
        for (std::int64_t d = 0; d < p_.q_dim; ++d)
          projected_q_[static_cast<std::size_t>(c)] += p_.q.load(b, i, h, d) * p_.w.load(h, d, c);
    } else if (p_.score == Score::additive) {
      projected_q_.assign(static_cast<std::size_t>(p_.additive_dim), 0.0);
      for (std::int64_t a = 0; a < p_.additive_dim; ++a)
        for (std::int64_t d = 0; d < p_.q_dim; ++d)
          projected_q_[static_cast<std::size_t>(a)] += p_.wq.load(h, a, d) * p_.q.load(b, i, h, d);
    }
  }

  // The score of docs/contract.md §2's table, before the scale.
  double RawScore(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j) const {
    const std::int64_t hk = p_.kv_head(h), A = p_.additive_dim;
    double r = 0.0;
    if (p_.score == Score::additive) {
      for (std::int64_t a = 0; a < A; ++a) {
        r += p_.va.load(h, a) * std::tanh(projected_q_[static_cast<std::size_t>(a)] +
                                          projected_k_[static_cast<std::size_t>(j * A + a)]);
      }
      return r;
    }
    for (std::int64_t d = 0; d < p_.k_dim; ++d) {
      const double left = p_.score == Score::bilinear ? projected_q_[static_cast<std::size_t>(d)]
                                                      : p_.q.load(b, i, h, d);
      r += left * p_.k.load(b, j, hk, d);
    }
    if (p_.score == Score::cosine) {  // r = τ[h]·(q·k)/(|q||k|), 0 for a zero vector
      const double norms = norm_of(p_.q, b, i, h, p_.q_dim) * norm_of(p_.k, b, j, hk, p_.k_dim);
      r = norms > 0 ? Temperature(h) * r / norms : 0.0;
    }
    return r;
  }

  // The forward of row i, keeping every intermediate; returns its LSE (the saved one for a block
  // of a larger problem), -inf when the row sees no key (and has no sink).
  double RecomputeRow(std::int64_t b, std::int64_t h, std::int64_t i) {
    double row_max = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      const auto J = static_cast<std::size_t>(j);
      raw_[J] = RawScore(b, h, i, j);
      scaled_[J] = p_.scale * raw_[J];
      double s = p_.softcap > 0 ? p_.softcap * std::tanh(scaled_[J] / p_.softcap) : scaled_[J];
      if (p_.alibi_slopes.present) {
        s -= p_.alibi_slopes.load(b, h) * static_cast<double>(std::llabs(i + p_.diagonal() - j));
      }
      if (p_.bias.present) s += p_.bias.load(b, h, i, j);
      unmodified_[J] = s;
      if (p_.score_mod != nullptr) p_.score_mod->forward(p_.score_mod_row(b, h, i, j, 1), &s);
      scores_[J] = s;
      const bool seen = key_visible(p_, b, h, i, j);
      visible_[J] = seen ? 1 : 0;
      if (seen && s > row_max) row_max = s;
    }
    if (p_.sigmoid) {  // P = 1 / (1 + e^−(s + b)) each on its own, LSE = log Σ P
      double total = 0.0;
      for (std::int64_t j = 0; j < p_.k_len; ++j) {
        const auto J = static_cast<std::size_t>(j);
        weights_[J] = visible_[J] ? 1.0 / (1.0 + std::exp(-(scores_[J] + p_.sigmoid_bias))) : 0.0;
        total += weights_[J];
      }
      if (saved_) return saved_lse_.data<double>()[(b * p_.q_heads + h) * p_.q_len + i];
      return total > 0 ? std::log(total) : -std::numeric_limits<double>::infinity();
    }
    // A sink: one more column of the softmax, with a logit and no value.
    const double sink = Sink(h);
    row_max = std::max(row_max, sink);
    if (row_max == -std::numeric_limits<double>::infinity()) return row_max;
    double denominator = 0.0;
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      if (visible_[static_cast<std::size_t>(j)])
        denominator += std::exp(scores_[static_cast<std::size_t>(j)] - row_max);
    }
    if (sink != -std::numeric_limits<double>::infinity()) denominator += std::exp(sink - row_max);
    const double lse = saved_ ? saved_lse_.data<double>()[(b * p_.q_heads + h) * p_.q_len + i]
                              : row_max + std::log(denominator);
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      const auto J = static_cast<std::size_t>(j);
      weights_[J] = visible_[J] && std::isfinite(lse) ? std::exp(scores_[J] - lse) : 0.0;
    }
    return lse;
  }

  // Row i's share of every gradient, from the intermediates of RecomputeRow and its LSE.
  void DifferentiateRow(std::int64_t b, std::int64_t h, std::int64_t i, double lse) {
    const std::int64_t hk = p_.kv_head(h);
    // O_i = Σ_j P_ij M_ij V_j, with M_ij the dropout factor (1 without dropout)
    //   →  dV_j += P_ij M_ij dO_i,  dP_ij = M_ij (dO_i · V_j).
    double delta = 0.0;  // Δ_i = Σ_j P_ij dP_ij
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      const auto J = static_cast<std::size_t>(j);
      d_weights_[J] = 0.0;
      if (weights_[J] == 0.0) continue;
      const double factor = dropout_.active() ? dropout_.factor(b, h, i, j) : 1.0;
      for (std::int64_t d = 0; d < p_.v_dim; ++d) {
        const double d_out_value = d_out_.load(b, i, h, d);
        grad_v_.add(weights_[J] * factor * d_out_value, b, j, hk, d);
        d_weights_[J] += factor * d_out_value * p_.v.load(b, j, hk, d);
      }
      delta += weights_[J] * d_weights_[J];
    }
    if (saved_) {  // Δ_i = dO_i · O_i over the whole problem, not this block
      delta = 0.0;
      for (std::int64_t d = 0; d < p_.v_dim; ++d) {
        delta += d_out_.load(b, i, h, d) *
                 saved_out_.data<double>()[((b * p_.q_len + i) * p_.q_heads + h) * p_.v_dim + d];
      }
    }
    const double d_lse =
        has_dlse_ ? dlse64_.data<double>()[(b * p_.q_heads + h) * p_.q_len + i] : 0.0;
    // The sink's column: P_sink = exp(sink − LSE), dP_sink = 0 (no value)  →
    // dsink += P_sink (0 − Δ_i + dLSE_i).
    if (p_.sinks.present) grad_sinks_.add(std::exp(Sink(h) - lse) * (d_lse - delta), h);
    for (std::int64_t j = 0; j < p_.k_len; ++j) {
      const auto J = static_cast<std::size_t>(j);
      if (weights_[J] == 0.0) continue;
      // P_ij = exp(s_ij − LSE_i), LSE_i = log Σ exp(s_ij)  →  dS_ij = P_ij (dP_ij − Δ_i + dLSE_i).
      // Sigmoid: P_ij = σ(s_ij + b), LSE_i = log Σ P_ij  →  dS_ij = σ'·(dP_ij + dLSE_i e^−LSE_i),
      // σ' = P_ij (1 − P_ij).
      double d_score =
          p_.sigmoid ? weights_[J] * (1.0 - weights_[J]) * (d_weights_[J] + d_lse * std::exp(-lse))
                     : weights_[J] * (d_weights_[J] - delta + d_lse);
      // s = score_mod(u)  →  du = dS ∂score_mod/∂u (dual numbers), and its parameters'.
      if (p_.score_mod != nullptr) {
        p_.score_mod->backward(p_.score_mod_row(b, h, i, j, 1), &unmodified_[J], &d_score,
                               score_mod_gradients_.arrays());
      }
      // s += bias  →  dbias += dS.
      grad_bias_.add(d_score, b, h, i, j);
      // s = c·tanh(u / c)  →  du = dS (1 − tanh²(u / c));  u = scale·raw  →  draw = scale·du.
      double d_scaled = d_score;
      if (p_.softcap > 0) {
        const double t = std::tanh(scaled_[J] / p_.softcap);
        d_scaled *= 1.0 - t * t;
      }
      AddScoreGradients(b, h, i, j, p_.scale * d_scaled);
    }
  }

  // ∂L/∂raw of pair (i, j) into q, k and the score's parameters: each score's chain rule.
  void AddScoreGradients(std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t j,
                         double d_raw) {
    const std::int64_t hk = p_.kv_head(h), A = p_.additive_dim;
    switch (p_.score) {
      case Score::dot:
      case Score::scaled_dot:  // raw = q·k
        for (std::int64_t d = 0; d < p_.q_dim; ++d) {
          grad_q_.add(d_raw * p_.k.load(b, j, hk, d), b, i, h, d);
          grad_k_.add(d_raw * p_.q.load(b, i, h, d), b, j, hk, d);
        }
        return;
      case Score::bilinear:  // raw = qᵀ W k = Σ_dc q_d W_dc k_c
        for (std::int64_t d = 0; d < p_.q_dim; ++d) {
          double w_k = 0.0;
          for (std::int64_t c = 0; c < p_.k_dim; ++c) {
            w_k += p_.w.load(h, d, c) * p_.k.load(b, j, hk, c);
            grad_w_.add(d_raw * p_.q.load(b, i, h, d) * p_.k.load(b, j, hk, c), h, d, c);
          }
          grad_q_.add(d_raw * w_k, b, i, h, d);
        }
        for (std::int64_t c = 0; c < p_.k_dim; ++c)
          grad_k_.add(d_raw * projected_q_[static_cast<std::size_t>(c)], b, j, hk, c);
        return;
      case Score::additive:  // raw = Σ_a va_a tanh(Wq q + Wk k)_a
        for (std::int64_t a = 0; a < A; ++a) {
          const double t = std::tanh(projected_q_[static_cast<std::size_t>(a)] +
                                     projected_k_[static_cast<std::size_t>(j * A + a)]);
          grad_va_.add(d_raw * t, h, a);
          const double d_pre = d_raw * p_.va.load(h, a) * (1.0 - t * t);
          for (std::int64_t d = 0; d < p_.q_dim; ++d) {
            grad_wq_.add(d_pre * p_.q.load(b, i, h, d), h, a, d);
            grad_q_.add(d_pre * p_.wq.load(h, a, d), b, i, h, d);
          }
          for (std::int64_t d = 0; d < p_.k_dim; ++d) {
            grad_wk_.add(d_pre * p_.k.load(b, j, hk, d), h, a, d);
            grad_k_.add(d_pre * p_.wk.load(h, a, d), b, j, hk, d);
          }
        }
        return;
      case Score::cosine: {
        // raw = τ c, c = q·k / (|q||k|):  dτ += draw·c,  dq = draw·τ (k/(|q||k|) − c q/|q|²),
        // dk = draw·τ (q/(|q||k|) − c k/|k|²); nothing through a zero vector.
        const double q_norm = norm_of(p_.q, b, i, h, p_.q_dim);
        const double k_norm = norm_of(p_.k, b, j, hk, p_.k_dim);
        if (q_norm == 0 || k_norm == 0) return;
        double dot = 0.0;
        for (std::int64_t d = 0; d < p_.q_dim; ++d)
          dot += p_.q.load(b, i, h, d) * p_.k.load(b, j, hk, d);
        const double tau = Temperature(h), cosine = dot / (q_norm * k_norm);
        grad_temperature_.add(d_raw * cosine, h);
        for (std::int64_t d = 0; d < p_.q_dim; ++d) {
          const double q_d = p_.q.load(b, i, h, d), k_d = p_.k.load(b, j, hk, d);
          grad_q_.add(d_raw * tau * (k_d / (q_norm * k_norm) - cosine * q_d / (q_norm * q_norm)), b,
                      i, h, d);
          grad_k_.add(d_raw * tau * (q_d / (q_norm * k_norm) - cosine * k_d / (k_norm * k_norm)), b,
                      j, hk, d);
        }
        return;
      }
    }
  }

  // The requested gradients, rounded to their views' dtypes.
  void Write() const {
    const std::pair<const std::optional<MutableTensorView>*, const Gradient*> outputs[] = {
        {&gradients_.dq, &grad_q_},
        {&gradients_.dk, &grad_k_},
        {&gradients_.dv, &grad_v_},
        {&gradients_.dw, &grad_w_},
        {&gradients_.dwq, &grad_wq_},
        {&gradients_.dwk, &grad_wk_},
        {&gradients_.dva, &grad_va_},
        {&gradients_.dbias, &grad_bias_},
        {&gradients_.dtemperature, &grad_temperature_},
        {&gradients_.dsinks, &grad_sinks_}};
    for (const auto& [target, gradient] : outputs) {
      if (*target) detail::store_dense(gradient->values.data(), **target);
    }
    score_mod_gradients_.store();
  }

  const Tensor q64_, k64_, v64_, dout64_, dlse64_;
  // A block of a larger problem (see attention_backward): the whole problem's O and LSE.
  const Tensor saved_out_, saved_lse_;
  const bool saved_, has_dlse_;
  std::vector<Tensor> keep_;  // the dense copies of the options' tensors
  const AttentionOptions dense_;
  Tensor out64_;
  const AttentionProblem p_;
  const AttentionGradients& gradients_;
  const detail::DropoutMask dropout_;
  StridedInput d_out_;
  Gradient grad_q_, grad_k_, grad_v_, grad_w_, grad_wq_, grad_wk_, grad_va_, grad_bias_,
      grad_temperature_, grad_sinks_;
  detail::ScoreModGradients score_mod_gradients_;
  // One row's intermediates, and the score's projections.
  std::vector<double> raw_, scaled_, unmodified_, scores_, weights_, d_weights_;
  std::vector<char> visible_;
  std::vector<double> projected_q_, projected_k_;
};

}  // namespace

void detail::backward_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                                const AttentionOptions& options, const TensorView& dout,
                                const std::optional<TensorView>& dlse,
                                const AttentionGradients& gradients,
                                const std::optional<SavedForward>& saved) {
  detail::check_backward_arguments(q, k, v, options, dout, dlse, gradients);
  LiteralBackward(q, k, v, options, dout, dlse, gradients, saved).Run();
}

}  // namespace qkv
