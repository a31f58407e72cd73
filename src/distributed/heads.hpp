// Head-parallel attention (see distributed_attention.cpp): the forward and the backward of one
// call, each rank computing whole sequences of H/P heads.
#pragma once

#include "distributed/shards.hpp"

namespace qkv::distributed::internal {

void heads_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionOptions& options, const DistributedOptions& d,
                   const MutableTensorView& out, const std::optional<MutableTensorView>& lse);

void heads_backward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                    const AttentionOptions& options, const DistributedOptions& d,
                    const TensorView& dout, const TensorView& out, const TensorView& lse,
                    const MutableTensorView& dq, const MutableTensorView& dk,
                    const MutableTensorView& dv, ParameterSums& sums);

}  // namespace qkv::distributed::internal
