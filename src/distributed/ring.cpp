// Ring attention over MPI: while a rank computes attention of its query shard on the key/value
// shard it holds, the next shard is already on its way (see distributed_attention.cpp).

#include "distributed/ring.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <thread>

#include "qkv/merge.hpp"

namespace qkv::distributed::internal {

namespace {

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

// Calls visit(a, e) for each pair of this rank's query piece a and the shard's key piece e that
// the mask does not hide entirely.
template <class Visit>
void for_each_visible_pair(const Context& c, const AttentionOptions& options,
                           const DistributedOptions& d, const Pieces& k_pieces, Visit visit) {
  for (std::size_t a = 0; a < c.q_pieces.size(); ++a)
    for (std::size_t e = 0; e < k_pieces.size(); ++e)
      if (!hidden(options, d.q_total, d.k_total, c.q_pieces[a], k_pieces[e])) visit(a, e);
}

// The forward's result for this rank's query pieces as the key shards pass: each piece's O and
// LSE, merged block by block in the wider dtype, and, when the weights are asked for, each
// block's weights, kept until the rows' final LSE is known.
class MergedRows {
 public:
  MergedRows(const Context& c, DType merged, bool keep_weights)
      : merged_(merged), keep_weights_(keep_weights) {
    for (const auto& piece : c.q_pieces) {
      out_.emplace_back(merged,
                        std::vector<std::int64_t>{c.batch, piece.second, c.q_heads, c.v_dim});
      Tensor minus_infinity(merged, {c.batch, c.q_heads, piece.second});
      for (std::int64_t n = 0; n < minus_infinity.numel(); ++n) {
        if (merged == DType::float64)
          minus_infinity.data<double>()[n] = -INFINITY;
        else
          minus_infinity.data<float>()[n] = -INFINITY;
      }
      lse_.push_back(std::move(minus_infinity));
    }
  }

  // Attention of query piece a (q) on the keys k, v (the shard's rows from key_offset on), merged
  // into the piece's running O and LSE.
  void attend(std::size_t a, const TensorView& q, const TensorView& k, const TensorView& v,
              const AttentionOptions& block, std::int64_t key_offset) {
    const std::int64_t batch = q.shape[0], rows = q.shape[1], heads = q.shape[2];
    Tensor part_out(merged_, {batch, rows, heads, v.shape[3]});
    Tensor part_lse(merged_, {batch, heads, rows});
    std::optional<MutableTensorView> part_weights;
    if (keep_weights_) {  // normalized by the block's LSE; rescaled once the row's LSE is known
      weight_blocks_.push_back({Tensor(merged_, {batch, heads, rows, k.shape[1]}),
                                Tensor(merged_, {batch, heads, rows}), a, key_offset});
      part_weights = weight_blocks_.back().weights.mutable_view();
    }
    attention_forward(q, k, v, block,
                      {part_out.mutable_view(), part_lse.mutable_view(), part_weights});
    if (keep_weights_) copy_into(part_lse.view(), weight_blocks_.back().lse.mutable_view());
    const TensorView outs[] = {out_[a].view(), part_out.view()};
    const TensorView lses[] = {lse_[a].view(), part_lse.view()};
    normalization_ = block.normalization;
    merge_attention(outs, lses, out_[a].mutable_view(), lse_[a].mutable_view(), normalization_);
  }

  // Each piece's rows into out, lse and the weights (blocks the mask hid stay 0).
  void write(const std::vector<std::int64_t>& q_starts, const MutableTensorView& out,
             const std::optional<MutableTensorView>& lse,
             const std::optional<MutableTensorView>& weights) {
    for (std::size_t a = 0; a < out_.size(); ++a) {
      const std::int64_t begin = q_starts[a], end = begin + out_[a].shape()[1];
      copy_into(out_[a].view(), out.narrow(1, begin, end));
      if (lse) copy_into(lse_[a].view(), lse->narrow(2, begin, end));
    }
    if (!weights) return;
    const Tensor zeros(merged_, shape_of(weights->as_const()));
    copy_into(zeros.view(), *weights);
    for (WeightBlock& block : weight_blocks_) {
      if (normalization_ == Normalization::softmax) {  // a sigmoid's weights are final already
        if (merged_ == DType::float64)
          rescale_weights<double>(block, lse_[block.q_piece]);
        else
          rescale_weights<float>(block, lse_[block.q_piece]);
      }
      const std::int64_t begin = q_starts[block.q_piece];
      copy_into(block.weights.view(),
                weights->narrow(2, begin, begin + block.lse.shape()[2])
                    .narrow(3, block.key_offset, block.key_offset + block.weights.shape()[3]));
    }
  }

 private:
  DType merged_;
  bool keep_weights_;
  Normalization normalization_ = Normalization::softmax;
  std::vector<Tensor> out_, lse_;
  std::vector<WeightBlock> weight_blocks_;
};

}  // namespace

void ring_forward(const Context& c, const TensorView& q, const TensorView& k, const TensorView& v,
                  const AttentionOptions& options, const DistributedOptions& d,
                  const MutableTensorView& out, const std::optional<MutableTensorView>& lse,
                  const std::optional<MutableTensorView>& weights, RingStatistics* statistics) {
  RingStatistics stats;
  const bool threads_allowed = mpi_threads_allowed();
  const std::vector<std::int64_t> q_starts = local_starts(c.q_pieces);
  MergedRows rows(c, wide(q.dtype), weights.has_value());
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
      stats.bytes_sent += static_cast<double>(current->size());
    }
    const Pieces k_pieces = shard_pieces(d.k_total, c.ranks, source, d.layout);
    const std::vector<std::int64_t> k_starts = local_starts(k_pieces);
    const double compute_start = MPI_Wtime();
    for_each_visible_pair(c, options, d, k_pieces, [&](std::size_t a, std::size_t e) {
      const std::int64_t q0 = q_starts[a], k0 = k_starts[e], k1 = k0 + k_pieces[e].second;
      rows.attend(a, q.narrow(1, q0, q0 + c.q_pieces[a].second), current->k().narrow(1, k0, k1),
                  current->v().narrow(1, k0, k1),
                  block_options(options, d, c.q_pieces[a], q0, k_pieces[e]), k_pieces[e].first);
      transfer.nudge();
    });
    stats.compute_seconds += MPI_Wtime() - compute_start;
    if (more) {
      ++stats.transfer_steps;
      if (transfer.finish()) ++stats.hidden_steps;
      std::swap(current, incoming);
    }
    ++stats.steps;
  }
  if (statistics != nullptr) *statistics = stats;
  rows.write(q_starts, out, lse, weights);
}

namespace {

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

// The dK, dV sums of the backward's ring, each travelling one step behind its shard: at step s a
// rank waits for the sum of the ranks before it (for the shard it just computed on), adds its own
// share, and sends the total on while the next step computes. After the last step, the sum that
// arrives is this rank's own shard's total.
class TravellingSums {
 public:
  TravellingSums(const Context& c, const DistributedOptions& d, DType accumulate,
                 bool threads_allowed)
      : c_(c),
        d_(d),
        transfer_(threads_allowed),
        row_bytes_(c.batch * c.kv_heads * (c.k_dim + c.v_dim) *
                   static_cast<std::int64_t>(dtype_size(accumulate))) {}

  void nudge() { transfer_.nudge(); }

  // Adds the sum that arrived for this step's shard (none at step 0) to this rank's share, sends
  // the total on, and starts receiving the sum for the shard of the next step (or, after the last
  // step, this rank's own).
  void pass_on(int step, int next_shard, Tensor& share_dk, Tensor& share_dv,
               RingStatistics& stats) {
    const double wait_start = MPI_Wtime();
    if (step > 0) {
      ++stats.transfer_steps;
      if (transfer_.finish()) ++stats.hidden_steps;
    }
    stats.wait_seconds += MPI_Wtime() - wait_start;
    thread_local std::vector<std::byte> sending_slot, arriving_slot;  // kept between calls
    std::vector<std::byte>& sending = sending_slot;
    std::vector<std::byte>& arriving = arriving_slot;
    add_and_pack(share_dk, share_dv, step > 0 ? &arriving : nullptr, sending);
    home_ = &sending;
    if (c_.ranks == 1) return;
    const int arriving_shard = step + 1 < c_.ranks ? next_shard : c_.rank;
    arriving.resize(static_cast<std::size_t>(
        shard_length(d_.k_total, c_.ranks, arriving_shard, d_.layout) * row_bytes_));
    const int next = (c_.rank + 1) % c_.ranks, previous = (c_.rank + c_.ranks - 1) % c_.ranks;
    transfer_.start(sending.data(), sending.size(), next, arriving.data(), arriving.size(),
                    previous, 2 * step + 1, c_.comm);
    stats.bytes_sent += static_cast<double>(sending.size());
    home_ = &arriving;
  }

  // After the last step: this rank's shard's total dK and dV, packed [dK | dV].
  const std::byte* home(RingStatistics& stats) {
    const double wait_start = MPI_Wtime();
    if (c_.ranks > 1) transfer_.finish();
    stats.wait_seconds += MPI_Wtime() - wait_start;
    return home_->data();
  }

 private:
  const Context& c_;
  const DistributedOptions& d_;
  Transfer transfer_;
  std::int64_t row_bytes_;
  const std::vector<std::byte>* home_ = nullptr;
};

}  // namespace

// The backward's ring. K and V travel ahead as in the forward; the dK, dV sums of each shard
// travel one step behind it (TravellingSums): rank r, having added its queries' share for the
// shard of step s, sends the sum on while it computes step s + 1, and the next rank needs it only
// after computing its own share. So both transfers hide behind compute, and after the last step
// one more pass brings every shard's total home. A shard's sum is always added in the same rank
// order (its owner first), whatever the timing.
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
  thread_local Block blocks[2];
  Block* current = &blocks[0];
  Block* incoming = &blocks[1];
  current->resize(c, k.shape[1], q.dtype);
  current->fill(k, v);
  const bool threads_allowed = mpi_threads_allowed();
  const int next = (c.rank + 1) % c.ranks, previous = (c.rank + c.ranks - 1) % c.ranks;
  TravellingSums travelling(c, d, accumulate, threads_allowed);
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
    // This rank's share of the shard's dK and dV.
    const std::int64_t source_rows = current->rows();
    Tensor& share_dk =
        zeroed_reused(share_slots[0], accumulate, {c.batch, source_rows, c.kv_heads, c.k_dim});
    Tensor& share_dv =
        zeroed_reused(share_slots[1], accumulate, {c.batch, source_rows, c.kv_heads, c.v_dim});
    const double compute_start = MPI_Wtime();
    for_each_visible_pair(c, options, d, k_pieces, [&](std::size_t a, std::size_t e) {
      const std::int64_t q0 = q_starts[a], q1 = q0 + c.q_pieces[a].second;
      const std::int64_t k0 = k_starts[e], k1 = k0 + k_pieces[e].second;
      Tensor part_dq(accumulate, {c.batch, q1 - q0, c.q_heads, c.q_dim});
      Tensor part_dk(accumulate, {c.batch, k1 - k0, c.kv_heads, c.k_dim});
      Tensor part_dv(accumulate, {c.batch, k1 - k0, c.kv_heads, c.v_dim});
      const AttentionOptions block = block_options(options, d, c.q_pieces[a], q0, k_pieces[e]);
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
      travelling.nudge();
    });
    stats.compute_seconds += MPI_Wtime() - compute_start;
    travelling.pass_on(step, coming, share_dk, share_dv, stats);
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
  const std::byte* home = travelling.home(stats);
  if (statistics != nullptr) *statistics = stats;
  const TensorView total_dk = TensorView::contiguous(home, accumulate, shape_of(k));
  const auto dk_bytes = static_cast<std::size_t>(total_dk.numel()) * dtype_size(accumulate);
  copy_into(dq_total.view(), dq);
  copy_into(total_dk, dk);
  copy_into(TensorView::contiguous(home + dk_bytes, accumulate, shape_of(v)), dv);
}

}  // namespace qkv::distributed::internal
