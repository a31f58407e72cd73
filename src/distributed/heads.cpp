// Head-parallel attention over MPI: an all-to-all turns sequence shards into head shards,
// attention runs on whole sequences, and a second all-to-all brings the results back.

#include "distributed/heads.hpp"

namespace qkv::distributed::internal {

namespace {

// Sequence shards [B, n_r, H, D] → head shards [B, N, H/P, D] (to_heads), or back.
Tensor reshard(const Context& c, const TensorView& local, std::int64_t total, Layout layout,
               bool to_heads, std::int64_t all_heads) {
  const int P = c.ranks;
  const std::int64_t group = all_heads / P, dim = local.shape[3];
  const std::size_t element = dtype_size(local.dtype);
  std::vector<int> send_counts(static_cast<std::size_t>(P)),
      receive_counts(static_cast<std::size_t>(P)), send_offsets(static_cast<std::size_t>(P)),
      receive_offsets(static_cast<std::size_t>(P));
  std::vector<std::byte> send, receive;
  const auto block_bytes = [&](std::int64_t rows_count) {
    return static_cast<int>(c.batch * rows_count * group * dim *
                            static_cast<std::int64_t>(element));
  };
  // Pack: to each rank s, [B, rows, group, D] — my rows of its heads (to_heads) or its rows of my
  // heads (back).
  for (int s = 0; s < P; ++s) {
    Tensor block;
    if (to_heads) {
      block = to_tensor(heads(local, s * group, (s + 1) * group));
    } else {
      const Pieces pieces = shard_pieces(total, P, s, layout);
      std::int64_t rows_count = 0;
      for (const auto& piece : pieces) rows_count += piece.second;
      block = Tensor(local.dtype, {c.batch, rows_count, group, dim});
      std::int64_t at = 0;
      for (const auto& piece : pieces) {
        copy_into(local.narrow(1, piece.first, piece.first + piece.second),
                  block.mutable_view().narrow(1, at, at + piece.second));
        at += piece.second;
      }
    }
    send_offsets[static_cast<std::size_t>(s)] = static_cast<int>(send.size());
    send_counts[static_cast<std::size_t>(s)] = static_cast<int>(block.nbytes());
    const auto* data = static_cast<const std::byte*>(block.raw());
    send.insert(send.end(), data, data + block.nbytes());
    const std::int64_t incoming_rows = shard_length(total, P, to_heads ? s : c.rank, layout);
    receive_offsets[static_cast<std::size_t>(s)] = static_cast<int>(receive.size());
    receive_counts[static_cast<std::size_t>(s)] = block_bytes(incoming_rows);
    receive.resize(receive.size() +
                   static_cast<std::size_t>(receive_counts[static_cast<std::size_t>(s)]));
  }
  check_mpi(
      MPI_Alltoallv(send.data(), send_counts.data(), send_offsets.data(), MPI_BYTE, receive.data(),
                    receive_counts.data(), receive_offsets.data(), MPI_BYTE, c.comm),
      "MPI_Alltoallv");
  // Unpack.
  Tensor result =
      to_heads
          ? Tensor(local.dtype, {c.batch, total, group, dim})
          : Tensor(local.dtype, {c.batch, shard_length(total, P, c.rank, layout), all_heads, dim});
  for (int s = 0; s < P; ++s) {
    const std::int64_t rows_count =
        to_heads ? shard_length(total, P, s, layout) : shard_length(total, P, c.rank, layout);
    const TensorView block =
        TensorView::contiguous(receive.data() + receive_offsets[static_cast<std::size_t>(s)],
                               local.dtype, {c.batch, rows_count, group, dim});
    if (to_heads) {
      std::int64_t at = 0;
      for (const auto& piece : shard_pieces(total, P, s, layout)) {
        copy_into(block.narrow(1, at, at + piece.second),
                  result.mutable_view().narrow(1, piece.first, piece.first + piece.second));
        at += piece.second;
      }
    } else {
      copy_into(block, heads(result.mutable_view(), s * group, (s + 1) * group));
    }
  }
  return result;
}

// LSE [B, H, N] as [B, N, H, 1] and back (reshard moves [B, N, H, D] tensors).
Tensor lse_as_sequence(const TensorView& lse) {
  Tensor t(lse.dtype, {lse.shape[0], lse.shape[2], lse.shape[1], 1});
  TensorView transposed = lse;
  std::swap(transposed.shape[1], transposed.shape[2]);
  std::swap(transposed.strides[1], transposed.strides[2]);
  copy_into(transposed, MutableTensorView::contiguous(t.raw(), t.dtype(),
                                                      {lse.shape[0], lse.shape[2], lse.shape[1]}));
  return t;
}

}  // namespace

// The per-head options of the heads [first, first + count).
AttentionOptions head_options(const AttentionOptions& options, std::int64_t first,
                              std::int64_t count, std::int64_t q_heads) {
  AttentionOptions o = options;
  const auto slice = [&](std::optional<TensorView>& parameter, int per_head_rank) {
    if (parameter && parameter->rank == per_head_rank && parameter->shape[0] == q_heads) {
      parameter = parameter->narrow(0, first, first + count);
    }
  };
  for (const detail::ScoreParameterOption& parameter : detail::score_parameter_options())
    slice(o.*parameter.option, parameter.per_head_rank);
  slice(o.sinks, 1);
  o.query_head_offset = first;  // dropout hashes global heads
  o.query_head_total = q_heads;
  if (o.alibi_slopes) {
    o.alibi_slopes = o.alibi_slopes->narrow(o.alibi_slopes->rank - 1, first, first + count);
  }
  return o;
}

void heads_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionOptions& options, const DistributedOptions& d,
                   const MutableTensorView& out, const std::optional<MutableTensorView>& lse) {
  const std::int64_t group = c.q_heads / c.ranks;
  const Tensor qh = reshard(c, q, d.q_total, d.layout, true, c.q_heads);
  const Tensor kh = reshard(c, k, d.k_total, d.layout, true, c.kv_heads);
  const Tensor vh = reshard(c, v, d.k_total, d.layout, true, c.kv_heads);
  const DType merged = wide(q.dtype);
  Tensor oh(q.dtype, {c.batch, d.q_total, group, c.v_dim}), lh(merged, {c.batch, group, d.q_total});
  attention_forward(qh.view(), kh.view(), vh.view(),
                    head_options(options, c.rank * group, group, c.q_heads),
                    {oh.mutable_view(), lh.mutable_view(), {}});
  const Tensor local_out = reshard(c, oh.view(), d.q_total, d.layout, false, c.q_heads);
  copy_into(local_out.view(), out);
  if (lse) {
    const Tensor back =
        reshard(c, lse_as_sequence(lh.view()).view(), d.q_total, d.layout, false, c.q_heads);
    TensorView as_lse = TensorView::contiguous(  // [B, n_r, H] seen as [B, H, n_r]
        back.raw(), back.dtype(), {back.shape()[0], back.shape()[1], back.shape()[2]});
    std::swap(as_lse.shape[1], as_lse.shape[2]);
    std::swap(as_lse.strides[1], as_lse.strides[2]);
    copy_into(as_lse, *lse);
  }
}

void heads_backward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                    const AttentionOptions& options, const DistributedOptions& d,
                    const TensorView& dout, const TensorView& out, const TensorView& lse,
                    const MutableTensorView& dq, const MutableTensorView& dk,
                    const MutableTensorView& dv, ParameterSums& sums) {
  const std::int64_t group = c.q_heads / c.ranks;
  const Tensor qh = reshard(c, q, d.q_total, d.layout, true, c.q_heads);
  const Tensor kh = reshard(c, k, d.k_total, d.layout, true, c.kv_heads);
  const Tensor vh = reshard(c, v, d.k_total, d.layout, true, c.kv_heads);
  const Tensor doh = reshard(c, dout, d.q_total, d.layout, true, c.q_heads);
  const Tensor oh = reshard(c, out, d.q_total, d.layout, true, c.q_heads);
  const Tensor lse_sequence = lse_as_sequence(lse);
  const Tensor lse_heads = reshard(c, lse_sequence.view(), d.q_total, d.layout, true, c.q_heads);
  TensorView lh = TensorView::contiguous(  // [B, N, group] seen as [B, group, N]
      lse_heads.raw(), lse_heads.dtype(),
      {lse_heads.shape()[0], lse_heads.shape()[1], lse_heads.shape()[2]});
  std::swap(lh.shape[1], lh.shape[2]);
  std::swap(lh.strides[1], lh.strides[2]);
  const DType accumulate = wide(q.dtype);
  Tensor dqh(accumulate, shape_of(qh.view())), dkh(accumulate, shape_of(kh.view())),
      dvh(accumulate, shape_of(vh.view()));
  const AttentionOptions head_shard = head_options(options, c.rank * group, group, c.q_heads);
  AttentionGradients grads = sums.block_slots(head_shard);
  grads.dq = dqh.mutable_view();
  grads.dk = dkh.mutable_view();
  grads.dv = dvh.mutable_view();
  attention_backward(qh.view(), kh.view(), vh.view(), head_shard, doh.view(), std::nullopt, grads,
                     SavedForward{oh.view(), lh});
  sums.add_parts(c.rank * group);
  copy_into(reshard(c, dqh.view(), d.q_total, d.layout, false, c.q_heads).view(), dq);
  copy_into(reshard(c, dkh.view(), d.k_total, d.layout, false, c.kv_heads).view(), dk);
  copy_into(reshard(c, dvh.view(), d.k_total, d.layout, false, c.kv_heads).view(), dv);
}

}  // namespace qkv::distributed::internal
