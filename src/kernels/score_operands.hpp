// The compared vectors of a problem's score, as every kernel prepares them: one place that applies
// a score unit's RowTransforms (core/score_unit.hpp) to query and key rows, forward and backward.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

#include "core/score_unit.hpp"
#include "kernels/operands.hpp"

namespace qkv::kernels {

// A RowTransform ready for rows in double: its matrix copied densely once ([heads, out, in], one
// copy when shared), its factor read per head.
class RowTransformer {
 public:
  RowTransformer(const detail::RowTransform& transform, std::int64_t heads)
      : t_(transform),
        heads_(transform.matrix != nullptr && transform.matrix->strides[0] != 0 ? heads : 1) {
    if (t_.matrix == nullptr) return;
    matrix_.resize(static_cast<std::size_t>(heads_ * t_.out_dim * t_.in_dim));
    for (std::int64_t h = 0; h < heads_; ++h)
      for (std::int64_t r = 0; r < t_.out_dim; ++r)
        for (std::int64_t c = 0; c < t_.in_dim; ++c)
          matrix_[static_cast<std::size_t>((h * t_.out_dim + r) * t_.in_dim + c)] =
              t_.transposed ? t_.matrix->load(h, c, r) : t_.matrix->load(h, r, c);
  }

  bool identity() const { return t_.identity(); }
  std::int64_t in_dim() const { return t_.in_dim; }
  std::int64_t out_dim() const { return t_.out_dim; }

  // out = the transform of `in` for head h.
  void apply(std::int64_t h, const double* in, double* out) const {
    Linear(h, in, out);
    if (t_.normalize) {
      const double norm = Norm(out);
      for (std::int64_t r = 0; r < t_.out_dim; ++r) out[r] = norm > 0 ? out[r] / norm : 0.0;
    }
    if (t_.factor != nullptr) {
      const double factor = t_.factor->load(h);
      for (std::int64_t r = 0; r < t_.out_dim; ++r) out[r] *= factor;
    }
  }

  // d_in = ∂L/∂in from d_out = ∂L/∂out for head h; returns ∂L/∂factor[h] of this row. (With a
  // matrix, the matrix's gradient is Σ d_out ⊗ in over the rows, which the caller sums.)
  double backward(std::int64_t h, const double* in, const double* d_out, double* d_in) const {
    std::vector<double> y(static_cast<std::size_t>(t_.out_dim)), d_y(y.size());
    Linear(h, in, y.data());
    const double norm = t_.normalize ? Norm(y.data()) : 1.0;
    const double factor = t_.factor != nullptr ? t_.factor->load(h) : 1.0;
    double d_factor = 0.0, along = 0.0;  // along: d_z · z, z = y / |y|
    for (std::int64_t r = 0; r < t_.out_dim; ++r) {
      const auto R = static_cast<std::size_t>(r);
      const double z = norm > 0 ? y[R] / norm : 0.0;
      d_factor += d_out[r] * z;
      d_y[R] = factor * d_out[r];
      along += d_y[R] * z;
    }
    if (t_.normalize) {  // z = y / |y|  →  d_y = (d_z − (d_z·z) z) / |y|
      for (std::int64_t r = 0; r < t_.out_dim; ++r) {
        const auto R = static_cast<std::size_t>(r);
        d_y[R] = norm > 0 ? (d_y[R] - along * y[R] / norm) / norm : 0.0;
      }
    }
    if (t_.matrix == nullptr) {
      for (std::int64_t c = 0; c < t_.in_dim; ++c) d_in[c] = d_y[static_cast<std::size_t>(c)];
    } else {
      for (std::int64_t c = 0; c < t_.in_dim; ++c) d_in[c] = 0.0;
      for (std::int64_t r = 0; r < t_.out_dim; ++r) {
        const double* row = Row(h, r);
        for (std::int64_t c = 0; c < t_.in_dim; ++c)
          d_in[c] += row[c] * d_y[static_cast<std::size_t>(r)];
      }
    }
    return t_.factor != nullptr ? d_factor : 0.0;
  }

 private:
  const double* Row(std::int64_t h, std::int64_t r) const {
    return matrix_.data() + ((heads_ == 1 ? 0 : h) * t_.out_dim + r) * t_.in_dim;
  }
  void Linear(std::int64_t h, const double* in, double* out) const {
    if (t_.matrix == nullptr) {
      for (std::int64_t r = 0; r < t_.out_dim; ++r) out[r] = in[r];
      return;
    }
    for (std::int64_t r = 0; r < t_.out_dim; ++r) {
      const double* row = Row(h, r);
      double sum = 0.0;
      for (std::int64_t c = 0; c < t_.in_dim; ++c) sum += row[c] * in[c];
      out[r] = sum;
    }
  }
  double Norm(const double* values) const {
    double sum = 0.0;
    for (std::int64_t r = 0; r < t_.out_dim; ++r) sum += values[r] * values[r];
    return std::sqrt(sum);
  }

  detail::RowTransform t_;
  std::int64_t heads_;
  std::vector<double> matrix_;
};

// result[b, n, h, :] = transform(input[b, n, source_head(h), :]) for `heads` heads, in T.
template <class T, class SourceHead>
void transform_rows(RowMajorOperand<T>& result, const StridedInput& input,
                    const RowTransformer& transform, std::int64_t batch, std::int64_t length,
                    std::int64_t heads, SourceHead source_head, int threads) {
  const std::int64_t in_dim = transform.in_dim(), out_dim = transform.out_dim();
  result.storage.assign(static_cast<std::size_t>(batch * length * heads * out_dim), T{0});
  result.stride_h = out_dim;
  result.stride_n = heads * out_dim;
  result.stride_b = length * heads * out_dim;
  result.data = result.storage.data();
  parallel_for(threads, batch * length, [&](std::int64_t row) {
    const std::int64_t b = row / length, n = row % length;
    std::vector<double> in(static_cast<std::size_t>(in_dim)),
        out(static_cast<std::size_t>(out_dim));
    for (std::int64_t h = 0; h < heads; ++h) {
      for (std::int64_t c = 0; c < in_dim; ++c)
        in[static_cast<std::size_t>(c)] = input.load(b, n, source_head(h), c);
      transform.apply(h, in.data(), out.data());
      T* y = result.storage.data() + b * result.stride_b + n * result.stride_n + h * out_dim;
      for (std::int64_t r = 0; r < out_dim; ++r)
        y[r] = static_cast<T>(out[static_cast<std::size_t>(r)]);
    }
  });
}

// The compared vectors of a problem in the compute type T: q' [B, Nq, Hq, dim] and k'
// [B, Nk, key_heads, dim] (the caller's storage when a transform is the identity and the layout
// allows), and for the additive form v[h, a] times the scale.
template <class T>
struct ComparedVectors {
  RowMajorOperand<T> q, k;
  std::int64_t dim = 0;
  std::int64_t key_heads = 0;  // Hk, or Hq when keys are transformed per query head
  bool additive = false;
  std::vector<T> additive_v;  // [Hq, A]: scale·v
};

// Fills q' (unless skip_queries) and k' (unless skip_keys: a kernel that keeps them in another
// type) for problem p, whose score's unit gave `operands`.
template <class T>
ComparedVectors<T> compared_vectors(const AttentionProblem& p,
                                    const detail::ScoreOperands& operands, int threads,
                                    bool skip_queries = false, bool skip_keys = false) {
  ComparedVectors<T> vectors;
  vectors.dim = operands.dim;
  vectors.additive = operands.form == detail::ScoreForm::additive;
  vectors.key_heads = operands.keys_per_query_head ? p.q_heads : p.kv_heads;
  const auto same = [](std::int64_t h) { return h; };
  if (!skip_queries) {
    const RowTransformer transform(operands.query, p.q_heads);
    if (transform.identity()) {
      adopt_or_pack(vectors.q, p.q, p.batch, p.q_len, p.q_heads, p.q_dim);
    } else {
      transform_rows(vectors.q, p.q, transform, p.batch, p.q_len, p.q_heads, same, threads);
    }
  }
  if (!skip_keys) {
    const RowTransformer transform(operands.key, p.q_heads);
    const std::int64_t group = operands.keys_per_query_head ? p.group_size : 1;
    if (transform.identity()) {
      adopt_or_pack(vectors.k, p.k, p.batch, p.k_len, p.kv_heads, p.k_dim);
    } else {
      transform_rows(
          vectors.k, p.k, transform, p.batch, p.k_len, vectors.key_heads,
          [group](std::int64_t h) { return h / group; }, threads);
    }
  }
  if (vectors.additive) {
    vectors.additive_v.resize(static_cast<std::size_t>(p.q_heads * operands.dim));
    for (std::int64_t h = 0; h < p.q_heads; ++h)
      for (std::int64_t a = 0; a < operands.dim; ++a)
        vectors.additive_v[static_cast<std::size_t>(h * operands.dim + a)] =
            static_cast<T>(p.scale * operands.additive_v->load(h, a));
  }
  return vectors;
}

// Whether a dot-form score compares the keys as they are (a kernel may then keep them bfloat16).
inline bool keys_as_they_are(const detail::ScoreOperands& operands) {
  return operands.form == detail::ScoreForm::dot && operands.key.identity();
}

}  // namespace qkv::kernels
