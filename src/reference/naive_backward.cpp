// The float64 oracle of the backward pass.
//
// Every input is first copied densely into float64, and the forward problem is built on those
// copies: each operand's four-index view then has dense strides, with stride 0 where it is
// broadcast (bias) or shared across heads (W, Wq, Wk, va). A gradient is accumulated in a float64
// buffer the size of its primal, at the primal's own offset for each index: shared and broadcast
// dimensions sum by themselves. Then, per (batch, head, query row), the forward is recomputed
// literally and differentiated step by step, each step quoting the forward line it undoes.

#include <fmt/format.h>

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

void detail::backward_reference(const TensorView& q, const TensorView& k, const TensorView& v,
                                const AttentionOptions& options, const TensorView& dout,
                                const std::optional<TensorView>& dlse,
                                const AttentionGradients& gradients,
                                const std::optional<SavedForward>& saved) {
  // 1. Validate.
  detail::check_backward_arguments(q, k, v, options, dout, dlse, gradients);
  const std::array<std::int64_t, 4> out_shape{q.shape[0], q.shape[1], q.shape[2], v.shape[3]};

  // 2. Dense float64 copies, and the problem built on them.
  const Tensor q64 = detail::dense_copy(q), k64 = detail::dense_copy(k),
               v64 = detail::dense_copy(v);
  const Tensor dout64 = detail::dense_copy(dout);
  const Tensor dlse64 = dlse ? detail::dense_copy(*dlse) : Tensor();
  // A block of a larger problem (see attention_backward): the whole problem's O and LSE.
  const Tensor saved_out = saved ? detail::dense_copy(saved->out) : Tensor();
  const Tensor saved_lse = saved ? detail::dense_copy(saved->lse) : Tensor();
  AttentionOptions dense = options;
  std::vector<Tensor> keep;
  for (std::optional<TensorView>* slot :
       {&dense.w, &dense.wq, &dense.wk, &dense.va, &dense.temperature, &dense.alibi_slopes,
        &dense.bias, &dense.key_lengths, &dense.mask}) {
    if (*slot) {
      keep.push_back(detail::dense_copy(**slot));
      *slot = keep.back().view();
    }
  }
  Tensor out64(DType::float64, {out_shape[0], out_shape[1], out_shape[2], out_shape[3]});
  const AttentionProblem p = detail::make_problem(q64.view(), k64.view(), v64.view(), dense,
                                                  {out64.mutable_view(), {}, {}});
  const StridedInput d_out = [&] {
    StridedInput input;
    input.data = static_cast<const std::byte*>(dout64.raw());
    input.dtype = DType::float64;
    input.present = true;
    const TensorView view = dout64.view();
    for (int d = 0; d < 4; ++d) input.strides[d] = view.strides[d];
    return input;
  }();
  const auto d_lse = [&](std::int64_t b, std::int64_t h, std::int64_t i) {
    return dlse ? dlse64.data<double>()[(b * p.q_heads + h) * p.q_len + i] : 0.0;
  };
  const auto size_of = [](const std::optional<TensorView>& view) {
    return view ? view->numel() : std::int64_t{0};
  };
  Gradient grad_q(p.q, q64.numel(), gradients.dq.has_value());
  Gradient grad_k(p.k, k64.numel(), gradients.dk.has_value());
  Gradient grad_v(p.v, v64.numel(), gradients.dv.has_value());
  Gradient grad_w(p.w, size_of(dense.w), gradients.dw.has_value());
  Gradient grad_wq(p.wq, size_of(dense.wq), gradients.dwq.has_value());
  Gradient grad_wk(p.wk, size_of(dense.wk), gradients.dwk.has_value());
  Gradient grad_va(p.va, size_of(dense.va), gradients.dva.has_value());
  Gradient grad_bias(p.bias, size_of(dense.bias), gradients.dbias.has_value());
  Gradient grad_temperature(p.temperature, size_of(dense.temperature),
                            gradients.dtemperature.has_value());
  const auto temperature = [&p](std::int64_t h) {
    return p.temperature.present ? p.temperature.load(h) : 1.0;
  };

  // 3. Per row: recompute, then differentiate.
  const detail::DropoutMask dropout(p);
  const std::int64_t A = p.additive_dim;
  std::vector<double> raw(static_cast<std::size_t>(p.k_len)), scaled(raw.size()),
      unmodified(raw.size()), scores(raw.size()), weights(raw.size()), d_weights(raw.size());
  detail::ScoreModGradients score_mod_gradients(p.score_mod, gradients.dscore_mod);
  std::vector<char> visible(raw.size());
  std::vector<double> projected_q,
      projected_k;  // bilinear: Wᵀq [Dk]; additive: Wq q [A], Wk k [Nk, A]
  for (std::int64_t b = 0; b < p.batch; ++b) {
    for (std::int64_t h = 0; h < p.q_heads; ++h) {
      const std::int64_t hk = p.kv_head(h);
      if (p.score == Score::additive) {
        projected_k.assign(static_cast<std::size_t>(p.k_len * A), 0.0);
        for (std::int64_t j = 0; j < p.k_len; ++j)
          for (std::int64_t a = 0; a < A; ++a)
            for (std::int64_t d = 0; d < p.k_dim; ++d)
              projected_k[static_cast<std::size_t>(j * A + a)] +=
                  p.wk.load(h, a, d) * p.k.load(b, j, hk, d);
      }
      for (std::int64_t i = 0; i < p.q_len; ++i) {
        if (p.score == Score::bilinear) {
          projected_q.assign(static_cast<std::size_t>(p.k_dim), 0.0);
          for (std::int64_t c = 0; c < p.k_dim; ++c)
            for (std::int64_t d = 0; d < p.q_dim; ++d)
              projected_q[static_cast<std::size_t>(c)] += p.q.load(b, i, h, d) * p.w.load(h, d, c);
        } else if (p.score == Score::additive) {
          projected_q.assign(static_cast<std::size_t>(A), 0.0);
          for (std::int64_t a = 0; a < A; ++a)
            for (std::int64_t d = 0; d < p.q_dim; ++d)
              projected_q[static_cast<std::size_t>(a)] += p.wq.load(h, a, d) * p.q.load(b, i, h, d);
        }
        // Forward, keeping every intermediate.
        double row_max = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          const auto J = static_cast<std::size_t>(j);
          double r = 0.0;
          if (p.score == Score::additive) {
            for (std::int64_t a = 0; a < A; ++a) {
              r += p.va.load(h, a) * std::tanh(projected_q[static_cast<std::size_t>(a)] +
                                               projected_k[static_cast<std::size_t>(j * A + a)]);
            }
          } else {
            for (std::int64_t d = 0; d < p.k_dim; ++d) {
              const double left = p.score == Score::bilinear
                                      ? projected_q[static_cast<std::size_t>(d)]
                                      : p.q.load(b, i, h, d);
              r += left * p.k.load(b, j, hk, d);
            }
          }
          if (p.score == Score::cosine) {  // r = τ[h]·(q·k)/(|q||k|), 0 for a zero vector
            const double norms = norm_of(p.q, b, i, h, p.q_dim) * norm_of(p.k, b, j, hk, p.k_dim);
            r = norms > 0 ? temperature(h) * r / norms : 0.0;
          }
          raw[J] = r;
          scaled[J] = p.scale * r;
          double s = p.softcap > 0 ? p.softcap * std::tanh(scaled[J] / p.softcap) : scaled[J];
          if (p.alibi_slopes.present) {
            s -= p.alibi_slopes.load(b, h) * static_cast<double>(std::llabs(i + p.diagonal() - j));
          }
          if (p.bias.present) s += p.bias.load(b, h, i, j);
          unmodified[J] = s;
          if (p.score_mod != nullptr) p.score_mod->forward(p.score_mod_row(b, h, i, j, 1), &s);
          scores[J] = s;
          const bool seen = key_visible(p, b, h, i, j);
          visible[J] = seen ? 1 : 0;
          if (seen && s > row_max) row_max = s;
        }
        if (row_max == -std::numeric_limits<double>::infinity()) continue;  // no key: no gradient
        double denominator = 0.0;
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          if (visible[static_cast<std::size_t>(j)])
            denominator += std::exp(scores[static_cast<std::size_t>(j)] - row_max);
        }
        const double lse = saved ? saved_lse.data<double>()[(b * p.q_heads + h) * p.q_len + i]
                                 : row_max + std::log(denominator);
        if (lse == -std::numeric_limits<double>::infinity()) continue;
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          const auto J = static_cast<std::size_t>(j);
          weights[J] = visible[J] ? std::exp(scores[J] - lse) : 0.0;
        }

        // O_i = Σ_j P_ij M_ij V_j, with M_ij the dropout factor (1 without dropout)
        //   →  dV_j += P_ij M_ij dO_i,  dP_ij = M_ij (dO_i · V_j).
        double delta = 0.0;  // Δ_i = Σ_j P_ij dP_ij
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          const auto J = static_cast<std::size_t>(j);
          d_weights[J] = 0.0;
          if (weights[J] == 0.0) continue;
          const double factor = dropout.active() ? dropout.factor(b, h, i, j) : 1.0;
          for (std::int64_t d = 0; d < p.v_dim; ++d) {
            const double d_out_value = d_out.load(b, i, h, d);
            grad_v.add(weights[J] * factor * d_out_value, b, j, hk, d);
            d_weights[J] += factor * d_out_value * p.v.load(b, j, hk, d);
          }
          delta += weights[J] * d_weights[J];
        }
        if (saved) {  // Δ_i = dO_i · O_i over the whole problem, not this block
          delta = 0.0;
          for (std::int64_t d = 0; d < p.v_dim; ++d) {
            delta += d_out.load(b, i, h, d) *
                     saved_out.data<double>()[((b * p.q_len + i) * p.q_heads + h) * p.v_dim + d];
          }
        }
        const double d_lse_value = d_lse(b, h, i);
        for (std::int64_t j = 0; j < p.k_len; ++j) {
          const auto J = static_cast<std::size_t>(j);
          if (weights[J] == 0.0) continue;
          // P_ij = exp(s_ij − LSE_i), LSE_i = log Σ exp(s_ij)  →  dS_ij = P_ij (dP_ij − Δ_i +
          // dLSE_i).
          double d_score = weights[J] * (d_weights[J] - delta + d_lse_value);
          // s = score_mod(u)  →  du = dS ∂score_mod/∂u (dual numbers), and its parameters'.
          if (p.score_mod != nullptr) {
            p.score_mod->backward(p.score_mod_row(b, h, i, j, 1), &unmodified[J], &d_score,
                                  score_mod_gradients.arrays());
          }
          // s += bias  →  dbias += dS.
          grad_bias.add(d_score, b, h, i, j);
          // s = c·tanh(u / c)  →  du = dS (1 − tanh²(u / c));  u = scale·raw  →  draw = scale·du.
          double d_scaled = d_score;
          if (p.softcap > 0) {
            const double t = std::tanh(scaled[J] / p.softcap);
            d_scaled *= 1.0 - t * t;
          }
          const double d_raw = p.scale * d_scaled;
          if (p.score == Score::cosine) {
            // raw = τ c, c = q·k / (|q||k|):  dτ += draw·c,  dq = draw·τ (k/(|q||k|) − c q/|q|²),
            // dk = draw·τ (q/(|q||k|) − c k/|k|²); nothing through a zero vector.
            const double q_norm = norm_of(p.q, b, i, h, p.q_dim);
            const double k_norm = norm_of(p.k, b, j, hk, p.k_dim);
            if (q_norm > 0 && k_norm > 0) {
              double dot = 0.0;
              for (std::int64_t d = 0; d < p.q_dim; ++d)
                dot += p.q.load(b, i, h, d) * p.k.load(b, j, hk, d);
              const double tau = temperature(h), cosine = dot / (q_norm * k_norm);
              grad_temperature.add(d_raw * cosine, h);
              for (std::int64_t d = 0; d < p.q_dim; ++d) {
                const double q_d = p.q.load(b, i, h, d), k_d = p.k.load(b, j, hk, d);
                grad_q.add(
                    d_raw * tau * (k_d / (q_norm * k_norm) - cosine * q_d / (q_norm * q_norm)), b,
                    i, h, d);
                grad_k.add(
                    d_raw * tau * (q_d / (q_norm * k_norm) - cosine * k_d / (k_norm * k_norm)), b,
                    j, hk, d);
              }
            }
          } else if (p.score == Score::dot || p.score == Score::scaled_dot) {
            // raw = q·k
            for (std::int64_t d = 0; d < p.q_dim; ++d) {
              grad_q.add(d_raw * p.k.load(b, j, hk, d), b, i, h, d);
              grad_k.add(d_raw * p.q.load(b, i, h, d), b, j, hk, d);
            }
          } else if (p.score == Score::bilinear) {
            // raw = qᵀ W k = Σ_dc q_d W_dc k_c
            for (std::int64_t d = 0; d < p.q_dim; ++d) {
              double w_k = 0.0;
              for (std::int64_t c = 0; c < p.k_dim; ++c) {
                w_k += p.w.load(h, d, c) * p.k.load(b, j, hk, c);
                grad_w.add(d_raw * p.q.load(b, i, h, d) * p.k.load(b, j, hk, c), h, d, c);
              }
              grad_q.add(d_raw * w_k, b, i, h, d);
            }
            for (std::int64_t c = 0; c < p.k_dim; ++c) {
              grad_k.add(d_raw * projected_q[static_cast<std::size_t>(c)], b, j, hk, c);
            }
          } else {
            // raw = Σ_a va_a tanh(Wq q + Wk k)_a
            for (std::int64_t a = 0; a < A; ++a) {
              const double t = std::tanh(projected_q[static_cast<std::size_t>(a)] +
                                         projected_k[static_cast<std::size_t>(j * A + a)]);
              grad_va.add(d_raw * t, h, a);
              const double d_pre = d_raw * p.va.load(h, a) * (1.0 - t * t);
              for (std::int64_t d = 0; d < p.q_dim; ++d) {
                grad_wq.add(d_pre * p.q.load(b, i, h, d), h, a, d);
                grad_q.add(d_pre * p.wq.load(h, a, d), b, i, h, d);
              }
              for (std::int64_t d = 0; d < p.k_dim; ++d) {
                grad_wk.add(d_pre * p.k.load(b, j, hk, d), h, a, d);
                grad_k.add(d_pre * p.wk.load(h, a, d), b, j, hk, d);
              }
            }
          }
        }
      }
    }
  }

  // 4. Write the requested gradients.
  const std::pair<const std::optional<MutableTensorView>*, const Gradient*> outputs[] = {
      {&gradients.dq, &grad_q},
      {&gradients.dk, &grad_k},
      {&gradients.dv, &grad_v},
      {&gradients.dw, &grad_w},
      {&gradients.dwq, &grad_wq},
      {&gradients.dwk, &grad_wk},
      {&gradients.dva, &grad_va},
      {&gradients.dbias, &grad_bias},
      {&gradients.dtemperature, &grad_temperature}};
  for (const auto& [target, gradient] : outputs) {
    if (*target) detail::store_dense(gradient->values.data(), **target);
  }
  score_mod_gradients.store();
}

}  // namespace qkv
