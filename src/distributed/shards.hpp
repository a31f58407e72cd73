// What ring and head-parallel attention share: the shards and pieces of a sequence, the
// context of one call, the blocks of a (query piece, key piece) pair, the sums of the score
// parameters' gradients, and small helpers (MPI errors, copies, row sums).
#pragma once

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>
#include <vector>

#include "core/backward_arguments.hpp"
#include "core/position_masks.hpp"
#include "core/score_unit.hpp"
#include "qkv/distributed.hpp"
#include "qkv/error.hpp"

namespace qkv::distributed::internal {

using Pieces = std::vector<std::pair<std::int64_t, std::int64_t>>;

// Heads [begin, end) (dimension 2 of [B, N, H, D]).
template <class View>
View heads(const View& view, std::int64_t begin, std::int64_t end) {
  return view.narrow(2, begin, end);
}

inline void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) throw Error(fmt::format("MPI: {} failed with code {}", what, code));
}

// The wider float type results are merged in: float64 for float64 inputs, float32 otherwise.
inline DType wide(DType dtype) {
  return dtype == DType::float64 ? DType::float64 : DType::float32;
}

// to = from, element by element (any strides and float dtypes), through float64 unless both are
// dense and of one dtype.
inline void copy_into(const TensorView& from, const MutableTensorView& to) {
  if (from.dtype == to.dtype && from.is_contiguous() && to.as_const().is_contiguous() &&
      from.numel() == to.as_const().numel()) {
    std::memcpy(to.data, from.data,
                static_cast<std::size_t>(from.numel()) * dtype_size(from.dtype));
    return;
  }
  const Tensor dense = detail::dense_copy(from);
  detail::store_dense(dense.data<double>(), to);
}

// total[:, first : first + m] += part for dense [B, N, …] and [B, m, …] tensors of one float
// dtype (the accumulation type: float32 or float64).
template <class T>
void add_rows_typed(Tensor& total, const Tensor& part, std::int64_t first) {
  const std::int64_t batch = part.shape()[0], n = total.shape()[1], m = part.shape()[1];
  const std::int64_t inner = m > 0 ? part.numel() / (batch * m) : 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    T* to = total.data<T>() + (b * n + first) * inner;
    const T* from = part.data<T>() + b * m * inner;
    for (std::int64_t i = 0; i < m * inner; ++i) to[i] += from[i];
  }
}

inline void add_rows(Tensor& total, const Tensor& part, std::int64_t first) {
  if (part.dtype() == DType::float64) {
    add_rows_typed<double>(total, part, first);
  } else {
    add_rows_typed<float>(total, part, first);
  }
}

// `slot` as a zeroed tensor of this dtype and shape: its memory is reused when they match.
inline Tensor& zeroed_reused(Tensor& slot, DType dtype, std::vector<std::int64_t> shape) {
  if (slot.dtype() != dtype || slot.shape() != shape) {
    slot = Tensor(dtype, std::move(shape));
  } else {
    std::memset(slot.raw(), 0, slot.nbytes());
  }
  return slot;
}

inline std::vector<std::int64_t> shape_of(const TensorView& view) {
  return std::vector<std::int64_t>(view.shape.begin(), view.shape.begin() + view.rank);
}

// Whether the position masks, or the block mask, hide every pair of a query piece and a key piece
// (global positions).
inline bool hidden(const AttentionOptions& o, std::int64_t q_total, std::int64_t k_total,
                   std::pair<std::int64_t, std::int64_t> q_piece,
                   std::pair<std::int64_t, std::int64_t> k_piece) {
  if (q_piece.second == 0 || k_piece.second == 0) return true;
  if (o.sinks && k_piece.first == 0) return false;  // the block that joins the rows' sinks
  detail::PositionMasks masks;
  masks.causal = o.causal;
  masks.causal_align = o.causal_align;
  masks.prefix_end = o.prefix_length;  // global positions
  masks.sink_end = o.sink_tokens;
  masks.window_left = o.window_left;
  masks.window_right = o.window_right;
  masks.bottom_right_diagonal = k_total - q_total;
  const std::int64_t q_end = q_piece.first + q_piece.second;
  const std::int64_t k_end = k_piece.first + k_piece.second;
  if (masks.tile(q_piece.first, q_end, k_piece.first, k_end, k_total) == BlockKind::empty)
    return true;
  if (o.block_mask == nullptr) return false;
  const BlockMask& mask = *o.block_mask;
  const BlockMaskShape& shape = mask.shape();
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.heads; ++h)
      for (std::int64_t qb = q_piece.first / shape.q_block; qb * shape.q_block < q_end; ++qb)
        for (std::int64_t kb = k_piece.first / shape.kv_block; kb * shape.kv_block < k_end; ++kb)
          if (mask.kind(b, h, qb, kb) != BlockKind::empty) return false;
  return true;
}

struct Context {
  MPI_Comm comm;
  int ranks = 1, rank = 0;
  std::int64_t batch = 0, q_heads = 0, kv_heads = 0, q_dim = 0, k_dim = 0, v_dim = 0;
  Pieces q_pieces, k_pieces;
};

inline Context context(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const DistributedOptions& d) {
  Context c;
  c.comm = comm;
  check_mpi(MPI_Comm_size(comm, &c.ranks), "MPI_Comm_size");
  check_mpi(MPI_Comm_rank(comm, &c.rank), "MPI_Comm_rank");
  if (q.rank != 4 || k.rank != 4 || v.rank != 4) {
    throw Error(fmt::format("q, k, v: expected [B, N, H, D] shards (rank 4), got {}, {}, {}",
                            q.shape_string(), k.shape_string(), v.shape_string()));
  }
  if (d.q_total <= 0 || d.k_total <= 0) {
    throw Error(fmt::format("q_total, k_total: expected the global lengths (> 0), got {} and {}",
                            d.q_total, d.k_total));
  }
  const std::int64_t nq = shard_length(d.q_total, c.ranks, c.rank, d.layout);
  const std::int64_t nk = shard_length(d.k_total, c.ranks, c.rank, d.layout);
  if (q.shape[1] != nq || k.shape[1] != nk || v.shape[1] != nk) {
    throw Error(
        fmt::format("q, k, v: expected shards of {} and {} rows on rank {} of {}, got {}, "
                    "{} and {}",
                    nq, nk, c.rank, c.ranks, q.shape[1], k.shape[1], v.shape[1]));
  }
  // A bias or mask holds the rank's query rows and every key: [.., Nq_r or 1, Nk or 1].
  for (const auto& [operand, name] :
       {std::pair{&options.bias, "bias"}, std::pair{&options.mask, "mask"}}) {
    if (!*operand) continue;
    const TensorView& view = **operand;
    const bool keys_fit =
        view.rank < 1 || view.shape[view.rank - 1] == 1 || view.shape[view.rank - 1] == d.k_total;
    const bool rows_fit =
        view.rank < 2 || view.shape[view.rank - 2] == 1 || view.shape[view.rank - 2] == nq;
    if (!keys_fit || !rows_fit) {
      throw Error(fmt::format(
          "{}: expected the rank's query rows and every key, [.., {} or 1, {} or 1], on rank {} "
          "of {}, got {}",
          name, nq, d.k_total, c.rank, c.ranks, view.shape_string()));
    }
  }
  c.batch = q.shape[0];
  c.q_heads = q.shape[2];
  c.kv_heads = k.shape[2];
  c.q_dim = q.shape[3];
  c.k_dim = k.shape[3];
  c.v_dim = v.shape[3];
  c.q_pieces = shard_pieces(d.q_total, c.ranks, c.rank, d.layout);
  c.k_pieces = shard_pieces(d.k_total, c.ranks, c.rank, d.layout);
  return c;
}

// Offsets of each piece within the local shard.
inline std::vector<std::int64_t> local_starts(const Pieces& pieces) {
  std::vector<std::int64_t> starts;
  std::int64_t at = 0;
  for (const auto& piece : pieces) {
    starts.push_back(at);
    at += piece.second;
  }
  return starts;
}

// The part of a bias or mask ([.., Nq_r or 1, Nk or 1]) that the block of local query rows
// [q_begin, q_end) and global keys [k_begin, k_end) reads.
inline std::optional<TensorView> block_operand(const std::optional<TensorView>& operand,
                                               std::int64_t q_begin, std::int64_t q_end,
                                               std::int64_t k_begin, std::int64_t k_end) {
  if (!operand) return operand;
  TensorView view = *operand;
  if (view.rank >= 1 && view.shape[view.rank - 1] != 1)
    view = view.narrow(view.rank - 1, k_begin, k_end);
  if (view.rank >= 2 && view.shape[view.rank - 2] != 1)
    view = view.narrow(view.rank - 2, q_begin, q_end);
  return view;
}

// The options of the block of query piece `q_piece` (whose rows start at local row `q_local`)
// and key piece `k_piece` (global offsets and lengths).
inline AttentionOptions block_options(const AttentionOptions& options, const DistributedOptions& d,
                                      std::pair<std::int64_t, std::int64_t> q_piece,
                                      std::int64_t q_local,
                                      std::pair<std::int64_t, std::int64_t> k_piece) {
  AttentionOptions block = options;
  block.query_offset = q_piece.first;
  block.key_offset = k_piece.first;
  block.query_total = d.q_total;
  block.key_total = d.k_total;
  const std::int64_t q_end = q_local + q_piece.second, k_end = k_piece.first + k_piece.second;
  block.bias = block_operand(options.bias, q_local, q_end, k_piece.first, k_end);
  block.mask = block_operand(options.mask, q_local, q_end, k_piece.first, k_end);
  return block;
}

// The learned tensors of the options whose gradients are sums over query rows: the score's
// parameters and the sinks (each [Hq] or with a leading Hq, or shared).
struct LearnedTensor {
  std::optional<TensorView> AttentionOptions::*option;
  detail::GradientSlot gradient;
};
inline std::vector<LearnedTensor> learned_tensors() {
  std::vector<LearnedTensor> tensors;
  for (const detail::ScoreParameterOption& parameter : detail::score_parameter_options())
    tensors.push_back({parameter.option, parameter.gradient});
  tensors.push_back({&AttentionOptions::sinks, &AttentionGradients::dsinks});
  return tensors;
}

// The learned tensors' gradients of one rank, in float64, summed over its blocks, then over all
// ranks. A head shard adds its per-head rows at its own heads.
class ParameterSums {
 public:
  ParameterSums(const AttentionOptions& options, const AttentionGradients& requested) {
    const auto parameters = learned_tensors();
    totals_.resize(parameters.size());
    parts_.resize(parameters.size());
    targets_.resize(parameters.size());
    for (std::size_t n = 0; n < parameters.size(); ++n) {
      const std::optional<TensorView>& primal = options.*parameters[n].option;
      const std::optional<MutableTensorView>& target = requested.*parameters[n].gradient;
      if (target.has_value() && primal.has_value()) {
        totals_[n] = Tensor(DType::float64, shape_of(*primal));
        targets_[n] = *target;
      }
    }
  }
  // Gradient slots for one block call, shaped like the (possibly head-sliced) parameters.
  AttentionGradients block_slots(const AttentionOptions& block_options) {
    AttentionGradients slots;
    const auto parameters = learned_tensors();
    for (std::size_t n = 0; n < parameters.size(); ++n) {
      const std::optional<TensorView>& primal = block_options.*parameters[n].option;
      if (totals_[n].numel() == 0 || !primal.has_value()) continue;
      parts_[n] = Tensor(DType::float64, shape_of(*primal));
      slots.*parameters[n].gradient = parts_[n].mutable_view();
    }
    return slots;
  }
  // Adds the last block's parts; `first_head` places a head shard's per-head rows.
  void add_parts(std::int64_t first_head) {
    for (std::size_t n = 0; n < parts_.size(); ++n) {
      if (parts_[n].numel() == 0) continue;
      const std::int64_t offset = parts_[n].numel() == totals_[n].numel()
                                      ? 0
                                      : first_head * (totals_[n].numel() / totals_[n].shape()[0]);
      for (std::int64_t i = 0; i < parts_[n].numel(); ++i)
        totals_[n].data<double>()[offset + i] += parts_[n].data<double>()[i];
    }
  }
  // Sums over the ranks and writes the requested gradients.
  void finish(MPI_Comm comm) {
    for (std::size_t n = 0; n < totals_.size(); ++n) {
      if (totals_[n].numel() == 0) continue;
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, totals_[n].raw(), static_cast<int>(totals_[n].numel()),
                              MPI_DOUBLE, MPI_SUM, comm),
                "MPI_Allreduce");
      copy_into(totals_[n].view(), targets_[n]);
    }
  }

 private:
  // One of each per learned tensor (learned_tensors()).
  std::vector<Tensor> totals_, parts_;
  std::vector<MutableTensorView> targets_;
};

}  // namespace qkv::distributed::internal
