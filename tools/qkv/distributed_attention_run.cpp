// qkv attention --distributed ring|heads, under mpirun: every rank reads its shard of the .npy
// files (memory-mapped: only its rows), the ranks compute together, and rank 0 gathers the results
// and writes each file once, whole (all or nothing). A rank that fails reports why on stderr and
// the job exits with status 2: after the reading phase every rank learns of the failure and stops;
// later, MPI_Abort ends the job at once. No rank waits forever and no output file is left.

#include "distributed_attention_run.hpp"

#include "heatmap_image.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include "qkv/distributed.hpp"
#include "qkv/error.hpp"
#include "qkv/npy.hpp"

namespace qkv::cli {

namespace {

using Pieces = std::vector<std::pair<std::int64_t, std::int64_t>>;

// The dimension of the sequence in a file of rank 2 ([N, D]), 3 ([N, H, D]) or 4 ([B, N, H, D]).
int sequence_dim(std::size_t rank) {
  return rank == 4 ? 1 : 0;
}

// Gathers every rank's shard (same shape but `dim`, the shard's rows in piece order) into the
// whole tensor on rank 0; other ranks get an empty tensor.
Tensor gather(const Tensor& shard, int dim, std::int64_t total, const distributed::Layout layout,
              int ranks, int rank) {
  const int bytes = static_cast<int>(shard.nbytes());
  std::vector<int> counts(static_cast<std::size_t>(ranks)),
      offsets(static_cast<std::size_t>(ranks));
  MPI_Gather(&bytes, 1, MPI_INT, counts.data(), 1, MPI_INT, 0, MPI_COMM_WORLD);
  std::vector<std::byte> all;
  if (rank == 0) {
    int at = 0;
    for (int s = 0; s < ranks; ++s) {
      offsets[static_cast<std::size_t>(s)] = at;
      at += counts[static_cast<std::size_t>(s)];
    }
    all.resize(static_cast<std::size_t>(at));
  }
  MPI_Gatherv(shard.raw(), bytes, MPI_BYTE, all.data(), counts.data(), offsets.data(), MPI_BYTE, 0,
              MPI_COMM_WORLD);
  if (rank != 0) return Tensor();
  std::vector<std::int64_t> shape = shard.shape();
  shape[static_cast<std::size_t>(dim)] = total;
  Tensor whole(shard.dtype(), shape);
  std::int64_t outer = 1, inner = static_cast<std::int64_t>(dtype_size(shard.dtype()));
  for (int d = 0; d < dim; ++d) outer *= shape[static_cast<std::size_t>(d)];
  for (std::size_t d = static_cast<std::size_t>(dim) + 1; d < shape.size(); ++d) inner *= shape[d];
  auto* out = static_cast<std::byte*>(whole.raw());
  for (int s = 0; s < ranks; ++s) {
    const Pieces pieces = distributed::shard_pieces(total, ranks, s, layout);
    const std::int64_t rows = distributed::shard_length(total, ranks, s, layout);
    const std::byte* source = all.data() + offsets[static_cast<std::size_t>(s)];
    for (std::int64_t o = 0; o < outer; ++o) {
      std::int64_t at = 0;
      for (const auto& [offset, length] : pieces) {
        std::memcpy(out + (o * total + offset) * inner, source + (o * rows + at) * inner,
                    static_cast<std::size_t>(length * inner));
        at += length;
      }
    }
  }
  return whole;
}

// A bias or mask file broadcastable to [B, H, Nq, Nk]: this rank's query rows when it has the
// query dimension, the whole (broadcast) file otherwise.
Tensor load_score_operand(const std::string& path, std::int64_t q_total, const Pieces& q_pieces) {
  const std::vector<std::int64_t> shape = npy_shape(path);
  if (shape.size() >= 2 && shape[shape.size() - 2] == q_total && q_total > 1) {
    return load_npy_rows(path, static_cast<int>(shape.size()) - 2, q_pieces);
  }
  return load_npy(path);
}

// A file's shape from the library's [B, H, …] one: rank-3 files drop B, rank-2 files B and H.
std::vector<std::int64_t> file_shape(std::vector<std::int64_t> full, std::size_t file_rank) {
  if (file_rank <= 3) full.erase(full.begin());
  if (file_rank == 2) full.erase(full.begin());
  return full;
}

}  // namespace

std::pair<int, int> start_mpi() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  int provided = 0;
  if (!initialized) MPI_Init_thread(nullptr, nullptr, MPI_THREAD_MULTIPLE, &provided);
  int ranks = 1, rank = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &ranks);
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return {ranks, rank};
}

void run_distributed_attention(const DistributedRun& run) {
  // (Plain variables, not a structured binding: lambdas below capture them, which clang 14
  // refuses for bindings.)
  const std::pair<int, int> mpi = start_mpi();
  const int ranks = mpi.first, rank = mpi.second;
  const auto fail_everywhere = [&](const std::string& message) {
    fmt::print(stderr, "qkv: rank {}: {}\n", rank, message);
    MPI_Abort(MPI_COMM_WORLD, 2);
    std::exit(2);  // not reached
  };

  // 1. Read this rank's shards; every rank learns whether all could.
  distributed::DistributedOptions options;
  Tensor q, k, v, dout, bias, mask;
  std::size_t file_rank = 0;
  std::string failure;
  try {
    options.strategy = run.strategy;
    options.layout = run.layout;
    const std::vector<std::int64_t> q_shape = npy_shape(run.q), k_shape = npy_shape(run.k);
    file_rank = q_shape.size();
    if (file_rank < 2 || file_rank > 4 || k_shape.size() != file_rank) {
      throw Error(fmt::format("--q, --k: expected files of one rank, 2 to 4, got {} and {}",
                              q_shape.size(), k_shape.size()));
    }
    const int dim = sequence_dim(file_rank);
    options.q_total = q_shape[static_cast<std::size_t>(dim)];
    options.k_total = k_shape[static_cast<std::size_t>(dim)];
    const Pieces q_pieces = distributed::shard_pieces(options.q_total, ranks, rank, run.layout);
    const Pieces k_pieces = distributed::shard_pieces(options.k_total, ranks, rank, run.layout);
    q = load_npy_rows(run.q, dim, q_pieces);
    k = load_npy_rows(run.k, dim, k_pieces);
    v = load_npy_rows(run.v, dim, k_pieces);
    if (!run.dout.empty()) dout = load_npy_rows(run.dout, dim, q_pieces);
    if (!run.bias.empty()) bias = load_score_operand(run.bias, options.q_total, q_pieces);
    if (!run.mask.empty()) mask = load_score_operand(run.mask, options.q_total, q_pieces);
  } catch (const Error& error) {
    failure = error.what();
  }
  int failed = failure.empty() ? 0 : 1, any_failed = 0;
  MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  if (any_failed) {
    if (failed) fmt::print(stderr, "qkv: rank {}: {}\n", rank, failure);
    MPI_Finalize();
    std::exit(2);
  }

  // 2. Compute; an error now (the same on every rank, from the same checks) aborts the job.
  StagedFiles files;
  try {
    const TensorView qv = run.as_sequence(q, "--q"), kv = run.as_sequence(k, "--k"),
                     vv = run.as_sequence(v, "--v");
    std::vector<std::int64_t> out_shape = q.shape();
    out_shape.back() = v.shape().back();
    Tensor out(v.dtype(), out_shape);
    const MutableTensorView out_view = MutableTensorView::contiguous(
        out.raw(), out.dtype(), {qv.shape[0], qv.shape[1], qv.shape[2], vv.shape[3]});
    Tensor lse(DType::float32, {qv.shape[0], qv.shape[2], qv.shape[1]});
    AttentionOptions attention_options = run.options;
    if (!run.bias.empty()) attention_options.bias = bias.view();
    if (!run.mask.empty()) attention_options.mask = mask.view();
    Tensor weights;  // [B, H, Nq_r, Nk]: this rank's query rows
    std::optional<MutableTensorView> weights_view;
    const bool want_weights = !run.weights.empty() || !run.weights_png.empty();
    if (want_weights) {
      weights = Tensor(q.dtype() == DType::float64 ? DType::float64 : DType::float32,
                       {qv.shape[0], qv.shape[2], qv.shape[1], options.k_total});
      weights_view = weights.mutable_view();
    }
    distributed::attention_forward(MPI_COMM_WORLD, qv, kv, vv, attention_options, options,
                                   {out_view, lse.mutable_view(), weights_view});
    const int dim = sequence_dim(file_rank);
    const Tensor whole_out = gather(out, dim, options.q_total, run.layout, ranks, rank);
    // LSE [B, H, N_r] (as the file drops leading dimensions: [H, N] for rank 3, [N] for rank 2).
    const Tensor whole_lse = gather(lse, 2, options.q_total, run.layout, ranks, rank);
    const Tensor whole_weights =
        want_weights ? gather(weights, 2, options.q_total, run.layout, ranks, rank) : Tensor();
    std::vector<std::pair<std::string, Tensor>> gradients;
    if (!run.dout.empty()) {
      Tensor dq(DType::float32, q.shape()), dk(DType::float32, k.shape()),
          dv(DType::float32, v.shape());
      const auto view_of = [](Tensor& t, const TensorView& like) {
        return MutableTensorView::contiguous(t.raw(), t.dtype(),
                                             std::span<const std::int64_t>(like.shape.data(), 4));
      };
      // The score parameters' and the sinks' gradients: summed over the ranks, the same on every
      // rank.
      AttentionGradients parameters;
      std::vector<std::pair<std::string, Tensor>> parameter_files;
      parameter_files.reserve(6);
      for (const auto& [path, primal, slot] :
           {std::tuple{&run.dw, &attention_options.w, &parameters.dw},
            std::tuple{&run.dwq, &attention_options.wq, &parameters.dwq},
            std::tuple{&run.dwk, &attention_options.wk, &parameters.dwk},
            std::tuple{&run.dva, &attention_options.va, &parameters.dva},
            std::tuple{&run.dtemperature, &attention_options.temperature, &parameters.dtemperature},
            std::tuple{&run.dsinks, &attention_options.sinks, &parameters.dsinks}}) {
        if (path->empty()) continue;
        parameter_files.emplace_back(
            *path, Tensor(DType::float32,
                          std::vector<std::int64_t>((*primal)->shape.begin(),
                                                    (*primal)->shape.begin() + (*primal)->rank)));
        *slot = parameter_files.back().second.mutable_view();
      }
      distributed::attention_backward(MPI_COMM_WORLD, qv, kv, vv, attention_options, options,
                                      run.as_sequence(dout, "--dout"), out_view.as_const(),
                                      lse.view(), view_of(dq, qv), view_of(dk, kv), view_of(dv, vv),
                                      parameters);
      for (auto [path, tensor, total] :
           {std::tuple{run.dq, &dq, options.q_total}, std::tuple{run.dk, &dk, options.k_total},
            std::tuple{run.dv, &dv, options.k_total}}) {
        Tensor whole = gather(*tensor, dim, total, run.layout, ranks, rank);
        if (!path.empty()) gradients.emplace_back(path, std::move(whole));
      }
      for (auto& file : parameter_files) gradients.push_back(std::move(file));
    }
    if (rank == 0) {
      add_npy(files, run.out, whole_out.view());
      if (!run.lse.empty()) {
        add_npy(files, run.lse,
                TensorView::contiguous(whole_lse.raw(), whole_lse.dtype(),
                                       file_shape(whole_lse.shape(), file_rank)));
      }
      if (!run.weights.empty()) {
        add_npy(files, run.weights,
                TensorView::contiguous(whole_weights.raw(), whole_weights.dtype(),
                                       file_shape(whole_weights.shape(), file_rank)));
      }
      if (!run.weights_png.empty()) {  // batch 0: one panel per head
        add_heatmap(files, run.weights_png, "--weights-png",
                    weight_panels(whole_weights.view().narrow(0, 0, 1), "--weights-png", {}, {},
                                  std::nullopt, "--weights-png", "--weights-png"),
                    "attention weights (rows: queries, columns: keys)");
      }
      for (const auto& [path, tensor] : gradients) add_npy(files, path, tensor.view());
      files.commit();
    }
  } catch (const Error& error) {
    fail_everywhere(error.what());
  }
  MPI_Finalize();
}

}  // namespace qkv::cli
