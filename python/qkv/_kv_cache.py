"""FlashAttention's flash_attn_with_kvcache on qkv's KV-cache call (include/qkv/kv_cache.hpp):
one generation step that appends the new keys and values to the cache in place and attends to
each sequence's own keys, contiguous or paged, with rotary embeddings fused into the call."""
import math

import numpy as np

from . import _qkv
from ._functions import _empty, _is_torch, _numpy_view, _result_dtypes, one_fx_node
from ._qkv import Error

try:
    import torch
except ImportError:  # NumPy alone works
    torch = None


def _per_sequence(value, batch, name):
    """cache_seqlens as FlashAttention takes it: an int for every sequence, or [B] ints."""
    if value is None or _is_torch(value) or isinstance(value, np.ndarray):
        return value
    if isinstance(value, (int, np.integer)):
        return np.full((batch,), int(value), dtype=np.int64)
    raise Error(f"{name}: expected an int or [B] ints, got {type(value).__name__}")


@one_fx_node
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False, sinks=None,
                            k_cache_scale=None, v_cache_scale=None):
    """flash_attn.flash_attn_with_kvcache on the CPU.

    q [B, Nq, Hq, D]. k_cache, v_cache [B_cache, capacity, Hk, D] (cache_batch_idx [B] picks the
    rows; else B_cache = B), or paged [num_blocks, page_size, Hk, D] with block_table
    [B, max_blocks] (any page_size >= 1). k, v [B, Nnew, Hk, D]: written into the caches in place
    at slots cache_seqlens[b] ... (an error, with the caches untouched, if they do not fit).
    cache_seqlens: an int or [B] ints (None: the whole capacity); cache_leftpad [B]: each
    sequence's first slot. rotary_cos, rotary_sin [positions, rotary_dim / 2]: q and the new k
    rotated at their positions (q at cache_seqlens + i with causal or a window, else at
    cache_seqlens), interleaved (GPT-J) or not (GPT-NeoX). The last query of each sequence is
    aligned with its last key (causal, window_size, ALiBi as in flash_attn_func); softmax_scale
    default 1/sqrt(D); softcap; alibi_slopes [Hq] or [B, Hq]; qkv adds sinks [Hq]. num_splits is
    accepted and ignored (qkv splits long caches itself). NumPy arrays or torch tensors (float32,
    bfloat16, float16, float64; the caches in q's dtype); not differentiable.

    qkv adds int8 caches: k_cache, v_cache int8 (q float32, bfloat16 or float16) with float32
    k_cache_scale, v_cache_scale [B_cache, capacity, Hk] (paged: [num_blocks, page_size, Hk]), one
    scale per row and head: a cached element stands for its int8 value times its row's scale. New
    rows are quantized as they are written (scale = max|x| / 127, round to nearest even), the
    scales written in place beside them; the kernels read the int8 cache as it lies. With an int8
    cache each query row is rounded to int8 by the same rule before its products with the keys,
    which are then integer dot products (llama.cpp's q8_0 scheme; contract section 9).

    Returns out [B, Nq, Hq, D] in q's dtype, and with return_softmax_lse also LSE [B, Hq, Nq]
    (float32; float64 for float64 inputs).
    """
    del num_splits
    if len(q.shape) != 4:
        raise Error(f"q: expected [B, Nq, Hq, D] (rank 4), got shape {tuple(q.shape)}")
    batch, q_len, q_heads, dim = (int(n) for n in q.shape)
    scale = 1.0 / math.sqrt(dim) if softmax_scale is None else float(softmax_scale)
    options = dict(score="dot", scale=scale, softcap=float(softcap), causal=bool(causal),
                   causal_align="bottom-right", window_left=int(window_size[0]),
                   window_right=int(window_size[1]),
                   alibi_slopes=_numpy_view(alibi_slopes, "alibi_slopes"),
                   sinks=_numpy_view(sinks, "sinks"))
    cache = dict(seqlens=_numpy_view(_per_sequence(cache_seqlens, batch, "cache_seqlens"),
                                     "cache_seqlens"),
                 batch_index=_numpy_view(cache_batch_idx, "cache_batch_idx"),
                 leftpad=_numpy_view(cache_leftpad, "cache_leftpad"),
                 block_table=_numpy_view(block_table, "block_table"),
                 rotary_cos=_numpy_view(rotary_cos, "rotary_cos"),
                 rotary_sin=_numpy_view(rotary_sin, "rotary_sin"),
                 rotary_interleaved=bool(rotary_interleaved),
                 k_scale=_numpy_view(k_cache_scale, "k_cache_scale"),
                 v_scale=_numpy_view(v_cache_scale, "v_cache_scale"))
    like_torch = _is_torch(q)
    out_dtype, wide = _result_dtypes(q)
    out = _empty((batch, q_len, q_heads, int(v_cache.shape[3])), out_dtype, like_torch)
    lse = _empty((batch, q_heads, q_len), wide, like_torch) if return_softmax_lse else None
    _qkv.attention_with_kv_cache(
        _numpy_view(q, "q"), _numpy_view(k_cache, "k_cache"), _numpy_view(v_cache, "v_cache"),
        _numpy_view(k, "k"), _numpy_view(v, "v"), options, cache, _numpy_view(out, "out"),
        _numpy_view(lse, "lse"))
    return (out, lse) if return_softmax_lse else out
