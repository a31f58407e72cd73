// SIMD targets: which instruction sets the fast kernels were compiled for, which one runs.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qkv {

// The targets compiled into this build that this CPU can run, best first, by Highway's names
// (e.g. "AVX3_DL", "AVX3", "AVX2", "SSE4", "EMU128").
std::vector<std::string> simd_targets();

// The target the kernels dispatch to now.
std::string simd_target();

// Makes the kernels use `name` (one of simd_targets(), any case); an empty name restores the
// best. The environment variable QKV_SIMD, read at the first call of any kernel, does the same.
// Throws qkv::Error for a name this build or CPU cannot run.
void force_simd_target(std::string_view name);

}  // namespace qkv
