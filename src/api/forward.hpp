// The forward's dispatch on a validated problem, for the doors that validate it themselves (the
// backward runs the forward when no saved O and LSE are given).
#pragma once

#include "core/problem.hpp"

namespace qkv::api {

// Runs the kernel that takes `problem`: decode-shaped ones on the split-KV kernel, the rest of
// float32 and bfloat16 on the fused kernel, float64 on the streaming kernel.
void run_forward(const detail::AttentionProblem& problem);

}  // namespace qkv::api
