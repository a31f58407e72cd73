// Which SIMD target runs: Highway picks the best one the CPU supports; QKV_SIMD or
// qkv::force_simd_target restrict it to one, so tests can cover every compiled target.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/simd.cpp"
#include <hwy/foreach_target.h>  // IWYU pragma: keep
#include <hwy/highway.h>

HWY_BEFORE_NAMESPACE();
namespace qkv::kernels {
namespace HWY_NAMESPACE {

const char* ThisTargetName() {
  return hwy::TargetName(HWY_TARGET);
}

}  // namespace HWY_NAMESPACE
}  // namespace qkv::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <mutex>

#include "kernels/simd_dispatch.hpp"
#include "qkv/error.hpp"
#include "qkv/simd.hpp"

namespace qkv {

namespace kernels {

HWY_EXPORT(ThisTargetName);

// The name of the target that runs (dispatched from this namespace: with a single target compiled
// in, the dispatch is a direct call to N_<target>::ThisTargetName).
const char* running_target_name() {
  return HWY_DYNAMIC_DISPATCH(ThisTargetName)();
}

void apply_simd_environment() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (const char* name = std::getenv("QKV_SIMD"); name != nullptr && *name != '\0') {
      force_simd_target(name);
    }
  });
}

}  // namespace kernels

namespace {

std::string upper(std::string_view text) {
  std::string result(text);
  for (char& c : result) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return result;
}

// Every compiled target the CPU supports, read once, before any forcing narrows what Highway
// reports as supported.
const std::vector<std::int64_t>& available_targets() {
  static const std::vector<std::int64_t> targets = hwy::SupportedAndGeneratedTargets();
  return targets;
}

}  // namespace

std::vector<std::string> simd_targets() {
  std::vector<std::string> names;
  for (std::int64_t target : available_targets()) names.emplace_back(hwy::TargetName(target));
  return names;
}

std::string simd_target() {
  kernels::apply_simd_environment();
  return kernels::running_target_name();
}

void force_simd_target(std::string_view name) {
  available_targets();  // list them while Highway still reports all of them
  if (name.empty()) {
    hwy::SetSupportedTargetsForTest(0);
    return;
  }
  for (std::int64_t target : available_targets()) {
    if (upper(name) == hwy::TargetName(target)) {
      hwy::SetSupportedTargetsForTest(target);
      return;
    }
  }
  throw Error(fmt::format("simd target: expected one of {} (compiled and supported here), got '{}'",
                          fmt::join(simd_targets(), ", "), name));
}

}  // namespace qkv
#endif  // HWY_ONCE
