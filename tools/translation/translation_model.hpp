// A small encoder–decoder translator built from qkv's layers, trained with qkv's own backward.
//
//   source ids → embedding + position → self-attention (+ residual) → feed-forward with GELU
//     (+ residual) = H
//   target ids shifted right (<s> first) → embedding + position → causal self-attention (+ res.)
//     → cross-attention: queries from the decoder, keys and values H (+ res.) → feed-forward
//     (+ res.) → linear to target-vocabulary logits → softmax cross-entropy
//
// The cross-attention has one head and the chosen score (additive is Bahdanau's, scaled_dot the
// Transformer's): its weights are the alignment between the words. Training uses Adam.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "qkv/attention.hpp"
#include "qkv/kv_cache.hpp"
#include "qkv/linear.hpp"
#include "qkv/multihead_attention.hpp"
#include "qkv/safetensors.hpp"
#include "toy_language.hpp"

namespace qkv::translation {

struct ModelConfig {
  std::int64_t embed_dim = 64;
  std::int64_t self_heads = 2;  // heads of the two self-attention layers
  std::int64_t ffn_dim = 128;
  std::int64_t max_len = 16;        // longest sentence (source, or target with </s>)
  Score score = Score::scaled_dot;  // of the cross-attention
};

// Sentences padded into one batch: ids [N, S] and [N, T] (int32), the decoder's input (<s> and
// the target shifted right), and the source padding mask [N, S] (true = padding).
struct Batch {
  std::int64_t size = 0, source_len = 0, target_len = 0;
  std::vector<std::int32_t> source, decoder_input, target;
  Tensor source_padding;
  std::int64_t target_tokens = 0;  // non-padding target tokens (the loss averages over them)
};
Batch make_batch(const std::vector<const Example*>& examples);

// One sentence translated greedily: the target ids (with </s> when it was produced) and the
// cross-attention weights [rows = produced ids, cols = source words], row-major.
struct Translation {
  std::vector<std::int32_t> ids;
  std::vector<double> alignment;
};

class TranslationModel {
 public:
  TranslationModel(const ModelConfig& config, std::int64_t source_vocab, std::int64_t target_vocab,
                   std::uint64_t seed);

  const ModelConfig& config() const { return config_; }

  // The batch's mean cross-entropy (nats per target token); keeps what backward needs.
  double forward(const Batch& batch);
  // Adds the gradient of the last forward's loss to every parameter's gradient.
  void backward();
  void zero_grad();

  // Every parameter with its gradient, by name (for the optimizer and the gradient check).
  struct Parameter {
    std::string name;
    Tensor* value;
    const Tensor* gradient;
  };
  std::vector<Parameter> parameters();

  // The parameters by name, with the configuration as "config" (int64 [5]).
  NamedTensors state();
  // A model from state(): throws qkv::Error naming a missing or misshapen tensor.
  static TranslationModel from_state(const NamedTensors& state, std::int64_t source_vocab,
                                     std::int64_t target_vocab);

  // Greedy decoding of each source (ids, no padding), up to max_len target tokens: every step
  // runs the decoder over all the words so far.
  std::vector<Translation> translate(const std::vector<std::vector<std::int32_t>>& sources);
  // The same translations decoded with caches: the encoder's keys and values for the
  // cross-attention projected once, and the decoder's self-attention appending one word's key and
  // value per step to a KV cache (attention_with_kv_cache); each step runs the decoder on the new
  // word alone.
  std::vector<Translation> translate_cached(const std::vector<std::vector<std::int32_t>>& sources);

 private:
  struct Activations;
  ModelConfig config_;
  std::int64_t target_vocab_;  // the source vocabulary is the rows of source_embedding_
  Tensor source_embedding_, target_embedding_, source_position_, target_position_;
  Tensor source_embedding_grad_, target_embedding_grad_, source_position_grad_,
      target_position_grad_;
  std::unique_ptr<MultiHeadAttention> encoder_attention_, decoder_attention_, cross_attention_;
  std::unique_ptr<Linear> encoder_ffn_in_, encoder_ffn_out_, decoder_ffn_in_, decoder_ffn_out_,
      output_;
  std::shared_ptr<Activations> saved_;

  Tensor embed(const Tensor& table, const Tensor& positions, const std::vector<std::int32_t>& ids,
               std::int64_t n, std::int64_t len) const;
  // The encoder's output [N, S, E] and the decoder's logits [N, T, V] (cross weights on request).
  void run(const Batch& batch, Activations& a, bool need_weights);
  // The encoder alone: a.source_in … a.encoder_out.
  void encode(const Batch& batch, Activations& a);
};

// Adam (Kingma and Ba 2015) with the global gradient norm clipped to `clip`.
class Adam {
 public:
  Adam(std::vector<TranslationModel::Parameter> parameters, double learning_rate, double clip = 1.0,
       double beta1 = 0.9, double beta2 = 0.98, double epsilon = 1e-9);
  void step(double learning_rate);
  double learning_rate() const { return learning_rate_; }

 private:
  std::vector<TranslationModel::Parameter> parameters_;
  std::vector<Tensor> first_, second_;
  double learning_rate_, clip_, beta1_, beta2_, epsilon_;
  std::int64_t steps_ = 0;
};

}  // namespace qkv::translation
