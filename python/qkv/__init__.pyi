"""Typed signatures of qkv's Python functions (see the docstrings in qkv/_functions.py)."""
from typing import Any, List, Optional, Sequence, Tuple, TypeVar, Union, overload

import numpy as np

from . import nn as nn

Array = TypeVar("Array")  # numpy.ndarray or torch.Tensor: results are of the inputs' kind
Window = Tuple[int, int]

class Error(ValueError, RuntimeError):
    """qkv's own error: bad shapes or values, the message naming the argument."""

def simd_target() -> str: ...

def attention(
    q: Array, k: Array, v: Array, *, score: str = ..., scale: Optional[float] = ...,
    w: Optional[Array] = ..., wq: Optional[Array] = ..., wk: Optional[Array] = ...,
    va: Optional[Array] = ..., softcap: float = ..., alibi_slopes: Optional[Array] = ...,
    bias: Optional[Array] = ..., causal: bool = ..., causal_align: str = ...,
    window: Window = ..., key_lengths: Optional[Array] = ..., mask: Optional[Array] = ...,
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
    return_attn_probs: bool = ...,
) -> Union[Array, Tuple[Array, Array, Array]]: ...

def flash_attn_varlen_func(
    q: Array, k: Array, v: Array, cu_seqlens_q: Array, cu_seqlens_k: Array, max_seqlen_q: int,
    max_seqlen_k: int, dropout_p: float = ..., softmax_scale: Optional[float] = ...,
    causal: bool = ..., window_size: Window = ..., softcap: float = ...,
    alibi_slopes: Optional[Array] = ..., deterministic: bool = ...,
    return_attn_probs: bool = ...,
) -> Union[Array, Tuple[Array, Array, List[Optional[Array]]]]: ...
