// The bench's memory read loop, in the vectors of the SIMD target that runs (Highway's dynamic
// dispatch, QKV_SIMD included). On two threads of an Intel Xeon (Sapphire Rapids or later), a loop
// of 16-byte vectors (what every x86 and ARM target has) read 23-25 GB/s, where one of AVX2's
// 32-byte loads read 28-30 and one of AVX-512's 64-byte loads 30-31: the memory floors of the bench
// had been 20% below what the machine can read. Four loads a step read 26 GB/s in AVX2 vectors,
// eight 28-30.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "read_loop.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

#include <cstddef>
#include <cstdint>

#include "read_loop.hpp"

HWY_BEFORE_NAMESPACE();
namespace qkv::bench {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

// Eight loads a step, folded by XOR into four independent chains: nothing but the loads limits
// the loop.
std::uint64_t FoldWords(const std::uint64_t* HWY_RESTRICT words, std::size_t count) {
  const hn::ScalableTag<std::uint64_t> d;
  const std::size_t lanes = hn::Lanes(d);
  auto a = hn::Zero(d), b = hn::Zero(d), c = hn::Zero(d), e = hn::Zero(d);
  std::size_t i = 0;
  for (; i + 8 * lanes <= count; i += 8 * lanes) {
    a = hn::Xor(a, hn::Xor(hn::LoadU(d, words + i), hn::LoadU(d, words + i + 4 * lanes)));
    b = hn::Xor(b, hn::Xor(hn::LoadU(d, words + i + lanes), hn::LoadU(d, words + i + 5 * lanes)));
    c = hn::Xor(c,
                hn::Xor(hn::LoadU(d, words + i + 2 * lanes), hn::LoadU(d, words + i + 6 * lanes)));
    e = hn::Xor(e,
                hn::Xor(hn::LoadU(d, words + i + 3 * lanes), hn::LoadU(d, words + i + 7 * lanes)));
  }
  // The lanes folded one by one (SumOfLanes of 64-bit lanes adds them as signed integers on
  // AVX-512, whose overflow UBSan reports).
  HWY_ALIGN std::uint64_t lanes_of[hn::MaxLanes(d)];
  hn::Store(hn::Xor(hn::Xor(a, b), hn::Xor(c, e)), d, lanes_of);
  std::uint64_t folded = 0;
  for (std::size_t lane = 0; lane < lanes; ++lane) folded ^= lanes_of[lane];
  for (; i < count; ++i) folded ^= words[i];
  return folded;
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::bench
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace qkv::bench {

HWY_EXPORT(FoldWords);

std::uint64_t fold_words(const std::uint64_t* words, std::size_t count) {
  return HWY_DYNAMIC_DISPATCH(FoldWords)(words, count);
}

}  // namespace qkv::bench
#endif  // HWY_ONCE
