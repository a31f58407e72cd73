// Ring attention and head-parallel attention over MPI.
//
// Ring. Rank r keeps its query shard and, for P steps, holds one key/value shard: its own first,
// then the one of rank r − 1, r − 2, … While it computes attention of its queries on the shard it
// holds (each pair of query piece and key piece told its global offsets, so causal masks, windows,
// key lengths and ALiBi see global positions; pairs a causal mask hides entirely are skipped), the
// next shard is already on its way (MPI_Isend / MPI_Irecv posted before the compute). Each step's
// (O, LSE) is merged into the running result with merge_attention. The backward walks the same
// ring: K and V travel ahead, and each shard's dK and dV, summed over the ranks it has visited
// (attention_backward on each block with the whole problem's O and LSE), follow one step behind;
// after P passes every sum is home.
//
// Heads. With Hq and Hk divisible by P, an all-to-all turns sequence shards into head shards
// (rank s gets every row of heads s·H/P …), attention runs on whole sequences, and a second
// all-to-all returns the results to the sequence shards.

#include "qkv/distributed.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <thread>

#include "core/backward_arguments.hpp"
#include "core/position_masks.hpp"
#include "core/score_unit.hpp"
#include "qkv/error.hpp"
#include "qkv/merge.hpp"

namespace qkv::distributed {

namespace {

using Pieces = std::vector<std::pair<std::int64_t, std::int64_t>>;

// Heads [begin, end) (dimension 2 of [B, N, H, D]).
template <class View>
View heads(const View& view, std::int64_t begin, std::int64_t end) {
  return view.narrow(2, begin, end);
}

void check_mpi(int code, const char* what) {
  if (code != MPI_SUCCESS) throw Error(fmt::format("MPI: {} failed with code {}", what, code));
}

// The wider float type results are merged in: float64 for float64 inputs, float32 otherwise.
DType wide(DType dtype) {
  return dtype == DType::float64 ? DType::float64 : DType::float32;
}

// to = from, element by element (any strides and float dtypes), through float64 unless both are
// dense and of one dtype.
void copy_into(const TensorView& from, const MutableTensorView& to) {
  if (from.dtype == to.dtype && from.is_contiguous() && to.as_const().is_contiguous() &&
      from.numel() == to.as_const().numel()) {
    std::memcpy(to.data, from.data,
                static_cast<std::size_t>(from.numel()) * dtype_size(from.dtype));
    return;
  }
  const Tensor dense = detail::dense_copy(from);
  detail::store_dense(dense.data<double>(), to);
}

// total[:, first : first + m] += part for dense [B, N, …] and [B, m, …] tensors of one float
// dtype (the accumulation type: float32 or float64).
template <class T>
void add_rows_typed(Tensor& total, const Tensor& part, std::int64_t first) {
  const std::int64_t batch = part.shape()[0], n = total.shape()[1], m = part.shape()[1];
  const std::int64_t inner = m > 0 ? part.numel() / (batch * m) : 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    T* to = total.data<T>() + (b * n + first) * inner;
    const T* from = part.data<T>() + b * m * inner;
    for (std::int64_t i = 0; i < m * inner; ++i) to[i] += from[i];
  }
}

void add_rows(Tensor& total, const Tensor& part, std::int64_t first) {
  if (part.dtype() == DType::float64) {
    add_rows_typed<double>(total, part, first);
  } else {
    add_rows_typed<float>(total, part, first);
  }
}

// `slot` as a zeroed tensor of this dtype and shape: its memory is reused when they match.
Tensor& zeroed_reused(Tensor& slot, DType dtype, std::vector<std::int64_t> shape) {
  if (slot.dtype() != dtype || slot.shape() != shape) {
    slot = Tensor(dtype, std::move(shape));
  } else {
    std::memset(slot.raw(), 0, slot.nbytes());
  }
  return slot;
}

std::vector<std::int64_t> shape_of(const TensorView& view) {
  return std::vector<std::int64_t>(view.shape.begin(), view.shape.begin() + view.rank);
}

// Whether the position masks, or the block mask, hide every pair of a query piece and a key piece
// (global positions).
bool hidden(const AttentionOptions& o, std::int64_t q_total, std::int64_t k_total,
            std::pair<std::int64_t, std::int64_t> q_piece,
            std::pair<std::int64_t, std::int64_t> k_piece) {
  if (q_piece.second == 0 || k_piece.second == 0) return true;
  detail::PositionMasks masks;
  masks.causal = o.causal;
  masks.causal_align = o.causal_align;
  masks.prefix_length = o.prefix_length;
  masks.window_left = o.window_left;
  masks.window_right = o.window_right;
  masks.bottom_right_diagonal = k_total - q_total;
  const std::int64_t q_end = q_piece.first + q_piece.second;
  const std::int64_t k_end = k_piece.first + k_piece.second;
  if (masks.tile(q_piece.first, q_end, k_piece.first, k_end, k_total) == BlockKind::empty)
    return true;
  if (o.block_mask == nullptr) return false;
  const BlockMask& mask = *o.block_mask;
  const BlockMaskShape& shape = mask.shape();
  for (std::int64_t b = 0; b < shape.batch; ++b)
    for (std::int64_t h = 0; h < shape.heads; ++h)
      for (std::int64_t qb = q_piece.first / shape.q_block; qb * shape.q_block < q_end; ++qb)
        for (std::int64_t kb = k_piece.first / shape.kv_block; kb * shape.kv_block < k_end; ++kb)
          if (mask.kind(b, h, qb, kb) != BlockKind::empty) return false;
  return true;
}

struct Context {
  MPI_Comm comm;
  int ranks = 1, rank = 0;
  std::int64_t batch = 0, q_heads = 0, kv_heads = 0, q_dim = 0, k_dim = 0, v_dim = 0;
  Pieces q_pieces, k_pieces;
};

Context context(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                const AttentionOptions& options, const DistributedOptions& d) {
  Context c;
  c.comm = comm;
  check_mpi(MPI_Comm_size(comm, &c.ranks), "MPI_Comm_size");
  check_mpi(MPI_Comm_rank(comm, &c.rank), "MPI_Comm_rank");
  if (q.rank != 4 || k.rank != 4 || v.rank != 4) {
    throw Error(fmt::format("q, k, v: expected [B, N, H, D] shards (rank 4), got {}, {}, {}",
                            q.shape_string(), k.shape_string(), v.shape_string()));
  }
  if (d.q_total <= 0 || d.k_total <= 0) {
    throw Error(fmt::format("q_total, k_total: expected the global lengths (> 0), got {} and {}",
                            d.q_total, d.k_total));
  }
  const std::int64_t nq = shard_length(d.q_total, c.ranks, c.rank, d.layout);
  const std::int64_t nk = shard_length(d.k_total, c.ranks, c.rank, d.layout);
  if (q.shape[1] != nq || k.shape[1] != nk || v.shape[1] != nk) {
    throw Error(
        fmt::format("q, k, v: expected shards of {} and {} rows on rank {} of {}, got {}, "
                    "{} and {}",
                    nq, nk, c.rank, c.ranks, q.shape[1], k.shape[1], v.shape[1]));
  }
  // A bias or mask holds the rank's query rows and every key: [.., Nq_r or 1, Nk or 1].
  for (const auto& [operand, name] :
       {std::pair{&options.bias, "bias"}, std::pair{&options.mask, "mask"}}) {
    if (!*operand) continue;
    const TensorView& view = **operand;
    const bool keys_fit =
        view.rank < 1 || view.shape[view.rank - 1] == 1 || view.shape[view.rank - 1] == d.k_total;
    const bool rows_fit =
        view.rank < 2 || view.shape[view.rank - 2] == 1 || view.shape[view.rank - 2] == nq;
    if (!keys_fit || !rows_fit) {
      throw Error(fmt::format(
          "{}: expected the rank's query rows and every key, [.., {} or 1, {} or 1], on rank {} "
          "of {}, got {}",
          name, nq, d.k_total, c.rank, c.ranks, view.shape_string()));
    }
  }
  c.batch = q.shape[0];
  c.q_heads = q.shape[2];
  c.kv_heads = k.shape[2];
  c.q_dim = q.shape[3];
  c.k_dim = k.shape[3];
  c.v_dim = v.shape[3];
  c.q_pieces = shard_pieces(d.q_total, c.ranks, c.rank, d.layout);
  c.k_pieces = shard_pieces(d.k_total, c.ranks, c.rank, d.layout);
  return c;
}

// Offsets of each piece within the local shard.
std::vector<std::int64_t> local_starts(const Pieces& pieces) {
  std::vector<std::int64_t> starts;
  std::int64_t at = 0;
  for (const auto& piece : pieces) {
    starts.push_back(at);
    at += piece.second;
  }
  return starts;
}

// The part of a bias or mask ([.., Nq_r or 1, Nk or 1]) that the block of local query rows
// [q_begin, q_end) and global keys [k_begin, k_end) reads.
std::optional<TensorView> block_operand(const std::optional<TensorView>& operand,
                                        std::int64_t q_begin, std::int64_t q_end,
                                        std::int64_t k_begin, std::int64_t k_end) {
  if (!operand) return operand;
  TensorView view = *operand;
  if (view.rank >= 1 && view.shape[view.rank - 1] != 1)
    view = view.narrow(view.rank - 1, k_begin, k_end);
  if (view.rank >= 2 && view.shape[view.rank - 2] != 1)
    view = view.narrow(view.rank - 2, q_begin, q_end);
  return view;
}

// The options of the block of query piece `q_piece` (whose rows start at local row `q_local`)
// and key piece `k_piece` (global offsets and lengths).
AttentionOptions block_options(const AttentionOptions& options, const DistributedOptions& d,
                               std::pair<std::int64_t, std::int64_t> q_piece, std::int64_t q_local,
                               std::pair<std::int64_t, std::int64_t> k_piece) {
  AttentionOptions block = options;
  block.query_offset = q_piece.first;
  block.key_offset = k_piece.first;
  block.query_total = d.q_total;
  block.key_total = d.k_total;
  const std::int64_t q_end = q_local + q_piece.second, k_end = k_piece.first + k_piece.second;
  block.bias = block_operand(options.bias, q_local, q_end, k_piece.first, k_end);
  block.mask = block_operand(options.mask, q_local, q_end, k_piece.first, k_end);
  return block;
}

// The score parameters' gradients of one rank, in float64, summed over its blocks, then over all
// ranks. A head shard adds its per-head rows at its own heads.
class ParameterSums {
 public:
  ParameterSums(const AttentionOptions& options, const AttentionGradients& requested) {
    const auto parameters = detail::score_parameter_options();
    totals_.resize(parameters.size());
    parts_.resize(parameters.size());
    targets_.resize(parameters.size());
    for (std::size_t n = 0; n < parameters.size(); ++n) {
      const std::optional<TensorView>& primal = options.*parameters[n].option;
      const std::optional<MutableTensorView>& target = requested.*parameters[n].gradient;
      if (target.has_value() && primal.has_value()) {
        totals_[n] = Tensor(DType::float64, shape_of(*primal));
        targets_[n] = *target;
      }
    }
  }
  // Gradient slots for one block call, shaped like the (possibly head-sliced) parameters.
  AttentionGradients block_slots(const AttentionOptions& block_options) {
    AttentionGradients slots;
    const auto parameters = detail::score_parameter_options();
    for (std::size_t n = 0; n < parameters.size(); ++n) {
      const std::optional<TensorView>& primal = block_options.*parameters[n].option;
      if (totals_[n].numel() == 0 || !primal.has_value()) continue;
      parts_[n] = Tensor(DType::float64, shape_of(*primal));
      slots.*parameters[n].gradient = parts_[n].mutable_view();
    }
    return slots;
  }
  // Adds the last block's parts; `first_head` places a head shard's per-head rows.
  void add_parts(std::int64_t first_head) {
    for (std::size_t n = 0; n < parts_.size(); ++n) {
      if (parts_[n].numel() == 0) continue;
      const std::int64_t offset = parts_[n].numel() == totals_[n].numel()
                                      ? 0
                                      : first_head * (totals_[n].numel() / totals_[n].shape()[0]);
      for (std::int64_t i = 0; i < parts_[n].numel(); ++i)
        totals_[n].data<double>()[offset + i] += parts_[n].data<double>()[i];
    }
  }
  // Sums over the ranks and writes the requested gradients.
  void finish(MPI_Comm comm) {
    for (std::size_t n = 0; n < totals_.size(); ++n) {
      if (totals_[n].numel() == 0) continue;
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, totals_[n].raw(), static_cast<int>(totals_[n].numel()),
                              MPI_DOUBLE, MPI_SUM, comm),
                "MPI_Allreduce");
      copy_into(totals_[n].view(), targets_[n]);
    }
  }

 private:
  // One of each per score parameter option (detail::score_parameter_options()).
  std::vector<Tensor> totals_, parts_;
  std::vector<MutableTensorView> targets_;
};

// ---- Ring ---------------------------------------------------------------------------------------

// A send and a receive in flight (two requests) kept moving while the caller computes. MPI moves a
// large message only inside MPI calls: a helper thread polls the requests (when MPI allows calls
// from several threads), otherwise the caller nudges them between blocks.
class Transfer {
 public:
  explicit Transfer(bool threads_allowed) : threads_allowed_(threads_allowed) {}
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;
  ~Transfer() {
    if (mover_.joinable()) mover_.join();
  }

  void start(const void* send, std::size_t send_bytes, int to, void* receive,
             std::size_t receive_bytes, int from, int tag, MPI_Comm comm) {
    check_mpi(MPI_Irecv(receive, static_cast<int>(receive_bytes), MPI_BYTE, from, tag, comm,
                        &requests_[0]),
              "MPI_Irecv");
    check_mpi(MPI_Isend(send, static_cast<int>(send_bytes), MPI_BYTE, to, tag, comm, &requests_[1]),
              "MPI_Isend");
    active_ = true;
    arrived_ = false;
    if (threads_allowed_) {
      mover_ = std::thread([this] {
        // Polls rather than blocks: a blocking wait would spin on a core the compute needs.
        int done = 0;
        while (!done) {
          MPI_Testall(2, requests_, &done, MPI_STATUSES_IGNORE);
          if (!done) std::this_thread::sleep_for(std::chrono::microseconds(50));
        }
        arrived_ = true;
      });
    }
  }
  // Without a helper thread: lets MPI move the messages a little.
  void nudge() {
    if (!active_ || threads_allowed_) return;
    int done = 0;
    MPI_Testall(2, requests_, &done, MPI_STATUSES_IGNORE);
  }
  // Waits for both requests; returns whether they had completed before this call.
  bool finish() {
    if (!active_) return true;
    active_ = false;
    if (threads_allowed_) {
      const bool early = arrived_;
      mover_.join();
      return early;
    }
    int done = 0;
    check_mpi(MPI_Testall(2, requests_, &done, MPI_STATUSES_IGNORE), "MPI_Testall");
    if (!done) check_mpi(MPI_Waitall(2, requests_, MPI_STATUSES_IGNORE), "MPI_Waitall");
    return done != 0;
  }

 private:
  bool threads_allowed_;
  bool active_ = false;
  MPI_Request requests_[2];
  std::atomic<bool> arrived_{false};
  std::thread mover_;
};

bool mpi_threads_allowed() {
  int thread_level = MPI_THREAD_SINGLE;
  check_mpi(MPI_Query_thread(&thread_level), "MPI_Query_thread");
  return thread_level == MPI_THREAD_MULTIPLE;
}

// K and V of one shard in one dense buffer, [k | v], which is also the message that travels: the
// ring keeps two (the one computed on, the one arriving) and swaps them, so nothing is allocated
// or copied per step. The buffer only grows: a block reused across calls is not touched again by
// the system (first touches of fresh memory are the expensive part).
class Block {
 public:
  // Sized for a shard of `rows` rows (the buffer only grows).
  void resize(const Context& c, std::int64_t rows, DType dtype) {
    dtype_ = dtype;
    k_shape_ = {c.batch, rows, c.kv_heads, c.k_dim};
    v_shape_ = {c.batch, rows, c.kv_heads, c.v_dim};
    k_bytes_ = static_cast<std::size_t>(c.batch * rows * c.kv_heads * c.k_dim) * dtype_size(dtype);
    size_ = k_bytes_ +
            static_cast<std::size_t>(c.batch * rows * c.kv_heads * c.v_dim) * dtype_size(dtype);
    if (buffer_.size() < size_) buffer_.resize(size_);
  }
  // Copies the rank's own K and V in (any strides).
  void fill(const TensorView& k, const TensorView& v) {
    copy_rows(k, buffer_.data());
    copy_rows(v, buffer_.data() + k_bytes_);
  }
  TensorView k() const { return TensorView::contiguous(buffer_.data(), dtype_, k_shape_); }
  TensorView v() const {
    return TensorView::contiguous(buffer_.data() + k_bytes_, dtype_, v_shape_);
  }
  std::int64_t rows() const { return k_shape_[1]; }
  std::byte* data() { return buffer_.data(); }
  std::size_t size() const { return size_; }

 private:
  // A [B, N, H, D] view into dense memory, a row of D at a time.
  static void copy_rows(const TensorView& view, std::byte* to) {
    const std::size_t element = dtype_size(view.dtype);
    const auto* from = static_cast<const std::byte*>(view.data);
    for (std::int64_t b = 0; b < view.shape[0]; ++b)
      for (std::int64_t n = 0; n < view.shape[1]; ++n)
        for (std::int64_t h = 0; h < view.shape[2]; ++h) {
          const std::byte* row =
              from + (b * view.strides[0] + n * view.strides[1] + h * view.strides[2]) *
                         static_cast<std::int64_t>(element);
          if (view.strides[3] == 1) {
            std::memcpy(to, row, static_cast<std::size_t>(view.shape[3]) * element);
          } else {
            for (std::int64_t d = 0; d < view.shape[3]; ++d)
              std::memcpy(to + static_cast<std::size_t>(d) * element,
                          row + d * view.strides[3] * static_cast<std::int64_t>(element), element);
          }
          to += static_cast<std::size_t>(view.shape[3]) * element;
        }
  }

  std::vector<std::byte> buffer_;
  std::size_t k_bytes_ = 0, size_ = 0;
  DType dtype_ = DType::float32;
  std::array<std::int64_t, 4> k_shape_{}, v_shape_{};
};

// One block's attention weights [B, Hq, n_a, n_e], normalized by its own LSE [B, Hq, n_a]: the
// final weights are these times exp(LSE_block − LSE_row).
struct WeightBlock {
  Tensor weights, lse;
  std::size_t q_piece;
  std::int64_t key_offset;
};

template <class T>
void rescale_weights(WeightBlock& block, const Tensor& row_lse) {
  const std::int64_t keys = block.weights.shape()[3];
  T* weights = block.weights.data<T>();
  const T* lse = block.lse.data<T>();  // [B, Hq, n_a], like the row LSE of its query piece
  const T* final_lse = row_lse.data<T>();
  for (std::int64_t r = 0; r < block.lse.numel(); ++r) {
    const T factor = std::isinf(lse[r]) ? T(0) : std::exp(lse[r] - final_lse[r]);
    for (std::int64_t j = 0; j < keys; ++j) weights[r * keys + j] *= factor;
  }
}

void ring_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                  const AttentionOptions& options, const DistributedOptions& d,
                  const MutableTensorView& out, const std::optional<MutableTensorView>& lse,
                  const std::optional<MutableTensorView>& weights, RingStatistics* statistics) {
  RingStatistics stats;
  std::vector<WeightBlock> weight_blocks;
  const bool threads_allowed = mpi_threads_allowed();
  const DType merged = wide(q.dtype);
  const std::vector<std::int64_t> q_starts = local_starts(c.q_pieces);
  std::vector<Tensor> running_out, running_lse;
  for (const auto& piece : c.q_pieces) {
    running_out.emplace_back(merged,
                             std::vector<std::int64_t>{c.batch, piece.second, c.q_heads, c.v_dim});
    Tensor minus_infinity(merged, {c.batch, c.q_heads, piece.second});
    for (std::int64_t n = 0; n < minus_infinity.numel(); ++n) {
      if (merged == DType::float64)
        minus_infinity.data<double>()[n] = -INFINITY;
      else
        minus_infinity.data<float>()[n] = -INFINITY;
    }
    running_lse.push_back(std::move(minus_infinity));
  }
  // Kept by the calling thread between calls, as the fused kernel keeps its packed K and V: fresh
  // pages cost more than the copy into them.
  thread_local Block blocks[2];
  Block* current = &blocks[0];
  Block* incoming = &blocks[1];
  current->resize(c, k.shape[1], q.dtype);
  current->fill(k, v);
  const int next = (c.rank + 1) % c.ranks, previous = (c.rank + c.ranks - 1) % c.ranks;
  for (int step = 0; step < c.ranks; ++step) {
    const int source = (c.rank - step + c.ranks) % c.ranks;
    // The next shard travels while this one is computed on.
    Transfer transfer(threads_allowed);
    const bool more = step + 1 < c.ranks;
    if (more) {
      const int coming = (c.rank - step - 1 + 2 * c.ranks) % c.ranks;
      incoming->resize(c, shard_length(d.k_total, c.ranks, coming, d.layout), q.dtype);
      transfer.start(current->data(), current->size(), next, incoming->data(), incoming->size(),
                     previous, step, c.comm);
    }
    const Pieces k_pieces = shard_pieces(d.k_total, c.ranks, source, d.layout);
    const std::vector<std::int64_t> k_starts = local_starts(k_pieces);
    const double compute_start = MPI_Wtime();
    if (more) stats.bytes_sent += static_cast<double>(current->size());
    for (std::size_t a = 0; a < c.q_pieces.size(); ++a) {
      const auto q_piece = c.q_pieces[a];
      for (std::size_t e = 0; e < k_pieces.size(); ++e) {
        if (hidden(options, d.q_total, d.k_total, q_piece, k_pieces[e])) continue;
        const TensorView qv = q.narrow(1, q_starts[a], q_starts[a] + q_piece.second);
        const TensorView kv = current->k().narrow(1, k_starts[e], k_starts[e] + k_pieces[e].second);
        const TensorView vv = current->v().narrow(1, k_starts[e], k_starts[e] + k_pieces[e].second);
        Tensor part_out(merged, {c.batch, q_piece.second, c.q_heads, c.v_dim});
        Tensor part_lse(merged, {c.batch, c.q_heads, q_piece.second});
        std::optional<MutableTensorView> part_weights;
        if (weights) {  // normalized by the block's LSE; rescaled once the row's LSE is known
          weight_blocks.push_back(
              {Tensor(merged, {c.batch, c.q_heads, q_piece.second, k_pieces[e].second}),
               Tensor(merged, {c.batch, c.q_heads, q_piece.second}), a, k_pieces[e].first});
          part_weights = weight_blocks.back().weights.mutable_view();
        }
        attention_forward(qv, kv, vv, block_options(options, d, q_piece, q_starts[a], k_pieces[e]),
                          {part_out.mutable_view(), part_lse.mutable_view(), part_weights});
        if (weights) copy_into(part_lse.view(), weight_blocks.back().lse.mutable_view());
        const TensorView outs[] = {running_out[a].view(), part_out.view()};
        const TensorView lses[] = {running_lse[a].view(), part_lse.view()};
        merge_attention(outs, lses, running_out[a].mutable_view(), running_lse[a].mutable_view());
        transfer.nudge();
      }
    }
    const double wait_start = MPI_Wtime();
    stats.compute_seconds += wait_start - compute_start;
    if (more) {
      ++stats.transfer_steps;
      if (transfer.finish()) ++stats.hidden_steps;
      std::swap(current, incoming);
    }
    ++stats.steps;
  }
  if (statistics != nullptr) *statistics = stats;
  for (std::size_t a = 0; a < c.q_pieces.size(); ++a) {
    const std::int64_t begin = q_starts[a], end = begin + c.q_pieces[a].second;
    copy_into(running_out[a].view(), out.narrow(1, begin, end));
    if (lse) copy_into(running_lse[a].view(), lse->narrow(2, begin, end));
  }
  if (weights) {  // blocks never computed (hidden by the mask) stay 0
    const Tensor zeros(merged, shape_of(weights->as_const()));
    copy_into(zeros.view(), *weights);
    for (WeightBlock& block : weight_blocks) {
      if (merged == DType::float64)
        rescale_weights<double>(block, running_lse[block.q_piece]);
      else
        rescale_weights<float>(block, running_lse[block.q_piece]);
      const std::int64_t begin = q_starts[block.q_piece];
      copy_into(block.weights.view(),
                weights->narrow(2, begin, begin + block.lse.shape()[2])
                    .narrow(3, block.key_offset, block.key_offset + block.weights.shape()[3]));
    }
  }
}

// Adds the packed [dK | dV] sums that arrived (float32 or float64, like the tensors) to dk and dv,
// then packs the totals into `packed` for the next rank.
template <class T>
void add_and_pack_typed(Tensor& dk, Tensor& dv, const std::vector<std::byte>* arrived,
                        std::vector<std::byte>& packed) {
  packed.resize(dk.nbytes() + dv.nbytes());
  std::int64_t at = 0;
  for (Tensor* part : {&dk, &dv}) {
    T* values = part->data<T>();
    if (arrived != nullptr) {
      const auto* sums = reinterpret_cast<const T*>(arrived->data()) + at;
      for (std::int64_t i = 0; i < part->numel(); ++i) values[i] += sums[i];
    }
    std::memcpy(packed.data() + at * static_cast<std::int64_t>(sizeof(T)), values, part->nbytes());
    at += part->numel();
  }
}

void add_and_pack(Tensor& dk, Tensor& dv, const std::vector<std::byte>* arrived,
                  std::vector<std::byte>& packed) {
  if (dk.dtype() == DType::float64) {
    add_and_pack_typed<double>(dk, dv, arrived, packed);
  } else {
    add_and_pack_typed<float>(dk, dv, arrived, packed);
  }
}

// The backward's ring. K and V travel ahead as in the forward. The dK, dV of a shard, summed over
// the ranks it has visited, travel one step behind it: rank r, having added its queries' share
// for the shard of step s, sends the sum on while it computes step s + 1, and the next rank needs
// it only after computing its own share. So both transfers hide behind compute, and after the
// last step one more pass brings every shard's total home. A shard's sum is always added in the
// same rank order (its owner first), whatever the timing.
void ring_backward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionOptions& options, const DistributedOptions& d,
                   const TensorView& dout, const TensorView& out, const TensorView& lse,
                   const MutableTensorView& dq, const MutableTensorView& dk,
                   const MutableTensorView& dv, ParameterSums& sums, RingStatistics* statistics) {
  RingStatistics stats;
  const DType accumulate = wide(q.dtype);
  const std::vector<std::int64_t> q_starts = local_starts(c.q_pieces);
  // Working space kept by the calling thread between calls (see Block).
  thread_local Tensor dq_slot, share_slots[2];
  Tensor& dq_total = zeroed_reused(dq_slot, accumulate, shape_of(q));
  // Kept by the calling thread between calls, as the fused kernel keeps its packed K and V: fresh
  // pages cost more than the copy into them.
  thread_local Block blocks[2];
  Block* current = &blocks[0];
  Block* incoming = &blocks[1];
  current->resize(c, k.shape[1], q.dtype);
  current->fill(k, v);
  const bool threads_allowed = mpi_threads_allowed();
  const int next = (c.rank + 1) % c.ranks, previous = (c.rank + c.ranks - 1) % c.ranks;
  thread_local std::vector<std::byte> sending, arriving;  // packed [dK | dV] sums, in flight
  Transfer gradient_transfer(threads_allowed);
  const std::int64_t gradient_row_bytes = c.batch * c.kv_heads * (c.k_dim + c.v_dim) *
                                          static_cast<std::int64_t>(dtype_size(accumulate));
  for (int step = 0; step < c.ranks; ++step) {
    const int source = (c.rank - step + c.ranks) % c.ranks;
    const int coming = (c.rank - step - 1 + 2 * c.ranks) % c.ranks;
    Transfer kv_transfer(threads_allowed);
    if (step + 1 < c.ranks) {  // the next K and V, while this step computes
      incoming->resize(c, shard_length(d.k_total, c.ranks, coming, d.layout), q.dtype);
      kv_transfer.start(current->data(), current->size(), next, incoming->data(), incoming->size(),
                        previous, 2 * step, c.comm);
    }
    const Pieces k_pieces = shard_pieces(d.k_total, c.ranks, source, d.layout);
    const std::vector<std::int64_t> k_starts = local_starts(k_pieces);
    const std::int64_t source_rows = current->rows();
    // This rank's share of the shard's dK and dV.
    Tensor& share_dk =
        zeroed_reused(share_slots[0], accumulate, {c.batch, source_rows, c.kv_heads, c.k_dim});
    Tensor& share_dv =
        zeroed_reused(share_slots[1], accumulate, {c.batch, source_rows, c.kv_heads, c.v_dim});
    const double compute_start = MPI_Wtime();
    for (std::size_t a = 0; a < c.q_pieces.size(); ++a) {
      const auto q_piece = c.q_pieces[a];
      const std::int64_t q0 = q_starts[a], q1 = q0 + q_piece.second;
      for (std::size_t e = 0; e < k_pieces.size(); ++e) {
        if (hidden(options, d.q_total, d.k_total, q_piece, k_pieces[e])) continue;
        const std::int64_t k0 = k_starts[e], k1 = k0 + k_pieces[e].second;
        Tensor part_dq(accumulate, {c.batch, q1 - q0, c.q_heads, c.q_dim});
        Tensor part_dk(accumulate, {c.batch, k1 - k0, c.kv_heads, c.k_dim});
        Tensor part_dv(accumulate, {c.batch, k1 - k0, c.kv_heads, c.v_dim});
        const AttentionOptions block = block_options(options, d, q_piece, q0, k_pieces[e]);
        AttentionGradients grads = sums.block_slots(block);
        grads.dq = part_dq.mutable_view();
        grads.dk = part_dk.mutable_view();
        grads.dv = part_dv.mutable_view();
        attention_backward(q.narrow(1, q0, q1), current->k().narrow(1, k0, k1),
                           current->v().narrow(1, k0, k1), block, dout.narrow(1, q0, q1),
                           std::nullopt, grads,
                           SavedForward{out.narrow(1, q0, q1), lse.narrow(2, q0, q1)});
        sums.add_parts(0);
        add_rows(dq_total, part_dq, q0);
        add_rows(share_dk, part_dk, k0);
        add_rows(share_dv, part_dv, k0);
        kv_transfer.nudge();
        gradient_transfer.nudge();
      }
    }
    // The sum of the ranks before this one (for the same shard) has arrived meanwhile.
    const double wait_start = MPI_Wtime();
    stats.compute_seconds += wait_start - compute_start;
    if (step > 0) {
      ++stats.transfer_steps;
      if (gradient_transfer.finish()) ++stats.hidden_steps;
    }
    stats.wait_seconds += MPI_Wtime() - wait_start;
    add_and_pack(share_dk, share_dv, step > 0 ? &arriving : nullptr, sending);
    if (c.ranks > 1) {  // on to the next rank; the sum for the next step's shard comes in
      const int arriving_shard = (step + 1 < c.ranks) ? coming : c.rank;
      arriving.resize(static_cast<std::size_t>(
          shard_length(d.k_total, c.ranks, arriving_shard, d.layout) * gradient_row_bytes));
      gradient_transfer.start(sending.data(), sending.size(), next, arriving.data(),
                              arriving.size(), previous, 2 * step + 1, c.comm);
      stats.bytes_sent += static_cast<double>(sending.size());
    }
    if (step + 1 < c.ranks) {
      stats.bytes_sent += static_cast<double>(current->size());
      const double kv_wait = MPI_Wtime();
      ++stats.transfer_steps;
      if (kv_transfer.finish()) ++stats.hidden_steps;
      stats.wait_seconds += MPI_Wtime() - kv_wait;
      std::swap(current, incoming);
    }
    ++stats.steps;
  }
  // Every shard's total comes home: the last sum sent to this rank is its own shard's (a transfer
  // with nothing left to hide behind).
  const std::vector<std::byte>& home = c.ranks > 1 ? arriving : sending;
  const double home_wait = MPI_Wtime();
  if (c.ranks > 1) gradient_transfer.finish();
  stats.wait_seconds += MPI_Wtime() - home_wait;
  if (statistics != nullptr) *statistics = stats;
  const TensorView total_dk = TensorView::contiguous(home.data(), accumulate, shape_of(k));
  const auto dk_bytes = static_cast<std::size_t>(total_dk.numel()) * dtype_size(accumulate);
  copy_into(dq_total.view(), dq);
  copy_into(total_dk, dk);
  copy_into(TensorView::contiguous(home.data() + dk_bytes, accumulate, shape_of(v)), dv);
}

// ---- Heads --------------------------------------------------------------------------------------

// Sequence shards [B, n_r, H, D] → head shards [B, N, H/P, D] (to_heads), or back.
Tensor reshard(const Context& c, const TensorView& local, std::int64_t total, Layout layout,
               bool to_heads, std::int64_t all_heads) {
  const int P = c.ranks;
  const std::int64_t group = all_heads / P, dim = local.shape[3];
  const std::size_t element = dtype_size(local.dtype);
  std::vector<int> send_counts(static_cast<std::size_t>(P)),
      receive_counts(static_cast<std::size_t>(P)), send_offsets(static_cast<std::size_t>(P)),
      receive_offsets(static_cast<std::size_t>(P));
  std::vector<std::byte> send, receive;
  const auto block_bytes = [&](std::int64_t rows_count) {
    return static_cast<int>(c.batch * rows_count * group * dim *
                            static_cast<std::int64_t>(element));
  };
  // Pack: to each rank s, [B, rows, group, D] — my rows of its heads (to_heads) or its rows of my
  // heads (back).
  for (int s = 0; s < P; ++s) {
    Tensor block;
    if (to_heads) {
      block = to_tensor(heads(local, s * group, (s + 1) * group));
    } else {
      const Pieces pieces = shard_pieces(total, P, s, layout);
      std::int64_t rows_count = 0;
      for (const auto& piece : pieces) rows_count += piece.second;
      block = Tensor(local.dtype, {c.batch, rows_count, group, dim});
      std::int64_t at = 0;
      for (const auto& piece : pieces) {
        copy_into(local.narrow(1, piece.first, piece.first + piece.second),
                  block.mutable_view().narrow(1, at, at + piece.second));
        at += piece.second;
      }
    }
    send_offsets[static_cast<std::size_t>(s)] = static_cast<int>(send.size());
    send_counts[static_cast<std::size_t>(s)] = static_cast<int>(block.nbytes());
    const auto* data = static_cast<const std::byte*>(block.raw());
    send.insert(send.end(), data, data + block.nbytes());
    const std::int64_t incoming_rows = shard_length(total, P, to_heads ? s : c.rank, layout);
    receive_offsets[static_cast<std::size_t>(s)] = static_cast<int>(receive.size());
    receive_counts[static_cast<std::size_t>(s)] = block_bytes(incoming_rows);
    receive.resize(receive.size() +
                   static_cast<std::size_t>(receive_counts[static_cast<std::size_t>(s)]));
  }
  check_mpi(
      MPI_Alltoallv(send.data(), send_counts.data(), send_offsets.data(), MPI_BYTE, receive.data(),
                    receive_counts.data(), receive_offsets.data(), MPI_BYTE, c.comm),
      "MPI_Alltoallv");
  // Unpack.
  Tensor result =
      to_heads
          ? Tensor(local.dtype, {c.batch, total, group, dim})
          : Tensor(local.dtype, {c.batch, shard_length(total, P, c.rank, layout), all_heads, dim});
  for (int s = 0; s < P; ++s) {
    const std::int64_t rows_count =
        to_heads ? shard_length(total, P, s, layout) : shard_length(total, P, c.rank, layout);
    const TensorView block =
        TensorView::contiguous(receive.data() + receive_offsets[static_cast<std::size_t>(s)],
                               local.dtype, {c.batch, rows_count, group, dim});
    if (to_heads) {
      std::int64_t at = 0;
      for (const auto& piece : shard_pieces(total, P, s, layout)) {
        copy_into(block.narrow(1, at, at + piece.second),
                  result.mutable_view().narrow(1, piece.first, piece.first + piece.second));
        at += piece.second;
      }
    } else {
      copy_into(block, heads(result.mutable_view(), s * group, (s + 1) * group));
    }
  }
  return result;
}

// LSE [B, H, N] as [B, N, H, 1] and back (reshard moves [B, N, H, D] tensors).
Tensor lse_as_sequence(const TensorView& lse) {
  Tensor t(lse.dtype, {lse.shape[0], lse.shape[2], lse.shape[1], 1});
  TensorView transposed = lse;
  std::swap(transposed.shape[1], transposed.shape[2]);
  std::swap(transposed.strides[1], transposed.strides[2]);
  copy_into(transposed, MutableTensorView::contiguous(t.raw(), t.dtype(),
                                                      {lse.shape[0], lse.shape[2], lse.shape[1]}));
  return t;
}

// The per-head options of the heads [first, first + count).
AttentionOptions head_options(const AttentionOptions& options, std::int64_t first,
                              std::int64_t count, std::int64_t q_heads) {
  AttentionOptions o = options;
  const auto slice = [&](std::optional<TensorView>& parameter, int per_head_rank) {
    if (parameter && parameter->rank == per_head_rank && parameter->shape[0] == q_heads) {
      parameter = parameter->narrow(0, first, first + count);
    }
  };
  for (const detail::ScoreParameterOption& parameter : detail::score_parameter_options())
    slice(o.*parameter.option, parameter.per_head_rank);
  o.query_head_offset = first;  // dropout hashes global heads
  o.query_head_total = q_heads;
  if (o.alibi_slopes) {
    o.alibi_slopes = o.alibi_slopes->narrow(o.alibi_slopes->rank - 1, first, first + count);
  }
  return o;
}

void heads_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                   const AttentionOptions& options, const DistributedOptions& d,
                   const MutableTensorView& out, const std::optional<MutableTensorView>& lse) {
  const std::int64_t group = c.q_heads / c.ranks;
  const Tensor qh = reshard(c, q, d.q_total, d.layout, true, c.q_heads);
  const Tensor kh = reshard(c, k, d.k_total, d.layout, true, c.kv_heads);
  const Tensor vh = reshard(c, v, d.k_total, d.layout, true, c.kv_heads);
  const DType merged = wide(q.dtype);
  Tensor oh(q.dtype, {c.batch, d.q_total, group, c.v_dim}), lh(merged, {c.batch, group, d.q_total});
  attention_forward(qh.view(), kh.view(), vh.view(),
                    head_options(options, c.rank * group, group, c.q_heads),
                    {oh.mutable_view(), lh.mutable_view(), {}});
  const Tensor local_out = reshard(c, oh.view(), d.q_total, d.layout, false, c.q_heads);
  copy_into(local_out.view(), out);
  if (lse) {
    const Tensor back =
        reshard(c, lse_as_sequence(lh.view()).view(), d.q_total, d.layout, false, c.q_heads);
    TensorView as_lse = TensorView::contiguous(  // [B, n_r, H] seen as [B, H, n_r]
        back.raw(), back.dtype(), {back.shape()[0], back.shape()[1], back.shape()[2]});
    std::swap(as_lse.shape[1], as_lse.shape[2]);
    std::swap(as_lse.strides[1], as_lse.strides[2]);
    copy_into(as_lse, *lse);
  }
}

void heads_backward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                    const AttentionOptions& options, const DistributedOptions& d,
                    const TensorView& dout, const TensorView& out, const TensorView& lse,
                    const MutableTensorView& dq, const MutableTensorView& dk,
                    const MutableTensorView& dv, ParameterSums& sums) {
  const std::int64_t group = c.q_heads / c.ranks;
  const Tensor qh = reshard(c, q, d.q_total, d.layout, true, c.q_heads);
  const Tensor kh = reshard(c, k, d.k_total, d.layout, true, c.kv_heads);
  const Tensor vh = reshard(c, v, d.k_total, d.layout, true, c.kv_heads);
  const Tensor doh = reshard(c, dout, d.q_total, d.layout, true, c.q_heads);
  const Tensor oh = reshard(c, out, d.q_total, d.layout, true, c.q_heads);
  const Tensor lse_sequence = lse_as_sequence(lse);
  const Tensor lse_heads = reshard(c, lse_sequence.view(), d.q_total, d.layout, true, c.q_heads);
  TensorView lh = TensorView::contiguous(  // [B, N, group] seen as [B, group, N]
      lse_heads.raw(), lse_heads.dtype(),
      {lse_heads.shape()[0], lse_heads.shape()[1], lse_heads.shape()[2]});
  std::swap(lh.shape[1], lh.shape[2]);
  std::swap(lh.strides[1], lh.strides[2]);
  const DType accumulate = wide(q.dtype);
  Tensor dqh(accumulate, shape_of(qh.view())), dkh(accumulate, shape_of(kh.view())),
      dvh(accumulate, shape_of(vh.view()));
  const AttentionOptions head_shard = head_options(options, c.rank * group, group, c.q_heads);
  AttentionGradients grads = sums.block_slots(head_shard);
  grads.dq = dqh.mutable_view();
  grads.dk = dkh.mutable_view();
  grads.dv = dvh.mutable_view();
  attention_backward(qh.view(), kh.view(), vh.view(), head_shard, doh.view(), std::nullopt, grads,
                     SavedForward{oh.view(), lh});
  sums.add_parts(c.rank * group);
  copy_into(reshard(c, dqh.view(), d.q_total, d.layout, false, c.q_heads).view(), dq);
  copy_into(reshard(c, dkh.view(), d.k_total, d.layout, false, c.kv_heads).view(), dk);
  copy_into(reshard(c, dvh.view(), d.k_total, d.layout, false, c.kv_heads).view(), dv);
}

// Whether the heads strategy runs: asked for, or chosen automatically when the head counts divide
// by P and nothing [Nq, Nk]-shaped (bias, mask, weights: held as the rank's query rows) is
// involved.
bool use_heads(const Context& c, Strategy strategy, const AttentionOptions& options, bool weights) {
  const bool divisible = c.q_heads % c.ranks == 0 && c.kv_heads % c.ranks == 0;
  const bool row_sharded = options.bias || options.mask || weights;
  if (strategy == Strategy::heads && !divisible) {
    throw Error(fmt::format("strategy: heads needs Hq and Hk divisible by P = {}, got {} and {}",
                            c.ranks, c.q_heads, c.kv_heads));
  }
  if (strategy == Strategy::heads && row_sharded) {
    throw Error(
        "strategy: heads expected no bias, mask or weights (they are sharded by query rows: use "
        "the ring), got one");
  }
  return strategy == Strategy::heads ||
         (strategy == Strategy::automatic && divisible && !row_sharded);
}

}  // namespace

Pieces shard_pieces(std::int64_t n, int ranks, int rank, Layout layout) {
  const auto even = [](std::int64_t count, std::int64_t parts, std::int64_t index) {
    const std::int64_t base = count / parts, extra = count % parts;
    const std::int64_t begin = index * base + std::min(index, extra);
    return std::pair<std::int64_t, std::int64_t>{begin, base + (index < extra ? 1 : 0)};
  };
  if (layout == Layout::contiguous) return {even(n, ranks, rank)};
  return {even(n, 2 * ranks, rank), even(n, 2 * ranks, 2 * ranks - 1 - rank)};
}

std::int64_t shard_length(std::int64_t n, int ranks, int rank, Layout layout) {
  std::int64_t length = 0;
  for (const auto& piece : shard_pieces(n, ranks, rank, layout)) length += piece.second;
  return length;
}

void attention_forward(MPI_Comm comm, const TensorView& q, const TensorView& k, const TensorView& v,
                       const AttentionOptions& options, const DistributedOptions& distributed,
                       const AttentionOutputs& outputs, RingStatistics* statistics) {
  const Context c = context(comm, q, k, v, options, distributed);
  if (outputs.weights) {
    const MutableTensorView& w = *outputs.weights;
    if (w.rank != 4 || w.shape[0] != c.batch || w.shape[1] != c.q_heads ||
        w.shape[2] != q.shape[1] || w.shape[3] != distributed.k_total) {
      throw Error(fmt::format("weights: expected [B, Hq, Nq_r, Nk] = [{}, {}, {}, {}], got {}",
                              c.batch, c.q_heads, q.shape[1], distributed.k_total,
                              w.as_const().shape_string()));
    }
  }
  if (use_heads(c, distributed.strategy, options, outputs.weights.has_value())) {
    heads_forward(c, q, k, v, options, distributed, outputs.out, outputs.lse);
  } else {
    ring_forward(c, q, k, v, options, distributed, outputs.out, outputs.lse, outputs.weights,
                 statistics);
  }
}

void attention_backward(MPI_Comm comm, const TensorView& q, const TensorView& k,
                        const TensorView& v, const AttentionOptions& options,
                        const DistributedOptions& distributed, const TensorView& dout,
                        const TensorView& out, const TensorView& lse, const MutableTensorView& dq,
                        const MutableTensorView& dk, const MutableTensorView& dv,
                        const AttentionGradients& parameters, RingStatistics* statistics) {
  const Context c = context(comm, q, k, v, options, distributed);
  ParameterSums sums(options, parameters);
  if (use_heads(c, distributed.strategy, options, false)) {
    heads_backward(c, q, k, v, options, distributed, dout, out, lse, dq, dk, dv, sums);
  } else {
    ring_backward(c, q, k, v, options, distributed, dout, out, lse, dq, dk, dv, sums, statistics);
  }
  sums.finish(comm);
}

}  // namespace qkv::distributed
