// Ring attention (see distributed_attention.cpp): the forward and the backward of one call.
#pragma once

#include "distributed/shards.hpp"

namespace qkv::distributed::internal {

// O (and LSE, the weights) of this rank's query shard, with every key shard passing by.
void ring_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                  const AttentionOptions& options, const DistributedOptions& d,
                  const MutableTensorView& out, const std::optional<MutableTensorView>& lse,
                  const std::optional<MutableTensorView>& weights, RingStatistics* statistics);

// dQ of this rank's query shard and dK, dV of its key shard (each summed over the ranks), and
// this rank's part of the score parameters' gradients (in `sums`).
void ring_backward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionOptions& options, const DistributedOptions& d,
                   const TensorView& dout, const TensorView& out, const TensorView& lse,
                   const MutableTensorView& dq, const MutableTensorView& dk,
                   const MutableTensorView& dv, ParameterSums& sums, RingStatistics* statistics);

}  // namespace qkv::distributed::internal
