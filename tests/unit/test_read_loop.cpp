// The bench's memory read loop (bench/read_loop.cpp), whose time is the memory floor of every
// decode shape: it must read each word it is given, on every SIMD target, from any start.

#include <gtest/gtest.h>

#include <cstddef>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "qkv/simd.hpp"
#include "read_loop.hpp"

namespace qkv {
namespace {

TEST(ReadLoop, ChangingAnyWordChangesTheFold) {
  std::mt19937_64 random(7);
  std::vector<std::uint64_t> words(300);
  for (std::uint64_t& word : words) word = random();
  for (const std::string& target : simd_targets()) {
    force_simd_target(target);
    EXPECT_EQ(bench::fold_words(words.data(), 0), 0u) << target;
    // Counts below, at and past a step of eight vectors (8 · 8 words on AVX-512), from an
    // aligned start and from one word past it.
    for (const std::size_t start : {std::size_t{0}, std::size_t{1}}) {
      const std::vector<std::size_t> counts{1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 129, 299 - start};
      for (const std::size_t count : counts) {
        const std::uint64_t* first = words.data() + start;
        const std::uint64_t folded = bench::fold_words(first, count);
        for (std::size_t i = 0; i < count; ++i) {
          words[start + i] ^= std::uint64_t{1} << (i % 64);
          EXPECT_NE(bench::fold_words(first, count), folded)
              << target << ": word " << i << " of " << count << " from " << start;
          words[start + i] ^= std::uint64_t{1} << (i % 64);
        }
      }
    }
  }
  force_simd_target("");
}

}  // namespace
}  // namespace qkv
