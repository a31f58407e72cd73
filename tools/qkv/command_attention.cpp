// qkv attention: reads Q, K, V and the optional parameters from .npy files, runs attention
// forward, and writes O (and LSE, P) — and, given dO, the backward's gradients — all of them or
// none.
//
// File layouts (docs/contract.md §1): rank 2 [N, D] means B = H = 1, rank 3 [N, H, D] means B = 1,
// rank 4 is [B, N, H, D]. O keeps Q's rank; LSE and the weights drop the same leading dimensions
// ([Nq] / [H, Nq] / [B, H, Nq] and [Nq, Nk] / [H, Nq, Nk] / [B, H, Nq, Nk]).

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <charconv>
#include <memory>
#include <optional>
#include <string>

#include "commands.hpp"
#include "heatmap_image.hpp"
#ifdef QKV_HAS_MPI
#include "distributed_attention_run.hpp"
#endif
#include "qkv/attention.hpp"
#include "qkv/backward.hpp"
#include "qkv/error.hpp"
#include "qkv/npy.hpp"

namespace qkv::cli {

namespace {

struct AttentionFlags {
  std::string q, k, v, out, lse, weights, weights_png;
  std::string score = "scaled_dot";
  std::optional<double> scale;
  std::string w, wq, wk, va, temperature, alibi, sinks, bias, key_lengths, mask;
  double softcap = 0.0;
  std::string normalization = "softmax";
  std::optional<double> sigmoid_bias;
  bool causal = false;
  std::string causal_align = "bottom-right";
  std::int64_t prefix_length = 0;
  std::string window;
  std::int64_t sink_tokens = 0;
  double dropout = 0.0;
  std::uint64_t dropout_seed = 0;
  int threads = 0;
  // The backward: ∂L/∂O in, the requested gradients out.
  std::string dout, dq, dk, dv, dw, dwq, dwk, dva, dtemperature, dsinks;
  // Under mpirun: ring | heads | auto, and how the sequence is laid out over the ranks.
  std::string distributed, layout = "contiguous";
};

// The logical [B, N, H, D] view of a sequence file of rank 2, 3 or 4.
TensorView sequence_view(const Tensor& tensor, const char* flag) {
  if (tensor.rank() < 2 || tensor.rank() > 4) {
    throw Error(
        fmt::format("{}: expected rank 2 [N, D], 3 [N, H, D] or 4 [B, N, H, D], got rank {}", flag,
                    tensor.rank()));
  }
  TensorView view = tensor.view();
  if (view.rank == 2) {  // [N, D] → [1, N, 1, D]
    view = TensorView::contiguous(tensor.raw(), tensor.dtype(),
                                  {1, tensor.shape()[0], 1, tensor.shape()[1]});
  }
  return view.with_rank(4);
}

// "L,R" with each side an integer >= -1.
std::pair<std::int64_t, std::int64_t> parse_window(const std::string& text) {
  const auto comma = text.find(',');
  std::int64_t left = 0, right = 0;
  auto parse = [&](std::string_view part, std::int64_t& value) {
    const auto [end, error] = std::from_chars(part.data(), part.data() + part.size(), value);
    return error == std::errc() && end == part.data() + part.size() && !part.empty();
  };
  const std::string_view all(text);
  if (comma == std::string::npos || !parse(all.substr(0, comma), left) ||
      !parse(all.substr(comma + 1), right)) {
    throw Error(
        fmt::format("--window: expected L,R (two integers, -1 = unbounded), got '{}'", text));
  }
  return {left, right};
}

std::optional<Tensor> load_optional(const std::string& path) {
  if (path.empty()) return std::nullopt;
  return load_npy(path);
}

// The options of the flags, with the tensors they point into (read from their files).
struct LoadedOptions {
  std::optional<Tensor> w, wq, wk, va, temperature, alibi, sinks, bias, key_lengths, mask;
  AttentionOptions options;
};

LoadedOptions load_options(const AttentionFlags& flags) {
  LoadedOptions loaded;
  loaded.w = load_optional(flags.w);
  loaded.wq = load_optional(flags.wq);
  loaded.wk = load_optional(flags.wk);
  loaded.va = load_optional(flags.va);
  loaded.temperature = load_optional(flags.temperature);
  loaded.alibi = load_optional(flags.alibi);
  loaded.sinks = load_optional(flags.sinks);
  loaded.bias = load_optional(flags.bias);
  loaded.key_lengths = load_optional(flags.key_lengths);
  loaded.mask = load_optional(flags.mask);
  AttentionOptions& options = loaded.options;
  options.score = parse_score(flags.score);
  options.scale = flags.scale;
  options.softcap = flags.softcap;
  auto attach = [](const std::optional<Tensor>& tensor, std::optional<TensorView>& slot,
                   const char* flag) {
    if (!tensor) return;
    if (tensor->rank() > kMaxRank) {
      throw Error(
          fmt::format("{}: expected rank <= {}, got rank {}", flag, kMaxRank, tensor->rank()));
    }
    slot = tensor->view();
  };
  attach(loaded.w, options.w, "--w");
  attach(loaded.wq, options.wq, "--wq");
  attach(loaded.wk, options.wk, "--wk");
  attach(loaded.va, options.va, "--va");
  attach(loaded.temperature, options.temperature, "--temperature");
  attach(loaded.alibi, options.alibi_slopes, "--alibi");
  attach(loaded.sinks, options.sinks, "--sinks");
  attach(loaded.bias, options.bias, "--bias");
  attach(loaded.key_lengths, options.key_lengths, "--key-lengths");
  attach(loaded.mask, options.mask, "--mask");
  options.causal = flags.causal;
  options.causal_align = parse_causal_align(flags.causal_align);
  options.normalization = parse_normalization(flags.normalization);
  options.sigmoid_bias = flags.sigmoid_bias;
  options.prefix_length = flags.prefix_length;
  if (!flags.window.empty()) {
    std::tie(options.window_left, options.window_right) = parse_window(flags.window);
  }
  options.sink_tokens = flags.sink_tokens;
  options.dropout = flags.dropout;
  options.dropout_seed = flags.dropout_seed;
  options.threads = flags.threads;
  return loaded;
}

// --dout comes with at least one requested gradient, and a gradient with --dout.
void check_gradient_flags(const AttentionFlags& flags) {
  const bool any_gradient =
      !(flags.dq.empty() && flags.dk.empty() && flags.dv.empty() && flags.dw.empty() &&
        flags.dwq.empty() && flags.dwk.empty() && flags.dva.empty() && flags.dtemperature.empty() &&
        flags.dsinks.empty());
  if (any_gradient != !flags.dout.empty()) {
    throw Error(any_gradient ? "--dout: expected ∂L/∂O for the requested gradients, got none"
                             : "--dout: expected at least one of --dq, --dk, --dv, --dw, --dwq, "
                               "--dwk, --dva, --dtemperature, --dsinks with it, got none");
  }
}

// The distributed path (issue: ring and head-parallel attention over MPI).
void run_distributed(const AttentionFlags& flags) {
#ifdef QKV_HAS_MPI
  DistributedRun run;
  if (flags.distributed == "ring") {
    run.strategy = distributed::Strategy::ring;
  } else if (flags.distributed == "heads") {
    run.strategy = distributed::Strategy::heads;
  } else if (flags.distributed == "auto") {
    run.strategy = distributed::Strategy::automatic;
  } else {
    throw Error(
        fmt::format("--distributed: expected ring, heads or auto, got '{}'", flags.distributed));
  }
  if (flags.layout != "contiguous" && flags.layout != "zigzag") {
    throw Error(fmt::format("--layout: expected contiguous or zigzag, got '{}'", flags.layout));
  }
  run.layout =
      flags.layout == "zigzag" ? distributed::Layout::zigzag : distributed::Layout::contiguous;
  check_gradient_flags(flags);
  for (const auto& [gradient, primal, names] :
       {std::tuple{&flags.dw, &flags.w, "--dw: expected --w"},
        std::tuple{&flags.dwq, &flags.wq, "--dwq: expected --wq"},
        std::tuple{&flags.dwk, &flags.wk, "--dwk: expected --wk"},
        std::tuple{&flags.dva, &flags.va, "--dva: expected --va"},
        std::tuple{&flags.dtemperature, &flags.temperature,
                   "--dtemperature: expected --temperature"},
        std::tuple{&flags.dsinks, &flags.sinks, "--dsinks: expected --sinks"}}) {
    if (!gradient->empty() && primal->empty()) {
      throw Error(fmt::format("{} to differentiate, got none", names));
    }
  }
  // The bias and mask are read by each rank, its query rows only.
  AttentionFlags shared = flags;
  shared.bias.clear();
  shared.mask.clear();
  const LoadedOptions loaded = load_options(shared);
  run.options = loaded.options;
  run.bias = flags.bias;
  run.mask = flags.mask;
  run.weights = flags.weights;
  run.weights_png = flags.weights_png;
  run.dw = flags.dw;
  run.dwq = flags.dwq;
  run.dwk = flags.dwk;
  run.dva = flags.dva;
  run.dtemperature = flags.dtemperature;
  run.dsinks = flags.dsinks;
  run.q = flags.q;
  run.k = flags.k;
  run.v = flags.v;
  run.out = flags.out;
  run.lse = flags.lse;
  run.dout = flags.dout;
  run.dq = flags.dq;
  run.dk = flags.dk;
  run.dv = flags.dv;
  run.as_sequence = sequence_view;
  run_distributed_attention(run);
#else
  throw Error(
      fmt::format("--distributed: expected a qkv built with MPI (OpenMPI), got '{}' in "
                  "one built without",
                  flags.distributed));
#endif
}

void run_attention(const AttentionFlags& flags) {
  if (!flags.distributed.empty()) {
    run_distributed(flags);
    return;
  }
  // 1. Read every input before computing anything.
  const Tensor q = load_npy(flags.q), k = load_npy(flags.k), v = load_npy(flags.v);
  const TensorView qv = sequence_view(q, "--q"), kv = sequence_view(k, "--k"),
                   vv = sequence_view(v, "--v");
  if (k.rank() != q.rank() || v.rank() != q.rank()) {
    throw Error(fmt::format("--k, --v: expected the rank of --q ({}), got {} and {}", q.rank(),
                            k.rank(), v.rank()));
  }
  const LoadedOptions loaded = load_options(flags);
  const AttentionOptions& options = loaded.options;
  check_gradient_flags(flags);
  const std::optional<Tensor> dout = load_optional(flags.dout);
  if (dout && dout->rank() != q.rank()) {
    throw Error(
        fmt::format("--dout: expected the rank of --q ({}), got {}", q.rank(), dout->rank()));
  }

  // 2. Results in the file layouts, seen by the library through [B, N, H, D] views.
  const std::int64_t batch = qv.shape[0], q_len = qv.shape[1], q_heads = qv.shape[2];
  const std::int64_t k_len = kv.shape[1], v_dim = vv.shape[3];
  // File shapes drop the leading dimensions Q's file did not have: rank 4 keeps [B, …],
  // rank 3 drops B, rank 2 drops B and H.
  const auto file_shape = [rank = q.rank()](std::vector<std::int64_t> full,
                                            std::size_t head_position) {
    if (rank <= 3) full.erase(full.begin());                                         // B
    if (rank == 2) full.erase(full.begin() + static_cast<long>(head_position - 1));  // H
    return full;
  };
  const std::vector<std::int64_t> out_shape = file_shape({batch, q_len, q_heads, v_dim}, 2);
  const std::vector<std::int64_t> lse_shape = file_shape({batch, q_heads, q_len}, 1);
  const std::vector<std::int64_t> weights_shape = file_shape({batch, q_heads, q_len, k_len}, 1);

  // O in V's dtype; LSE written in float32; weights in float32 (float64 for float64 inputs).
  Tensor out(v.dtype(), out_shape);
  std::optional<Tensor> lse, weights;
  AttentionOutputs outputs;
  outputs.out =
      MutableTensorView::contiguous(out.raw(), out.dtype(), {batch, q_len, q_heads, v_dim});
  if (!flags.lse.empty() || dout) {  // the backward needs LSE, written or not
    // Kept in float64 for the backward's weights (contract.md §7); the file is float32.
    lse.emplace(DType::float64, lse_shape);
    outputs.lse = MutableTensorView::contiguous(lse->raw(), lse->dtype(), {batch, q_heads, q_len});
  }
  if (!flags.weights.empty() || !flags.weights_png.empty()) {
    weights.emplace(q.dtype() == DType::float64 ? DType::float64 : DType::float32, weights_shape);
    outputs.weights = MutableTensorView::contiguous(weights->raw(), weights->dtype(),
                                                    {batch, q_heads, q_len, k_len});
  }
  attention_forward(qv, kv, vv, options, outputs);

  // 3. The gradients, each in its primal's file shape (float32; float64 for float64 inputs).
  const DType gradient_dtype = q.dtype() == DType::float64 ? DType::float64 : DType::float32;
  std::vector<std::pair<std::string, Tensor>> gradient_files;
  if (dout) {
    AttentionGradients gradients;
    const auto request = [&](const std::string& path, const std::vector<std::int64_t>& shape,
                             const TensorView& primal, std::optional<MutableTensorView>& slot) {
      if (path.empty()) return;
      // The file's shape; the library sees the primal's (rank-4 for Q, K, V) over the same data.
      gradient_files.emplace_back(path, Tensor(gradient_dtype, shape));
      slot = MutableTensorView::contiguous(
          gradient_files.back().second.raw(), gradient_dtype,
          std::span<const std::int64_t>(primal.shape.data(),
                                        static_cast<std::size_t>(primal.rank)));
    };
    gradient_files.reserve(9);
    request(flags.dq, q.shape(), qv, gradients.dq);
    request(flags.dk, k.shape(), kv, gradients.dk);
    request(flags.dv, v.shape(), vv, gradients.dv);
    const auto parameter = [&](const std::string& path, const std::optional<Tensor>& primal,
                               std::optional<MutableTensorView>& slot, const char* flag,
                               const char* input) {
      if (path.empty()) return;
      if (!primal) {
        throw Error(fmt::format("{}: expected {} to differentiate, got none", flag, input));
      }
      request(path, primal->shape(), primal->view(), slot);
    };
    parameter(flags.dw, loaded.w, gradients.dw, "--dw", "--w");
    parameter(flags.dwq, loaded.wq, gradients.dwq, "--dwq", "--wq");
    parameter(flags.dwk, loaded.wk, gradients.dwk, "--dwk", "--wk");
    parameter(flags.dva, loaded.va, gradients.dva, "--dva", "--va");
    parameter(flags.dtemperature, loaded.temperature, gradients.dtemperature, "--dtemperature",
              "--temperature");
    parameter(flags.dsinks, loaded.sinks, gradients.dsinks, "--dsinks", "--sinks");
    const std::optional<SavedForward> saved =
        SavedForward{outputs.out.as_const(), outputs.lse->as_const()};
    attention_backward(qv, kv, vv, options, sequence_view(*dout, "--dout"), std::nullopt, gradients,
                       saved);
  }

  // 4. Write all outputs, or none.
  StagedFiles files;
  add_npy(files, flags.out, out.view());
  if (!flags.lse.empty()) {
    Tensor lse32(DType::float32, lse->shape());
    for (std::int64_t i = 0; i < lse->numel(); ++i)
      lse32.data<float>()[i] = static_cast<float>(lse->data<double>()[i]);
    add_npy(files, flags.lse, lse32.view());
  }
  if (!flags.weights.empty()) add_npy(files, flags.weights, weights->view());
  if (!flags.weights_png.empty()) {  // batch 0: one panel per head
    const TensorView first_batch =
        weights->rank() == 4 ? weights->view().narrow(0, 0, 1) : weights->view();
    add_heatmap(files, flags.weights_png, "--weights-png",
                weight_panels(first_batch, "--weights-png", {}, {}, std::nullopt, "--weights-png",
                              "--weights-png"),
                "attention weights (rows: queries, columns: keys)");
  }
  for (const auto& [path, gradient] : gradient_files) add_npy(files, path, gradient.view());
  files.commit();
}

}  // namespace

void add_attention_command(CLI::App& app) {
  auto flags = std::make_shared<AttentionFlags>();
  CLI::App* command = app.add_subcommand(
      "attention", "Attention forward on .npy files: O = softmax(score(Q, K)) V");
  command->add_option("--q", flags->q, "queries [N, D], [N, H, D] or [B, N, H, D]")->required();
  command->add_option("--k", flags->k, "keys, same rank as --q")->required();
  command->add_option("--v", flags->v, "values, same rank as --q")->required();
  command->add_option("--out", flags->out, "output O, Q's rank, V's dtype")->required();
  command->add_option("--lse", flags->lse, "log-sum-exp [Nq], [H, Nq] or [B, H, Nq], float32");
  command->add_option("--weights", flags->weights, "softmax weights [.., Nq, Nk]");
  command->add_option("--weights-png", flags->weights_png,
                      "heatmap of the weights (batch 0, a panel per head): FILE.png or FILE.svg");
  command->add_option("--score", flags->score, fmt::format("{}", fmt::join(score_names(), " | ")))
      ->default_str("scaled_dot");
  command->add_option("--scale", flags->scale, "score multiplier (default: per score)");
  command->add_option("--w", flags->w, "bilinear W [Dq, Dk] or [Hq, Dq, Dk]");
  command->add_option("--wq", flags->wq, "additive Wq [A, Dq] or [Hq, A, Dq]");
  command->add_option("--wk", flags->wk, "additive Wk [A, Dk] or [Hq, A, Dk]");
  command->add_option("--va", flags->va, "additive v [A] or [Hq, A]");
  command->add_option("--temperature", flags->temperature, "cosine τ [Hq] or [1] (default 1)");
  command->add_option("--softcap", flags->softcap, "soft cap c: s <- c tanh(s / c); 0 = off");
  command->add_option("--alibi", flags->alibi, "ALiBi slopes [Hq] or [B, Hq]");
  command->add_option("--normalization", flags->normalization,
                      "softmax (default) | sigmoid: P = sigmoid(s + b), no normalization");
  command->add_option("--sigmoid-bias", flags->sigmoid_bias, "b of sigmoid attention (-log Nk)");
  command->add_option("--sinks", flags->sinks,
                      "attention sinks [Hq]: a learned logit per head joining each softmax");
  command->add_option("--bias", flags->bias, "float bias broadcastable to [B, Hq, Nq, Nk]");
  command->add_flag("--causal", flags->causal, "causal mask");
  command->add_option("--causal-align", flags->causal_align, "bottom-right | top-left")
      ->default_str("bottom-right");
  command->add_option("--prefix-length", flags->prefix_length,
                      "prefix LM (with --causal): the first N keys are visible to every query");
  command->add_option("--window", flags->window, "local window L,R (-1 = unbounded)");
  command->add_option("--sink-tokens", flags->sink_tokens,
                      "StreamingLLM: the first N keys stay visible past the window's left edge");
  command->add_option("--key-lengths", flags->key_lengths, "valid keys per batch [B], int");
  command->add_option("--mask", flags->mask, "boolean mask, true = may attend");
  command->add_option("--dropout", flags->dropout, "dropout probability on the weights")
      ->default_str("0");
  command->add_option("--dropout-seed", flags->dropout_seed, "seed of the dropout mask")
      ->default_str("0");
  command->add_option("--threads", flags->threads, "worker threads (0 = all)");
  command->add_option("--dout", flags->dout, "∂L/∂O (O's shape): run the backward");
  command->add_option("--distributed", flags->distributed,
                      "under mpirun: ring | heads | auto (each rank reads its shard)");
  command->add_option("--layout", flags->layout, "with --distributed: contiguous | zigzag")
      ->default_str("contiguous");
  command->add_option("--dq", flags->dq, "write ∂L/∂Q (Q's shape)");
  command->add_option("--dk", flags->dk, "write ∂L/∂K");
  command->add_option("--dv", flags->dv, "write ∂L/∂V");
  command->add_option("--dw", flags->dw, "write ∂L/∂W (bilinear)");
  command->add_option("--dwq", flags->dwq, "write ∂L/∂Wq (additive)");
  command->add_option("--dwk", flags->dwk, "write ∂L/∂Wk (additive)");
  command->add_option("--dva", flags->dva, "write ∂L/∂v (additive)");
  command->add_option("--dtemperature", flags->dtemperature, "write ∂L/∂τ (cosine)");
  command->add_option("--dsinks", flags->dsinks, "write ∂L/∂sinks");
  command->callback([flags] { run_attention(*flags); });
}

}  // namespace qkv::cli
