// attention_with_kv_cache against the same steps done by hand: the expected cache is the old one
// with the new keys (rotated here, in double, as the contract says) and values written at each
// sequence's slots, checked byte for byte (nothing outside the written slots changes); the output
// against the float64 reference of each sequence alone — its own keys, its queries rotated at
// their positions — within twice the naive algorithm's error on that sequence in the cache's
// precision (the zoo's rule).
// Contiguous and paged caches (page sizes 1, 3, 16; pages shuffled), ragged lengths including 0
// and a page boundary, left padding, batch_index, GQA, rotary both styles, windows, ALiBi, sinks,
// soft caps, float32 and bfloat16; and every refusal.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>

#include "attention_case.hpp"
#include "core/problem.hpp"
#include "qkv/error.hpp"
#include "qkv/kv_cache.hpp"
#include "qkv/reference.hpp"
#include "qkv/simd.hpp"
#include "reference/naive_attention.hpp"

namespace qkv::testing {
namespace {

struct CacheCase {
  std::vector<std::int64_t> seqlens;  // tokens already in each sequence
  std::vector<std::int64_t> leftpad;  // empty: none
  std::int64_t new_len = 1, q_len = 1, capacity = 48, page_size = 0;  // page_size 0: contiguous
  std::int64_t q_heads = 4, kv_heads = 2, dim = 16;
  std::int64_t rotary_half = 0;  // rotary_dim / 2; 0: none
  bool interleaved = true, causal = true, batch_index = false, alibi = false, sinks = false;
  std::int64_t window_left = -1;
  double softcap = 0.0;
  DType dtype = DType::float32;  // of q, the new keys and values, and the cache …
  bool int8_cache = false;       // … unless it is int8, with its scales
};

double value_of(const Tensor& t, std::int64_t n) {
  if (t.dtype() == DType::int8) return t.data<std::int8_t>()[n];
  return t.dtype() == DType::bfloat16 ? from_bfloat16(t.data<std::uint16_t>()[n])
                                      : static_cast<double>(t.data<float>()[n]);
}
void set_value(Tensor& t, std::int64_t n, double value) {
  if (t.dtype() == DType::int8)
    t.data<std::int8_t>()[n] = static_cast<std::int8_t>(std::clamp(value, -127.0, 127.0));
  else if (t.dtype() == DType::bfloat16)
    t.data<std::uint16_t>()[n] = to_bfloat16(static_cast<float>(value));
  else
    t.data<float>()[n] = static_cast<float>(value);
}
// Values of random_float32 (int8: times 127, within ±127).
Tensor random_tensor(DType dtype, std::vector<std::int64_t> shape, std::uint64_t seed) {
  const Tensor f = random_float32(shape, seed);
  Tensor t(dtype, std::move(shape));
  const double factor = dtype == DType::int8 ? 127 : 1;
  for (std::int64_t n = 0; n < t.numel(); ++n) set_value(t, n, factor * f.data<float>()[n]);
  return t;
}

// An int8 cache's row quantized as the contract says: scale = max |x| / 127 rounded to float32,
// round(x / scale) ties to even. Also checks the contract's bound |x − k·scale| ≤ scale / 2.
float quantize(const std::vector<double>& row, Tensor& cache, std::int64_t at) {
  double largest = 0;
  for (const double x : row) largest = std::max(largest, std::abs(x));
  const auto scale = static_cast<float>(largest / 127);
  for (std::size_t e = 0; e < row.size(); ++e) {
    const double quantized = scale > 0 ? std::nearbyint(row[e] / scale) : 0.0;
    set_value(cache, at + static_cast<std::int64_t>(e), quantized);
    EXPECT_LE(std::abs(row[e] - value_of(cache, at + static_cast<std::int64_t>(e)) * scale),
              0.5 * scale * (1 + 1e-6))
        << "element " << e;
  }
  return scale;
}

// A row replaced by its int8 rounding q · scale (the rule of quantize, computed here apart).
void round_to_int8(std::vector<double>& row) {
  double largest = 0;
  for (const double x : row) largest = std::max(largest, std::abs(x));
  const auto scale = static_cast<float>(largest / 127);
  for (double& x : row) x = scale > 0 ? std::nearbyint(x / scale) * scale : 0.0;
}

void rotate(const Tensor& cos, const Tensor& sin, std::int64_t half, bool interleaved,
            std::int64_t position, double* row) {
  for (std::int64_t t = 0; t < half; ++t) {
    const std::int64_t a = interleaved ? 2 * t : t, b = interleaved ? 2 * t + 1 : t + half;
    const double c = cos.data<float>()[position * half + t],
                 s = sin.data<float>()[position * half + t];
    const double x = row[a], y = row[b];
    row[a] = x * c - y * s;
    row[b] = x * s + y * c;
  }
}

struct Layout {
  std::int64_t batch, storage_rows,
      rows_per_storage;             // cache tensors [storage_rows, rows_per, H, D]
  std::vector<std::int64_t> table;  // paged: [B, pages_per_sequence]
  std::vector<std::int64_t> batch_index;
  std::int64_t pages_per_sequence = 0;
  // (storage row, row within it) of slot s of sequence b.
  std::pair<std::int64_t, std::int64_t> locate(const CacheCase& c, std::int64_t b,
                                               std::int64_t s) const {
    if (c.page_size > 0) return {table[b * pages_per_sequence + s / c.page_size], s % c.page_size};
    return {batch_index.empty() ? b : batch_index[b], s};
  }
};

Layout layout_of(const CacheCase& c) {
  Layout l;
  l.batch = static_cast<std::int64_t>(c.seqlens.size());
  if (c.page_size > 0) {
    l.pages_per_sequence = (c.capacity + c.page_size - 1) / c.page_size;
    l.storage_rows = l.batch * l.pages_per_sequence + 3;  // spare pages nobody owns
    l.rows_per_storage = c.page_size;
    std::vector<std::int64_t> pages(static_cast<std::size_t>(l.storage_rows));
    std::iota(pages.begin(), pages.end(), 0);
    std::shuffle(pages.begin(), pages.end(), std::mt19937_64(7));
    l.table.assign(pages.begin(), pages.begin() + l.batch * l.pages_per_sequence);
  } else {
    l.storage_rows = c.batch_index ? l.batch + 2 : l.batch;
    l.rows_per_storage = c.capacity;
    if (c.batch_index) {
      for (std::int64_t b = 0; b < l.batch; ++b)
        l.batch_index.push_back((b * 3 + 1) % l.storage_rows);
    }
  }
  return l;
}

Tensor int64_tensor(const std::vector<std::int64_t>& values, std::vector<std::int64_t> shape) {
  Tensor t(DType::int64, std::move(shape));
  std::copy(values.begin(), values.end(), t.data<std::int64_t>());
  return t;
}

void expect_cache_call_matches_steps(const CacheCase& c) {
  const Layout l = layout_of(c);
  const std::int64_t batch = l.batch, hk = c.kv_heads, hq = c.q_heads, d = c.dim;
  const DType cache_dtype = c.int8_cache ? DType::int8 : c.dtype;
  Tensor k_cache = random_tensor(cache_dtype, {l.storage_rows, l.rows_per_storage, hk, d}, 11);
  Tensor v_cache = random_tensor(cache_dtype, {l.storage_rows, l.rows_per_storage, hk, d}, 12);
  // An int8 cache's scales, one per row and head; rows already there stand for values of about
  // ±0.5 like the float caches'.
  Tensor k_scale(DType::float32, {l.storage_rows, l.rows_per_storage, hk});
  Tensor v_scale = k_scale;
  if (c.int8_cache) {
    const Tensor noise = random_float32({2, k_scale.numel()}, 16);
    for (std::int64_t n = 0; n < k_scale.numel(); ++n) {
      k_scale.data<float>()[n] = (0.6f + noise.data<float>()[n]) / 127;
      v_scale.data<float>()[n] = (0.6f + noise.data<float>()[k_scale.numel() + n]) / 127;
    }
  }
  const Tensor q = random_tensor(c.dtype, {batch, c.q_len, hq, d}, 13);
  const Tensor k_new = random_tensor(c.dtype, {batch, c.new_len, hk, d}, 14);
  const Tensor v_new = random_tensor(c.dtype, {batch, c.new_len, hk, d}, 15);
  const std::int64_t positions = c.capacity + 2;
  Tensor cos(DType::float32, {positions, std::max<std::int64_t>(c.rotary_half, 1)});
  Tensor sin(DType::float32, {positions, std::max<std::int64_t>(c.rotary_half, 1)});
  for (std::int64_t p = 0; p < positions; ++p)
    for (std::int64_t t = 0; t < c.rotary_half; ++t) {
      const double angle =
          static_cast<double>(p) *
          std::pow(100.0, -static_cast<double>(t) / static_cast<double>(c.rotary_half));
      cos.data<float>()[p * c.rotary_half + t] = static_cast<float>(std::cos(angle));
      sin.data<float>()[p * c.rotary_half + t] = static_cast<float>(std::sin(angle));
    }

  // The expected cache: the new rows written (keys rotated) at slots seqlens[b] + t, quantized
  // into an int8 cache.
  Tensor expected_k = k_cache, expected_v = v_cache;
  Tensor expected_k_scale = k_scale, expected_v_scale = v_scale;
  std::vector<double> row(static_cast<std::size_t>(d)), value_row(row.size());
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < c.new_len; ++t) {
      const std::int64_t slot = c.seqlens[b] + t;
      const auto [r0, r1] = l.locate(c, b, slot);
      for (std::int64_t h = 0; h < hk; ++h) {
        const std::int64_t from = ((b * c.new_len + t) * hk + h) * d;
        const std::int64_t to = ((r0 * l.rows_per_storage + r1) * hk + h) * d;
        for (std::int64_t e = 0; e < d; ++e) row[e] = value_of(k_new, from + e);
        if (c.rotary_half > 0) rotate(cos, sin, c.rotary_half, c.interleaved, slot, row.data());
        for (std::int64_t e = 0; e < d; ++e) value_row[e] = value_of(v_new, from + e);
        if (c.int8_cache) {
          expected_k_scale.data<float>()[to / d] = quantize(row, expected_k, to);
          expected_v_scale.data<float>()[to / d] = quantize(value_row, expected_v, to);
          continue;
        }
        for (std::int64_t e = 0; e < d; ++e) {
          set_value(expected_k, to + e, row[e]);
          set_value(expected_v, to + e, value_row[e]);
        }
      }
    }

  // The call.
  const Tensor seqlens = int64_tensor(c.seqlens, {batch});
  const Tensor leftpad = int64_tensor(c.leftpad, {batch});
  const Tensor table = int64_tensor(l.table, {batch, l.pages_per_sequence});
  const Tensor batch_index = int64_tensor(l.batch_index, {batch});
  KVCache cache{k_cache.mutable_view(), v_cache.mutable_view(), {}, seqlens.view(), {}, {}};
  if (c.page_size > 0) cache.block_table = table.view();
  if (c.batch_index) cache.batch_index = batch_index.view();
  if (!c.leftpad.empty()) cache.leftpad = leftpad.view();
  if (c.int8_cache) {
    cache.k_scale = k_scale.mutable_view();
    cache.v_scale = v_scale.mutable_view();
  }
  RotaryEmbedding rotary;
  if (c.rotary_half > 0) {
    rotary.cos = cos.view();
    rotary.sin = sin.view();
    rotary.interleaved = c.interleaved;
  }
  Tensor slopes(DType::float32, {hq}), sinks(DType::float32, {hq});
  for (std::int64_t h = 0; h < hq; ++h) {
    slopes.data<float>()[h] = 0.05f * static_cast<float>(h + 1);
    sinks.data<float>()[h] = -1.0f + static_cast<float>(h);
  }
  AttentionOptions options;
  options.causal = c.causal;
  options.window_left = c.window_left;
  options.softcap = c.softcap;
  if (c.alibi) options.alibi_slopes = slopes.view();
  if (c.sinks) options.sinks = sinks.view();
  Tensor out(DType::float64, {batch, c.q_len, hq, d});
  Tensor lse(DType::float64, {batch, hq, c.q_len});
  attention_with_kv_cache(q.view(), cache, k_new.view(), v_new.view(), rotary, options,
                          {out.mutable_view(), lse.mutable_view(), {}});
  ASSERT_EQ(std::memcmp(k_cache.raw(), expected_k.raw(), k_cache.nbytes()), 0) << "k_cache";
  ASSERT_EQ(std::memcmp(v_cache.raw(), expected_v.raw(), v_cache.nbytes()), 0) << "v_cache";
  ASSERT_EQ(std::memcmp(k_scale.raw(), expected_k_scale.raw(), k_scale.nbytes()), 0) << "k_scale";
  ASSERT_EQ(std::memcmp(v_scale.raw(), expected_v_scale.raw(), v_scale.nbytes()), 0) << "v_scale";

  // Each sequence alone: its keys [leftpad, seqlens + new) of the expected cache (dequantized:
  // int8 · scale in float32, as the kernels compute it), its queries rotated at seqlens + i
  // (causal or a window) or seqlens.
  const auto cached = [&](const Tensor& cache_tensor, const Tensor& scales, std::int64_t at) {
    const double value = value_of(cache_tensor, at);
    return c.int8_cache ? static_cast<float>(value) * scales.data<float>()[at / d]
                        : static_cast<float>(value);
  };
  const bool advance = c.causal || c.window_left >= 0;
  for (std::int64_t b = 0; b < batch; ++b) {
    const std::int64_t first = c.leftpad.empty() ? 0 : c.leftpad[b];
    const std::int64_t length = c.seqlens[b] + c.new_len - first;
    Tensor qb(DType::float32, {1, c.q_len, hq, d}),
        unrounded_qb(DType::float32, {1, c.q_len, hq, d});
    double largest_query = 0;  // element, before the int8 rounding
    Tensor kb(DType::float32, {1, length, hk, d}), vb(DType::float32, {1, length, hk, d});
    for (std::int64_t i = 0; i < c.q_len; ++i)
      for (std::int64_t h = 0; h < hq; ++h) {
        for (std::int64_t e = 0; e < d; ++e)
          row[e] = value_of(q, ((b * c.q_len + i) * hq + h) * d + e);
        if (c.rotary_half > 0)
          rotate(cos, sin, c.rotary_half, c.interleaved, c.seqlens[b] + (advance ? i : 0),
                 row.data());
        for (std::int64_t e = 0; e < d; ++e) {
          // The kernels read bfloat16 queries rounded: so does the reference.
          if (c.dtype == DType::bfloat16)
            row[e] = from_bfloat16(to_bfloat16(static_cast<float>(row[e])));
          row[e] = static_cast<float>(row[e]);
        }
        for (std::int64_t e = 0; e < d; ++e) {
          unrounded_qb.data<float>()[(i * hq + h) * d + e] = static_cast<float>(row[e]);
          largest_query = std::max(largest_query, std::abs(row[e]));
        }
        // With an int8 cache the query rows are rounded to int8 as its rows are (the contract).
        if (c.int8_cache) round_to_int8(row);
        for (std::int64_t e = 0; e < d; ++e)
          qb.data<float>()[(i * hq + h) * d + e] = static_cast<float>(row[e]);
      }
    for (std::int64_t j = 0; j < length; ++j) {
      const auto [r0, r1] = l.locate(c, b, first + j);
      for (std::int64_t h = 0; h < hk; ++h)
        for (std::int64_t e = 0; e < d; ++e) {
          const std::int64_t at = ((r0 * l.rows_per_storage + r1) * hk + h) * d + e;
          kb.data<float>()[(j * hk + h) * d + e] = cached(expected_k, expected_k_scale, at);
          vb.data<float>()[(j * hk + h) * d + e] = cached(expected_v, expected_v_scale, at);
        }
    }
    Tensor reference(DType::float64, {1, c.q_len, hq, d}),
        naive(DType::float64, {1, c.q_len, hq, d});
    Tensor reference_lse(DType::float64, {1, hq, c.q_len});
    AttentionOptions alone = options;
    attention_reference(qb.view(), kb.view(), vb.view(), alone,
                        {reference.mutable_view(), reference_lse.mutable_view(), {}});
    // The floor: the naive algorithm in the cache's precision (bfloat16: each stage rounded).
    const detail::AttentionProblem naive_problem = detail::make_problem(
        qb.view(), kb.view(), vb.view(), alone, {naive.mutable_view(), {}, {}});
    if (c.dtype == DType::bfloat16) {
      detail::naive_attention_bfloat16(naive_problem);
    } else {
      detail::naive_attention<float>(naive_problem);
    }
    double error = 0, floor = 0, magnitude = 0, lse_error = 0;
    for (std::int64_t n = 0; n < reference.numel(); ++n) {
      const double want = reference.data<double>()[n];
      error = std::max(error, std::abs(out.data<double>()[b * reference.numel() + n] - want));
      floor = std::max(floor, std::abs(naive.data<double>()[n] - want));
      magnitude = std::max(magnitude, std::abs(want));
    }
    for (std::int64_t n = 0; n < reference_lse.numel(); ++n) {
      const double want = reference_lse.data<double>()[n],
                   got = lse.data<double>()[b * reference_lse.numel() + n];
      if (std::isinf(want)) {
        EXPECT_EQ(got, want) << "sequence " << b;
      } else {
        lse_error = std::max(lse_error, std::abs(got - want) / (1 + std::abs(want)));
      }
    }
    EXPECT_LE(error, 2.0 * floor + 1e-6 * (1 + magnitude))
        << "sequence " << b << " (floor " << floor << ")";
    EXPECT_LE(lse_error, c.dtype == DType::bfloat16 ? 1e-3 : 1e-5) << "sequence " << b;
    if (c.int8_cache) {
      // The contract's bound on the query rounding: a score moves by at most
      // scale · ‖k‖₁ · max |q| / 254, so the LSE (1-Lipschitz in the scores) as far.
      double largest_key_norm = 0;
      for (std::int64_t j = 0; j < length; ++j)
        for (std::int64_t h = 0; h < hk; ++h) {
          double norm = 0;
          for (std::int64_t e = 0; e < d; ++e)
            norm += std::abs(kb.data<float>()[(j * hk + h) * d + e]);
          largest_key_norm = std::max(largest_key_norm, norm);
        }
      const double bound =
          largest_key_norm * largest_query / (254 * std::sqrt(static_cast<double>(d)));
      Tensor unrounded_lse(DType::float64, {1, hq, c.q_len});
      attention_reference(unrounded_qb.view(), kb.view(), vb.view(), alone,
                          {reference.mutable_view(), unrounded_lse.mutable_view(), {}});
      double moved = 0;
      for (std::int64_t n = 0; n < unrounded_lse.numel(); ++n) {
        const double want = unrounded_lse.data<double>()[n];
        if (!std::isinf(want))
          moved =
              std::max(moved, std::abs(lse.data<double>()[b * unrounded_lse.numel() + n] - want));
      }
      EXPECT_LE(moved, bound + 1e-5) << "sequence " << b;
      EXPECT_GT(moved, 0.0) << "sequence " << b;  // (the queries are rounded)
    }
  }
}

TEST(KVCache, ContiguousRaggedDecodeWithRotary) {
  CacheCase c;
  c.seqlens = {0, 17, 47, 30};  // an empty sequence, and one that ends at the capacity
  c.rotary_half = 4;
  expect_cache_call_matches_steps(c);
  c.interleaved = false;
  c.rotary_half = 8;  // the whole head dim
  expect_cache_call_matches_steps(c);
}

TEST(KVCache, SeveralNewTokensCausalWithinThem) {
  CacheCase c;
  c.seqlens = {5, 0, 20};
  c.new_len = c.q_len = 4;
  c.rotary_half = 6;
  c.interleaved = false;
  expect_cache_call_matches_steps(c);
  c.causal = false;  // every query at position seqlens
  expect_cache_call_matches_steps(c);
  c.window_left = 3;  // a window: positions advance again
  expect_cache_call_matches_steps(c);
}

TEST(KVCache, BatchIndexAndLeftPadding) {
  CacheCase c;
  c.seqlens = {12, 30, 9};
  c.leftpad = {4, 0, 9};  // the last sequence holds only its new token
  c.batch_index = true;
  c.new_len = c.q_len = 2;
  c.alibi = true;
  c.rotary_half = 2;
  expect_cache_call_matches_steps(c);
}

TEST(KVCache, PagedAnyPageSize) {
  for (const std::int64_t page : {1, 3, 16}) {
    CacheCase c;
    c.page_size = page;
    c.capacity = 48;
    c.seqlens = {0, 16, 31, 45};  // 16: a page boundary for pages of 16
    c.new_len = c.q_len = 3;
    c.rotary_half = 8;
    c.sinks = page == 3;
    c.softcap = page == 16 ? 5.0 : 0.0;
    expect_cache_call_matches_steps(c);
  }
}

TEST(KVCache, PagedPrefillWithWindowAndMultiQuery) {
  CacheCase c;
  c.page_size = 16;
  c.capacity = 160;
  c.seqlens = {40, 0};
  c.new_len = c.q_len = 40;  // past the decode kernel: the fused kernel reads the pages
  c.kv_heads = 1;
  c.window_left = 24;
  c.leftpad = {8, 0};
  expect_cache_call_matches_steps(c);
}

// A sequence with no key at all — full to capacity and left-padded to its end, no new keys — beside
// longer ones, in a prefill the fused kernel takes (it packs every tile): no read outside the
// cache (the sanitizer build checks), O = 0 and LSE = −inf for its rows.
TEST(KVCache, AnEmptySequenceAtFullCapacity) {
  for (const std::int64_t page : {0, 16}) {
    const std::int64_t capacity = 32, batch = 2, q_len = 20, heads = 2, d = 8;
    Tensor k_cache = random_float32({page > 0 ? 4 : batch, page > 0 ? 16 : capacity, heads, d}, 1);
    Tensor v_cache = random_float32({page > 0 ? 4 : batch, page > 0 ? 16 : capacity, heads, d}, 2);
    const Tensor q = random_float32({batch, q_len, heads, d}, 3);
    const Tensor seqlens = int64_tensor({capacity, 25}, {batch});
    const Tensor leftpad = int64_tensor({capacity, 0}, {batch});
    const Tensor table = int64_tensor({3, 1, 0, 2}, {batch, 2});
    KVCache cache{k_cache.mutable_view(), v_cache.mutable_view(), {}, seqlens.view(), {},
                  leftpad.view()};
    if (page > 0) cache.block_table = table.view();
    Tensor out(DType::float32, {batch, q_len, heads, d}),
        lse(DType::float32, {batch, heads, q_len});
    attention_with_kv_cache(q.view(), cache, std::nullopt, std::nullopt, {}, AttentionOptions{},
                            {out.mutable_view(), lse.mutable_view(), {}});
    for (std::int64_t n = 0; n < q_len * heads * d; ++n) EXPECT_EQ(out.data<float>()[n], 0.0f);
    for (std::int64_t n = 0; n < heads * q_len; ++n) EXPECT_TRUE(std::isinf(lse.data<float>()[n]));
    EXPECT_TRUE(std::isfinite(out.data<float>()[q_len * heads * d]));
  }
}

TEST(KVCache, Bfloat16Cache) {
  CacheCase c;
  c.dtype = DType::bfloat16;
  c.page_size = 5;
  c.seqlens = {7, 22};
  c.new_len = c.q_len = 2;
  c.rotary_half = 4;
  expect_cache_call_matches_steps(c);
}

// int8 caches: the appended rows quantized byte for byte as the contract says, the output against
// the reference on the dequantized cache within the float32 rule — decode (the split-KV kernel)
// and prefill (the fused kernel), contiguous and paged, GQA and MQA, with rotary, sinks, soft caps
// and windows, float32 and bfloat16 queries. The decode runs on every SIMD target: its key
// products are the VNNI tile's or the int16 tile's (Int8DotTile) depending on the target.
TEST(KVCache, Int8CacheDecode) {
  for (const std::string& target : simd_targets_under_test()) {
    SCOPED_TRACE(target);
    force_simd_target(target);
    CacheCase c;
    c.int8_cache = true;
    c.seqlens = {0, 17, 47, 30};
    c.rotary_half = 4;
    c.sinks = true;
    expect_cache_call_matches_steps(c);
    c.page_size = 16;
    c.seqlens = {0, 16, 31, 45};
    c.softcap = 5.0;
    c.sinks = false;
    c.kv_heads = 1;
    expect_cache_call_matches_steps(c);
    // Rows longer than one AVX-512 vector of bytes (and than two AVX2 vectors of int16), with a
    // tail; groups of four query rows.
    c.dim = 80;
    c.q_heads = 8;
    c.kv_heads = 2;
    c.softcap = 0;
    expect_cache_call_matches_steps(c);
    // Groups of three rows: 12 sums, padded to 16 for the reduction tree.
    c.q_heads = 6;
    expect_cache_call_matches_steps(c);
  }
  force_simd_target("");
}

// Rows past kInt8ProductsMaxLength: the decode's int32 sums could overflow there (127 · 127 ·
// 140000 > 2³¹), so such rows take the fused kernel. Key 0 equals the query (score √D ≈ 374),
// key 1 is zero: all the weight is on key 0 (an overflowed sum would put it on key 1).
TEST(KVCache, Int8RowsLongerThanExactIntegerSums) {
  constexpr std::int64_t d = 140000;
  Tensor q(DType::float32, {1, 1, 1, d});
  Tensor k8(DType::int8, {1, 2, 1, d}), v8(DType::int8, {1, 2, 1, d});
  Tensor k_scales(DType::float32, {1, 2, 1}), v_scales(DType::float32, {1, 2, 1});
  for (std::int64_t e = 0; e < d; ++e) {
    q.data<float>()[e] = 1.0f;
    k8.data<std::int8_t>()[e] = 127;
    k8.data<std::int8_t>()[d + e] = 0;
    v8.data<std::int8_t>()[e] = 1;
    v8.data<std::int8_t>()[d + e] = -1;
  }
  k_scales.data<float>()[0] = k_scales.data<float>()[1] = 1.0f / 127;
  v_scales.data<float>()[0] = v_scales.data<float>()[1] = 1.0f;
  const Tensor seqlens = int64_tensor({2}, {1});
  KVCache cache{k8.mutable_view(), v8.mutable_view(), {}, seqlens.view(), {}, {}};
  cache.k_scale = k_scales.mutable_view();
  cache.v_scale = v_scales.mutable_view();
  for (const std::string& target : simd_targets_under_test()) {
    force_simd_target(target);
    Tensor out(DType::float32, {1, 1, 1, d}), lse(DType::float32, {1, 1, 1});
    attention_with_kv_cache(q.view(), cache, std::nullopt, std::nullopt, {}, AttentionOptions{},
                            {out.mutable_view(), lse.mutable_view(), {}});
    EXPECT_EQ(out.data<float>()[0], 1.0f) << target;
    EXPECT_EQ(out.data<float>()[d - 1], 1.0f) << target;
    // (within the rounding of a float32 score of d terms, |s| · 2⁻²⁴ per term: contract §7)
    const double score = std::sqrt(static_cast<double>(d));
    EXPECT_NEAR(lse.data<float>()[0], score, static_cast<double>(d) * 0x1p-24 * score) << target;
  }
  force_simd_target("");
}

TEST(KVCache, Int8CachePrefillAndBfloat16Queries) {
  CacheCase c;
  c.int8_cache = true;
  c.page_size = 3;
  c.capacity = 96;
  c.seqlens = {40, 0};
  c.leftpad = {8, 0};
  c.new_len = c.q_len = 40;  // the fused kernel
  c.window_left = 24;
  c.rotary_half = 8;
  c.interleaved = false;
  expect_cache_call_matches_steps(c);
  c.dtype = DType::bfloat16;
  c.new_len = c.q_len = 2;  // the split-KV kernel
  c.alibi = true;
  expect_cache_call_matches_steps(c);
}

// ---- Refusals ---------------------------------------------------------------------------------

struct Small {
  Tensor q = random_float32({2, 1, 2, 4}, 1);
  Tensor k_cache = random_float32({2, 6, 2, 4}, 2), v_cache = random_float32({2, 6, 2, 4}, 3);
  Tensor pages_k = random_float32({5, 2, 2, 4}, 4), pages_v = random_float32({5, 2, 2, 4}, 5);
  Tensor k_new = random_float32({2, 1, 2, 4}, 6), v_new = random_float32({2, 1, 2, 4}, 7);
  Tensor seqlens = int64_tensor({2, 5}, {2});
  Tensor table = int64_tensor({0, 1, 2, 3, 4, 0}, {2, 3});
  Tensor out = Tensor(DType::float32, {2, 1, 2, 4});
  KVCache cache{k_cache.mutable_view(), v_cache.mutable_view(), {}, seqlens.view(), {}, {}};
  AttentionOptions options;
  RotaryEmbedding rotary;
  void run() {
    attention_with_kv_cache(q.view(), cache, k_new.view(), v_new.view(), rotary, options,
                            {out.mutable_view(), {}, {}});
  }
};

void expect_refused(const std::function<void(Small&)>& change, const std::string& message) {
  Small s;
  change(s);
  const Tensor k_before = s.k_cache, pages_before = s.pages_k;
  try {
    s.run();
    ADD_FAILURE() << "no error; expected: " << message;
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find(message), std::string::npos) << error.what();
  }
  EXPECT_EQ(std::memcmp(s.k_cache.raw(), k_before.raw(), k_before.nbytes()), 0) << "cache touched";
  EXPECT_EQ(std::memcmp(s.pages_k.raw(), pages_before.raw(), pages_before.nbytes()), 0);
}

// With an int8 cache the bilinear score rounds the query it compares, Wᵀq, to int8 (contract §9):
// its attention is the dot score's of the rounded Wᵀq against the dequantized cache.
TEST(KVCache, Int8CacheBilinearRoundsTheComparedQuery) {
  constexpr std::int64_t d = 16, slots = 8, length = 6;  // 5 cached + 1 new
  const Tensor q = random_float32({1, 1, 2, d}, 11), w = random_float32({d, d}, 12);
  Tensor k8 = random_tensor(DType::int8, {1, slots, 1, d}, 13);
  Tensor v8 = random_tensor(DType::int8, {1, slots, 1, d}, 14);
  Tensor k_scales(DType::float32, {1, slots, 1}), v_scales(DType::float32, {1, slots, 1});
  for (std::int64_t j = 0; j < slots; ++j) {
    k_scales.data<float>()[j] = 0.02f;
    v_scales.data<float>()[j] = 0.03f;
  }
  const Tensor k_new = random_float32({1, 1, 1, d}, 15), v_new = random_float32({1, 1, 1, d}, 16);
  const Tensor seqlens = int64_tensor({length - 1}, {1});
  KVCache cache{k8.mutable_view(), v8.mutable_view(), {}, seqlens.view(), {}, {}};
  cache.k_scale = k_scales.mutable_view();
  cache.v_scale = v_scales.mutable_view();
  AttentionOptions options;
  options.score = Score::bilinear;
  options.w = w.view();
  Tensor out(DType::float64, {1, 1, 2, d}), lse(DType::float64, {1, 2, 1});
  attention_with_kv_cache(q.view(), cache, k_new.view(), v_new.view(), RotaryEmbedding{}, options,
                          {out.mutable_view(), lse.mutable_view(), {}});

  Tensor compared(DType::float32, {1, 1, 2, d});
  for (std::int64_t h = 0; h < 2; ++h) {
    std::vector<double> row(static_cast<std::size_t>(d), 0.0);
    for (std::int64_t c = 0; c < d; ++c) {
      for (std::int64_t e = 0; e < d; ++e)
        row[static_cast<std::size_t>(c)] +=
            double{q.data<float>()[h * d + e]} * double{w.data<float>()[e * d + c]};
      row[static_cast<std::size_t>(c)] = static_cast<float>(row[static_cast<std::size_t>(c)]);
    }
    round_to_int8(row);
    for (std::int64_t c = 0; c < d; ++c)
      compared.data<float>()[h * d + c] = static_cast<float>(row[static_cast<std::size_t>(c)]);
  }
  Tensor keys(DType::float32, {1, length, 1, d}), values(DType::float32, {1, length, 1, d});
  for (std::int64_t n = 0; n < length * d; ++n) {  // the cache after the append, dequantized
    keys.data<float>()[n] =
        static_cast<float>(k8.data<std::int8_t>()[n]) * k_scales.data<float>()[n / d];
    values.data<float>()[n] =
        static_cast<float>(v8.data<std::int8_t>()[n]) * v_scales.data<float>()[n / d];
  }
  AttentionOptions dot;
  dot.score = Score::dot;
  dot.scale = 1.0;  // the bilinear score's default
  Tensor reference(DType::float64, {1, 1, 2, d}), reference_lse(DType::float64, {1, 2, 1});
  attention_reference(compared.view(), keys.view(), values.view(), dot,
                      {reference.mutable_view(), reference_lse.mutable_view(), {}});
  for (std::int64_t n = 0; n < reference.numel(); ++n)
    EXPECT_NEAR(out.data<double>()[n], reference.data<double>()[n], 1e-5) << "element " << n;
  for (std::int64_t n = 0; n < reference_lse.numel(); ++n)
    EXPECT_NEAR(lse.data<double>()[n], reference_lse.data<double>()[n], 1e-5) << "row " << n;
}

// With an int8 cache a query row holding a NaN gets the NaN scale of the int8 rounding: its
// output is what the unrounded row gives against the dequantized cache in float32, and the other
// rows' are as without the NaN (contract §9).
TEST(KVCache, Int8CacheQueryRowWithNaN) {
  Tensor k8(DType::int8, {2, 6, 2, 4}), v8(DType::int8, {2, 6, 2, 4});
  Tensor k_scales(DType::float32, {2, 6, 2}), v_scales(DType::float32, {2, 6, 2});
  Tensor k32(DType::float32, {2, 6, 2, 4}), v32(DType::float32, {2, 6, 2, 4});
  for (std::int64_t n = 0; n < k8.numel(); ++n) {
    k8.data<std::int8_t>()[n] = static_cast<std::int8_t>(n % 7 - 3);
    v8.data<std::int8_t>()[n] = static_cast<std::int8_t>(n % 5 - 2);
    k32.data<float>()[n] = static_cast<float>(n % 7 - 3) * 0.25f;
    v32.data<float>()[n] = static_cast<float>(n % 5 - 2) * 0.25f;
  }
  for (std::int64_t n = 0; n < k_scales.numel(); ++n)
    k_scales.data<float>()[n] = v_scales.data<float>()[n] = 0.25f;
  const auto run = [&](bool int8, bool nan) {
    Small s;
    Tensor k = int8 ? k8 : k32, v = int8 ? v8 : v32, ks = k_scales, vs = v_scales;
    s.cache.k = k.mutable_view();
    s.cache.v = v.mutable_view();
    if (int8) {
      s.cache.k_scale = ks.mutable_view();
      s.cache.v_scale = vs.mutable_view();
    }
    if (nan) s.q.data<float>()[1] = std::numeric_limits<float>::quiet_NaN();  // row (b 0, h 0)
    s.run();
    return s.out;
  };
  const Tensor with_nan = run(true, true), without = run(true, false), float32 = run(false, true);
  for (std::int64_t n = 0; n < with_nan.numel(); ++n) {
    const float got = with_nan.data<float>()[n];
    const float want = n < 4 ? float32.data<float>()[n] : without.data<float>()[n];
    EXPECT_TRUE(std::isnan(want) ? std::isnan(got) : got == want) << "element " << n;
  }
}

TEST(KVCache, RefusesWhatWouldCorruptOrMisread) {
  Small ok;
  ok.run();  // the baseline call works
  expect_refused([](Small& s) { s.seqlens.data<std::int64_t>()[1] = 6; },
                 "k: expected the new keys to fit the cache: sequence 1 holds 6 of 6 slots, 1 more "
                 "do not fit");
  expect_refused([](Small& s) { s.seqlens.data<std::int64_t>()[0] = 7; },
                 "seqlens: expected lengths in [0, 6], got 7 at [0]");
  const auto paged = [](Small& s) {
    s.cache.k = s.pages_k.mutable_view();
    s.cache.v = s.pages_v.mutable_view();
    s.cache.block_table = s.table.view();
  };
  expect_refused(
      [&](Small& s) {
        paged(s);
        s.table.data<std::int64_t>()[4] = 5;
      },
      "block_table: expected page numbers in [0, 4], got 5 at [4]");
  expect_refused(
      [&](Small& s) {
        paged(s);
        s.table.data<std::int64_t>()[2] = -1;
      },
      "block_table: expected page numbers in [0, 4], got -1 at [2]");
  expect_refused(
      [&](Small& s) {
        paged(s);
        s.cache.batch_index = s.seqlens.view();
      },
      "batch_index: expected none with a paged cache");
  expect_refused([](Small& s) { s.options.key_lengths = s.seqlens.view(); },
                 "key_lengths: expected none with a KV cache");
  expect_refused([](Small& s) { s.options.dropout = 0.1; },
                 "dropout: expected none with a KV cache");
  expect_refused(
      [](Small& s) {
        s.options.causal = true;
        s.options.causal_align = CausalAlign::top_left;
      },
      "causal_align: expected none with a KV cache");
  static Tensor cos = random_float32({5, 2}, 8), sin = random_float32({5, 2}, 9);
  expect_refused(
      [](Small& s) {
        s.rotary.cos = cos.view();
        s.rotary.sin = sin.view();
      },
      "rotary_cos: expected a row for every position, got 5 rows where a new key reaches position "
      "5");
  expect_refused([](Small& s) { s.rotary.cos = cos.view(); },
                 "rotary: expected cos and sin together");
  static Tensor bf16_cache(DType::bfloat16, {2, 6, 2, 4});
  expect_refused([](Small& s) { s.cache.k = bf16_cache.mutable_view(); },
                 "k_cache: expected q's dtype float32 (or int8), got bfloat16");
  // int8 caches.
  static Tensor int8_k(DType::int8, {2, 6, 2, 4}), int8_v(DType::int8, {2, 6, 2, 4});
  static Tensor scales_k(DType::float32, {2, 6, 2}), scales_v(DType::float32, {2, 6, 2});
  const auto int8 = [](Small& s) {
    s.cache.k = int8_k.mutable_view();
    s.cache.v = int8_v.mutable_view();
    s.cache.k_scale = scales_k.mutable_view();
    s.cache.v_scale = scales_v.mutable_view();
  };
  {
    Small s;
    int8(s);
    s.run();  // the int8 baseline works
  }
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.cache.v_scale.reset();
      },
      "v_scale: expected the float32 scales of the int8 cache, got none");
  expect_refused([&](Small& s) { s.cache.k_scale = scales_k.mutable_view(); },
                 "k_scale: expected none with a float32 cache (scales are for int8), got one");
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.cache.v = s.v_cache.mutable_view();
      },
      "v_cache: expected int8 like k_cache, got float32");
  static Tensor wrong_scales(DType::float32, {2, 6, 1});
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.cache.k_scale = wrong_scales.mutable_view();
      },
      "k_scale: expected one scale per row and head, [2, 6, 2], got [2, 6, 1]");
  static Tensor q64(DType::float64, {2, 1, 2, 4});
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.q = q64;
      },
      "q: expected float32, bfloat16 or float16 with an int8 cache, got float64");
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.cache.k.strides = {48, 8, 1, 2};
        s.cache.k.shape = {2, 6, 2, 4};
      },
      "k_cache: expected an int8 cache with unit stride along D, got 2");
  // A NaN in a new value: refused before anything is written (the int8 cache is checked here).
  const Tensor int8_before = int8_k;
  expect_refused(
      [&](Small& s) {
        int8(s);
        s.v_new.data<float>()[5] = std::nanf("");
      },
      "v: expected finite values to quantize into the int8 cache, got a NaN or an infinity in "
      "row [0, 0, 1]");
  EXPECT_EQ(std::memcmp(int8_k.raw(), int8_before.raw(), int8_k.nbytes()), 0);
}

}  // namespace
}  // namespace qkv::testing
