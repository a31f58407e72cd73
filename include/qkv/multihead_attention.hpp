// Multi-head attention with learned Q/K/V/output projections: torch.nn.MultiheadAttention's
// layer (docs/contract.md §5), its parameter names and semantics, forward and backward, plus the
// scores PyTorch lacks (bilinear, additive, cosine), each with the parameters its unit declares.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qkv/attention.hpp"
#include "qkv/safetensors.hpp"
#include "qkv/tensor.hpp"

namespace qkv {

// A parameter an attention layer learns for its score, besides the projections: its name in
// the state dict, the AttentionOptions member it is passed as (its name: "w", "wq", "wk", "va",
// "temperature"), its shape, and how the layer starts it. Each score declares its own in its unit
// (src/core/score_<name>.cpp); qkv::MultiHeadAttention and qkv.nn.MultiheadAttention both build
// theirs from this list.
struct ScoreLayerParameter {
  enum class Start {
    identity,  // each head's square matrix is the identity
    xavier,    // each head's [out, in] matrix uniform in ±sqrt(6 / (in + out))
    uniform,   // every element uniform in ±value
    constant,  // every element equal to value
  };
  std::string name;
  std::string option;
  std::vector<std::int64_t> shape;
  Start start = Start::constant;
  double value = 0;
};

// What a layer with `heads` heads of `head_dim` features learns and passes for `score`:
// its parameters (additive_dim: the A of the additive score; 0 means head_dim) and the scale it
// passes (none: the score's default). qkv::Error for sizes below 1 (additive_dim below 0).
struct ScoreLayer {
  std::vector<ScoreLayerParameter> parameters;
  std::optional<double> scale;
};
ScoreLayer score_layer(Score score, std::int64_t heads, std::int64_t head_dim,
                       std::int64_t additive_dim = 0);

struct MultiHeadAttentionOptions {
  std::int64_t embed_dim = 0;  // E; a multiple of num_heads
  std::int64_t num_heads = 1;  // H; each head has E / H dimensions
  std::int64_t kdim = 0;       // features of key (0: E)
  std::int64_t vdim = 0;       // features of value (0: E)
  bool bias = true;            // in_proj_bias and out_proj.bias
  bool add_bias_kv = false;    // learned bias_k, bias_v appended to the keys and values
  bool add_zero_attn = false;  // a zero key and value appended (after bias_kv)
  bool batch_first = false;    // inputs [N, L, E] instead of [L, N, E]
  double dropout = 0.0;        // on the attention weights, when a call is training
  // scaled_dot is PyTorch's. Any other score adds the parameters score_layer() lists: bilinear
  // a per-head W [H, E/H, E/H] ("score_weight", starting at the identity, scaled by 1/sqrt(E/H)
  // like scaled_dot); additive per-head Wq, Wk [H, A, E/H] and v [H, A] ("score_wq", "score_wk",
  // "score_v"); cosine a per-head temperature [H] ("score_temperature", starting at 10).
  Score score = Score::scaled_dot;
  std::int64_t additive_dim = 0;  // A of the additive score (0: E / H)
  // A learned attention sink per head ("sinks" [H], starting at 0: "softmax plus one"), as in
  // gpt-oss (AttentionOptions::sinks).
  bool sinks = false;
  // Softmax or sigmoid attention (AttentionOptions::normalization, sigmoid_bias).
  Normalization normalization = Normalization::softmax;
  std::optional<double> sigmoid_bias = std::nullopt;
};

// One call's masks and switches (PyTorch's forward arguments).
struct MultiHeadAttentionCall {
  // [N, S] bool: true = this key is padding, ignore it (PyTorch's module meaning).
  std::optional<TensorView> key_padding_mask;
  // [L, S] or [N·H, L, S]: bool (true = may NOT attend, PyTorch's module meaning) or float
  // (added to the scores).
  std::optional<TensorView> attn_mask;
  bool need_weights = true;          // return the attention weights
  bool average_attn_weights = true;  // [N, L, S'] averaged over heads, else [N, H, L, S']
  bool is_causal = false;            // hide key j > i (top-left); not with attn_mask (qkv::Error)
  bool training = false;             // apply dropout (with dropout_seed)
  std::uint64_t dropout_seed = 0;
};

struct MultiHeadAttentionResult {
  Tensor output;  // [L, N, E] (or [N, L, E] with batch_first), float32
  // Empty unless need_weights. S' = S + add_bias_kv + add_zero_attn. A query that sees no key
  // gets an output of out_proj.bias (zero attention) and zero weights, where PyTorch gives NaN.
  Tensor weights;
};

struct MultiHeadAttentionInputGradients {
  Tensor query, key, value;  // shaped like the inputs of the forward call
};

class MultiHeadAttention {
 public:
  // Parameters initialized as PyTorch does (xavier-uniform in_proj, out_proj uniform in
  // ±1/sqrt(E), zero biases, xavier-normal bias_k/bias_v), drawn from `seed`.
  explicit MultiHeadAttention(const MultiHeadAttentionOptions& options, std::uint64_t seed = 0);

  const MultiHeadAttentionOptions& options() const { return options_; }

  // The parameters by PyTorch's state_dict names: "in_proj_weight" [3E, E] when kdim = vdim = E,
  // else "q_proj_weight" [E, E], "k_proj_weight" [E, kdim], "v_proj_weight" [E, vdim];
  // "in_proj_bias" [3E], "out_proj.weight" [E, E], "out_proj.bias" [E], "bias_k", "bias_v"
  // [1, 1, E]; the score's own (see MultiHeadAttentionOptions::score); "sinks" [H].
  const NamedTensors& parameters() const { return parameters_; }
  // The same, for an optimizer to update in place (values only: shapes must stay).
  NamedTensors& parameters() { return parameters_; }
  // The AttentionOptions each forward call starts from: the score, the scale the layer passes,
  // the score's parameters and the sinks as views of parameters() (valid while the layer lives
  // and load_state_dict has not replaced them), the normalization. A call adds its masks and
  // dropout. For evaluating the layer's attention another way (attention_reference).
  AttentionOptions attention_options() const;
  // Replaces every parameter from a state_dict (float32, float64, bfloat16 or float16, converted to
  // float32). Throws qkv::Error naming a missing, unexpected or misshapen tensor.
  void load_state_dict(const NamedTensors& state);
  // load_state_dict(load_safetensors(path)) / save_safetensors(path, parameters()).
  void load(const std::string& path);
  void save(const std::string& path) const;

  // query [L, N, E], key [S, N, kdim], value [S, N, vdim] (batch_first: [N, L, E], …), float32.
  // Keeps what backward needs (the projections, O and LSE: O(N·E) memory).
  MultiHeadAttentionResult forward(const TensorView& query, const TensorView& key,
                                   const TensorView& value, const MultiHeadAttentionCall& call);

  // For ∂L/∂output = dout (the output's shape) of the last forward call: adds the gradient of
  // every parameter to gradients() and returns the inputs' gradients. Self-attention callers
  // that passed one tensor as query, key and value sum the three.
  MultiHeadAttentionInputGradients backward(const TensorView& dout);

  // Parameter gradients, by the parameters' names, summed until zero_grad (which zeroes them in
  // place: their addresses stay valid).
  const NamedTensors& gradients() const { return gradients_; }
  void zero_grad();

 private:
  struct Saved;
  MultiHeadAttentionOptions options_;
  NamedTensors parameters_, gradients_;
  std::shared_ptr<Saved> saved_;
  // What the attention call learns besides the projections (the score's parameters from its unit,
  // the sinks) and the scale it passes: fixed by the options, found once.
  std::vector<ScoreLayerParameter> attention_parameters_;
  std::optional<double> score_scale_;
};

}  // namespace qkv
