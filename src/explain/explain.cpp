// The walkthrough of qkv/explain.hpp: the projections written out as loops over rows and
// features, the scores, weights and output from the float64 reference (attention_reference),
// and the fast path run on the same inputs for comparison.

#include "qkv/explain.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <random>

#include "qkv/error.hpp"
#include "qkv/reference.hpp"
#include "qkv/simd.hpp"

namespace qkv {

namespace {

// Element (i, j) of a rank-2 float32 or float64 view, as a double.
double element(const TensorView& view, std::int64_t i, std::int64_t j) {
  const std::int64_t offset = i * view.strides[0] + j * view.strides[1];
  if (view.dtype == DType::float64) return static_cast<const double*>(view.data)[offset];
  return static_cast<const float*>(view.data)[offset];
}

Tensor checked_rows(const std::vector<std::string>& words, const TensorView& x,
                    std::int64_t embed_dim) {
  if (words.empty()) throw Error("words: expected at least one word, got none");
  const auto n = static_cast<std::int64_t>(words.size());
  if (x.rank != 2 || x.shape[0] != n || x.shape[1] != embed_dim) {
    throw Error(
        fmt::format("x: expected [words, E] = [{}, {}], got {}", n, embed_dim, x.shape_string()));
  }
  if (x.dtype != DType::float32 && x.dtype != DType::float64) {
    throw Error(fmt::format("x: expected dtype float32 or float64, got {}", dtype_name(x.dtype)));
  }
  if (x.data == nullptr) throw Error("x: expected data, got a null pointer");
  Tensor rows(DType::float64, {n, embed_dim});
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t e = 0; e < embed_dim; ++e) {
      const double value = element(x, i, e);
      if (!std::isfinite(value)) {
        throw Error(fmt::format("x: expected finite values, got {} at [{}, {}]", value, i, e));
      }
      rows.data<double>()[i * embed_dim + e] = value;
    }
  }
  return rows;
}

void check_layer(const MultiHeadAttention& layer) {
  const MultiHeadAttentionOptions& o = layer.options();
  if ((o.kdim != 0 && o.kdim != o.embed_dim) || (o.vdim != 0 && o.vdim != o.embed_dim)) {
    throw Error(fmt::format(
        "layer: expected a self-attention layer (kdim = vdim = embed_dim = {}), got kdim {} and "
        "vdim {}",
        o.embed_dim, o.kdim, o.vdim));
  }
  if (o.normalization != Normalization::softmax || o.sinks || o.add_bias_kv || o.add_zero_attn) {
    throw Error(
        "layer: expected softmax attention over the words alone (no sigmoid, sinks, bias_kv or "
        "zero_attn), got a layer with one of them");
  }
}

// Step 1: rows of X·Wᵀ + b for the block `part` (0: Q, 1: K, 2: V) of in_proj_weight [3E, E]
// and in_proj_bias [3E], as [N, H, Dh] (the same memory as [N, E]).
Tensor project(const Tensor& x, const MultiHeadAttention& layer, std::int64_t part) {
  const std::int64_t n = x.shape()[0], e = x.shape()[1], heads = layer.options().num_heads;
  const Tensor& weight = layer.parameters().at("in_proj_weight");
  const auto bias = layer.parameters().find("in_proj_bias");
  Tensor out(DType::float64, {n, heads, e / heads});
  for (std::int64_t i = 0; i < n; ++i) {
    for (std::int64_t f = 0; f < e; ++f) {
      const float* w = weight.data<float>() + (part * e + f) * e;
      double sum =
          bias == layer.parameters().end() ? 0.0 : bias->second.data<float>()[part * e + f];
      for (std::int64_t d = 0; d < e; ++d) sum += x.data<double>()[i * e + d] * w[d];
      out.data<double>()[i * e + f] = sum;
    }
  }
  return out;
}

Tensor rounded_to_float32(const Tensor& t) {
  Tensor out(DType::float32, t.shape());
  for (std::int64_t i = 0; i < t.numel(); ++i)
    out.data<float>()[i] = static_cast<float>(t.data<double>()[i]);
  return out;
}

}  // namespace

ExplainedAttention explain_attention(const std::vector<std::string>& words, const TensorView& x,
                                     const MultiHeadAttention& layer, bool causal) {
  check_layer(layer);
  ExplainedAttention r;
  const MultiHeadAttentionOptions& o = layer.options();
  const auto n = static_cast<std::int64_t>(words.size());
  r.words = words;
  r.x = checked_rows(words, x, o.embed_dim);
  r.in_proj_weight = layer.parameters().at("in_proj_weight");
  if (const auto bias = layer.parameters().find("in_proj_bias"); bias != layer.parameters().end())
    r.in_proj_bias = bias->second;
  r.heads = o.num_heads;
  r.head_dim = o.embed_dim / o.num_heads;
  r.causal = causal;

  // 1. Projections.
  r.q = project(r.x, layer, 0);
  r.k = project(r.x, layer, 1);
  r.v = project(r.x, layer, 2);

  // 2–4. Scores, weights and output from the reference, with the layer's score and parameters.
  AttentionOptions options = layer.attention_options();
  options.causal = causal;
  options.causal_align = CausalAlign::top_left;
  r.score = options.score;
  for (const ScoreLayerParameter& parameter :
       score_layer(o.score, r.heads, r.head_dim, o.additive_dim).parameters)
    r.score_parameters[parameter.name] = layer.parameters().at(parameter.name);
  r.scale = options.scale.value_or(default_score_scale(options.score, r.head_dim));
  const std::vector<std::int64_t> rows_shape{1, n, r.heads, r.head_dim};
  auto as_rows = [&](const Tensor& t) {
    return TensorView::contiguous(t.raw(), t.dtype(), rows_shape);
  };
  auto as_pairs = [&](Tensor& t) {
    return MutableTensorView::contiguous(t.raw(), DType::float64, {1, r.heads, n, n});
  };
  r.scores = Tensor(DType::float64, {r.heads, n, n});
  r.masked_scores = Tensor(DType::float64, {r.heads, n, n});
  r.weights = Tensor(DType::float64, {r.heads, n, n});
  r.output = Tensor(DType::float64, {n, r.heads, r.head_dim});
  AttentionOutputs outputs;
  outputs.out = MutableTensorView::contiguous(r.output.raw(), DType::float64, rows_shape);
  outputs.weights = as_pairs(r.weights);
  attention_reference(as_rows(r.q), as_rows(r.k), as_rows(r.v), options, outputs,
                      as_pairs(r.masked_scores));
  if (causal) {  // the scores the mask hid: one more evaluation, without it
    AttentionOptions unmasked = options;
    unmasked.causal = false;
    AttentionOutputs scratch;
    Tensor unmasked_output(DType::float64, {n, r.heads, r.head_dim});
    scratch.out = MutableTensorView::contiguous(unmasked_output.raw(), DType::float64, rows_shape);
    attention_reference(as_rows(r.q), as_rows(r.k), as_rows(r.v), unmasked, scratch,
                        as_pairs(r.scores));
  } else {
    r.scores = r.masked_scores;
  }

  // The fast path on the same inputs, rounded to float32.
  const Tensor q32 = rounded_to_float32(r.q), k32 = rounded_to_float32(r.k),
               v32 = rounded_to_float32(r.v);
  Tensor fast(DType::float32, {n, r.heads, r.head_dim});
  AttentionOutputs fast_outputs;
  fast_outputs.out = MutableTensorView::contiguous(fast.raw(), DType::float32, rows_shape);
  attention_forward(as_rows(q32), as_rows(k32), as_rows(v32), options, fast_outputs);
  for (std::int64_t i = 0; i < fast.numel(); ++i) {
    r.fast_path_difference = std::max(r.fast_path_difference,
                                      std::abs(fast.data<float>()[i] - r.output.data<double>()[i]));
  }
  r.fast_path_target = simd_target();
  return r;
}

ExplainedAttention explain_attention(const std::vector<std::string>& words, Score score,
                                     std::int64_t dim, std::int64_t heads, bool causal,
                                     std::uint64_t seed) {
  if (dim < 1 || heads < 1 || dim % heads != 0) {
    throw Error(fmt::format(
        "dim, heads: expected dim >= 1 and heads a divisor of it, got {} and {}", dim, heads));
  }
  MultiHeadAttentionOptions options;
  options.embed_dim = dim;
  options.num_heads = heads;
  options.score = score;
  options.bias = false;
  const MultiHeadAttention layer(options, seed);
  const Tensor x = seeded_word_embeddings(words, dim, seed);
  return explain_attention(words, x.view(), layer, causal);
}

Tensor seeded_word_embeddings(const std::vector<std::string>& words, std::int64_t dim,
                              std::uint64_t seed) {
  if (dim < 1) throw Error(fmt::format("dim: expected >= 1, got {}", dim));
  Tensor rows(DType::float64, {static_cast<std::int64_t>(words.size()), dim});
  for (std::size_t w = 0; w < words.size(); ++w) {
    // FNV-1a of the word's bytes, mixed with the seed: the same on every platform.
    std::uint64_t hash = 14695981039346656037ULL ^ seed;
    for (const char c : words[w]) {
      hash ^= static_cast<unsigned char>(c);
      hash *= 1099511628211ULL;
    }
    std::mt19937_64 generator(hash);
    std::normal_distribution<double> normal(0.0, 1.0);
    for (std::int64_t d = 0; d < dim; ++d)
      rows.data<double>()[static_cast<std::int64_t>(w) * dim + d] = normal(generator);
  }
  return rows;
}

}  // namespace qkv
