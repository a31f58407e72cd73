// qkv mha: a MultiHeadAttention layer saved as .safetensors (PyTorch's state_dict names) run on
// .npy inputs; with dO, its backward too. Writes every output or none.

#include <fmt/format.h>

#include <memory>
#include <optional>
#include <string>

#include "commands.hpp"
#include "qkv/error.hpp"
#include "qkv/multihead_attention.hpp"
#include "qkv/npy.hpp"
#include "qkv/safetensors.hpp"

namespace qkv::cli {

namespace {

struct MhaFlags {
  std::string weights, query, key, value, key_padding_mask, attn_mask;
  std::int64_t num_heads = 0;
  bool batch_first = false, add_zero_attn = false, is_causal = false, per_head_weights = false;
  double dropout = 0.0;
  std::uint64_t dropout_seed = 0;
  std::string out, attention_weights, dout, grads;
};

// The layer's options, as far as its state_dict tells them (the rest come from flags).
MultiHeadAttentionOptions options_of(const NamedTensors& state, const MhaFlags& flags) {
  const auto shape_of = [&](const char* name) -> const std::vector<std::int64_t>* {
    const auto found = state.find(name);
    return found == state.end() ? nullptr : &found->second.shape();
  };
  const auto* out_weight = shape_of("out_proj.weight");
  if (out_weight == nullptr || out_weight->size() != 2) {
    throw Error("--weights: expected 'out_proj.weight' [E, E] in the state_dict, got none");
  }
  MultiHeadAttentionOptions options;
  options.embed_dim = (*out_weight)[0];
  options.num_heads = flags.num_heads;
  if (const auto* k = shape_of("k_proj_weight"); k != nullptr && k->size() == 2) {
    options.kdim = (*k)[1];
  }
  if (const auto* v = shape_of("v_proj_weight"); v != nullptr && v->size() == 2) {
    options.vdim = (*v)[1];
  }
  options.bias = shape_of("in_proj_bias") != nullptr;
  options.add_bias_kv = shape_of("bias_k") != nullptr;
  options.add_zero_attn = flags.add_zero_attn;
  options.batch_first = flags.batch_first;
  options.dropout = flags.dropout;
  if (shape_of("score_weight") != nullptr) options.score = Score::bilinear;
  if (const auto* wq = shape_of("score_wq"); wq != nullptr) {
    options.score = Score::additive;
    if (wq->size() == 3) options.additive_dim = (*wq)[1];
  }
  return options;
}

void run_mha(const MhaFlags& flags) {
  // 1. Read everything first.
  const NamedTensors state = load_safetensors(flags.weights);
  const Tensor query = load_npy(flags.query);
  if (flags.key.empty() != flags.value.empty()) {
    throw Error("--key, --value: expected both (cross-attention) or neither (self-attention)");
  }
  const bool self_attention = flags.key.empty();
  const Tensor key = self_attention ? Tensor() : load_npy(flags.key);
  const Tensor value = self_attention ? Tensor() : load_npy(flags.value);
  const std::optional<Tensor> padding =
      flags.key_padding_mask.empty() ? std::nullopt
                                     : std::optional<Tensor>(load_npy(flags.key_padding_mask));
  const std::optional<Tensor> attn_mask =
      flags.attn_mask.empty() ? std::nullopt : std::optional<Tensor>(load_npy(flags.attn_mask));
  const std::optional<Tensor> dout =
      flags.dout.empty() ? std::nullopt : std::optional<Tensor>(load_npy(flags.dout));
  if (dout.has_value() == flags.grads.empty()) {
    throw Error("--dout, --grads: expected both (run the backward) or neither");
  }
  for (const auto& [tensor, flag] :
       {std::pair{&query, "--query"}, std::pair{&key, "--key"}, std::pair{&value, "--value"}}) {
    if (tensor->numel() > 0 && tensor->rank() > kMaxRank) {
      throw Error(fmt::format("{}: expected rank 3, got rank {}", flag, tensor->rank()));
    }
  }

  // 2. The layer, then forward (and backward).
  MultiHeadAttention layer(options_of(state, flags));
  layer.load_state_dict(state);
  MultiHeadAttentionCall call;
  if (padding) call.key_padding_mask = padding->view();
  if (attn_mask) call.attn_mask = attn_mask->view();
  call.need_weights = !flags.attention_weights.empty();
  call.average_attn_weights = !flags.per_head_weights;
  call.is_causal = flags.is_causal;
  call.training = flags.dropout > 0;
  call.dropout_seed = flags.dropout_seed;
  const TensorView query_view = query.view();
  const TensorView key_view = self_attention ? query_view : key.view();
  const TensorView value_view = self_attention ? query_view : value.view();
  const MultiHeadAttentionResult result = layer.forward(query_view, key_view, value_view, call);
  NamedTensors gradients;
  if (dout) {
    if (dout->rank() > kMaxRank) {
      throw Error(fmt::format("--dout: expected rank 3, got rank {}", dout->rank()));
    }
    MultiHeadAttentionInputGradients inputs = layer.backward(dout->view());
    gradients = layer.gradients();
    if (self_attention) {  // query, key and value were one tensor: its gradient is the sum
      for (std::int64_t n = 0; n < inputs.query.numel(); ++n) {
        inputs.query.data<float>()[n] +=
            inputs.key.data<float>()[n] + inputs.value.data<float>()[n];
      }
      gradients["query"] = std::move(inputs.query);
    } else {
      gradients["query"] = std::move(inputs.query);
      gradients["key"] = std::move(inputs.key);
      gradients["value"] = std::move(inputs.value);
    }
  }

  // 3. Write all outputs, or none.
  StagedFiles files;
  add_npy(files, flags.out, result.output.view());
  if (!flags.attention_weights.empty())
    add_npy(files, flags.attention_weights, result.weights.view());
  if (dout) add_safetensors(files, flags.grads, gradients);
  files.commit();
}

}  // namespace

void add_mha_command(CLI::App& app) {
  auto flags = std::make_shared<MhaFlags>();
  CLI::App* command = app.add_subcommand(
      "mha", "A MultiheadAttention layer (PyTorch state_dict in .safetensors) on .npy inputs");
  command->add_option("--weights", flags->weights, "the layer's state_dict, .safetensors")
      ->required();
  command->add_option("--num-heads", flags->num_heads, "heads H (E / H per head)")->required();
  command->add_option("--query", flags->query, "query [L, N, E] (or [N, L, E] batch first)")
      ->required();
  command->add_option("--key", flags->key, "key [S, N, kdim] (default: the query)");
  command->add_option("--value", flags->value, "value [S, N, vdim] (default: the query)");
  command->add_option("--out", flags->out, "the layer's output, the query's shape")->required();
  command->add_option("--attention-weights", flags->attention_weights,
                      "write the attention weights [N, L, S'] (need_weights)");
  command->add_flag("--per-head-weights", flags->per_head_weights,
                    "weights [N, H, L, S'] (average_attn_weights=False)");
  command->add_flag("--batch-first", flags->batch_first, "inputs are [N, L, E]");
  command->add_flag("--add-zero-attn", flags->add_zero_attn, "append a zero key and value");
  command->add_flag("--is-causal", flags->is_causal, "hide keys after the query (top-left)");
  command->add_option("--key-padding-mask", flags->key_padding_mask,
                      "[N, S] bool, true = padding (ignored)");
  command->add_option("--attn-mask", flags->attn_mask,
                      "[L, S] or [N·H, L, S]: bool (true = not allowed) or float (added)");
  command->add_option("--dropout", flags->dropout, "dropout on the weights (training)")
      ->default_str("0");
  command->add_option("--dropout-seed", flags->dropout_seed, "seed of the dropout mask")
      ->default_str("0");
  command->add_option("--dout", flags->dout, "∂L/∂output (the output's shape): run the backward");
  command->add_option("--grads", flags->grads,
                      "write the gradients (.safetensors): every parameter by its state_dict "
                      "name, and query (key, value)");
  command->callback([flags] { run_mha(*flags); });
}

}  // namespace qkv::cli
