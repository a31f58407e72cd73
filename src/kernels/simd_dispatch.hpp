// Run-time SIMD target selection shared by every dispatched kernel.
#pragma once

namespace qkv::kernels {

// Applies QKV_SIMD (a target name, see qkv::force_simd_target) the first time it is called;
// every dispatched kernel calls it before HWY_DYNAMIC_DISPATCH.
void apply_simd_environment();

}  // namespace qkv::kernels
