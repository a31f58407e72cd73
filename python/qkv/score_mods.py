"""Score modifications that qkv.flex_attention runs natively, inside the fused forward and
backward, with the gradients of the tensors they read (docs/programmable.md).

Each is also an ordinary score_mod, score_mod(score, b, h, q_idx, kv_idx), vectorized as
FlexAttention calls it (PyTorch's flex_attention accepts them too), and they compose:
compose(relative_bias(table), soft_cap(30.0)) applies the table, then the cap.

- alibi(slopes [H]):              score + slopes[h]·(kv_idx − q_idx)
- soft_cap(cap):                  cap·tanh(score / cap)
- relative_bias(table):           score + table[h, d + M − 1] (table [H, 2M − 1], or [2M − 1] shared
                                  by the heads), d = q_idx − kv_idx clamped to [−(M − 1), M − 1]
- head_scale(scales [H]):         score·scales[h]
"""
import numpy as np

from ._qkv import Error

try:
    import torch
except ImportError:  # NumPy alone works
    torch = None

__all__ = ["ScoreMod", "alibi", "soft_cap", "relative_bias", "head_scale", "compose"]


def _is_torch(x):
    return torch is not None and isinstance(x, torch.Tensor)


def _tanh(x):
    return torch.tanh(x) if _is_torch(x) else np.tanh(x)


def _clip(x, low, high):
    return torch.clamp(x, low, high) if _is_torch(x) else np.clip(x, low, high)


class ScoreMod:
    """A composition of built-in pieces, each (kind, tensor or None, constant)."""

    def __init__(self, pieces):
        self._pieces = list(pieces)

    def __call__(self, score, b, h, q_idx, kv_idx):
        for kind, tensor, constant in self._pieces:
            if kind == "alibi":
                score = score + tensor[h] * (kv_idx - q_idx)
            elif kind == "soft_cap":
                score = constant * _tanh(score / constant)
            elif kind == "relative_bias":
                reach = (tensor.shape[-1] - 1) // 2
                at = _clip(q_idx - kv_idx, -reach, reach) + reach
                score = score + (tensor[h, at] if len(tensor.shape) == 2 else tensor[at])
            elif kind == "head_scale":
                score = score * tensor[h]
        return score

    def _native(self, heads):
        """The pieces for the C++ core — (kind, parameter index, constant) — and the parameter
        tensors; qkv.Error when a tensor does not fit `heads` query heads."""
        pieces, parameters = [], []
        for kind, tensor, constant in self._pieces:
            if tensor is None:
                pieces.append((kind, -1, float(constant)))
                continue
            shape = tuple(tensor.shape)
            if kind == "relative_bias":
                fits = len(shape) in (1, 2) and shape[-1] % 2 == 1 and (
                    len(shape) == 1 or shape[0] == heads)
                expected = f"[{heads}, 2M - 1] or [2M - 1] (an odd length)"
            else:
                fits = shape == (heads,)
                expected = f"[{heads}] (one per query head)"
            if not fits:
                raise Error(f"score_mod {kind}: expected {expected}, got {list(shape)}")
            pieces.append((kind, len(parameters), float(constant)))
            parameters.append(tensor)
        return pieces, parameters

    def __fx_create_arg__(self, tracer):
        """In a torch.fx graph: a node that builds this composition from its pieces (whose
        tensors may be the graph's own values, such as a module's parameters)."""
        return tracer.create_node("call_function", ScoreMod, (tracer.create_arg(self._pieces),),
                                  {})

    def __repr__(self):
        names = ", ".join(kind for kind, _, _ in self._pieces)
        return f"qkv.score_mods.ScoreMod({names})"


def alibi(slopes):
    """score + slopes[h]·(kv_idx − q_idx): ALiBi as FlexAttention's documentation writes it."""
    return ScoreMod([("alibi", slopes, 0.0)])


def soft_cap(cap):
    """cap·tanh(score / cap) (Gemma 2's logit soft-capping)."""
    if not float(cap) > 0 or not np.isfinite(float(cap)):
        raise Error(f"soft_cap: expected a finite cap > 0, got {cap}")
    return ScoreMod([("soft_cap", None, float(cap))])


def relative_bias(table):
    """score + table[h, clamp(q_idx − kv_idx) + M − 1]: a learned relative position bias."""
    return ScoreMod([("relative_bias", table, 0.0)])


def head_scale(scales):
    """score·scales[h]: a (learned) temperature per query head."""
    return ScoreMod([("head_scale", scales, 0.0)])


def compose(*mods):
    """The pieces of each mod in order: compose(a, b)(s) = b(a(s))."""
    pieces = []
    for mod in mods:
        if not isinstance(mod, ScoreMod):
            raise Error(f"compose: expected qkv.score_mods pieces, got {type(mod).__name__}")
        pieces += mod._pieces
    return ScoreMod(pieces)
