// attention_forward: validate once at the door, then hand the plain problem to a kernel.

#include "qkv/attention.hpp"

#include <fmt/format.h>

#include "api/forward.hpp"
#include "core/problem.hpp"
#include "kernels/decode_attention.hpp"
#include "kernels/fused_attention.hpp"
#include "kernels/streaming_attention.hpp"
#include "qkv/error.hpp"

namespace qkv {

const char* causal_align_name(CausalAlign align) {
  return align == CausalAlign::bottom_right ? "bottom-right" : "top-left";
}

CausalAlign parse_causal_align(std::string_view name) {
  if (name == "bottom-right") return CausalAlign::bottom_right;
  if (name == "top-left") return CausalAlign::top_left;
  throw Error(fmt::format("causal_align: expected bottom-right or top-left, got '{}'", name));
}

const char* normalization_name(Normalization normalization) {
  return normalization == Normalization::sigmoid ? "sigmoid" : "softmax";
}

Normalization parse_normalization(std::string_view name) {
  if (name == "softmax") return Normalization::softmax;
  if (name == "sigmoid") return Normalization::sigmoid;
  throw Error(fmt::format("normalization: expected softmax or sigmoid, got '{}'", name));
}

void attention_forward(const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const AttentionOutputs& outputs) {
  api::run_forward(detail::make_problem(q, k, v, options, outputs));
}

void api::run_forward(const detail::AttentionProblem& problem) {
  // Dispatch once, here: decoding shapes stream K and V once; the fused kernel takes the rest of
  // float32 and bfloat16; the streaming kernel takes float64.
  if (kernels::decode_attention_supports(problem)) {
    kernels::decode_attention(problem);
  } else if (kernels::fused_attention_supports(problem)) {
    kernels::fused_attention(problem);
  } else {
    kernels::streaming_attention(problem);
  }
}

}  // namespace qkv
