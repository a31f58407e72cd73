// Programmable scores: FlexAttention's score_mod in C++, evaluated inside the fused forward and the
// fused backward, with its derivative obtained by automatic differentiation (docs/programmable.md).
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "qkv/tensor.hpp"

namespace qkv {

// A number and its derivative along one direction (forward-mode automatic differentiation): how
// attention_backward gets ∂score_mod/∂score, and ∂score_mod/∂parameter, from the score_mod alone.
// A double converts to a Dual with derivative 0, so constants mix freely.
struct Dual {
  double value = 0.0, tangent = 0.0;
  Dual() = default;
  Dual(double v, double t = 0.0) : value(v), tangent(t) {}  // NOLINT: implicit on purpose
};

inline Dual operator+(Dual a, Dual b) {
  return {a.value + b.value, a.tangent + b.tangent};
}
inline Dual operator-(Dual a, Dual b) {
  return {a.value - b.value, a.tangent - b.tangent};
}
inline Dual operator-(Dual a) {
  return {-a.value, -a.tangent};
}
inline Dual operator*(Dual a, Dual b) {
  return {a.value * b.value, a.tangent * b.value + a.value * b.tangent};
}
inline Dual operator/(Dual a, Dual b) {
  return {a.value / b.value, (a.tangent * b.value - a.value * b.tangent) / (b.value * b.value)};
}
inline bool operator<(Dual a, Dual b) {
  return a.value < b.value;
}
inline bool operator>(Dual a, Dual b) {
  return a.value > b.value;
}
inline bool operator<=(Dual a, Dual b) {
  return a.value <= b.value;
}
inline bool operator>=(Dual a, Dual b) {
  return a.value >= b.value;
}

// Functions of a score for score_mods (qkv::tanh(score) and so on; they take Dual and double).
inline Dual exp(Dual a) {
  const double e = std::exp(a.value);
  return {e, a.tangent * e};
}
inline Dual log(Dual a) {
  return {std::log(a.value), a.tangent / a.value};
}
inline Dual tanh(Dual a) {
  const double t = std::tanh(a.value);
  return {t, a.tangent * (1.0 - t * t)};
}
inline Dual sqrt(Dual a) {
  const double r = std::sqrt(a.value);
  return {r, a.tangent / (2.0 * r)};
}
inline Dual abs(Dual a) {
  return {std::fabs(a.value), a.value < 0 ? -a.tangent : a.tangent};
}
inline Dual sigmoid(Dual a) {
  const double s = 1.0 / (1.0 + std::exp(-a.value));
  return {s, a.tangent * s * (1.0 - s)};
}
inline Dual min(Dual a, Dual b) {
  return b.value < a.value ? b : a;
}
inline Dual max(Dual a, Dual b) {
  return b.value > a.value ? b : a;
}

// A tensor a score_mod reads — a learned bias table, per-head slopes — of float32, float64 or
// bfloat16 values, any shape of rank 1 to 4, read by index: table(h, q_idx - kv_idx + n).
// attention_backward computes ∂L/∂values where AttentionGradients::dscore_mod asks for it. A read
// past the shape gives NaN. The values must outlive the calls; a parameter belongs to one
// ScoreMod, which numbers it. Throws qkv::Error for another dtype or rank.
class ScoreParameter {
 public:
  explicit ScoreParameter(const TensorView& values);

  Dual operator()(std::int64_t i0, std::int64_t i1 = 0, std::int64_t i2 = 0,
                  std::int64_t i3 = 0) const;  // below, after the tape

  const TensorView& values() const { return values_; }

 private:
  friend class ScoreMod;
  TensorView values_;
  mutable int id_ = -1;  // its place in the ScoreMod's list
};

namespace detail {

// While attention_backward differentiates a score_mod with respect to its parameters, the reads
// of ScoreParameters are counted and one of them is seeded (its Dual derivative 1): the tape of
// the evaluating thread. None (nullptr) outside that.
struct ScoreModTape {
  int reads = 0;              // reads so far in this evaluation
  int seed = -1;              // the read seeded in this evaluation (-1: none)
  int seeded_parameter = -1;  // which parameter and element that read was
  std::int64_t seeded_element = 0;
};
inline thread_local ScoreModTape* score_mod_tape = nullptr;

// Points the thread's tape at `tape` for its lifetime (also when the score_mod throws).
class TapeInUse {
 public:
  explicit TapeInUse(ScoreModTape& tape) { score_mod_tape = &tape; }
  TapeInUse(const TapeInUse&) = delete;
  TapeInUse& operator=(const TapeInUse&) = delete;
  ~TapeInUse() { score_mod_tape = nullptr; }
};

}  // namespace detail

inline Dual ScoreParameter::operator()(std::int64_t i0, std::int64_t i1, std::int64_t i2,
                                       std::int64_t i3) const {
  const std::int64_t index[kMaxRank] = {i0, i1, i2, i3};
  std::int64_t offset = 0, element = 0;
  for (int d = 0; d < values_.rank; ++d) {
    if (index[d] < 0 || index[d] >= values_.shape[d]) return Dual(std::nan(""));
    offset += index[d] * values_.strides[d];
    element = element * values_.shape[d] + index[d];
  }
  double value = 0.0;
  switch (values_.dtype) {
    case DType::float32:
      value = static_cast<const float*>(values_.data)[offset];
      break;
    case DType::float64:
      value = static_cast<const double*>(values_.data)[offset];
      break;
    case DType::bfloat16:
      value = from_bfloat16(static_cast<const std::uint16_t*>(values_.data)[offset]);
      break;
    default:
      return Dual(std::nan(""));
  }
  detail::ScoreModTape* tape = detail::score_mod_tape;
  if (tape == nullptr || tape->reads++ != tape->seed) return Dual(value);
  tape->seeded_parameter = id_;
  tape->seeded_element = element;
  return Dual(value, 1.0);
}

// A score_mod, FlexAttention's meaning: after the contract's own score options (scale, soft cap,
// ALiBi, bias), the score s of query q_idx and key kv_idx of batch b and query head h becomes
// fn(s, b, h, q_idx, kv_idx) — positions and heads those of the whole problem (with
// AttentionOptions' offsets). fn takes a Dual score and four std::int64_t and returns a Dual (or a
// double); write it with qkv's functions (qkv::tanh, qkv::exp, …) and `auto` or `qkv::Dual`
// arguments. The kernels call it on every pair that is not masked, forward and backward: it must
// be a pure function of its arguments and of the parameters it reads, safe to call from several
// threads at once. The backward differentiates it on dual numbers; parameters that fn reads must
// be listed so that their gradients are computed (one more evaluation per read per pair).
class ScoreMod {
 public:
  template <class F>
  explicit ScoreMod(F fn, std::vector<const ScoreParameter*> parameters = {})
      : fn_(std::make_shared<F>(std::move(fn))),
        parameters_(std::move(parameters)),
        forward_float_(&ForwardRow<F, float>),
        forward_double_(&ForwardRow<F, double>),
        backward_float_(&BackwardRow<F, float>),
        backward_double_(&BackwardRow<F, double>) {
    for (std::size_t n = 0; n < parameters_.size(); ++n) parameters_[n]->id_ = static_cast<int>(n);
  }

  // The keys kv_begin … kv_begin + count − 1 of one query row, in the whole problem's positions.
  struct Row {
    std::int64_t b = 0, h = 0, q_idx = 0, kv_begin = 0, count = 0;
  };
  // scores[t] ← fn(scores[t], b, h, q_idx, kv_begin + t).
  void forward(const Row& row, float* scores) const { forward_float_(fn_.get(), row, scores); }
  void forward(const Row& row, double* scores) const { forward_double_(fn_.get(), row, scores); }
  // The backward of a row: scores holds the scores fn was given, d_scores ∂L/∂fn(…) on entry and
  // ∂L/∂score on return; with `gradients` (one dense array of doubles per listed parameter), each
  // parameter's ∂L/∂element is added to it.
  void backward(const Row& row, const float* scores, float* d_scores,
                double* const* gradients) const {
    backward_float_(fn_.get(), row, scores, d_scores, gradients);
  }
  void backward(const Row& row, const double* scores, double* d_scores,
                double* const* gradients) const {
    backward_double_(fn_.get(), row, scores, d_scores, gradients);
  }
  const std::vector<const ScoreParameter*>& parameters() const { return parameters_; }

  // A score_mod that gives whole rows instead of one pair at a time (the Python module's
  // built-in pieces): rows.forward(row, T* scores) and rows.backward(row, const T* scores,
  // T* d_scores, double* const* gradients), for T float and double, with the meaning of forward()
  // and backward() above. `rows` must be safe to call from several threads at once.
  template <class Rows>
  static ScoreMod from_rows(Rows rows, std::vector<const ScoreParameter*> parameters = {}) {
    ScoreMod mod;
    mod.fn_ = std::make_shared<Rows>(std::move(rows));
    mod.parameters_ = std::move(parameters);
    for (std::size_t n = 0; n < mod.parameters_.size(); ++n)
      mod.parameters_[n]->id_ = static_cast<int>(n);
    mod.forward_float_ = [](const void* r, const Row& row, float* scores) {
      static_cast<const Rows*>(r)->forward(row, scores);
    };
    mod.forward_double_ = [](const void* r, const Row& row, double* scores) {
      static_cast<const Rows*>(r)->forward(row, scores);
    };
    mod.backward_float_ = [](const void* r, const Row& row, const float* scores, float* d_scores,
                             double* const* gradients) {
      static_cast<const Rows*>(r)->backward(row, scores, d_scores, gradients);
    };
    mod.backward_double_ = [](const void* r, const Row& row, const double* scores, double* d_scores,
                              double* const* gradients) {
      static_cast<const Rows*>(r)->backward(row, scores, d_scores, gradients);
    };
    return mod;
  }

 private:
  ScoreMod() = default;

  template <class F, class T>
  static void ForwardRow(const void* fn, const Row& row, T* scores) {
    const F& f = *static_cast<const F*>(fn);
    for (std::int64_t t = 0; t < row.count; ++t) {
      const Dual result =
          f(Dual(static_cast<double>(scores[t])), row.b, row.h, row.q_idx, row.kv_begin + t);
      scores[t] = static_cast<T>(result.value);
    }
  }

  template <class F, class T>
  static void BackwardRow(const void* fn, const Row& row, const T* scores, T* d_scores,
                          double* const* gradients) {
    const F& f = *static_cast<const F*>(fn);
    detail::ScoreModTape tape;
    const detail::TapeInUse in_use(tape);
    for (std::int64_t t = 0; t < row.count; ++t) {
      const double score = static_cast<double>(scores[t]), upstream = d_scores[t];
      const std::int64_t kv_idx = row.kv_begin + t;
      if (upstream == 0.0) {  // a hidden key, or one with no gradient: nothing to carry back
        d_scores[t] = T{0};
        continue;
      }
      tape = {};
      const Dual by_score = f(Dual(score, 1.0), row.b, row.h, row.q_idx, kv_idx);
      d_scores[t] = static_cast<T>(upstream * by_score.tangent);
      if (gradients == nullptr) continue;
      // One more evaluation per parameter read, that read seeded.
      const int reads = tape.reads;
      for (int read = 0; read < reads; ++read) {
        tape = {};
        tape.seed = read;
        const Dual by_read = f(Dual(score), row.b, row.h, row.q_idx, kv_idx);
        if (tape.seeded_parameter >= 0 && gradients[tape.seeded_parameter] != nullptr)
          gradients[tape.seeded_parameter][tape.seeded_element] += upstream * by_read.tangent;
      }
    }
  }

  using Forward32 = void (*)(const void*, const Row&, float*);
  using Forward64 = void (*)(const void*, const Row&, double*);
  using Backward32 = void (*)(const void*, const Row&, const float*, float*, double* const*);
  using Backward64 = void (*)(const void*, const Row&, const double*, double*, double* const*);
  std::shared_ptr<const void> fn_;
  std::vector<const ScoreParameter*> parameters_;
  Forward32 forward_float_ = nullptr;
  Forward64 forward_double_ = nullptr;
  Backward32 backward_float_ = nullptr;
  Backward64 backward_double_ = nullptr;
};

}  // namespace qkv
