// Ring attention and head-parallel attention over MPI.
//
// Ring. Rank r keeps its query shard and, for P steps, holds one key/value shard: its own first,
// then the one of rank r − 1, r − 2, … While it computes attention of its queries on the shard it
// holds (each pair of query piece and key piece told its global offsets, so causal masks, windows,
// key lengths and ALiBi see global positions; pairs a causal mask hides entirely are skipped), the
// next shard is already on its way (MPI_Isend / MPI_Irecv posted before the compute). Each step's
// (O, LSE) is merged into the running result with merge_attention. The backward walks the same
// ring: K and V travel ahead, and each shard's dK and dV, summed over the ranks it has visited
// (attention_backward on each block with the whole problem's O and LSE), follow one step behind;
// after P passes every sum is home.
//
// Heads. With Hq and Hk divisible by P, an all-to-all turns sequence shards into head shards
// (rank s gets every row of heads s·H/P …), attention runs on whole sequences, and a second
// all-to-all returns the results to the sequence shards.

#include "qkv/distributed.hpp"

#include <fmt/format.h>

#include "distributed/heads.hpp"
#include "distributed/ring.hpp"
#include "distributed/shards.hpp"
#include "qkv/error.hpp"

namespace qkv::distributed {

namespace {

// Whether the heads strategy runs: asked for, or chosen automatically when the head counts divide
// by P and nothing [Nq, Nk]-shaped (bias, mask, weights: held as the rank's query rows) is
// involved.
bool use_heads(const internal::Context& c, Strategy strategy, const AttentionOptions& options,
               bool weights) {
  const bool divisible = c.q_heads % c.ranks == 0 && c.kv_heads % c.ranks == 0;
  const bool row_sharded = options.bias || options.mask || weights;
  if (strategy == Strategy::heads && !divisible) {
    throw Error(fmt::format("strategy: heads needs Hq and Hk divisible by P = {}, got {} and {}",
                            c.ranks, c.q_heads, c.kv_heads));
  }
  if (strategy == Strategy::heads && row_sharded) {
    throw Error(
        "strategy: heads expected no bias, mask or weights (they are sharded by query rows: use "
        "the ring), got one");
  }
  return strategy == Strategy::heads ||
         (strategy == Strategy::automatic && divisible && !row_sharded);
}

}  // namespace

std::vector<std::pair<std::int64_t, std::int64_t>> shard_pieces(std::int64_t n, int ranks, int rank,
                                                                Layout layout) {
  const auto even = [](std::int64_t count, std::int64_t parts, std::int64_t index) {
    const std::int64_t base = count / parts, extra = count % parts;
    const std::int64_t begin = index * base + std::min(index, extra);
    return std::pair<std::int64_t, std::int64_t>{begin, base + (index < extra ? 1 : 0)};
  };
  if (layout == Layout::contiguous) return {even(n, ranks, rank)};
  return {even(n, 2 * ranks, rank), even(n, 2 * ranks, 2 * ranks - 1 - rank)};
}

std::int64_t shard_length(std::int64_t n, int ranks, int rank, Layout layout) {
  std::int64_t length = 0;
  for (const auto& piece : shard_pieces(n, ranks, rank, layout)) length += piece.second;
  return length;
}

void attention_forward(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const DistributedOptions& distributed,
                       const AttentionOutputs& outputs, RingStatistics* statistics) {
  const internal::Context c = internal::context(comm, q, k, v, options, distributed);
  if (outputs.weights) {
    const MutableTensorView& w = *outputs.weights;
    if (w.rank != 4 || w.shape[0] != c.batch || w.shape[1] != c.q_heads ||
        w.shape[2] != q.shape[1] || w.shape[3] != distributed.k_total) {
      throw Error(fmt::format("weights: expected [B, Hq, Nq_r, Nk] = [{}, {}, {}, {}], got {}",
                              c.batch, c.q_heads, q.shape[1], distributed.k_total,
                              w.as_const().shape_string()));
    }
  }
  if (use_heads(c, distributed.strategy, options, outputs.weights.has_value())) {
    internal::heads_forward(c, q, k, v, options, distributed, outputs.out, outputs.lse);
  } else {
    internal::ring_forward(c, q, k, v, options, distributed, outputs.out, outputs.lse,
                           outputs.weights, statistics);
  }
}

void attention_backward(MPI_Comm comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const AttentionOptions& options,
                        const DistributedOptions& distributed, const TensorView& dout,
                        const TensorView& out, const TensorView& lse, const MutableTensorView& dq,
                        const MutableTensorView& dk, const MutableTensorView& dv,
                        const AttentionGradients& parameters, RingStatistics* statistics) {
  const internal::Context c = internal::context(comm, q, k, v, options, distributed);
  internal::ParameterSums sums(options, parameters);
  if (use_heads(c, distributed.strategy, options, false)) {
    internal::heads_backward(c, q, k, v, options, distributed, dout, out, lse, dq, dk, dv, sums);
  } else {
    internal::ring_backward(c, q, k, v, options, distributed, dout, out, lse, dq, dk, dv, sums,
                            statistics);
  }
  sums.finish(comm);
}

}  // namespace qkv::distributed
