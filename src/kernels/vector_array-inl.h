// N vectors that a kernel keeps across a loop: the accumulators of a register tile, or the rows it
// has loaded once to use several times. Per SIMD target:
//   fixed-size vectors (x86, NEON): an array of vectors. The loops over it run to compile-time
//     bounds and are unrolled, so the compiler keeps every element in a register;
//   scalable vectors (SVE): a vector whose size is known only at run time cannot be an array
//     element (nor a class member), so the elements live in a buffer sized for the longest vector
//     the target allows, and every access is a load or a store. Correct at every vector length,
//     but not tuned: SVE speed cannot be measured on the machines qkv is developed on.
// Included after hwy/highway.h by the kernels.

// Per-target include guard (Highway's convention for headers included once per target).
#if defined(QKV_KERNELS_VECTOR_ARRAY_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef QKV_KERNELS_VECTOR_ARRAY_INL_H_
#undef QKV_KERNELS_VECTOR_ARRAY_INL_H_
#else
#define QKV_KERNELS_VECTOR_ARRAY_INL_H_
#endif

#include <hwy/highway.h>

#include <cstddef>
#include <type_traits>

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

namespace hn = hwy::HWY_NAMESPACE;

// Get(i) and Set(i, v) for i in [0, N); a kernel's tile of R rows × C vectors indexes r·C + c.
template <class D, int N>
class VectorArray {
 public:
  using V = hn::Vec<D>;
  // Declared here so that it is compiled for this target (an implicit one may not be).
  HWY_INLINE VectorArray() {}
#if HWY_HAVE_SCALABLE
  HWY_INLINE V Get(int i) const {
    return hn::LoadU(D(), lanes_ + i * kMaxLanes);
  }
  HWY_INLINE void Set(int i, V v) {
    hn::StoreU(v, D(), lanes_ + i * kMaxLanes);
  }

 private:
  static constexpr std::size_t kMaxLanes = hn::MaxLanes(D());
  hn::TFromD<D> lanes_[N * kMaxLanes];
#else
  HWY_INLINE V Get(int i) const {
    return vectors_[i];
  }
  HWY_INLINE void Set(int i, V v) {
    vectors_[i] = v;
  }

 private:
  V vectors_[N];
#endif
};

// body(std::integral_constant<int, n>{}) for n = rows clamped to 1 … kMaxRows: a register tile's
// row count as a compile-time constant.
template <int kMaxRows, class Body>
HWY_INLINE void WithRows(int rows, Body&& body) {
  if constexpr (kMaxRows > 1) {
    if (rows < kMaxRows) {
      WithRows<kMaxRows - 1>(rows, body);
      return;
    }
  }
  body(std::integral_constant<int, kMaxRows>{});
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#endif  // per-target include guard
