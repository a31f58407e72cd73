// Attention against a KV cache: generating text one step at a time, each sequence's earlier keys
// and values kept in a cache that the new ones are appended to in place (FlashAttention's
// flash_attn_with_kvcache, vLLM's paged attention). docs/contract.md §9.
#pragma once

#include <optional>

#include "qkv/attention.hpp"

namespace qkv {

// A KV cache: the sequences' keys and values, in one of two layouts.
//   contiguous: k [Bc, capacity, Hk, Dk], v [Bc, capacity, Hk, Dv]; batch element b reads cache
//               row batch_index[b] (b when absent: Bc = B).
//   paged:      k [num_pages, page_size, Hk, Dk], v [num_pages, page_size, Hk, Dv] with
//               block_table [B, max_pages]: slot s of batch element b is row s % page_size of page
//               block_table[b, s / page_size]; any page_size >= 1. Capacity = max_pages·page_size.
// Sequence b occupies slots [leftpad[b], seqlens[b]) (leftpad absent: 0; seqlens absent: the
// whole capacity). The cache holds Q's dtype (float32, float64, bfloat16 or float16), or int8.
//
// An int8 cache (k and v int8, unit stride along D, Q float32, bfloat16 or float16) is quantized
// symmetrically with one float32 scale per row and head, for keys and values alike: element d of
// key row (slot, h) stands for k[…, h, d] · k_scale[…, h] (v likewise), the scales laid out like
// the rows, [Bc, capacity, Hk] or [num_pages, page_size, Hk]. A row is quantized as it is
// appended: scale = max_d |x_d| / 127 (rounded to float32), k = round(x / scale) (ties to even),
// so |x − k·scale| ≤ scale / 2 for every element. docs/contract.md §9 says why per token. Where
// the score compares the keys as they are (dot-product and bilinear scores), the query rows are
// rounded to int8 by the same rule, so that their products with the keys are integer dot
// products (llama.cpp's q8_0 scheme); attention is that of the rounded queries against the
// dequantized cache (§9 bounds how far a score moves).
struct KVCache {
  MutableTensorView k, v;
  std::optional<TensorView> block_table;  // [B, max_pages], int32 or int64: paged
  std::optional<TensorView> seqlens;      // [B], int32 or int64, each in [leftpad[b], capacity]
  std::optional<TensorView> batch_index;  // [B], int32 or int64, each in [0, Bc): contiguous only
  std::optional<TensorView> leftpad;      // [B], int32 or int64: each sequence's first slot
  std::optional<MutableTensorView> k_scale{}, v_scale{};  // int8 caches only: [·, ·, Hk], float32
};

// The rotary position embedding (RoPE) of Q and of the new keys: the first rotary_dim dimensions
// of a row at position p are turned, pair by pair, by the angle whose cosine and sine are
// cos[p, t] and sin[p, t]: (x, y) → (x·cos − y·sin, x·sin + y·cos). Pairs are (2t, 2t + 1) when
// interleaved (GPT-J), (t, t + rotary_dim/2) otherwise (GPT-NeoX, Llama).
struct RotaryEmbedding {
  std::optional<TensorView> cos, sin;  // [positions, rotary_dim / 2], float: both or neither
  bool interleaved = true;
};

// One step of generation against `cache`, FlashAttention's flash_attn_with_kvcache:
//   1. the new keys k_new [B, Nnew, Hk, Dk] (rotated at positions seqlens[b] + t when `rotary` is
//      given) and values v_new [B, Nnew, Hk, Dv] are written into the cache in place, at slots
//      seqlens[b] … seqlens[b] + Nnew − 1 of each sequence (an error, before anything is written,
//      when a sequence would pass the cache's capacity); nothing else in the cache changes;
//   2. q [B, Nq, Hq, Dq] (rotated at positions seqlens[b] + i with causal or a window, else all at
//      seqlens[b]) attends to each sequence's own keys, slots [leftpad[b], seqlens[b] + Nnew), the
//      last query aligned with the last key: causal, windows and ALiBi as docs/contract.md §3 with
//      that sequence's length as Nk.
// `options` gives the score and its scale (default 1/√Dq), soft cap, ALiBi, sinks, causal
// (bottom-right), window and threads; the masks and options that name key positions of one
// shared axis (key_lengths, key_starts, mask, bias, block_mask, sink_tokens, prefix_length, the
// offsets of ring attention) and dropout are refused, as is a request for the weights. outputs: O
// [B, Nq, Hq, Dv] and optionally LSE [B, Hq, Nq]. Validation is complete before the cache is
// touched; every error is a qkv::Error naming the argument.
void attention_with_kv_cache(const TensorView& q, const KVCache& cache,
                             const std::optional<TensorView>& k_new,
                             const std::optional<TensorView>& v_new, const RotaryEmbedding& rotary,
                             const AttentionOptions& options, const AttentionOutputs& outputs);

}  // namespace qkv
