// Distributed attention (run under mpirun -np P) against one process: every rank builds the same
// global inputs, takes its shards, runs ring or head-parallel attention forward and backward, and
// compares its shards of O, LSE, dQ, dK and dV with attention on the whole sequence. Prints one
// line per case on rank 0; exits non-zero on any mismatch (on any rank).

#include <mpi.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "qkv/distributed.hpp"

namespace {

using namespace qkv;

struct Case {
  std::string name;
  distributed::Strategy strategy;
  distributed::Layout layout;
  std::int64_t n = 23, hq = 4, hk = 2;
  bool causal = false;
  Score score = Score::scaled_dot;
  bool alibi = false, window = false, key_lengths = false;
  bool bias = false, mask = false, weights = false;  // bias and mask sharded by query rows
  double dropout = 0.0;
  bool sinks = false;    // joined once per row, by the block holding key 0, whatever the mask
  bool sigmoid = false;  // normalization sigmoid: the blocks' O summed
  std::int64_t sink_tokens = 0;  // with the window
};

Case with(Case c, const std::string& name, bool bias, bool mask, bool weights, double dropout) {
  c.name = name;
  c.bias = bias;
  c.mask = mask;
  c.weights = weights;
  c.dropout = dropout;
  return c;
}

Tensor random(std::vector<std::int64_t> shape, std::uint64_t seed) {
  Tensor t(DType::float32, std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = normal(rng);
  return t;
}

// The rows of a rank's shard (`pieces` of dimension `dim`) of a dense tensor of any dtype.
Tensor shard(const Tensor& whole, const std::vector<std::pair<std::int64_t, std::int64_t>>& pieces,
             int dim = 1) {
  std::vector<std::int64_t> shape = whole.shape();
  const auto at_dim = static_cast<std::size_t>(dim);
  const std::int64_t n = shape[at_dim];
  std::int64_t outer = 1, inner = static_cast<std::int64_t>(dtype_size(whole.dtype()));
  for (std::size_t x = 0; x < shape.size(); ++x) {
    if (x < at_dim) outer *= shape[x];
    if (x > at_dim) inner *= shape[x];
  }
  std::int64_t rows = 0;
  for (const auto& piece : pieces) rows += piece.second;
  shape[at_dim] = rows;
  Tensor out(whole.dtype(), shape);
  const auto* from = static_cast<const std::byte*>(whole.raw());
  auto* to = static_cast<std::byte*>(out.raw());
  for (std::int64_t o = 0; o < outer; ++o) {
    std::int64_t at = 0;
    for (const auto& [offset, length] : pieces) {
      std::memcpy(to + (o * rows + at) * inner, from + (o * n + offset) * inner,
                  static_cast<std::size_t>(length * inner));
      at += length;
    }
  }
  return out;
}

double relative_error(const Tensor& got, const Tensor& want) {
  double worst = 0.0, scale = 0.0;
  for (std::int64_t i = 0; i < want.numel(); ++i) {
    const double w = want.data<float>()[i], g = got.data<float>()[i];
    if (std::isinf(w) && w == g) continue;
    worst = std::max(worst, std::abs(g - w));
    if (std::isfinite(w)) scale = std::max(scale, std::abs(w));
  }
  return worst / (1.0 + scale);
}

bool run(const Case& c, int ranks, int rank) {
  const std::int64_t b = 2, d = 8, dv = 6;
  const Tensor q = random({b, c.n, c.hq, d}, 1), k = random({b, c.n, c.hk, d}, 2),
               v = random({b, c.n, c.hk, dv}, 3), dout = random({b, c.n, c.hq, dv}, 4);
  AttentionOptions options;
  options.score = c.score;
  options.causal = c.causal;
  Tensor w, wq, wk, va, slopes, lengths, sinks;
  if (c.score == Score::bilinear) {
    w = random({c.hq, d, d}, 5);
    options.w = w.view();
    options.scale = 0.3;
  }
  if (c.score == Score::additive) {
    wq = random({c.hq, 5, d}, 6);
    wk = random({5, d}, 7);
    va = random({c.hq, 5}, 8);
    options.wq = wq.view();
    options.wk = wk.view();
    options.va = va.view();
  }
  if (c.alibi) {
    slopes = Tensor(DType::float32, {c.hq});
    for (std::int64_t h = 0; h < c.hq; ++h) slopes.data<float>()[h] = std::pow(2.0f, -1.0f - h);
    options.alibi_slopes = slopes.view();
  }
  if (c.sigmoid) options.normalization = Normalization::sigmoid;
  if (c.sinks) {
    sinks = Tensor(DType::float32, {c.hq});
    for (std::int64_t h = 0; h < c.hq; ++h) sinks.data<float>()[h] = -1.0f + 0.8f * h;
    options.sinks = sinks.view();
  }
  options.sink_tokens = c.sink_tokens;
  if (c.window) {
    options.window_left = 5;
    options.window_right = 2;
  }
  if (c.key_lengths) {
    lengths = Tensor(DType::int64, {b});
    lengths.data<std::int64_t>()[0] = c.n - 4;
    lengths.data<std::int64_t>()[1] = c.n / 2;
    options.key_lengths = lengths.view();
  }
  options.dropout = c.dropout;
  options.dropout_seed = 11;
  const auto pieces = distributed::shard_pieces(c.n, ranks, rank, c.layout);
  Tensor bias, mask, bias_local, mask_local;
  if (c.bias) {  // per head, broadcast over the batch
    bias = random({1, c.hq, c.n, c.n}, 9);
    options.bias = bias.view();
    bias_local = shard(bias, pieces, 2);
  }
  if (c.mask) {  // per batch, broadcast over heads; row 3 of batch 0 sees nothing
    mask = Tensor(DType::boolean, {b, 1, c.n, c.n});
    std::mt19937_64 rng(10);
    for (std::int64_t i = 0; i < mask.numel(); ++i) mask.data<bool>()[i] = rng() % 4 != 0;
    for (std::int64_t j = 0; j < c.n; ++j) mask.data<bool>()[3 * c.n + j] = false;
    options.mask = mask.view();
    mask_local = shard(mask, pieces, 2);
  }
  // One process, the whole sequence.
  Tensor out(DType::float32, {b, c.n, c.hq, dv}), lse(DType::float32, {b, c.hq, c.n});
  Tensor weights(DType::float32, {b, c.hq, c.n, c.n});
  attention_forward(q.view(), k.view(), v.view(), options,
                    {out.mutable_view(), lse.mutable_view(), weights.mutable_view()});
  Tensor dq(DType::float32, {b, c.n, c.hq, d}), dk(DType::float32, {b, c.n, c.hk, d}),
      dv_(DType::float32, {b, c.n, c.hk, dv});
  AttentionGradients grads;
  grads.dq = dq.mutable_view();
  grads.dk = dk.mutable_view();
  grads.dv = dv_.mutable_view();
  // The score's parameters (the same on every rank): their gradients, one process and summed
  // over the ranks.
  std::vector<std::pair<Tensor, Tensor>> parameter_grads;  // (one process, distributed)
  AttentionGradients whole_parameters, distributed_parameters;
  for (auto [param, whole_slot, dist_slot] :
       {std::tuple{&w, &grads.dw, &distributed_parameters.dw},
        std::tuple{&wq, &grads.dwq, &distributed_parameters.dwq},
        std::tuple{&wk, &grads.dwk, &distributed_parameters.dwk},
        std::tuple{&va, &grads.dva, &distributed_parameters.dva},
        std::tuple{&sinks, &grads.dsinks, &distributed_parameters.dsinks}}) {
    if (param->numel() == 0) continue;
    parameter_grads.emplace_back(Tensor(DType::float32, param->shape()),
                                 Tensor(DType::float32, param->shape()));
    *whole_slot = parameter_grads.back().first.mutable_view();
    *dist_slot = parameter_grads.back().second.mutable_view();
  }
  (void)whole_parameters;
  attention_backward(q.view(), k.view(), v.view(), options, dout.view(), std::nullopt, grads,
                     SavedForward{out.view(), lse.view()});

  // Distributed: the bias and mask as the rank's query rows.
  AttentionOptions local_options = options;
  if (c.bias) local_options.bias = bias_local.view();
  if (c.mask) local_options.mask = mask_local.view();
  const Tensor q_local = shard(q, pieces), k_local = shard(k, pieces), v_local = shard(v, pieces),
               dout_local = shard(dout, pieces);
  distributed::DistributedOptions dist{c.strategy, c.layout, c.n, c.n};
  Tensor out_local(DType::float32, {b, q_local.shape()[1], c.hq, dv});
  Tensor lse_local(DType::float32, {b, c.hq, q_local.shape()[1]});
  Tensor weights_local(DType::float32, {b, c.hq, q_local.shape()[1], c.n});
  std::optional<MutableTensorView> weights_slot;
  if (c.weights) weights_slot = weights_local.mutable_view();
  distributed::attention_forward(
      MPI_COMM_WORLD, q_local.view(), k_local.view(), v_local.view(), local_options, dist,
      {out_local.mutable_view(), lse_local.mutable_view(), weights_slot});
  Tensor dq_local(DType::float32, {b, q_local.shape()[1], c.hq, d});
  Tensor dk_local(DType::float32, {b, k_local.shape()[1], c.hk, d});
  Tensor dv_local(DType::float32, {b, k_local.shape()[1], c.hk, dv});
  distributed::attention_backward(
      MPI_COMM_WORLD, q_local.view(), k_local.view(), v_local.view(), local_options, dist,
      dout_local.view(), out_local.view(), lse_local.view(), dq_local.mutable_view(),
      dk_local.mutable_view(), dv_local.mutable_view(), distributed_parameters);
  const double errors[] = {
      relative_error(out_local, shard(out, pieces)),
      relative_error(lse_local, shard(lse, pieces, 2)), relative_error(dq_local, shard(dq, pieces)),
      relative_error(dk_local, shard(dk, pieces)), relative_error(dv_local, shard(dv_, pieces))};
  double worst = 0.0;
  for (double e : errors) worst = std::max(worst, e);
  if (c.weights) worst = std::max(worst, relative_error(weights_local, shard(weights, pieces, 2)));
  for (const auto& [whole, summed] : parameter_grads)
    worst = std::max(worst, relative_error(summed, whole));
  double global_worst = 0.0;
  MPI_Allreduce(&worst, &global_worst, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  const bool ok = global_worst <= 2e-5;
  if (rank == 0) {
    std::printf("%-40s P=%d  max relative error %.2e  %s\n", c.name.c_str(), ranks, global_worst,
                ok ? "ok" : "MISMATCH");
  }
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  int provided = 0;
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int ranks = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  using distributed::Layout;
  using distributed::Strategy;
  std::vector<Case> cases = {
      {"ring", Strategy::ring, Layout::contiguous},
      {"ring causal", Strategy::ring, Layout::contiguous, 23, 4, 2, true},
      {"ring causal zigzag", Strategy::ring, Layout::zigzag, 23, 4, 2, true},
      {"ring MQA bilinear", Strategy::ring, Layout::contiguous, 17, 4, 1, false, Score::bilinear},
      {"ring additive causal", Strategy::ring, Layout::zigzag, 19, 4, 2, true, Score::additive},
      {"ring alibi window lengths", Strategy::ring, Layout::contiguous, 29, 4, 2, false,
       Score::scaled_dot, true, true, true},
      {"heads causal", Strategy::heads, Layout::contiguous, 23, 4, 4, true},
      {"heads zigzag GQA", Strategy::heads, Layout::zigzag, 21, 8, 4, true},
      {"heads additive alibi", Strategy::heads, Layout::contiguous, 19, 4, 4, false,
       Score::additive, true},
      {"heads GQA 12/6 causal", Strategy::heads, Layout::zigzag, 25, 12, 6, true},
      {"automatic", Strategy::automatic, Layout::contiguous, 22, 4, 2, true},
  };
  // Row-sharded operands and dropout (the same mask as one process: global positions).
  const Case ring{"", Strategy::ring, Layout::contiguous, 23, 4, 2};
  const Case ring_causal_zigzag{"", Strategy::ring, Layout::zigzag, 26, 4, 2, true};
  const Case heads_causal{"", Strategy::heads, Layout::zigzag, 23, 4, 4, true};
  const Case automatic{"", Strategy::automatic, Layout::contiguous, 21, 4, 4};
  cases.push_back(with(ring, "ring bias mask weights", true, true, true, 0.0));
  cases.push_back(
      with(ring_causal_zigzag, "ring zigzag causal bias dropout", true, false, true, 0.25));
  cases.push_back(with(heads_causal, "heads causal dropout", false, false, false, 0.25));
  cases.push_back(with(automatic, "automatic with mask (ring)", false, true, true, 0.0));
  Case sinks_window{"ring sinks window", Strategy::ring, Layout::contiguous, 29, 4, 2, true};
  sinks_window.window = true;  // the rows far from key 0 see none of its shard
  sinks_window.sinks = true;
  cases.push_back(with(sinks_window, "ring sinks causal window weights", false, false, true, 0.0));
  Case sinks_zigzag = sinks_window;
  sinks_zigzag.layout = Layout::zigzag;
  cases.push_back(with(sinks_zigzag, "ring zigzag sinks mask", false, true, false, 0.0));
  Case streaming{"", Strategy::ring, Layout::contiguous, 29, 4, 2, true};
  streaming.window = true;  // the shards between the sink tokens and a row's window skipped
  streaming.sink_tokens = 2;
  cases.push_back(with(streaming, "ring sink tokens window weights", false, false, true, 0.0));
  Case sigmoid_ring{"", Strategy::ring, Layout::zigzag, 26, 4, 2, true};
  sigmoid_ring.sigmoid = true;
  cases.push_back(with(sigmoid_ring, "ring zigzag sigmoid bias weights", true, false, true, 0.0));
  Case sinks_heads{"heads sinks GQA", Strategy::heads, Layout::zigzag, 21, 8, 4, true};
  sinks_heads.sinks = true;
  cases.push_back(with(sinks_heads, "heads sinks GQA", false, false, false, 0.0));
  bool all = true;
  for (const Case& c : cases) {
    const bool divisible = c.hq % ranks == 0 && c.hk % ranks == 0;
    if (c.strategy == Strategy::heads && !divisible) continue;  // heads needs H divisible by P
    try {
      all = run(c, ranks, rank) && all;
    } catch (const std::exception& error) {
      std::fprintf(stderr, "rank %d, %s: %s\n", rank, c.name.c_str(), error.what());
      MPI_Abort(MPI_COMM_WORLD, 2);
    }
  }
  MPI_Finalize();
  return all ? 0 : 1;
}
