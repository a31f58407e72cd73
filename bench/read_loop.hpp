// The bench's memory read loop (bench/read_loop.cpp), in the vectors of the SIMD target that
// runs: call qkv::simd_target() first, so that QKV_SIMD has narrowed Highway's choice.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qkv::bench {

// A value that depends on every one of words[0 … count), each read once, in whole vectors.
std::uint64_t fold_words(const std::uint64_t* words, std::size_t count);

}  // namespace qkv::bench
