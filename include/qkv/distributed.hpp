// Attention past one machine: each MPI rank holds a shard of the sequence, and the ranks together
// compute what one process would (ring attention, or head-parallel attention).
#pragma once

#include <mpi.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "qkv/attention.hpp"
#include "qkv/backward.hpp"

namespace qkv::distributed {

// How a sequence of N rows is laid out over the P ranks of a communicator.
enum class Layout {
  contiguous,  // rank r holds one run of rows; the first N mod P ranks hold one row more
  zigzag,  // N in 2P chunks (as even as contiguous); rank r holds chunks r and 2P−1−r, which
           // gives every rank the same share of a causal mask's work
};

enum class Strategy {
  ring,       // K/V shards travel round the ring while each rank computes on the one it holds
  heads,      // all-to-all from sequence shards to head shards, attention, and back (needs Hq
              // and Hk divisible by P, and no bias, mask or weights)
  automatic,  // heads when those conditions hold, ring otherwise
};

struct DistributedOptions {
  Strategy strategy = Strategy::automatic;
  Layout layout = Layout::contiguous;
  std::int64_t q_total = 0;  // global Nq
  std::int64_t k_total = 0;  // global Nk (the keys are laid out like the queries)
};

// The global rows [offset, offset + length) a rank holds, in its local order.
std::vector<std::pair<std::int64_t, std::int64_t>> shard_pieces(std::int64_t n, int ranks, int rank,
                                                                Layout layout);
// The number of rows a rank holds.
std::int64_t shard_length(std::int64_t n, int ranks, int rank, Layout layout);

// Where one rank's time went in a ring forward or backward (for qkv bench --distributed).
struct RingStatistics {
  double compute_seconds = 0;  // attention on the blocks held, and merging
  double wait_seconds = 0;     // waiting for the next block after computing (exposed communication
                               // and waiting for a slower neighbour)
  double bytes_sent = 0;       // bytes this rank sent (K and V; in the backward also dK and dV)
  int steps = 0;
  int transfer_steps = 0;  // transfers that had compute beside them (the backward's K/V and
                           // dK/dV each count; its last dK/dV pass home has none, and its time
                           // is in wait_seconds)
  int hidden_steps = 0;    // of those, transfers complete when the compute beside them ended
};

// Forward over the communicator. Each rank passes its shards — q [B, Nq_r, Hq, Dq], k and v
// [B, Nk_r, Hk, D…] with Nq_r = shard_length(q_total, …) — and gets its shard of O [B, Nq_r, Hq,
// Dv], of LSE [B, Hq, Nq_r] (optional) and of the weights [B, Hq, Nq_r, Nk] (optional: its query
// rows, every key in global order). Every score and option of attention_forward: the
// position-based ones (causal, window, key_lengths, ALiBi) and dropout see global positions; a
// float bias or boolean mask is the rank's query rows and every key, broadcastable to [B, Hq,
// Nq_r, Nk] (ring only: with a bias, mask or weights the automatic strategy is the ring).
// Equal to attention_forward on the whole sequence up to float rounding (the same dropout mask).
// Throws qkv::Error on bad input, the same on every rank. Working space: the ring keeps two K/V
// shards (the backward also its dK/dV messages) with the calling thread between calls.
void attention_forward(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const DistributedOptions& distributed,
                       const AttentionOutputs& outputs, RingStatistics* statistics = nullptr);

// Backward over the communicator, from each rank's shards of dO, and of O and LSE as the forward
// returned them: writes the rank's shards of dQ, dK and dV (dK and dV are summed over every rank's
// queries: in the ring they travel back to their owners). The score's parameters are the same on
// every rank; their gradients, requested in `parameters` (dw, dwq, dwk, dva; the other fields are
// ignored), are summed over all ranks' blocks and written on every rank. The bias and mask are
// sharded as in the forward; no gradient of the bias.
void attention_backward(MPI_Comm comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const AttentionOptions& options,
                        const DistributedOptions& distributed, const TensorView& dout,
                        const TensorView& out, const TensorView& lse, const MutableTensorView& dq,
                        const MutableTensorView& dk, const MutableTensorView& dv,
                        const AttentionGradients& parameters = {},
                        RingStatistics* statistics = nullptr);

}  // namespace qkv::distributed
