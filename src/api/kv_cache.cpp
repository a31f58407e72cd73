// attention_with_kv_cache: check everything, append the new keys and values in place, then run the
// ordinary forward on a problem whose K and V are the cache's rows, found through a RowMap.
//
// The sequences of a batch have different lengths. They share one key axis of Nk = the longest
// length, each right-aligned on it: logical key n of sequence b is its slot
// n − (Nk − length_b) + leftpad_b, and keys before Nk − length_b are hidden by the key_starts mask.
// Right alignment puts every sequence's last key at Nk − 1, so the bottom-right causal diagonal,
// windows and ALiBi distances of contract §3 hold for each sequence as if it were alone.

#include "qkv/kv_cache.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "api/forward.hpp"
#include "core/int8_rows.hpp"
#include "core/problem.hpp"
#include "core/row_map.hpp"
#include "qkv/error.hpp"

namespace qkv {
namespace {

using detail::RowMap;

// A [B] (or [B, M]) vector of integer indices as int64, checked for dtype and shape.
std::vector<std::int64_t> indices_of(const TensorView& view, const char* name,
                                     std::initializer_list<std::int64_t> shape,
                                     const char* layout) {
  detail::require_view(view, name);
  if (view.dtype != DType::int32 && view.dtype != DType::int64)
    throw Error(
        fmt::format("{}: expected dtype int32 or int64, got {}", name, dtype_name(view.dtype)));
  const bool fits = view.rank == static_cast<int>(shape.size()) &&
                    std::equal(shape.begin(), shape.end(), view.shape.begin());
  if (!fits) {
    std::string expected;
    for (const std::int64_t n : shape)
      expected += (expected.empty() ? "" : ", ") + std::to_string(n);
    throw Error(
        fmt::format("{}: expected {} = [{}], got {}", name, layout, expected, view.shape_string()));
  }
  const detail::StridedInput input = detail::input_of(view);
  std::vector<std::int64_t> values;
  const std::int64_t rows = view.shape[0], columns = view.rank == 2 ? view.shape[1] : 1;
  for (std::int64_t r = 0; r < rows; ++r)
    for (std::int64_t c = 0; c < columns; ++c)
      values.push_back(
          static_cast<std::int64_t>(view.rank == 2 ? input.load(r, c) : input.load(r)));
  return values;
}

void require_in_range(const std::vector<std::int64_t>& values, const char* name, std::int64_t low,
                      std::int64_t high, const char* what) {
  for (std::size_t n = 0; n < values.size(); ++n) {
    if (values[n] < low || values[n] > high)
      throw Error(fmt::format("{}: expected {} in [{}, {}], got {} at [{}]", name, what, low, high,
                              values[n], n));
  }
}

// The cache's shape, what each batch element reads, and where its slots lie.
struct CacheLayout {
  bool paged = false;
  bool int8 = false;  // quantized, with k_scale and v_scale
  std::int64_t batch = 0, capacity = 0, kv_heads = 0, k_dim = 0, v_dim = 0;
  std::int64_t page_size = 1, pages_per_sequence = 0;
  std::vector<std::int64_t> block_table, batch_index, seqlens, leftpad;
  RowMap slots;  // slot s of sequence b (no shift): where the new keys and values go
};

CacheLayout check_cache(const TensorView& q, const KVCache& cache) {
  CacheLayout c;
  c.batch = q.shape[0];
  for (const auto& [view, name] :
       {std::pair{cache.k.as_const(), "k_cache"}, std::pair{cache.v.as_const(), "v_cache"}}) {
    detail::require_view(view, name);
    if (view.rank != 4)
      throw Error(
          fmt::format("{}: expected rank 4 ([Bc, capacity, Hk, D] or [pages, page_size, "
                      "Hk, D]), got {}",
                      name, view.shape_string()));
  }
  const auto& k = cache.k;
  const auto& v = cache.v;
  c.int8 = k.dtype == DType::int8;
  if (c.int8) {
    if (v.dtype != DType::int8)
      throw Error(fmt::format("v_cache: expected int8 like k_cache, got {}", dtype_name(v.dtype)));
    if (q.dtype == DType::float64)
      throw Error("q: expected float32, bfloat16 or float16 with an int8 cache, got float64");
    for (const auto& [view, name] : {std::pair{k, "k_cache"}, std::pair{v, "v_cache"}}) {
      if (view.strides[3] != 1)
        throw Error(fmt::format("{}: expected an int8 cache with unit stride along D, got {}", name,
                                view.strides[3]));
    }
  } else {
    for (const auto& [view, name] : {std::pair{k, "k_cache"}, std::pair{v, "v_cache"}}) {
      if (view.dtype != q.dtype)
        throw Error(fmt::format("{}: expected q's dtype {} (or int8), got {}", name,
                                dtype_name(q.dtype), dtype_name(view.dtype)));
    }
  }
  if (k.shape[0] != v.shape[0] || k.shape[1] != v.shape[1] || k.shape[2] != v.shape[2])
    throw Error(fmt::format("v_cache: expected the first three dimensions of k_cache {}, got {}",
                            k.as_const().shape_string(), v.as_const().shape_string()));
  c.kv_heads = k.shape[2];
  c.k_dim = k.shape[3];
  c.v_dim = v.shape[3];
  for (const auto& [scales, name] :
       {std::pair{cache.k_scale, "k_scale"}, std::pair{cache.v_scale, "v_scale"}}) {
    if (!c.int8) {
      if (scales)
        throw Error(fmt::format("{}: expected none with a {} cache (scales are for int8), got one",
                                name, dtype_name(k.dtype)));
      continue;
    }
    if (!scales)
      throw Error(fmt::format("{}: expected the float32 scales of the int8 cache, got none", name));
    detail::require_view(scales->as_const(), name);
    if (scales->dtype != DType::float32)
      throw Error(
          fmt::format("{}: expected dtype float32, got {}", name, dtype_name(scales->dtype)));
    if (scales->rank != 3 || scales->shape[0] != k.shape[0] || scales->shape[1] != k.shape[1] ||
        scales->shape[2] != c.kv_heads)
      throw Error(fmt::format("{}: expected one scale per row and head, [{}, {}, {}], got {}", name,
                              k.shape[0], k.shape[1], c.kv_heads,
                              scales->as_const().shape_string()));
  }
  c.paged = cache.block_table.has_value();
  if (c.paged) {
    if (cache.batch_index)
      throw Error("batch_index: expected none with a paged cache (the block table picks pages)");
    c.page_size = k.shape[1];
    const TensorView& table = *cache.block_table;
    if (table.rank != 2)
      throw Error(
          fmt::format("block_table: expected [B, max_pages], got {}", table.shape_string()));
    c.pages_per_sequence = table.shape[1];
    c.block_table =
        indices_of(table, "block_table", {c.batch, c.pages_per_sequence}, "[B, max_pages]");
    require_in_range(c.block_table, "block_table", 0, k.shape[0] - 1, "page numbers");
    c.capacity = c.pages_per_sequence * c.page_size;
    c.slots.page_table = c.block_table.data();
    c.slots.pages_per_sequence = c.pages_per_sequence;
    c.slots.page_size = c.page_size;
    if (std::has_single_bit(static_cast<std::uint64_t>(c.page_size)))
      c.slots.page_shift = std::countr_zero(static_cast<std::uint64_t>(c.page_size));
  } else {
    c.capacity = k.shape[1];
    if (cache.batch_index) {
      c.batch_index = indices_of(*cache.batch_index, "batch_index", {c.batch}, "[B]");
      require_in_range(c.batch_index, "batch_index", 0, k.shape[0] - 1, "cache rows");
      c.slots.batch_index = c.batch_index.data();
    } else if (k.shape[0] != c.batch) {
      throw Error(fmt::format("k_cache: expected B = {} sequences (or a batch_index), got {}",
                              c.batch, k.as_const().shape_string()));
    }
  }
  c.seqlens = cache.seqlens
                  ? indices_of(*cache.seqlens, "seqlens", {c.batch}, "[B]")
                  : std::vector<std::int64_t>(static_cast<std::size_t>(c.batch), c.capacity);
  require_in_range(c.seqlens, "seqlens", 0, c.capacity, "lengths");
  c.leftpad = cache.leftpad ? indices_of(*cache.leftpad, "leftpad", {c.batch}, "[B]")
                            : std::vector<std::int64_t>(static_cast<std::size_t>(c.batch), 0);
  for (std::size_t b = 0; b < c.leftpad.size(); ++b) {
    if (c.leftpad[b] < 0 || c.leftpad[b] > c.seqlens[b])
      throw Error(
          fmt::format("leftpad: expected first slots in [0, seqlens[b]], got {} at [{}] "
                      "(seqlens {})",
                      c.leftpad[b], b, c.seqlens[b]));
  }
  return c;
}

void refuse_shared_axis_options(const AttentionOptions& o, const AttentionOutputs& outputs) {
  const std::pair<bool, const char*> refused[] = {
      {o.key_lengths.has_value(), "key_lengths"},
      {o.key_starts.has_value(), "key_starts"},
      {o.mask.has_value(), "mask"},
      {o.bias.has_value(), "bias"},
      {o.block_mask != nullptr, "block_mask"},
      {o.sink_tokens != 0, "sink_tokens"},
      {o.prefix_length != 0, "prefix_length"},
      {o.dropout != 0, "dropout"},
      {o.query_offset != 0 || o.key_offset != 0 || o.query_total != 0 || o.key_total != 0,
       "query_offset, key_offset, query_total, key_total"},
      {o.causal && o.causal_align != CausalAlign::bottom_right, "causal_align"},
      {outputs.weights.has_value(), "weights"},
  };
  for (const auto& [given, name] : refused) {
    if (given)
      throw Error(
          fmt::format("{}: expected none with a KV cache (each sequence has its own keys; "
                      "causal aligns bottom-right), got one",
                      name));
  }
}

// A rotary table's cos and sin as float64 [positions, half], checked.
struct RotaryTable {
  std::int64_t positions = 0, half = 0;
  detail::StridedInput cos, sin;
  bool interleaved = true;
  bool present() const { return half > 0; }
};

RotaryTable check_rotary(const RotaryEmbedding& rotary, std::int64_t q_dim, std::int64_t k_dim) {
  RotaryTable table;
  if (!rotary.cos && !rotary.sin) return table;
  if (!rotary.cos || !rotary.sin)
    throw Error("rotary: expected cos and sin together, got only one of them");
  for (const auto& [view, name] :
       {std::pair{*rotary.cos, "rotary_cos"}, std::pair{*rotary.sin, "rotary_sin"}}) {
    detail::require_view(view, name);
    detail::require_float(view, name);
    if (view.rank != 2 || view.shape != rotary.cos->shape)
      throw Error(fmt::format("{}: expected [positions, rotary_dim / 2] like rotary_cos {}, got {}",
                              name, rotary.cos->shape_string(), view.shape_string()));
  }
  table.positions = rotary.cos->shape[0];
  table.half = rotary.cos->shape[1];
  if (2 * table.half > std::min(q_dim, k_dim) || table.half == 0)
    throw Error(
        fmt::format("rotary_cos: expected rotary_dim / 2 in [1, {}] (rotary_dim <= D), got {}",
                    std::min(q_dim, k_dim) / 2, table.half));
  table.cos = detail::input_of(*rotary.cos);
  table.sin = detail::input_of(*rotary.sin);
  table.interleaved = rotary.interleaved;
  return table;
}

// row[0 … 2·half) turned by the angles of `position` (docs: RotaryEmbedding), in double.
void rotate(const RotaryTable& table, std::int64_t position, double* row) {
  for (std::int64_t t = 0; t < table.half; ++t) {
    const std::int64_t a = table.interleaved ? 2 * t : t;
    const std::int64_t b = table.interleaved ? 2 * t + 1 : t + table.half;
    const double c = table.cos.load(position, t), s = table.sin.load(position, t);
    const double x = row[a], y = row[b];
    row[a] = x * c - y * s;
    row[b] = x * s + y * c;
  }
}

void require_position(const RotaryTable& table, std::int64_t position, const char* what) {
  if (position >= table.positions)
    throw Error(
        fmt::format("rotary_cos: expected a row for every position, got {} rows where {} "
                    "reaches position {}",
                    table.positions, what, position));
}

// The new keys (rotated at their slots) and values, written into the cache at each sequence's
// seqlens: converted to the cache's dtype, or quantized into an int8 cache with the scales
// computed beforehand (so that a row that cannot be quantized is refused before any write).
class Appender {
 public:
  Appender(const CacheLayout& c, const KVCache& cache, const TensorView& k_new,
           const TensorView& v_new, const RotaryTable& table)
      : c_(c),
        cache_(cache),
        keys_(detail::input_of(k_new)),
        values_(detail::input_of(v_new)),
        table_(table),
        new_len_(k_new.shape[1]),
        row_(static_cast<std::size_t>(std::max(c.k_dim, c.v_dim))) {}

  // Every row's scale, for an int8 cache; qkv::Error naming k or v for a row holding a NaN or an
  // infinity (an int8 cache cannot hold them).
  void compute_scales() {
    if (!c_.int8) return;
    for (std::int64_t b = 0; b < c_.batch; ++b)
      for (std::int64_t t = 0; t < new_len_; ++t)
        for (std::int64_t h = 0; h < c_.kv_heads; ++h) {
          for (const bool keys : {true, false}) {
            Load(keys, b, t, h);
            const float scale = detail::int8_row_scale(row_.data(), keys ? c_.k_dim : c_.v_dim);
            if (!std::isfinite(scale))
              throw Error(fmt::format(
                  "{}: expected finite values to quantize into the int8 cache, got a NaN or an "
                  "infinity in row [{}, {}, {}]{}",
                  keys ? "k" : "v", b, t, h,
                  keys && table_.present() ? " (after the rotary embedding)" : ""));
            (keys ? key_scales_ : value_scales_).push_back(scale);
          }
        }
  }

  void write() {
    const detail::StridedOutput k_out = detail::output_of(cache_.k),
                                v_out = detail::output_of(cache_.v);
    std::size_t row_index = 0;
    for (std::int64_t b = 0; b < c_.batch; ++b)
      for (std::int64_t t = 0; t < new_len_; ++t) {
        const std::int64_t slot = c_.seqlens[static_cast<std::size_t>(b)] + t;
        const auto [r0, r1] = c_.slots.locate(b, slot);
        for (std::int64_t h = 0; h < c_.kv_heads; ++h, ++row_index) {
          for (const bool keys : {true, false}) {
            Load(keys, b, t, h);
            const std::int64_t dim = keys ? c_.k_dim : c_.v_dim;
            if (c_.int8) {
              const MutableTensorView& storage = keys ? cache_.k : cache_.v;
              const MutableTensorView& scales = keys ? *cache_.k_scale : *cache_.v_scale;
              const float scale = (keys ? key_scales_ : value_scales_)[row_index];
              detail::quantize_int8_row(row_.data(), dim, scale,
                                        static_cast<std::int8_t*>(storage.data) +
                                            r0 * storage.strides[0] + r1 * storage.strides[1] +
                                            h * storage.strides[2]);
              static_cast<float*>(scales.data)[r0 * scales.strides[0] + r1 * scales.strides[1] +
                                               h * scales.strides[2]] = scale;
            } else {
              (keys ? k_out : v_out).store_row(row_.data(), dim, r0, r1, h);
            }
          }
        }
      }
  }

 private:
  // row_ = new key row (b, t, h) rotated at its slot, or new value row (b, t, h), in double.
  void Load(bool keys, std::int64_t b, std::int64_t t, std::int64_t h) {
    const detail::StridedInput& in = keys ? keys_ : values_;
    const std::int64_t dim = keys ? c_.k_dim : c_.v_dim;
    in.load_row(row_.data(), dim, b, t, h);
    if (keys && table_.present())
      rotate(table_, c_.seqlens[static_cast<std::size_t>(b)] + t, row_.data());
  }

  const CacheLayout& c_;
  const KVCache& cache_;
  detail::StridedInput keys_, values_;
  const RotaryTable& table_;
  std::int64_t new_len_;
  std::vector<double> row_;
  std::vector<float> key_scales_, value_scales_;  // [B, Nnew, Hk]
};

}  // namespace

void attention_with_kv_cache(const TensorView& q, const KVCache& cache,
                             const std::optional<TensorView>& k_new,
                             const std::optional<TensorView>& v_new, const RotaryEmbedding& rotary,
                             const AttentionOptions& options, const AttentionOutputs& outputs) {
  detail::require_view(q, "q");
  if (q.rank != 4)
    throw Error(fmt::format("q: expected [B, Nq, Hq, Dq] (rank 4), got {}", q.shape_string()));
  detail::require_float(q, "q");
  refuse_shared_axis_options(options, outputs);
  CacheLayout c = check_cache(q, cache);
  const std::int64_t batch = c.batch, q_len = q.shape[1], q_heads = q.shape[2];

  // The new keys and values: both or neither, fitting the cache.
  if (k_new.has_value() != v_new.has_value())
    throw Error("k, v: expected new keys and values together, got only one of them");
  std::int64_t new_len = 0;
  if (k_new) {
    for (const auto& [view, name, dim] :
         {std::tuple{*k_new, "k", c.k_dim}, std::tuple{*v_new, "v", c.v_dim}}) {
      detail::require_view(view, name);
      if (view.dtype != q.dtype)
        throw Error(fmt::format("{}: expected q's dtype {}, got {}", name, dtype_name(q.dtype),
                                dtype_name(view.dtype)));
      if (view.rank != 4 || view.shape[0] != batch || view.shape[1] != k_new->shape[1] ||
          view.shape[2] != c.kv_heads || view.shape[3] != dim)
        throw Error(fmt::format("{}: expected [B, Nnew, Hk, D] = [{}, Nnew, {}, {}], got {}", name,
                                batch, c.kv_heads, dim, view.shape_string()));
    }
    new_len = k_new->shape[1];
    for (std::int64_t b = 0; b < batch; ++b) {
      const auto at = static_cast<std::size_t>(b);
      if (c.seqlens[at] + new_len > c.capacity)
        throw Error(
            fmt::format("k: expected the new keys to fit the cache: sequence {} holds {} "
                        "of {} slots, {} more do not fit",
                        b, c.seqlens[at], c.capacity, new_len));
    }
  }
  const RotaryTable table = check_rotary(rotary, q.shape[3], c.k_dim);
  if (table.present() && !k_new)
    throw Error("rotary_cos: expected new keys k and v with a rotary embedding, got none");
  const bool positions_advance =
      options.causal || options.window_left >= 0 || options.window_right >= 0;
  if (table.present()) {
    for (std::int64_t b = 0; b < batch; ++b) {
      const std::int64_t start = c.seqlens[static_cast<std::size_t>(b)];
      require_position(table, start + new_len - 1, "a new key");
      require_position(table, start + (positions_advance ? q_len - 1 : 0), "a query");
    }
  }

  // Everything is checked (an int8 cache's new rows too, by computing their scales): 1. append
  // (the new keys rotated) in place.
  if (k_new) {
    Appender appender(c, cache, *k_new, *v_new, table);
    appender.compute_scales();
    appender.write();
  }

  // 2. Q, rotated at its positions (a copy in Q's dtype), or Q as it is.
  Tensor rotated_q;
  TensorView queries = q;
  if (table.present()) {
    rotated_q = Tensor(q.dtype, {batch, q_len, q_heads, q.shape[3]});
    const detail::StridedInput in = detail::input_of(q);
    const detail::StridedOutput out = detail::output_of(rotated_q.mutable_view());
    std::vector<double> row(static_cast<std::size_t>(q.shape[3]));
    for (std::int64_t b = 0; b < batch; ++b)
      for (std::int64_t i = 0; i < q_len; ++i)
        for (std::int64_t h = 0; h < q_heads; ++h) {
          in.load_row(row.data(), q.shape[3], b, i, h);
          rotate(table, c.seqlens[static_cast<std::size_t>(b)] + (positions_advance ? i : 0),
                 row.data());
          out.store_row(row.data(), q.shape[3], b, i, h);
        }
    queries = rotated_q.view();
  }

  // 3. The sequences right-aligned on one key axis (top of file), read through a RowMap.
  std::vector<std::int64_t> starts(static_cast<std::size_t>(batch)), shifts(starts.size()),
      firsts(starts.size()), ends(starts.size());
  std::int64_t k_len = 0;
  for (std::size_t b = 0; b < starts.size(); ++b)
    k_len = std::max(k_len, c.seqlens[b] + new_len - c.leftpad[b]);
  for (std::size_t b = 0; b < starts.size(); ++b) {
    ends[b] = c.seqlens[b] + new_len;
    starts[b] = k_len - (ends[b] - c.leftpad[b]);
    shifts[b] = c.leftpad[b] - starts[b];  // slot of logical key n: n + shift
    // Hidden rows come from the sequence's own slots; an empty sequence's from a slot inside the
    // cache (its leftpad may equal the capacity).
    firsts[b] = std::min(c.leftpad[b], c.capacity - 1);
  }
  RowMap rows = c.slots;
  rows.slot_shift = shifts.data();
  rows.first_slot = firsts.data();
  rows.end_slot = ends.data();
  // Logical views: the right shape over the cache's storage; the RowMap places each row.
  // An int8 cache is described to make_problem in Q's dtype (it checks shapes and strides, and
  // reads no element), then marked as the int8 rows and scales it is.
  const auto logical = [&](const MutableTensorView& storage, std::int64_t dim) {
    TensorView view = storage.as_const();
    view.shape = {batch, k_len, c.kv_heads, dim};
    view.dtype = q.dtype;
    return view;
  };
  AttentionOptions attention = options;
  attention.key_starts = TensorView::contiguous(starts.data(), DType::int64, {batch});
  detail::AttentionProblem problem = detail::make_problem(
      queries, logical(cache.k, c.k_dim), logical(cache.v, c.v_dim), attention, outputs);
  problem.k.rows = &rows;
  problem.v.rows = &rows;
  if (c.int8) {
    for (const auto& [operand, scales] :
         {std::pair{&problem.k, &*cache.k_scale}, std::pair{&problem.v, &*cache.v_scale}}) {
      operand->dtype = DType::int8;
      operand->scales = static_cast<const float*>(scales->data);
      operand->scale_strides = {scales->strides[0], scales->strides[1], scales->strides[2]};
    }
  }
  api::run_forward(problem);
}

}  // namespace qkv
