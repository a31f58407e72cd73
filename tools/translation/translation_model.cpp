#include "translation_model.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <random>

#include "qkv/error.hpp"

namespace qkv::translation {

namespace {

Tensor normal_tensor(std::vector<std::int64_t> shape, double deviation, std::mt19937_64& rng) {
  Tensor t(DType::float32, std::move(shape));
  std::normal_distribution<double> normal(0.0, deviation);
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = static_cast<float>(normal(rng));
  return t;
}

Tensor zeros_like(const Tensor& t) {
  return Tensor(t.dtype(), t.shape());
}

// a + b, elementwise (same shapes, float32).
Tensor sum(const Tensor& a, const Tensor& b) {
  Tensor out = zeros_like(a);
  for (std::int64_t i = 0; i < a.numel(); ++i)
    out.data<float>()[i] = a.data<float>()[i] + b.data<float>()[i];
  return out;
}

void add_to(Tensor& total, const Tensor& part) {
  for (std::int64_t i = 0; i < total.numel(); ++i) total.data<float>()[i] += part.data<float>()[i];
}

// GELU(x) = x Φ(x), the Transformer's smooth ReLU (smooth, so finite differences check it).
Tensor gelu(const Tensor& x) {
  Tensor out = zeros_like(x);
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double v = x.data<float>()[i];
    out.data<float>()[i] = static_cast<float>(0.5 * v * std::erfc(-v / std::numbers::sqrt2));
  }
  return out;
}

// dy ∘ GELU'(x), GELU'(x) = Φ(x) + x φ(x).
Tensor gelu_backward(const Tensor& x, const Tensor& dy) {
  Tensor out = zeros_like(x);
  for (std::int64_t i = 0; i < x.numel(); ++i) {
    const double v = x.data<float>()[i];
    const double slope = 0.5 * std::erfc(-v / std::numbers::sqrt2) +
                         v * std::exp(-0.5 * v * v) / std::sqrt(2 * std::numbers::pi);
    out.data<float>()[i] = static_cast<float>(dy.data<float>()[i] * slope);
  }
  return out;
}

// x + W₂ GELU(W₁ x + b₁) + b₂ back to x, from d (of the output); hidden = W₁ x + b₁ and
// activated = GELU(hidden) as the forward kept them.
Tensor feed_forward_backward(Linear& in, Linear& out, const Tensor& x, const Tensor& hidden,
                             const Tensor& activated, const Tensor& d) {
  const Tensor d_activated = out.backward(activated.view(), d.view());
  return sum(d, in.backward(x.view(), gelu_backward(hidden, d_activated).view()));
}

// x + attention(x, x, x) back to x: the residual and the three inputs' gradients.
Tensor self_attention_backward(MultiHeadAttention& attention, const Tensor& d) {
  const MultiHeadAttentionInputGradients inputs = attention.backward(d.view());
  Tensor total = sum(d, inputs.query);
  add_to(total, inputs.key);
  add_to(total, inputs.value);
  return total;
}

MultiHeadAttentionOptions attention_options(const ModelConfig& c, std::int64_t heads, Score score) {
  MultiHeadAttentionOptions o;
  o.embed_dim = c.embed_dim;
  o.num_heads = heads;
  o.batch_first = true;
  o.score = score;
  return o;
}

}  // namespace

Batch make_batch(const std::vector<const Example*>& examples) {
  Batch b;
  b.size = static_cast<std::int64_t>(examples.size());
  for (const Example* e : examples) {
    b.source_len = std::max(b.source_len, static_cast<std::int64_t>(e->source.size()));
    b.target_len = std::max(b.target_len, static_cast<std::int64_t>(e->target.size()));
  }
  b.source.assign(static_cast<std::size_t>(b.size * b.source_len), kPad);
  b.decoder_input.assign(static_cast<std::size_t>(b.size * b.target_len), kPad);
  b.target.assign(static_cast<std::size_t>(b.size * b.target_len), kPad);
  b.source_padding = Tensor(DType::boolean, {b.size, b.source_len});
  for (std::int64_t n = 0; n < b.size; ++n) {
    const Example& e = *examples[static_cast<std::size_t>(n)];
    for (std::int64_t s = 0; s < b.source_len; ++s) {
      const bool word = s < static_cast<std::int64_t>(e.source.size());
      b.source[static_cast<std::size_t>(n * b.source_len + s)] =
          word ? e.source[static_cast<std::size_t>(s)] : kPad;
      b.source_padding.data<bool>()[n * b.source_len + s] = !word;
    }
    for (std::size_t t = 0; t < e.target.size(); ++t) {
      const auto at = static_cast<std::size_t>(n * b.target_len) + t;
      b.target[at] = e.target[t];
      b.decoder_input[at] = t == 0 ? kBegin : e.target[t - 1];
      ++b.target_tokens;
    }
  }
  return b;
}

namespace {

// The sources to translate as a batch (each target just </s>: the decoder reads only <s>).
Batch source_batch(const std::vector<std::vector<std::int32_t>>& sources) {
  std::vector<Example> examples(sources.size());
  std::vector<const Example*> pointers;
  for (std::size_t n = 0; n < sources.size(); ++n) {
    examples[n].source = sources[n];
    examples[n].target = {kEnd};
    pointers.push_back(&examples[n]);
  }
  return make_batch(pointers);
}

}  // namespace

struct TranslationModel::Activations {
  Batch batch;
  Tensor source_in, encoder_mid, encoder_hidden, encoder_ffn, encoder_out;
  Tensor target_in, decoder_mid, decoder_cross, decoder_hidden, decoder_ffn, decoder_out;
  Tensor logits, cross_weights;
};

TranslationModel::TranslationModel(const ModelConfig& config, std::int64_t source_vocab,
                                   std::int64_t target_vocab, std::uint64_t seed)
    : config_(config), target_vocab_(target_vocab) {
  std::mt19937_64 rng(seed);
  const std::int64_t e = config.embed_dim;
  source_embedding_ = normal_tensor({source_vocab, e}, 0.5, rng);
  target_embedding_ = normal_tensor({target_vocab, e}, 0.5, rng);
  source_position_ = normal_tensor({config.max_len, e}, 0.5, rng);
  target_position_ = normal_tensor({config.max_len, e}, 0.5, rng);
  source_embedding_grad_ = zeros_like(source_embedding_);
  target_embedding_grad_ = zeros_like(target_embedding_);
  source_position_grad_ = zeros_like(source_position_);
  target_position_grad_ = zeros_like(target_position_);
  encoder_attention_ = std::make_unique<MultiHeadAttention>(
      attention_options(config, config.self_heads, Score::scaled_dot), rng());
  decoder_attention_ = std::make_unique<MultiHeadAttention>(
      attention_options(config, config.self_heads, Score::scaled_dot), rng());
  cross_attention_ =
      std::make_unique<MultiHeadAttention>(attention_options(config, 1, config.score), rng());
  encoder_ffn_in_ = std::make_unique<Linear>(e, config.ffn_dim, true, rng());
  encoder_ffn_out_ = std::make_unique<Linear>(config.ffn_dim, e, true, rng());
  decoder_ffn_in_ = std::make_unique<Linear>(e, config.ffn_dim, true, rng());
  decoder_ffn_out_ = std::make_unique<Linear>(config.ffn_dim, e, true, rng());
  output_ = std::make_unique<Linear>(e, target_vocab, true, rng());
}

Tensor TranslationModel::embed(const Tensor& table, const Tensor& positions,
                               const std::vector<std::int32_t>& ids, std::int64_t n,
                               std::int64_t len) const {
  const std::int64_t e = config_.embed_dim;
  if (len > config_.max_len) {
    throw Error(fmt::format("sentence: expected at most {} words, got {}", config_.max_len, len));
  }
  Tensor x(DType::float32, {n, len, e});
  for (std::int64_t r = 0; r < n * len; ++r) {
    const float* word = table.data<float>() + ids[static_cast<std::size_t>(r)] * e;
    const float* position = positions.data<float>() + (r % len) * e;
    for (std::int64_t d = 0; d < e; ++d) x.data<float>()[r * e + d] = word[d] + position[d];
  }
  return x;
}

void TranslationModel::encode(const Batch& batch, Activations& a) {
  const std::int64_t n = batch.size;
  a.source_in = embed(source_embedding_, source_position_, batch.source, n, batch.source_len);
  MultiHeadAttentionCall encoder_call;
  encoder_call.key_padding_mask = batch.source_padding.view();
  encoder_call.need_weights = false;
  const TensorView x = a.source_in.view();
  a.encoder_mid = sum(a.source_in, encoder_attention_->forward(x, x, x, encoder_call).output);
  a.encoder_hidden = encoder_ffn_in_->forward(a.encoder_mid.view());
  a.encoder_ffn = gelu(a.encoder_hidden);
  a.encoder_out = sum(a.encoder_mid, encoder_ffn_out_->forward(a.encoder_ffn.view()));
}

void TranslationModel::run(const Batch& batch, Activations& a, bool need_weights) {
  const std::int64_t n = batch.size;
  encode(batch, a);
  a.target_in =
      embed(target_embedding_, target_position_, batch.decoder_input, n, batch.target_len);
  MultiHeadAttentionCall decoder_call;
  decoder_call.is_causal = true;
  decoder_call.need_weights = false;
  const TensorView y = a.target_in.view();
  a.decoder_mid = sum(a.target_in, decoder_attention_->forward(y, y, y, decoder_call).output);
  MultiHeadAttentionCall cross_call;
  cross_call.key_padding_mask = batch.source_padding.view();
  cross_call.need_weights = need_weights;
  MultiHeadAttentionResult cross = cross_attention_->forward(
      a.decoder_mid.view(), a.encoder_out.view(), a.encoder_out.view(), cross_call);
  a.decoder_cross = sum(a.decoder_mid, cross.output);
  a.cross_weights = std::move(cross.weights);
  a.decoder_hidden = decoder_ffn_in_->forward(a.decoder_cross.view());
  a.decoder_ffn = gelu(a.decoder_hidden);
  a.decoder_out = sum(a.decoder_cross, decoder_ffn_out_->forward(a.decoder_ffn.view()));
  a.logits = output_->forward(a.decoder_out.view());
}

double TranslationModel::forward(const Batch& batch) {
  saved_ = std::make_shared<Activations>();
  saved_->batch = batch;
  run(batch, *saved_, false);
  // Cross-entropy over the non-padding targets, each row's log-softmax taken stably.
  double loss = 0;
  const std::int64_t v = target_vocab_;
  for (std::int64_t r = 0; r < batch.size * batch.target_len; ++r) {
    const std::int32_t target = batch.target[static_cast<std::size_t>(r)];
    if (target == kPad) continue;
    const float* row = saved_->logits.data<float>() + r * v;
    const double top = *std::max_element(row, row + v);
    double total = 0;
    for (std::int64_t j = 0; j < v; ++j) total += std::exp(row[j] - top);
    loss += top + std::log(total) - row[target];
  }
  return loss / static_cast<double>(std::max<std::int64_t>(batch.target_tokens, 1));
}

void TranslationModel::backward() {
  Activations& a = *saved_;
  const Batch& batch = a.batch;
  const std::int64_t v = target_vocab_, e = config_.embed_dim;
  // ∂loss/∂logits = (softmax − one-hot) / tokens on the non-padding rows.
  Tensor dlogits = zeros_like(a.logits);
  const auto tokens = static_cast<double>(std::max<std::int64_t>(batch.target_tokens, 1));
  for (std::int64_t r = 0; r < batch.size * batch.target_len; ++r) {
    const std::int32_t target = batch.target[static_cast<std::size_t>(r)];
    if (target == kPad) continue;
    const float* row = a.logits.data<float>() + r * v;
    float* grad = dlogits.data<float>() + r * v;
    const double top = *std::max_element(row, row + v);
    double total = 0;
    for (std::int64_t j = 0; j < v; ++j) total += std::exp(row[j] - top);
    for (std::int64_t j = 0; j < v; ++j)
      grad[j] =
          static_cast<float>((std::exp(row[j] - top) / total - (j == target ? 1 : 0)) / tokens);
  }
  // Decoder, top down; a residual's gradient flows both ways.
  Tensor d_out = output_->backward(a.decoder_out.view(), dlogits.view());
  const Tensor d_cross = feed_forward_backward(*decoder_ffn_in_, *decoder_ffn_out_, a.decoder_cross,
                                               a.decoder_hidden, a.decoder_ffn, d_out);
  MultiHeadAttentionInputGradients cross = cross_attention_->backward(d_cross.view());
  const Tensor d_mid = sum(d_cross, cross.query);
  const Tensor d_encoder_out = sum(cross.key, cross.value);
  const Tensor d_target_in = self_attention_backward(*decoder_attention_, d_mid);
  // Encoder.
  const Tensor d_encoder_mid =
      feed_forward_backward(*encoder_ffn_in_, *encoder_ffn_out_, a.encoder_mid, a.encoder_hidden,
                            a.encoder_ffn, d_encoder_out);
  const Tensor d_source_in = self_attention_backward(*encoder_attention_, d_encoder_mid);
  // Embeddings: each row's gradient goes to its word and its position.
  const auto scatter = [e](const Tensor& d, const std::vector<std::int32_t>& ids, std::int64_t len,
                           Tensor& table_grad, Tensor& position_grad) {
    for (std::int64_t r = 0; r < static_cast<std::int64_t>(ids.size()); ++r) {
      const std::int32_t id = ids[static_cast<std::size_t>(r)];
      if (id == kPad) continue;
      for (std::int64_t c = 0; c < e; ++c) {
        const float g = d.data<float>()[r * e + c];
        table_grad.data<float>()[id * e + c] += g;
        position_grad.data<float>()[(r % len) * e + c] += g;
      }
    }
  };
  scatter(d_target_in, batch.decoder_input, batch.target_len, target_embedding_grad_,
          target_position_grad_);
  scatter(d_source_in, batch.source, batch.source_len, source_embedding_grad_,
          source_position_grad_);
}

void TranslationModel::zero_grad() {
  for (Tensor* t : {&source_embedding_grad_, &target_embedding_grad_, &source_position_grad_,
                    &target_position_grad_})
    *t = zeros_like(*t);
  for (auto* attention :
       {encoder_attention_.get(), decoder_attention_.get(), cross_attention_.get()})
    attention->zero_grad();
  for (auto* linear : {encoder_ffn_in_.get(), encoder_ffn_out_.get(), decoder_ffn_in_.get(),
                       decoder_ffn_out_.get(), output_.get()})
    linear->zero_grad();
}

std::vector<TranslationModel::Parameter> TranslationModel::parameters() {
  std::vector<Parameter> all{{"source_embedding", &source_embedding_, &source_embedding_grad_},
                             {"target_embedding", &target_embedding_, &target_embedding_grad_},
                             {"source_position", &source_position_, &source_position_grad_},
                             {"target_position", &target_position_, &target_position_grad_}};
  for (auto [prefix, attention] : {std::pair{"encoder.self_attn.", encoder_attention_.get()},
                                   std::pair{"decoder.self_attn.", decoder_attention_.get()},
                                   std::pair{"decoder.cross_attn.", cross_attention_.get()}}) {
    for (auto& [name, value] : attention->parameters()) {
      all.push_back({prefix + name, &value, &attention->gradients().at(name)});
    }
  }
  for (auto [prefix, linear] :
       {std::pair{"encoder.ffn.0.", encoder_ffn_in_.get()},
        std::pair{"encoder.ffn.2.", encoder_ffn_out_.get()},
        std::pair{"decoder.ffn.0.", decoder_ffn_in_.get()},
        std::pair{"decoder.ffn.2.", decoder_ffn_out_.get()}, std::pair{"output.", output_.get()}}) {
    all.push_back({std::string(prefix) + "weight", &linear->weight, &linear->weight_grad});
    all.push_back({std::string(prefix) + "bias", &linear->bias, &linear->bias_grad});
  }
  return all;
}

NamedTensors TranslationModel::state() {
  NamedTensors state;
  for (const Parameter& p : parameters()) state[p.name] = *p.value;
  Tensor config(DType::int64, {5});
  const std::int64_t values[] = {config_.embed_dim, config_.self_heads, config_.ffn_dim,
                                 config_.max_len, static_cast<std::int64_t>(config_.score)};
  std::copy(std::begin(values), std::end(values), config.data<std::int64_t>());
  state["config"] = std::move(config);
  return state;
}

TranslationModel TranslationModel::from_state(const NamedTensors& state, std::int64_t source_vocab,
                                              std::int64_t target_vocab) {
  const auto config = state.find("config");
  if (config == state.end() || config->second.dtype() != DType::int64 ||
      config->second.numel() != 5) {
    throw Error("model: expected a tensor 'config' (int64 [5]) of a qkv demo model, got none");
  }
  const std::int64_t* c = config->second.data<std::int64_t>();
  ModelConfig model_config{c[0], c[1], c[2], c[3], static_cast<Score>(c[4])};
  if (c[0] <= 0 || c[0] > 4096 || c[1] <= 0 || c[0] % c[1] != 0 || c[2] <= 0 || c[2] > 16384 ||
      c[3] <= 0 || c[3] > 1024 || c[4] < 0 || c[4] > static_cast<std::int64_t>(Score::cosine)) {
    throw Error(fmt::format("model: expected a valid 'config', got [{}, {}, {}, {}, {}]", c[0],
                            c[1], c[2], c[3], c[4]));
  }
  TranslationModel model(model_config, source_vocab, target_vocab, 0);
  for (const Parameter& p : model.parameters()) {
    const auto found = state.find(p.name);
    if (found == state.end()) {
      throw Error(fmt::format("model: expected a tensor '{}', got none", p.name));
    }
    if (found->second.dtype() != DType::float32 || found->second.shape() != p.value->shape()) {
      throw Error(fmt::format("model: expected '{}' float32 [{}], got {} [{}]", p.name,
                              fmt::join(p.value->shape(), ", "), dtype_name(found->second.dtype()),
                              fmt::join(found->second.shape(), ", ")));
    }
    *p.value = found->second;
  }
  return model;
}

std::vector<Translation> TranslationModel::translate(
    const std::vector<std::vector<std::int32_t>>& sources) {
  std::vector<Translation> out(sources.size());
  if (sources.empty()) return out;
  Batch batch = source_batch(sources);
  const auto count = static_cast<std::int64_t>(sources.size());
  std::vector<bool> done(sources.size(), false);
  Activations a;
  for (std::int64_t t = 0; t < config_.max_len; ++t) {
    // The decoder reads <s> and the words produced so far (causal: later rows do not matter).
    batch.target_len = t + 1;
    batch.decoder_input.assign(static_cast<std::size_t>(count * (t + 1)), kPad);
    for (std::int64_t n = 0; n < count; ++n) {
      const auto& ids = out[static_cast<std::size_t>(n)].ids;
      batch.decoder_input[static_cast<std::size_t>(n * (t + 1))] = kBegin;
      for (std::int64_t s = 0; s < t; ++s)
        batch.decoder_input[static_cast<std::size_t>(n * (t + 1) + s + 1)] =
            s < static_cast<std::int64_t>(ids.size()) ? ids[static_cast<std::size_t>(s)] : kEnd;
    }
    run(batch, a, true);
    bool all_done = true;
    for (std::int64_t n = 0; n < count; ++n) {
      if (done[static_cast<std::size_t>(n)]) continue;
      const float* row = a.logits.data<float>() + (n * (t + 1) + t) * target_vocab_;
      const auto best =
          static_cast<std::int32_t>(std::max_element(row + kEnd, row + target_vocab_) - row);
      out[static_cast<std::size_t>(n)].ids.push_back(best);
      done[static_cast<std::size_t>(n)] = best == kEnd;
      all_done = all_done && best == kEnd;
    }
    if (all_done) break;
  }
  // The last pass saw every produced word: row t is the attention that produced word t.
  const std::int64_t rows = batch.target_len, cols = batch.source_len;
  for (std::int64_t n = 0; n < count; ++n) {
    Translation& tr = out[static_cast<std::size_t>(n)];
    const auto words = static_cast<std::int64_t>(sources[static_cast<std::size_t>(n)].size());
    for (std::int64_t r = 0; r < static_cast<std::int64_t>(tr.ids.size()) && r < rows; ++r)
      for (std::int64_t s = 0; s < words; ++s)
        tr.alignment.push_back(a.cross_weights.data<float>()[(n * rows + r) * cols + s]);
  }
  return out;
}

namespace {

// One of the projections of an attention layer as a Linear: block 0, 1, 2 of in_proj (queries,
// keys, values) or out_proj (block 3).
Linear projection(const MultiHeadAttention& layer, int block) {
  const NamedTensors& p = layer.parameters();
  const bool out = block == 3;
  const Tensor& weight = p.at(out ? "out_proj.weight" : "in_proj_weight");
  const std::int64_t e = weight.shape()[1];
  Linear linear(e, e, true, 0);
  const std::int64_t first = out ? 0 : block * e;
  std::copy_n(weight.data<float>() + first * e, e * e, linear.weight.data<float>());
  if (auto bias = p.find(out ? "out_proj.bias" : "in_proj_bias"); bias != p.end()) {
    std::copy_n(bias->second.data<float>() + first, e, linear.bias.data<float>());
  } else {
    std::fill_n(linear.bias.data<float>(), e, 0.0f);
  }
  return linear;
}

// x [N, E] seen as [N, 1, heads, E / heads].
TensorView one_position(const Tensor& x, std::int64_t heads) {
  const std::int64_t n = x.shape()[0], e = x.shape()[1];
  return TensorView::contiguous(x.raw(), DType::float32, {n, 1, heads, e / heads});
}

}  // namespace

std::vector<Translation> TranslationModel::translate_cached(
    const std::vector<std::vector<std::int32_t>>& sources) {
  std::vector<Translation> out(sources.size());
  if (sources.empty()) return out;
  const Batch batch = source_batch(sources);
  const std::int64_t count = batch.size, e = config_.embed_dim, heads = config_.self_heads;
  const std::int64_t head_dim = e / heads, source_len = batch.source_len;
  Activations a;
  encode(batch, a);
  // The cross-attention's keys and values, once: [N, S, 1, E].
  const Linear cross_q = projection(*cross_attention_, 0),
               cross_out = projection(*cross_attention_, 3);
  const Tensor cross_k = projection(*cross_attention_, 1).forward(a.encoder_out.view());
  const Tensor cross_v = projection(*cross_attention_, 2).forward(a.encoder_out.view());
  const auto source_view = [&](const Tensor& t) {
    return TensorView::contiguous(t.raw(), DType::float32, {count, source_len, 1, e});
  };
  std::vector<std::int64_t> source_lengths;
  for (const auto& source : sources)
    source_lengths.push_back(static_cast<std::int64_t>(source.size()));
  AttentionOptions cross_options = cross_attention_->attention_options();
  cross_options.key_lengths = TensorView::contiguous(source_lengths.data(), DType::int64, {count});
  // The decoder self-attention's KV cache [N, max_len, H, d], filled one word per step.
  const Linear self_q = projection(*decoder_attention_, 0),
               self_k = projection(*decoder_attention_, 1),
               self_v = projection(*decoder_attention_, 2),
               self_out = projection(*decoder_attention_, 3);
  Tensor k_cache(DType::float32, {count, config_.max_len, heads, head_dim});
  Tensor v_cache(DType::float32, {count, config_.max_len, heads, head_dim});
  std::vector<std::int64_t> lengths(static_cast<std::size_t>(count), 0);
  AttentionOptions self_options = decoder_attention_->attention_options();
  self_options.causal = true;

  std::vector<std::int32_t> words(static_cast<std::size_t>(count), kBegin);
  std::vector<bool> done(sources.size(), false);
  for (std::int64_t t = 0; t < config_.max_len; ++t) {
    Tensor y(DType::float32, {count, e});  // the newest word, at position t
    for (std::int64_t n = 0; n < count; ++n)
      for (std::int64_t d = 0; d < e; ++d)
        y.data<float>()[n * e + d] =
            target_embedding_.data<float>()[words[static_cast<std::size_t>(n)] * e + d] +
            target_position_.data<float>()[t * e + d];
    const Tensor q = self_q.forward(y.view()), k = self_k.forward(y.view()),
                 v = self_v.forward(y.view());
    Tensor attended(DType::float32, {count, e});
    KVCache cache;
    cache.k = k_cache.mutable_view();
    cache.v = v_cache.mutable_view();
    cache.seqlens = TensorView::contiguous(lengths.data(), DType::int64, {count});
    attention_with_kv_cache(
        one_position(q, heads), cache, one_position(k, heads), one_position(v, heads), {},
        self_options,
        {MutableTensorView::contiguous(attended.raw(), DType::float32, {count, 1, heads, head_dim}),
         {},
         {}});
    for (auto& length : lengths) ++length;
    const Tensor mid = sum(y, self_out.forward(attended.view()));
    const Tensor cq = cross_q.forward(mid.view());
    Tensor cross_attended(DType::float32, {count, e});
    Tensor cross_weights(DType::float32, {count, 1, 1, source_len});
    attention_forward(
        one_position(cq, 1), source_view(cross_k), source_view(cross_v), cross_options,
        {MutableTensorView::contiguous(cross_attended.raw(), DType::float32, {count, 1, 1, e}),
         {},
         cross_weights.mutable_view().with_rank(4)});
    const Tensor cross = sum(mid, cross_out.forward(cross_attended.view()));
    const Tensor ffn =
        sum(cross, decoder_ffn_out_->forward(gelu(decoder_ffn_in_->forward(cross.view())).view()));
    const Tensor logits = output_->forward(ffn.view());
    bool all_done = true;
    for (std::int64_t n = 0; n < count; ++n) {
      if (done[static_cast<std::size_t>(n)]) continue;
      const float* row = logits.data<float>() + n * target_vocab_;
      const auto best =
          static_cast<std::int32_t>(std::max_element(row + kEnd, row + target_vocab_) - row);
      Translation& tr = out[static_cast<std::size_t>(n)];
      tr.ids.push_back(best);
      const auto words_in = static_cast<std::int64_t>(sources[static_cast<std::size_t>(n)].size());
      for (std::int64_t s = 0; s < words_in; ++s)
        tr.alignment.push_back(cross_weights.data<float>()[n * source_len + s]);
      words[static_cast<std::size_t>(n)] = best;
      done[static_cast<std::size_t>(n)] = best == kEnd;
      all_done = all_done && best == kEnd;
    }
    for (std::int64_t n = 0; n < count; ++n)
      if (done[static_cast<std::size_t>(n)]) words[static_cast<std::size_t>(n)] = kEnd;
    if (all_done) break;
  }
  return out;
}

Adam::Adam(std::vector<TranslationModel::Parameter> parameters, double learning_rate, double clip,
           double beta1, double beta2, double epsilon)
    : parameters_(std::move(parameters)),
      learning_rate_(learning_rate),
      clip_(clip),
      beta1_(beta1),
      beta2_(beta2),
      epsilon_(epsilon) {
  for (const auto& p : parameters_) {
    first_.push_back(zeros_like(*p.value));
    second_.push_back(zeros_like(*p.value));
  }
}

void Adam::step(double learning_rate) {
  learning_rate_ = learning_rate;
  double norm = 0;
  for (const auto& p : parameters_)
    for (std::int64_t i = 0; i < p.gradient->numel(); ++i) {
      const double g = p.gradient->data<float>()[i];
      norm += g * g;
    }
  norm = std::sqrt(norm);
  const double scale = clip_ > 0 && norm > clip_ ? clip_ / norm : 1.0;
  ++steps_;
  const double correction1 = 1 - std::pow(beta1_, static_cast<double>(steps_));
  const double correction2 = 1 - std::pow(beta2_, static_cast<double>(steps_));
  for (std::size_t k = 0; k < parameters_.size(); ++k) {
    float* value = parameters_[k].value->data<float>();
    const float* gradient = parameters_[k].gradient->data<float>();
    float* m = first_[k].data<float>();
    float* v = second_[k].data<float>();
    for (std::int64_t i = 0; i < first_[k].numel(); ++i) {
      const double g = gradient[i] * scale;
      m[i] = static_cast<float>(beta1_ * m[i] + (1 - beta1_) * g);
      v[i] = static_cast<float>(beta2_ * v[i] + (1 - beta2_) * g * g);
      value[i] -= static_cast<float>(learning_rate * (m[i] / correction1) /
                                     (std::sqrt(v[i] / correction2) + epsilon_));
    }
  }
}

}  // namespace qkv::translation
