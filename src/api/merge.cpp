#include "core/merge.hpp"

#include <fmt/format.h>

#include <vector>

#include "core/problem.hpp"
#include "qkv/error.hpp"
#include "qkv/merge.hpp"

namespace qkv {

namespace {

bool same_shape(const TensorView& a, const TensorView& b) {
  if (a.rank != b.rank) return false;
  for (int d = 0; d < a.rank; ++d) {
    if (a.shape[d] != b.shape[d]) return false;
  }
  return true;
}

void require_float_view(const TensorView& view, const std::string& name, int rank,
                        const char* layout) {
  if (view.rank != rank) {
    throw Error(
        fmt::format("{}: expected rank {} {}, got {}", name, rank, layout, view.shape_string()));
  }
  detail::require_float_data(view, name);
}

}  // namespace

void merge_attention(std::span<const TensorView> outs, std::span<const TensorView> lses,
                     const MutableTensorView& out, const std::optional<MutableTensorView>& lse,
                     Normalization normalization) {
  if (outs.empty() || outs.size() != lses.size()) {
    throw Error(fmt::format("outs, lses: expected the same number (>= 1) of parts, got {} and {}",
                            outs.size(), lses.size()));
  }
  require_float_view(out.as_const(), "out", 4, "[B, Nq, Hq, Dv]");
  const std::int64_t batch = out.shape[0], q_len = out.shape[1], heads = out.shape[2],
                     dim = out.shape[3];
  const TensorView lse_shape =
      TensorView::contiguous(nullptr, DType::float32, {batch, heads, q_len});
  if (lse) {
    require_float_view(lse->as_const(), "lse", 3, "[B, Hq, Nq]");
    if (!same_shape(lse->as_const(), lse_shape)) {
      throw Error(fmt::format("lse: expected {} (from out), got {}", lse_shape.shape_string(),
                              lse->as_const().shape_string()));
    }
  }
  for (std::size_t p = 0; p < outs.size(); ++p) {
    require_float_view(outs[p], fmt::format("outs[{}]", p), 4, "[B, Nq, Hq, Dv]");
    require_float_view(lses[p], fmt::format("lses[{}]", p), 3, "[B, Hq, Nq]");
    if (!same_shape(outs[p], out.as_const())) {
      throw Error(fmt::format("outs[{}]: expected {} (the shape of out), got {}", p,
                              out.as_const().shape_string(), outs[p].shape_string()));
    }
    if (!same_shape(lses[p], lse_shape)) {
      throw Error(fmt::format("lses[{}]: expected {} (from out), got {}", p,
                              lse_shape.shape_string(), lses[p].shape_string()));
    }
  }
  std::vector<detail::StridedInput> part_outs, part_lses;
  for (std::size_t p = 0; p < outs.size(); ++p) {
    part_outs.push_back(detail::input_of(outs[p]));
    part_lses.push_back(detail::input_of(lses[p]));
  }
  detail::StridedOutput merged_out, merged_lse;
  merged_out.data = static_cast<std::byte*>(out.data);
  merged_out.dtype = out.dtype;
  for (int d = 0; d < 4; ++d) merged_out.strides[d] = out.strides[d];
  if (lse) {
    merged_lse.data = static_cast<std::byte*>(lse->data);
    merged_lse.dtype = lse->dtype;
    for (int d = 0; d < 3; ++d) merged_lse.strides[d] = lse->strides[d];
  }
  // The merged row is gathered first, so `out` may alias a part.
  std::vector<double> weights(outs.size()), row(static_cast<std::size_t>(dim));
  for (std::int64_t b = 0; b < batch; ++b) {
    for (std::int64_t i = 0; i < q_len; ++i) {
      for (std::int64_t h = 0; h < heads; ++h) {
        const double merged = detail::merge_row<double>(
            weights, dim,
            [&](std::int64_t p) { return part_lses[static_cast<std::size_t>(p)].load(b, h, i); },
            [&](std::int64_t p, std::int64_t d) {
              return part_outs[static_cast<std::size_t>(p)].load(b, i, h, d);
            },
            [&](std::int64_t d, double value) { row[static_cast<std::size_t>(d)] = value; });
        if (normalization == Normalization::sigmoid) {  // unnormalized parts: their sum
          for (std::int64_t d = 0; d < dim; ++d) {
            double sum = 0.0;
            for (const detail::StridedInput& part : part_outs) sum += part.load(b, i, h, d);
            row[static_cast<std::size_t>(d)] = sum;
          }
        }
        for (std::int64_t d = 0; d < dim; ++d)
          merged_out.store(row[static_cast<std::size_t>(d)], b, i, h, d);
        if (lse) merged_lse.store(merged, b, h, i);
      }
    }
  }
}

}  // namespace qkv
