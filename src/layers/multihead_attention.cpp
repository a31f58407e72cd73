// MultiHeadAttention: PyTorch's layer around qkv's attention.
//
// The projections are GEMMs on the inputs' rows in their storage order ((l, n) or, batch first,
// (n, l)), so the projected Q and the attention output are read and written in place through
// strided [N, L, H, E/H] views. K and V are copied into dense [N, S', H, E/H] tensors because
// bias_k / bias_v and the zero key extend them. The masks become qkv's: PyTorch's boolean masks
// say where NOT to attend, qkv's where one may; key padding and a boolean attn_mask merge into
// one mask, a float attn_mask becomes the score bias. The backward runs the same steps in reverse
// through attention_backward and the projections' GEMMs.

#include "qkv/multihead_attention.hpp"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <type_traits>
#include <utility>

#include "core/score_unit.hpp"
#include "io/untrusted_file.hpp"
#include "layers/dense.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"

namespace qkv {

namespace {

Tensor filled(std::vector<std::int64_t> shape, std::mt19937_64& rng, double bound, bool normal) {
  Tensor t(DType::float32, std::move(shape));
  std::uniform_real_distribution<double> uniform(-bound, bound);
  std::normal_distribution<double> gaussian(0.0, bound);
  for (std::int64_t n = 0; n < t.numel(); ++n)
    t.data<float>()[n] = static_cast<float>(normal ? gaussian(rng) : uniform(rng));
  return t;
}

// Xavier (Glorot) bound of a [fan_out, fan_in] matrix: uniform ±sqrt(6 / (in + out)).
double xavier(std::int64_t fan_out, std::int64_t fan_in) {
  return std::sqrt(6.0 / static_cast<double>(fan_in + fan_out));
}

// A score's layer parameter as ScoreLayerParameter::start says.
Tensor started(const ScoreLayerParameter& parameter, std::mt19937_64& rng) {
  using Start = ScoreLayerParameter::Start;
  const std::vector<std::int64_t>& shape = parameter.shape;
  switch (parameter.start) {
    case Start::identity: {
      Tensor t(DType::float32, shape);  // zeros, then each head's diagonal
      const std::int64_t rows = shape.at(shape.size() - 2), columns = shape.back();
      for (std::int64_t m = 0; m < t.numel() / (rows * columns); ++m)
        for (std::int64_t d = 0; d < std::min(rows, columns); ++d)
          t.data<float>()[(m * rows + d) * columns + d] = 1.0f;
      return t;
    }
    case Start::xavier:
      return filled(shape, rng, xavier(shape.at(shape.size() - 2), shape.back()), false);
    case Start::uniform:
      return filled(shape, rng, parameter.value, false);
    case Start::constant: {
      Tensor t(DType::float32, shape);
      std::fill_n(t.data<float>(), t.numel(), static_cast<float>(parameter.value));
      return t;
    }
  }
  throw Error("score layer parameter: unknown start");
}

// The AttentionOptions member and the AttentionGradients slot an attention parameter binds.
struct BoundOption {
  std::optional<TensorView> AttentionOptions::*option;
  detail::GradientSlot gradient;
};
BoundOption bound_option(const ScoreLayerParameter& parameter) {
  if (parameter.option == "sinks") return {&AttentionOptions::sinks, &AttentionGradients::dsinks};
  for (const detail::ScoreParameterOption& option : detail::score_parameter_options())
    if (parameter.option == option.name) return {option.option, option.gradient};
  throw Error(
      fmt::format("score layer parameter {}: no option '{}'", parameter.name, parameter.option));
}

// What the layer learns for its attention besides the projections: its score's parameters
// (score_layer) and its sinks.
std::vector<ScoreLayerParameter> attention_parameters(const MultiHeadAttentionOptions& o) {
  const std::int64_t head = o.embed_dim / o.num_heads;
  std::vector<ScoreLayerParameter> parameters =
      score_layer(o.score, o.num_heads, head, o.additive_dim).parameters;
  if (o.sinks) {
    parameters.push_back(
        {"sinks", "sinks", {o.num_heads}, ScoreLayerParameter::Start::constant, 0.0});
  }
  return parameters;
}

Tensor like(const Tensor& t) {
  return Tensor(DType::float32, t.shape());
}

}  // namespace

// What forward keeps for backward.
struct MultiHeadAttention::Saved {
  std::int64_t batch = 0, q_len = 0, k_len = 0, keys = 0;  // N, L, S, S'
  Tensor query, key, value;                                // the inputs (dense copies)
  Tensor q_rows;                                           // [L·N, E] projected, input row order
  Tensor k_full, v_full;                                   // [N, S', H, E/H]
  Tensor o_rows;                                           // [L·N, E] attention output
  Tensor lse;                                              // [N, H, L]
  Tensor mask, bias;                                       // qkv's masks (kept alive)
  AttentionOptions options;
  std::array<std::int64_t, 4> q_strides{}, k_strides{};  // of [N, L|S, H, E/H] in row order
};

ScoreLayer score_layer(Score score, std::int64_t heads, std::int64_t head_dim,
                       std::int64_t additive_dim) {
  if (heads < 1 || head_dim < 1 || additive_dim < 0) {
    throw Error(fmt::format(
        "heads, head_dim, additive_dim: expected >= 1, >= 1 and >= 0, got {}, {} and {}", heads,
        head_dim, additive_dim));
  }
  return detail::score_unit(score).layer(heads, head_dim,
                                         additive_dim == 0 ? head_dim : additive_dim);
}

MultiHeadAttention::MultiHeadAttention(const MultiHeadAttentionOptions& options, std::uint64_t seed)
    : options_(options) {
  MultiHeadAttentionOptions& o = options_;
  if (o.kdim == 0) o.kdim = o.embed_dim;
  if (o.vdim == 0) o.vdim = o.embed_dim;
  if (o.embed_dim <= 0 || o.num_heads <= 0 || o.embed_dim % o.num_heads != 0) {
    throw Error(fmt::format("embed_dim: expected a positive multiple of num_heads ({}), got {}",
                            o.num_heads, o.embed_dim));
  }
  if (o.kdim < 0 || o.vdim < 0) {
    throw Error(fmt::format("kdim, vdim: expected >= 0, got {} and {}", o.kdim, o.vdim));
  }
  if (!(o.dropout >= 0.0 && o.dropout < 1.0)) {
    throw Error(fmt::format("dropout: expected a probability in [0, 1), got {}", o.dropout));
  }
  const std::int64_t E = o.embed_dim, H = o.num_heads, head = E / H;
  if (o.additive_dim == 0) o.additive_dim = head;
  std::mt19937_64 rng(seed);
  if (o.kdim == E && o.vdim == E) {
    parameters_["in_proj_weight"] = filled({3 * E, E}, rng, xavier(3 * E, E), false);
  } else {
    parameters_["q_proj_weight"] = filled({E, E}, rng, xavier(E, E), false);
    parameters_["k_proj_weight"] = filled({E, o.kdim}, rng, xavier(E, o.kdim), false);
    parameters_["v_proj_weight"] = filled({E, o.vdim}, rng, xavier(E, o.vdim), false);
  }
  if (o.bias) {
    parameters_["in_proj_bias"] = Tensor(DType::float32, {3 * E});
    parameters_["out_proj.bias"] = Tensor(DType::float32, {E});
  }
  parameters_["out_proj.weight"] =
      filled({E, E}, rng, 1.0 / std::sqrt(static_cast<double>(E)), false);
  if (o.add_bias_kv) {  // xavier-normal of a [1, 1, E] tensor: std sqrt(2 / (1 + E))
    const double deviation = std::sqrt(2.0 / static_cast<double>(1 + E));
    parameters_["bias_k"] = filled({1, 1, E}, rng, deviation, true);
    parameters_["bias_v"] = filled({1, 1, E}, rng, deviation, true);
  }
  attention_parameters_ = attention_parameters(o);
  score_scale_ = score_layer(o.score, H, head, o.additive_dim).scale;
  for (const ScoreLayerParameter& parameter : attention_parameters_)
    parameters_[parameter.name] = started(parameter, rng);
  zero_grad();
}

void MultiHeadAttention::zero_grad() {
  // In place, as PyTorch's zero_grad: an optimizer may hold the gradients' addresses.
  for (const auto& [name, tensor] : parameters_) {
    const auto found = gradients_.find(name);
    if (found != gradients_.end() && found->second.shape() == tensor.shape()) {
      std::memset(found->second.raw(), 0, found->second.nbytes());
    } else {
      gradients_[name] = like(tensor);
    }
  }
}

void MultiHeadAttention::load_state_dict(const NamedTensors& state) {
  for (const auto& [name, tensor] : state) {
    if (parameters_.count(name) == 0) {
      throw Error(
          fmt::format("state_dict: unexpected tensor '{}' for this layer", io::escaped(name)));
    }
  }
  NamedTensors loaded;
  for (const auto& [name, current] : parameters_) {
    const auto found = state.find(name);
    if (found == state.end()) {
      throw Error(fmt::format("state_dict: missing tensor '{}'", name));
    }
    const Tensor& given = found->second;
    if (given.shape() != current.shape()) {
      throw Error(fmt::format("state_dict: expected '{}' of shape [{}], got [{}]", name,
                              fmt::join(current.shape(), ", "), fmt::join(given.shape(), ", ")));
    }
    if (given.dtype() != DType::float32 && given.dtype() != DType::float64 &&
        given.dtype() != DType::bfloat16) {
      throw Error(fmt::format("state_dict: expected '{}' in a float dtype, got {}", name,
                              dtype_name(given.dtype())));
    }
    Tensor converted(DType::float32, given.shape());
    for (std::int64_t n = 0; n < given.numel(); ++n) {
      float value = 0.0f;
      if (given.dtype() == DType::float32) value = given.data<float>()[n];
      if (given.dtype() == DType::float64) value = static_cast<float>(given.data<double>()[n]);
      if (given.dtype() == DType::bfloat16) value = from_bfloat16(given.data<std::uint16_t>()[n]);
      converted.data<float>()[n] = value;
    }
    loaded[name] = std::move(converted);
  }
  parameters_ = std::move(loaded);
}

void MultiHeadAttention::load(const std::string& path) {
  load_state_dict(load_safetensors(path));
}

void MultiHeadAttention::save(const std::string& path) const {
  save_safetensors(path, parameters_);
}

namespace {

// The layer's projection matrices (and biases, null when absent) in `tensors` (parameters or
// their gradients): slices of the packed in_proj_* or the separate tensors.
template <class Map>
auto projections(Map& tensors, std::int64_t E, std::int64_t kdim) {
  using Float = std::conditional_t<std::is_const_v<Map>, const float, float>;
  struct {
    Float *wq, *wk, *wv, *bq = nullptr, *bk = nullptr, *bv = nullptr;
  } p{};
  if (auto packed = tensors.find("in_proj_weight"); packed != tensors.end()) {
    Float* w = packed->second.template data<float>();
    p.wq = w;
    p.wk = w + E * E;
    p.wv = w + 2 * E * E;
  } else {
    p.wq = tensors.find("q_proj_weight")->second.template data<float>();
    p.wk = tensors.find("k_proj_weight")->second.template data<float>();
    p.wv = tensors.find("v_proj_weight")->second.template data<float>();
  }
  if (auto bias = tensors.find("in_proj_bias"); bias != tensors.end()) {
    Float* b = bias->second.template data<float>();
    p.bq = b;
    p.bk = b + E;
    p.bv = b + 2 * E;
  }
  (void)kdim;
  return p;
}

// The data of a tensor that may be absent (null then).
float* optional_data(NamedTensors& tensors, const char* name) {
  const auto found = tensors.find(name);
  return found == tensors.end() ? nullptr : found->second.data<float>();
}

void check_sequence(const TensorView& x, const char* name, std::int64_t features, bool batch_first,
                    std::int64_t& length, std::int64_t& batch) {
  if (x.rank != 3 || x.shape[2] != features) {
    throw Error(fmt::format("{}: expected {} with {} features, got {}", name,
                            batch_first ? "[N, L, E]" : "[L, N, E]", features, x.shape_string()));
  }
  if (x.dtype != DType::float32) {
    throw Error(fmt::format("{}: expected dtype float32, got {}", name, dtype_name(x.dtype)));
  }
  length = batch_first ? x.shape[1] : x.shape[0];
  batch = batch_first ? x.shape[0] : x.shape[1];
}

// Strides, in floats, of the [N, length, H, head] view of rows [length·N, E] in input order.
std::array<std::int64_t, 4> row_view_strides(bool batch_first, std::int64_t length,
                                             std::int64_t batch, std::int64_t E,
                                             std::int64_t head) {
  return batch_first ? std::array<std::int64_t, 4>{length * E, E, head, 1}
                     : std::array<std::int64_t, 4>{E, batch * E, head, 1};
}

// The row of (batch n, position s) among rows in input order.
std::int64_t row_index(bool batch_first, std::int64_t n, std::int64_t s, std::int64_t length,
                       std::int64_t batch) {
  return batch_first ? n * length + s : s * batch + n;
}

}  // namespace

AttentionOptions MultiHeadAttention::attention_options() const {
  AttentionOptions options;
  options.score = options_.score;
  options.scale = score_scale_;
  options.normalization = options_.normalization;
  options.sigmoid_bias = options_.sigmoid_bias;
  for (const ScoreLayerParameter& parameter : attention_parameters_)
    options.*bound_option(parameter).option = parameters_.at(parameter.name).view();
  return options;
}

MultiHeadAttentionResult MultiHeadAttention::forward(const TensorView& query, const TensorView& key,
                                                     const TensorView& value,
                                                     const MultiHeadAttentionCall& call) {
  const MultiHeadAttentionOptions& o = options_;
  const std::int64_t E = o.embed_dim, H = o.num_heads, head = E / H;
  auto s = std::make_shared<Saved>();
  std::int64_t L = 0, N = 0, S = 0, key_batch = 0, value_len = 0, value_batch = 0;
  check_sequence(query, "query", E, o.batch_first, L, N);
  check_sequence(key, "key", o.kdim, o.batch_first, S, key_batch);
  check_sequence(value, "value", o.vdim, o.batch_first, value_len, value_batch);
  if (key_batch != N || value_batch != N || value_len != S) {
    throw Error(
        fmt::format("key, value: expected {} sequences like query and one length, got "
                    "key {} and value {}",
                    N, key.shape_string(), value.shape_string()));
  }
  const std::int64_t keys = S + (o.add_bias_kv ? 1 : 0) + (o.add_zero_attn ? 1 : 0);
  s->batch = N;
  s->q_len = L;
  s->k_len = S;
  s->keys = keys;
  s->query = to_tensor(query);
  s->key = to_tensor(key);
  s->value = to_tensor(value);

  // 1. Projections.
  const auto w = projections(std::as_const(parameters_), E, o.kdim);
  s->q_rows = Tensor(DType::float32, {L * N, E});
  Tensor k_rows(DType::float32, {S * N, E}), v_rows(DType::float32, {S * N, E});
  layers::affine(s->query.data<float>(), L * N, E, w.wq, w.bq, E, s->q_rows.data<float>());
  layers::affine(s->key.data<float>(), S * N, o.kdim, w.wk, w.bk, E, k_rows.data<float>());
  layers::affine(s->value.data<float>(), S * N, o.vdim, w.wv, w.bv, E, v_rows.data<float>());

  // 2. K and V with bias_k / bias_v and the zero key appended.
  s->k_full = Tensor(DType::float32, {N, keys, H, head});
  s->v_full = Tensor(DType::float32, {N, keys, H, head});
  const float* bias_k = optional_data(parameters_, "bias_k");
  const float* bias_v = optional_data(parameters_, "bias_v");
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t j = 0; j < keys; ++j) {
      float* k_row = s->k_full.data<float>() + (n * keys + j) * E;
      float* v_row = s->v_full.data<float>() + (n * keys + j) * E;
      const float* k_source = nullptr;
      const float* v_source = nullptr;
      if (j < S) {
        const std::int64_t row = row_index(o.batch_first, n, j, S, N);
        k_source = k_rows.data<float>() + row * E;
        v_source = v_rows.data<float>() + row * E;
      } else if (j == S && o.add_bias_kv) {
        k_source = bias_k;
        v_source = bias_v;
      }
      if (k_source == nullptr) continue;  // the zero key and value
      std::copy(k_source, k_source + E, k_row);
      std::copy(v_source, v_source + E, v_row);
    }
  }

  // 3. Masks in qkv's terms.
  s->options = attention_options();
  AttentionOptions& options = s->options;
  if (call.is_causal) {
    if (call.attn_mask) {  // one rule with the functions (PyTorch's scaled_dot_product_attention)
      throw Error(
          "attn_mask, is_causal: expected at most one of them (is_causal is the causal mask "
          "itself: pass it alone, or attn_mask alone), got both");
    }
    options.causal = true;
    options.causal_align = CausalAlign::top_left;
  }
  if (call.training && o.dropout > 0) {
    options.dropout = o.dropout;
    options.dropout_seed = call.dropout_seed;
  }
  const TensorView* attn = call.attn_mask ? &*call.attn_mask : nullptr;
  if (attn != nullptr) {
    const bool ok_shape =
        (attn->rank == 2 && attn->shape[0] == L && attn->shape[1] == S) ||
        (attn->rank == 3 && attn->shape[0] == N * H && attn->shape[1] == L && attn->shape[2] == S);
    if (!ok_shape) {
      throw Error(
          fmt::format("attn_mask: expected [L, S] = [{}, {}] or [N·H, L, S] = [{}, {}, "
                      "{}], got {}",
                      L, S, N * H, L, S, attn->shape_string()));
    }
    if (attn->dtype != DType::boolean && attn->dtype != DType::float32) {
      throw Error(fmt::format("attn_mask: expected dtype bool or float32, got {}",
                              dtype_name(attn->dtype)));
    }
  }
  const TensorView* padding = call.key_padding_mask ? &*call.key_padding_mask : nullptr;
  if (padding != nullptr) {
    if (padding->rank != 2 || padding->shape[0] != N || padding->shape[1] != S) {
      throw Error(fmt::format("key_padding_mask: expected [N, S] = [{}, {}], got {}", N, S,
                              padding->shape_string()));
    }
    if (padding->dtype != DType::boolean) {
      throw Error(
          fmt::format("key_padding_mask: expected dtype bool, got {}", dtype_name(padding->dtype)));
    }
  }
  const Tensor attn_dense = attn != nullptr ? to_tensor(*attn) : Tensor();
  const Tensor padding_dense = padding != nullptr ? to_tensor(*padding) : Tensor();
  const bool per_batch_attn = attn != nullptr && attn->rank == 3;
  // attn_mask element (n, h, l, s) for s < S.
  const auto attn_index = [&](std::int64_t n, std::int64_t h, std::int64_t l, std::int64_t j) {
    return ((per_batch_attn ? n * H + h : 0) * L + l) * S + j;
  };
  const bool bool_attn = attn != nullptr && attn->dtype == DType::boolean;
  if (bool_attn || padding != nullptr) {
    const std::int64_t mb = per_batch_attn || padding != nullptr ? N : 1;
    const std::int64_t mh = per_batch_attn && bool_attn ? H : 1;
    const std::int64_t ml = bool_attn ? L : 1;
    s->mask = Tensor(DType::boolean, {mb, mh, ml, keys});
    auto* allowed = s->mask.data<std::uint8_t>();
    for (std::int64_t n = 0; n < mb; ++n)
      for (std::int64_t h = 0; h < mh; ++h)
        for (std::int64_t l = 0; l < ml; ++l)
          for (std::int64_t j = 0; j < keys; ++j) {
            bool hidden = false;
            if (j < S && padding != nullptr) hidden = padding_dense.data<std::uint8_t>()[n * S + j];
            if (j < S && bool_attn)
              hidden = hidden || attn_dense.data<std::uint8_t>()[attn_index(n, h, l, j)];
            allowed[((n * mh + h) * ml + l) * keys + j] = hidden ? 0 : 1;
          }
    options.mask = s->mask.view();
  }
  if (attn != nullptr && !bool_attn) {
    const std::int64_t bb = per_batch_attn ? N : 1, bh = per_batch_attn ? H : 1;
    s->bias = Tensor(DType::float32, {bb, bh, L, keys});
    for (std::int64_t n = 0; n < bb; ++n)
      for (std::int64_t h = 0; h < bh; ++h)
        for (std::int64_t l = 0; l < L; ++l)
          for (std::int64_t j = 0; j < S; ++j)
            s->bias.data<float>()[((n * bh + h) * L + l) * keys + j] =
                attn_dense.data<float>()[attn_index(n, h, l, j)];
    options.bias = s->bias.view();
  }

  // 4. Attention.
  s->q_strides = row_view_strides(o.batch_first, L, N, E, head);
  s->o_rows = Tensor(DType::float32, {L * N, E});
  s->lse = Tensor(DType::float64, {N, H, L});  // for the backward's P: every bit kept
  const TensorView q_view{
      s->q_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s->q_strides};
  MutableTensorView o_view{
      s->o_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s->q_strides};
  Tensor weights;
  if (call.need_weights) weights = Tensor(DType::float32, {N, H, L, keys});
  AttentionOutputs outputs{o_view, s->lse.mutable_view(), std::nullopt};
  if (call.need_weights) outputs.weights = weights.mutable_view();
  attention_forward(q_view, s->k_full.view(), s->v_full.view(), options, outputs);

  // 5. Output projection, in the query's layout.
  MultiHeadAttentionResult result;
  result.output = Tensor(DType::float32, s->query.shape());
  layers::affine(s->o_rows.data<float>(), L * N, E, parameters_.at("out_proj.weight").data<float>(),
                 optional_data(parameters_, "out_proj.bias"), E, result.output.data<float>());
  if (call.need_weights && call.average_attn_weights) {
    result.weights = Tensor(DType::float32, {N, L, keys});
    for (std::int64_t n = 0; n < N; ++n)
      for (std::int64_t l = 0; l < L; ++l)
        for (std::int64_t j = 0; j < keys; ++j) {
          double sum = 0.0;
          for (std::int64_t h = 0; h < H; ++h)
            sum += weights.data<float>()[((n * H + h) * L + l) * keys + j];
          result.weights.data<float>()[(n * L + l) * keys + j] =
              static_cast<float>(sum / static_cast<double>(H));
        }
  } else if (call.need_weights) {
    result.weights = std::move(weights);
  }
  saved_ = std::move(s);
  return result;
}

MultiHeadAttentionInputGradients MultiHeadAttention::backward(const TensorView& dout) {
  if (!saved_) throw Error("backward: expected a forward call first, got none");
  const Saved& s = *saved_;
  const MultiHeadAttentionOptions& o = options_;
  const std::int64_t E = o.embed_dim, H = o.num_heads, head = E / H;
  const std::int64_t L = s.q_len, N = s.batch, S = s.k_len, keys = s.keys;
  const layers::Rows d_output = layers::rows_of(dout, E, "dout");
  if (dout.rank != 3 || d_output.count != L * N) {
    throw Error(fmt::format("dout: expected the output's shape [{}], got {}",
                            fmt::join(s.query.shape(), ", "), dout.shape_string()));
  }

  // 5'. Output projection.
  Tensor d_o_rows(DType::float32, {L * N, E});
  layers::affine_backward(s.o_rows.data<float>(), d_output.data, L * N, E, E,
                          parameters_.at("out_proj.weight").data<float>(), d_o_rows.data<float>(),
                          gradients_.at("out_proj.weight").data<float>(),
                          optional_data(gradients_, "out_proj.bias"));

  // 4'. Attention.
  Tensor dq_rows(DType::float32, {L * N, E});
  Tensor dk_full(DType::float32, {N, keys, H, head}), dv_full(DType::float32, {N, keys, H, head});
  const TensorView q_view{s.q_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s.q_strides};
  const TensorView o_view{s.o_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s.q_strides};
  const TensorView d_o_view{
      d_o_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s.q_strides};
  AttentionGradients grads;
  grads.dq =
      MutableTensorView{dq_rows.data<float>(), DType::float32, 4, {N, L, H, head}, s.q_strides};
  grads.dk = dk_full.mutable_view();
  grads.dv = dv_full.mutable_view();
  NamedTensors score_grads;
  for (const ScoreLayerParameter& parameter : attention_parameters_) {
    score_grads[parameter.name] = like(parameters_.at(parameter.name));
    grads.*bound_option(parameter).gradient = score_grads[parameter.name].mutable_view();
  }
  attention_backward(q_view, s.k_full.view(), s.v_full.view(), s.options, d_o_view, std::nullopt,
                     grads, SavedForward{o_view, s.lse.view()});
  for (const auto& [name, gradient] : score_grads) {
    float* total = gradients_.at(name).data<float>();
    for (std::int64_t n = 0; n < gradient.numel(); ++n) total[n] += gradient.data<float>()[n];
  }

  // 2'. Keys and values back in input row order; bias_k / bias_v sum over the batch.
  Tensor dk_rows(DType::float32, {S * N, E}), dv_rows(DType::float32, {S * N, E});
  float* d_bias_k = optional_data(gradients_, "bias_k");
  float* d_bias_v = optional_data(gradients_, "bias_v");
  for (std::int64_t n = 0; n < N; ++n) {
    for (std::int64_t j = 0; j < S + (o.add_bias_kv ? 1 : 0); ++j) {
      const float* dk = dk_full.data<float>() + (n * keys + j) * E;
      const float* dv = dv_full.data<float>() + (n * keys + j) * E;
      if (j < S) {
        const std::int64_t row = row_index(o.batch_first, n, j, S, N);
        std::copy(dk, dk + E, dk_rows.data<float>() + row * E);
        std::copy(dv, dv + E, dv_rows.data<float>() + row * E);
      } else {
        for (std::int64_t e = 0; e < E; ++e) {
          d_bias_k[e] += dk[e];
          d_bias_v[e] += dv[e];
        }
      }
    }
  }

  // 1'. Projections.
  const auto w = projections(std::as_const(parameters_), E, o.kdim);
  const auto dw = projections(gradients_, E, o.kdim);
  MultiHeadAttentionInputGradients inputs;
  inputs.query = Tensor(DType::float32, s.query.shape());
  inputs.key = Tensor(DType::float32, s.key.shape());
  inputs.value = Tensor(DType::float32, s.value.shape());
  layers::affine_backward(s.query.data<float>(), dq_rows.data<float>(), L * N, E, E, w.wq,
                          inputs.query.data<float>(), dw.wq, dw.bq);
  layers::affine_backward(s.key.data<float>(), dk_rows.data<float>(), S * N, o.kdim, E, w.wk,
                          inputs.key.data<float>(), dw.wk, dw.bk);
  layers::affine_backward(s.value.data<float>(), dv_rows.data<float>(), S * N, o.vdim, E, w.wv,
                          inputs.value.data<float>(), dw.wv, dw.bv);
  return inputs;
}

}  // namespace qkv
