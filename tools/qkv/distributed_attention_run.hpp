// The distributed path of `qkv attention` (built when MPI is found).
#pragma once

#include <functional>
#include <string>
#include <utility>

#include "qkv/attention.hpp"
#include "qkv/distributed.hpp"

namespace qkv::cli {

struct DistributedRun {
  std::string q, k, v, out, lse, weights, weights_png, dout, dq, dk, dv, dw, dwq, dwk, dva,
      dtemperature, dsinks;
  std::string bias, mask;    // read by each rank: its query rows, every key
  AttentionOptions options;  // the flags' options but the bias and mask
  distributed::Strategy strategy = distributed::Strategy::automatic;
  distributed::Layout layout = distributed::Layout::contiguous;
  // A file's [B, N, H, D] view (the command's own rule for ranks 2, 3, 4).
  std::function<TensorView(const Tensor&, const char*)> as_sequence;
};

// Initializes MPI unless already done, allowing calls from several threads (the ring's transfers
// progress on a helper thread beside the compute); returns {ranks, rank} of MPI_COMM_WORLD.
std::pair<int, int> start_mpi();

// Runs under MPI (initializing it if needed): reads this rank's shards, computes with the other
// ranks, and has rank 0 write the outputs. Exits the process with status 2 on any rank's failure.
void run_distributed_attention(const DistributedRun& run);

}  // namespace qkv::cli
