// qkv bench --distributed, under mpirun: ring attention's time per rank split into compute and
// waiting, the transfers' own time, the share of transfers hidden behind compute, and a model fed
// by these figures of how a step scales to 8 … 1024 ranks.
//
// The model (strong scaling: one global sequence of N rows, P ranks, the contiguous or zigzag
// layout): a ring step computes one block pair of n = N/P rows, 4·n²·D·H·c FLOPs at the measured
// per-rank rate R (c = 1/2 when causal: zigzag balances it), while n·Hk·(Dk + Dv)·4 bytes of K and
// V move over a link of bandwidth W with latency λ. With overlap a step takes the longer of the
// two, and P steps make the forward: T(P) = P · max(4n²DHc / R, λ + bytes(n) / W). Compute
// shrinks as 1/P², communication as 1/P: past P* where they cross, adding ranks stops paying.

#include "distributed_bench.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <random>
#include <vector>

#include "attention_bench.hpp"
#include "distributed_attention_run.hpp"
#include "qkv/distributed.hpp"
#include "qkv/error.hpp"

namespace qkv::cli {

namespace {

Tensor random_tensor(std::vector<std::int64_t> shape, std::uint64_t seed) {
  Tensor t(DType::float32, std::move(shape));
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  for (std::int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = normal(rng);
  return t;
}

}  // namespace

void run_distributed_bench(const std::string& spec, int repetitions, double link_gbs,
                           double latency_us) {
  const auto [ranks, rank] = start_mpi();
  const bench::Shape shape = bench::parse_shape(spec.empty() ? "B1H8N4096D64causal" : spec);
  const distributed::Layout layout =
      shape.causal ? distributed::Layout::zigzag : distributed::Layout::contiguous;
  const std::int64_t n = shape.q_len, rows = distributed::shard_length(n, ranks, rank, layout);
  if (shape.value_dim != shape.head_dim)
    throw Error(fmt::format("--shapes: expected Dv = D with --distributed, got '{}'", spec));
  const std::int64_t b = shape.batch, h = shape.q_heads, hk = shape.kv_heads, d = shape.head_dim;
  const Tensor q = random_tensor({b, rows, h, d}, 1 + static_cast<std::uint64_t>(rank));
  const Tensor k = random_tensor({b, rows, hk, d}, 100 + static_cast<std::uint64_t>(rank));
  const Tensor v = random_tensor({b, rows, hk, d}, 200 + static_cast<std::uint64_t>(rank));
  Tensor out(DType::float32, {b, rows, h, d}), lse(DType::float32, {b, h, rows});
  AttentionOptions options;
  options.causal = shape.causal;
  const distributed::DistributedOptions dist{distributed::Strategy::ring, layout, n, n};

  // 1. The ring forward, with its own split of time.
  std::vector<double> walls;
  distributed::RingStatistics stats, best;
  double best_wall = 1e30;
  for (int r = 0; r <= repetitions; ++r) {  // r = 0 warms up
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    distributed::attention_forward(MPI_COMM_WORLD, q.view(), k.view(), v.view(), options, dist,
                                   {out.mutable_view(), lse.mutable_view(), std::nullopt}, &stats);
    const double wall = MPI_Wtime() - start;
    if (r > 0 && wall < best_wall) {
      best_wall = wall;
      best = stats;
    }
  }
  // 1b. The ring backward: K/V ahead and dK/dV one step behind, split the same way.
  const Tensor dout = random_tensor({b, rows, h, d}, 300 + static_cast<std::uint64_t>(rank));
  Tensor dq(DType::float32, {b, rows, h, d}), dk(DType::float32, {b, rows, hk, d}),
      dv(DType::float32, {b, rows, hk, d});
  distributed::RingStatistics backward_stats, backward_best;
  double backward_wall = 1e30;
  for (int r = 0; r <= repetitions; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    distributed::attention_backward(MPI_COMM_WORLD, q.view(), k.view(), v.view(), options, dist,
                                    dout.view(), out.view(), lse.view(), dq.mutable_view(),
                                    dk.mutable_view(), dv.mutable_view(), {}, &backward_stats);
    const double wall = MPI_Wtime() - start;
    if (r > 0 && wall < backward_wall) {
      backward_wall = wall;
      backward_best = backward_stats;
    }
  }
  // 2. The same transfers with nothing to hide them behind.
  const std::size_t block_bytes = static_cast<std::size_t>(rows * hk * d * 4 * 2 * b);
  std::vector<std::byte> send(block_bytes), receive(block_bytes + 64 * 1024);
  double transfer = 1e30;
  for (int r = 0; r <= repetitions; ++r) {
    MPI_Barrier(MPI_COMM_WORLD);
    const double start = MPI_Wtime();
    for (int step = 0; step + 1 < ranks; ++step) {
      MPI_Sendrecv(send.data(), static_cast<int>(send.size()), MPI_BYTE, (rank + 1) % ranks, 7,
                   receive.data(), static_cast<int>(receive.size()), MPI_BYTE,
                   (rank + ranks - 1) % ranks, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    }
    if (r > 0) transfer = std::min(transfer, MPI_Wtime() - start);
  }
  // Hidden: the share of transfers that had completed when the compute beside them ended.
  const double hidden =
      best.transfer_steps > 0 ? static_cast<double>(best.hidden_steps) / best.transfer_steps : 1.0;
  const double backward_hidden =
      backward_best.transfer_steps > 0
          ? static_cast<double>(backward_best.hidden_steps) / backward_best.transfer_steps
          : 1.0;
  constexpr int kFigures = 11;
  const double figures[kFigures] = {best_wall,
                                    best.compute_seconds,
                                    best.wait_seconds,
                                    transfer,
                                    hidden,
                                    best.bytes_sent,
                                    backward_wall,
                                    backward_best.compute_seconds,
                                    backward_best.wait_seconds,
                                    backward_hidden,
                                    backward_best.bytes_sent};
  std::vector<double> all(kFigures * static_cast<std::size_t>(ranks));
  MPI_Gather(figures, kFigures, MPI_DOUBLE, all.data(), kFigures, MPI_DOUBLE, 0, MPI_COMM_WORLD);
  if (rank == 0) {
    fmt::print("qkv bench --distributed: ring attention, {} ranks, {} ({} layout), float32\n",
               ranks, shape.name, shape.causal ? "zigzag" : "contiguous");
    fmt::print("{:>5} {:>10} {:>11} {:>13} {:>13} {:>8} {:>10}\n", "rank", "wall ms", "compute ms",
               "waiting ms", "transfers ms", "hidden", "MiB sent");
    double compute_total = 0, bytes_total = 0, transfer_total = 0;
    for (int r = 0; r < ranks; ++r) {
      const double* f = all.data() + kFigures * r;
      fmt::print("{:>5} {:>10.2f} {:>11.2f} {:>13.2f} {:>13.2f} {:>7.0f}% {:>10.1f}\n", r,
                 f[0] * 1e3, f[1] * 1e3, f[2] * 1e3, f[3] * 1e3, f[4] * 100, f[5] / (1 << 20));
      compute_total += f[1];
      bytes_total += f[5];
      transfer_total += f[3];
    }
    fmt::print(
        "(waiting: after its compute, for the next block — exposed communication or a slower "
        "neighbour; transfers: the same K/V messages sent round the ring alone; hidden: the "
        "share of transfers complete when the compute beside them ended)\n\n");
    fmt::print("ring backward (K/V ahead, dK/dV one step behind):\n");
    fmt::print("{:>5} {:>10} {:>11} {:>13} {:>8} {:>10}\n", "rank", "wall ms", "compute ms",
               "waiting ms", "hidden", "MiB sent");
    for (int r = 0; r < ranks; ++r) {
      const double* f = all.data() + kFigures * r;
      fmt::print("{:>5} {:>10.2f} {:>11.2f} {:>13.2f} {:>7.0f}% {:>10.1f}\n", r, f[6] * 1e3,
                 f[7] * 1e3, f[8] * 1e3, f[9] * 100, f[10] / (1 << 20));
    }
    fmt::print(
        "(waiting includes the last dK/dV pass home, which has no compute to hide behind)\n\n");
    // 3. The model, fed by this run.
    const double flops = bench::attention_flops(shape);  // causal counts visible pairs
    const double rate = flops / compute_total;           // per rank, FLOP/s
    const double measured_gbs =
        ranks > 1 && transfer_total > 0 ? bytes_total / transfer_total / 1e9 : 0.0;
    const double bandwidth = (link_gbs > 0       ? link_gbs
                              : measured_gbs > 0 ? measured_gbs
                                                 : 10.0) *
                             1e9;
    const double latency = latency_us * 1e-6;
    const double causal_share = shape.causal ? 0.5 : 1.0;
    fmt::print(
        "model: per-rank rate R = {:.1f} GFLOP/s (this run), link W = {:.1f} GB/s ({}), "
        "latency {:.1f} µs; N = {}, H = {}, Hk = {}, D = {}\n",
        rate / 1e9, bandwidth / 1e9,
        link_gbs > 0       ? "--link-gbs"
        : measured_gbs > 0 ? "measured here"
                           : "assumed",
        latency_us, n, h, hk, d);
    fmt::print("{:>6} {:>10} {:>14} {:>14} {:>12} {:>12} {:>11}\n", "ranks", "rows/rank",
               "compute/step", "comm/step", "forward", "speed-up", "efficiency");
    const double one_rank = flops / rate;
    for (int p = 8; p <= 1024; p *= 2) {
      const double rows_per = static_cast<double>(n) / p;
      const double compute =
          4.0 * rows_per * rows_per * static_cast<double>(d * h * b) * causal_share / rate;
      const double comm = latency + rows_per * static_cast<double>(hk * d * 2 * 4 * b) / bandwidth;
      const double total = p * std::max(compute, comm);
      fmt::print("{:>6} {:>10.1f} {:>11.3f} ms {:>11.3f} ms {:>9.2f} ms {:>11.1f}× {:>10.0f}%\n", p,
                 rows_per, compute * 1e3, comm * 1e3, total * 1e3, one_rank / total,
                 100.0 * one_rank / total / p);
    }
    fmt::print(
        "(a step overlaps compute with communication and costs the longer of the two; "
        "efficiency falls once comm/step exceeds compute/step)\n");
  }
  MPI_Finalize();
}

}  // namespace qkv::cli
