"""The C++ core (private: use the functions of the qkv package)."""
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

class Error(ValueError, RuntimeError): ...

def forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, options: Dict[str, Any],
            out: np.ndarray, lse: Optional[np.ndarray] = ...,
            weights: Optional[np.ndarray] = ...) -> None:
    """attention_forward into the given arrays (uint16 = bfloat16 bits)."""

def backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, options: Dict[str, Any],
             dout: np.ndarray, dlse: Optional[np.ndarray], out: np.ndarray, lse: np.ndarray,
             gradients: Dict[str, np.ndarray]) -> None:
    """attention_backward into the arrays of `gradients`."""

def simd_target() -> str: ...
def explain(words: List[str], score: str, dim: int, heads: int, causal: bool, seed: int) -> Dict[str, Any]: ...
def score_names() -> List[str]: ...
def score_layer(score: str, heads: int, head_dim: int, additive_dim: int = ...
                ) -> Tuple[List[Tuple[str, str, Tuple[int, ...], str, float]], Optional[float]]: ...

class BlockMask:
    """The C++ block mask: kinds uint8 [B, H, q_blocks, kv_blocks] (0 empty, 1 partial, 2 full),
    partial uint8 [P, q_block, kv_block], the pairs of each partial block in order."""
    def __init__(self, batch: int, heads: int, q_len: int, kv_len: int, q_block: int,
                 kv_block: int, kinds: np.ndarray, partial: np.ndarray) -> None: ...
    def density(self) -> float: ...
