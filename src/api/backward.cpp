// attention_backward: validate once at the door, then the fused kernel (float32, bfloat16) or
// the float64 oracle.

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "api/forward.hpp"
#include "core/backward_arguments.hpp"
#include "core/problem.hpp"
#include "kernels/fused_backward.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "reference/naive_backward.hpp"

namespace qkv {

namespace {

void check_saved(const TensorView& view, const char* name,
                 std::initializer_list<std::int64_t> shape, const char* layout) {
  bool same = view.rank == static_cast<int>(shape.size());
  int d = 0;
  for (std::int64_t extent : shape) same = same && view.shape[d++] == extent;
  if (!same) {
    throw Error(fmt::format("{}: expected {} = [{}], got {}", name, layout, fmt::join(shape, ", "),
                            view.shape_string()));
  }
  detail::require_float_data(view, name);
}

}  // namespace

void attention_backward(const TensorView& q, const TensorView& k, const TensorView& v,
                        const AttentionOptions& options, const TensorView& dout,
                        const std::optional<TensorView>& dlse, const AttentionGradients& gradients,
                        const std::optional<SavedForward>& saved) {
  const detail::AttentionProblem p =
      detail::check_backward_arguments(q, k, v, options, dout, dlse, gradients);
  const std::int64_t B = p.batch, Nq = p.q_len, Hq = p.q_heads, Dv = p.v_dim;
  if (saved) {
    check_saved(saved->out, "saved.out", {B, Nq, Hq, Dv}, "[B, Nq, Hq, Dv]");
    check_saved(saved->lse, "saved.lse", {B, Hq, Nq}, "[B, Hq, Nq]");
  }
  if (q.dtype == DType::float64) {
    detail::backward_reference(q, k, v, options, dout, dlse, gradients, saved);
    return;
  }
  // O and LSE: the caller's, or a forward run now.
  Tensor out, lse;
  TensorView out_view, lse_view;
  if (saved) {
    out_view = saved->out;
    lse_view = saved->lse;
  } else {
    out = Tensor(DType::float32, {B, Nq, Hq, Dv});
    lse = Tensor(DType::float64, {B, Hq, Nq});  // P is recomputed from it: keep every bit
    detail::AttentionProblem forward = p;       // validated already: only the results change
    forward.out = detail::output_of(out.mutable_view());
    forward.lse = detail::output_of(lse.mutable_view());
    api::run_forward(forward);
    out_view = out.view();
    lse_view = lse.view();
  }
  kernels::BackwardInputs inputs;
  inputs.dout = detail::input_of(dout);
  inputs.out = detail::input_of(out_view);
  inputs.lse = detail::input_of(lse_view);
  if (dlse) inputs.dlse = detail::input_of(*dlse);
  kernels::fused_backward(p, inputs, gradients);
}

}  // namespace qkv
