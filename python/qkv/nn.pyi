"""Typed signatures of qkv.nn."""
from typing import Optional, Tuple

import torch

class MultiheadAttention(torch.nn.Module):
    embed_dim: int
    kdim: int
    vdim: int
    num_heads: int
    dropout: float
    batch_first: bool
    head_dim: int
    score: str
    normalization: str
    sigmoid_bias: Optional[float]
    in_proj_weight: Optional[torch.nn.Parameter]
    q_proj_weight: Optional[torch.nn.Parameter]
    k_proj_weight: Optional[torch.nn.Parameter]
    v_proj_weight: Optional[torch.nn.Parameter]
    in_proj_bias: Optional[torch.nn.Parameter]
    bias_k: Optional[torch.nn.Parameter]
    bias_v: Optional[torch.nn.Parameter]
    sinks: Optional[torch.nn.Parameter]
    out_proj: torch.nn.Linear
    def __init__(self, embed_dim: int, num_heads: int, dropout: float = ..., bias: bool = ...,
                 add_bias_kv: bool = ..., add_zero_attn: bool = ..., kdim: Optional[int] = ...,
                 vdim: Optional[int] = ..., batch_first: bool = ..., device: object = ...,
                 dtype: Optional[torch.dtype] = ..., score: str = ...,
                 additive_dim: Optional[int] = ..., sinks: bool = ...,
                 normalization: str = ..., sigmoid_bias: Optional[float] = ...) -> None: ...
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor] = ..., need_weights: bool = ...,
                attn_mask: Optional[torch.Tensor] = ..., average_attn_weights: bool = ...,
                is_causal: bool = ...) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...


class DifferentialAttention(torch.nn.Module):
    embed_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    lambda_init: float
    q_proj: torch.nn.Linear
    k_proj: torch.nn.Linear
    v_proj: torch.nn.Linear
    out_proj: torch.nn.Linear
    lambda_q1: torch.nn.Parameter
    lambda_k1: torch.nn.Parameter
    lambda_q2: torch.nn.Parameter
    lambda_k2: torch.nn.Parameter
    subln_weight: torch.nn.Parameter
    def __init__(self, embed_dim: int, num_heads: int, depth: int,
                 num_kv_heads: Optional[int] = ..., bias: bool = ..., device: object = ...,
                 dtype: Optional[torch.dtype] = ...) -> None: ...
    def reset_parameters(self) -> None: ...
    def lambda_full(self) -> torch.Tensor: ...
    def forward(self, x: torch.Tensor, is_causal: bool = ...) -> torch.Tensor: ...
