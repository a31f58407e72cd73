// Argument checks and dense/strided moves shared by the two backward passes.

#include "core/backward_arguments.hpp"

#include "core/score_mod_gradients.hpp"
#include "core/score_unit.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <vector>

#include "core/problem.hpp"
#include "qkv/error.hpp"

namespace qkv::detail {

namespace {

// A requested gradient must have its primal's shape and a float dtype.
void check_gradient(const std::optional<MutableTensorView>& gradient, const TensorView* primal,
                    const char* name, const char* primal_name) {
  if (!gradient) return;
  if (primal == nullptr) {
    throw Error(fmt::format("{}: expected none ({} is not an input of this score), got {}", name,
                            primal_name, gradient->as_const().shape_string()));
  }
  const TensorView given = gradient->as_const();
  bool same = given.rank == primal->rank;
  for (int d = 0; same && d < given.rank; ++d) same = given.shape[d] == primal->shape[d];
  if (!same) {
    throw Error(fmt::format("{}: expected the shape of {}, {}, got {}", name, primal_name,
                            primal->shape_string(), given.shape_string()));
  }
  require_float_data(given, name);
}

void check_sequence_like(const TensorView& view, const char* name,
                         const std::array<std::int64_t, 4>& shape, int rank, const char* layout) {
  bool same = view.rank == rank;
  for (int d = 0; same && d < rank; ++d) same = view.shape[d] == shape[d];
  if (!same) {
    throw Error(fmt::format("{}: expected {} = [{}], got {}", name, layout,
                            fmt::join(shape.begin(), shape.begin() + rank, ", "),
                            view.shape_string()));
  }
  require_float_data(view, name);
}

}  // namespace

std::int64_t offset_of(const TensorView& view, std::int64_t n) {
  std::int64_t offset = 0;
  for (int d = view.rank - 1; d >= 0; --d) {
    offset += (n % view.shape[d]) * view.strides[d];
    n /= view.shape[d];
  }
  return offset;
}

Tensor dense_copy(const TensorView& view) {
  const bool is_float = view.dtype == DType::float32 || view.dtype == DType::float64 ||
                        view.dtype == DType::bfloat16 || view.dtype == DType::float16;
  if (!is_float) return to_tensor(view);
  Tensor copy(DType::float64,
              std::vector<std::int64_t>(view.shape.begin(), view.shape.begin() + view.rank));
  StridedInput element;  // one index: the element offset
  element.data = static_cast<const std::byte*>(view.data);
  element.dtype = view.dtype;
  element.strides = {1, 0, 0, 0};
  for (std::int64_t n = 0; n < copy.numel(); ++n) {
    copy.data<double>()[n] = element.load(offset_of(view, n));
  }
  return copy;
}

void store_dense(const double* values, const MutableTensorView& view) {
  StridedOutput element;  // one index: the element offset
  element.data = static_cast<std::byte*>(view.data);
  element.dtype = view.dtype;
  element.strides = {1, 0, 0, 0};
  const TensorView shape = view.as_const();
  for (std::int64_t n = 0; n < shape.numel(); ++n) element.store(values[n], offset_of(shape, n));
}

AttentionProblem check_backward_arguments(const TensorView& q, const TensorView& k,
                                          const TensorView& v, const AttentionOptions& options,
                                          const TensorView& dout,
                                          const std::optional<TensorView>& dlse,
                                          const AttentionGradients& gradients) {
  // O's slot: its shape (from q and v, once they are known to be rank 4), every stride 0.
  static float no_storage = 0.0f;
  const MutableTensorView out_slot{&no_storage,
                                   DType::float32,
                                   4,
                                   {q.rank == 4 ? q.shape[0] : 0, q.rank == 4 ? q.shape[1] : 0,
                                    q.rank == 4 ? q.shape[2] : 0, v.rank == 4 ? v.shape[3] : 0},
                                   {0, 0, 0, 0}};
  AttentionProblem problem = make_problem(q, k, v, options, {out_slot, {}, {}});
  check_sequence_like(dout, "dout", {q.shape[0], q.shape[1], q.shape[2], v.shape[3]}, 4,
                      "[B, Nq, Hq, Dv]");
  if (dlse)
    check_sequence_like(*dlse, "dlse", {q.shape[0], q.shape[2], q.shape[1], 0}, 3, "[B, Hq, Nq]");
  check_gradient(gradients.dq, &q, "dq", "q");
  check_gradient(gradients.dk, &k, "dk", "k");
  check_gradient(gradients.dv, &v, "dv", "v");
  for (const ScoreParameterOption& parameter : score_parameter_options()) {
    const std::optional<TensorView>& primal = options.*parameter.option;
    check_gradient(gradients.*parameter.gradient, primal ? &*primal : nullptr,
                   parameter.gradient_name, parameter.name);
  }
  check_gradient(gradients.dbias, options.bias ? &*options.bias : nullptr, "dbias", "bias");
  check_gradient(gradients.dsinks, options.sinks ? &*options.sinks : nullptr, "dsinks", "sinks");
  check_score_mod_gradients(options.score_mod, gradients.dscore_mod);
  return problem;
}

}  // namespace qkv::detail
