"""The C++ core (private: use the functions of the qkv package)."""
from typing import Any, Dict, Optional

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
