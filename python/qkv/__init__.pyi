"""Typed signatures of qkv's Python functions (see the docstrings in qkv/_functions.py)."""
from typing import Any, List, Optional, Sequence, Tuple, TypeVar, Union, overload

import numpy as np

from . import nn as nn
from . import score_mods as score_mods

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor: results are of the inputs' kind
Window = Tuple[int, int]

class Error(ValueError, RuntimeError):
    """qkv's own error: bad shapes or values, the message naming the argument."""

def simd_target() -> str: ...

def attention(
    q: Array, k: Array, v: Array, *, score: str = ..., scale: Optional[float] = ...,
    w: Optional[Array] = ..., wq: Optional[Array] = ..., wk: Optional[Array] = ...,
    va: Optional[Array] = ..., temperature: Optional[Array] = ..., softcap: float = ...,
    alibi_slopes: Optional[Array] = ...,
    bias: Optional[Array] = ..., sinks: Optional[Array] = ..., causal: bool = ...,
    causal_align: str = ..., prefix_length: int = ..., sink_tokens: int = ...,
    normalization: str = ...,
    sigmoid_bias: Optional[float] = ..., window: Window = ..., key_lengths: Optional[Array] = ...,
    key_starts: Optional[Array] = ..., mask: Optional[Array] = ...,
    return_lse: bool = ..., return_weights: bool = ..., dropout_p: float = ...,
    dropout_seed: Optional[int] = ..., threads: Optional[int] = ...,
) -> Union[Array, Tuple[Array, Array], Tuple[Array, Array, Array]]: ...

def scaled_dot_product_attention(
    query: Array, key: Array, value: Array, attn_mask: Optional[Array] = ...,
    dropout_p: float = ..., is_causal: bool = ..., scale: Optional[float] = ...,
    enable_gqa: bool = ...,
) -> Array: ...

def flash_attn_func(
    q: Array, k: Array, v: Array, dropout_p: float = ..., softmax_scale: Optional[float] = ...,
    causal: bool = ..., window_size: Window = ..., softcap: float = ...,
    alibi_slopes: Optional[Array] = ..., deterministic: bool = ...,
    return_attn_probs: bool = ..., sinks: Optional[Array] = ...,
) -> Union[Array, Tuple[Array, Array, Array]]: ...

def flash_attn_varlen_func(
    q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = ..., softmax_scale: Optional[float] = ...,
    causal: bool = ..., window_size: Window = ..., softcap: float = ...,
    alibi_slopes: Optional[Array] = ..., deterministic: bool = ...,
    return_attn_probs: bool = ..., sinks: Optional[Array] = ..., block_table: Optional[Array] = ...,
    seqused_k: Optional[Array] = ...,
) -> Union[Array, Tuple[Array, Array, List[Optional[Array]]]]: ...

def flash_attn_with_kvcache(
    q: Array, k_cache: Array, v_cache: Array, k: Optional[Array] = ..., v: Optional[Array] = ...,
    rotary_cos: Optional[Array] = ..., rotary_sin: Optional[Array] = ...,
    cache_seqlens: Union[int, Array, None] = ..., cache_batch_idx: Optional[Array] = ...,
    cache_leftpad: Optional[Array] = ..., block_table: Optional[Array] = ...,
    softmax_scale: Optional[float] = ..., causal: bool = ..., window_size: Window = ...,
    softcap: float = ..., rotary_interleaved: bool = ..., alibi_slopes: Optional[Array] = ...,
    num_splits: int = ..., return_softmax_lse: bool = ..., sinks: Optional[Array] = ...,
) -> Union[Array, Tuple[Array, Array]]: ...

MaskMod = Any  # (b, h, q_idx, kv_idx) -> bool tensor, vectorized over index tensors
ScoreMod = Any  # (score, b, h, q_idx, kv_idx) -> score tensor, vectorized

class BlockMask:
    shape: Tuple[int, int, int, int]
    seq_lengths: Tuple[int, int]
    BLOCK_SIZE: Tuple[int, int]
    mask_mod: MaskMod
    kv_num_blocks: Any
    kv_indices: Any
    full_kv_num_blocks: Any
    full_kv_indices: Any
    def sparsity(self) -> float: ...
    def to_dense(self) -> Any: ...

def create_block_mask(
    mask_mod: MaskMod, B: Optional[int], H: Optional[int], Q_LEN: int, KV_LEN: int,
    device: str = ..., BLOCK_SIZE: Union[int, Tuple[int, int]] = ..., _compile: bool = ...,
) -> BlockMask: ...

def flex_attention(
    query: Array, key: Array, value: Array, score_mod: Optional[ScoreMod] = ...,
    block_mask: Optional[BlockMask] = ..., scale: Optional[float] = ..., enable_gqa: bool = ...,
    return_lse: bool = ..., kernel_options: Optional[Any] = ..., sinks: Optional[Array] = ...,
) -> Union[Array, Tuple[Array, Array]]: ...

def and_masks(*mask_mods: MaskMod) -> MaskMod: ...
def or_masks(*mask_mods: MaskMod) -> MaskMod: ...
def noop_mask(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any: ...

class Explanation(Tuple[Any, ...]):
    words: List[str]
    x: np.ndarray
    in_proj_weight: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    scores: np.ndarray
    masked_scores: np.ndarray
    weights: np.ndarray
    output: np.ndarray
    score: str
    scale: float
    causal: bool
    score_parameters: dict
    fast_path_difference: float
    fast_path_target: str

def explain(
    sentence: str = ..., score: str = ..., dim: int = ..., heads: int = ..., causal: bool = ...,
    seed: int = ...,
) -> Explanation: ...
