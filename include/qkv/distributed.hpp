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
              // and Hk divisible by P)
  automatic,  // heads when the head counts allow it, ring otherwise
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

// Where one rank's time went in a ring forward (for qkv bench --distributed).
struct RingStatistics {
  double compute_seconds = 0;  // attention on the blocks held, and merging
  double wait_seconds = 0;     // waiting for the next block after computing (exposed communication
                               // and waiting for a slower neighbour)
  double bytes_sent = 0;       // K and V bytes this rank sent
  int steps = 0;
  int transfer_steps = 0;  // steps that moved a block
  int hidden_steps = 0;    // of those, steps whose block had fully arrived when compute ended
};

// Forward over the communicator. Each rank passes its shards — q [B, Nq_r, Hq, Dq], k and v
// [B, Nk_r, Hk, D…] with Nq_r = shard_length(q_total, …) — and gets its shard of O [B, Nq_r, Hq,
// Dv] and of LSE [B, Hq, Nq_r] (optional). Every score and the position-based options (causal,
// window, key_lengths, ALiBi), GQA; not a float bias or boolean mask (their [Nq, Nk] would not be
// sharded), nor dropout. Equal to attention_forward on the whole sequence up to float rounding.
// Throws qkv::Error on bad input, the same on every rank.
void attention_forward(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const DistributedOptions& distributed,
                       const MutableTensorView& out, const std::optional<MutableTensorView>& lse,
                       RingStatistics* statistics = nullptr);

// Backward over the communicator, from each rank's shards of dO, and of O and LSE as the forward
// returned them: writes the rank's shards of dQ, dK and dV (dK and dV are summed over every rank's
// queries: in the ring they travel back to their owners). The score's parameters are the same on
// every rank; their gradients, requested in `parameters` (dw, dwq, dwk, dva; the other fields are
// ignored), are summed over all ranks' blocks and written on every rank.
void attention_backward(MPI_Comm comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const AttentionOptions& options,
                        const DistributedOptions& distributed, const TensorView& dout,
                        const TensorView& out, const TensorView& lse, const MutableTensorView& dq,
                        const MutableTensorView& dk, const MutableTensorView& dv,
                        const AttentionGradients& parameters = {});

}  // namespace qkv::distributed
