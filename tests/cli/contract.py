"""docs/contract.md §2–4 evaluated with NumPy in float64, independently of qkv's C++ code.

Layout as the contract: q [B, Nq, Hq, Dq], k [B, Nk, Hk, Dk], v [B, Nk, Hk, Dv].
Returns O [B, Nq, Hq, Dv], LSE [B, Hq, Nq] and P [B, Hq, Nq, Nk].
"""
import numpy as np


def attention(q, k, v, score="scaled_dot", scale=None, w=None, wq=None, wk=None, va=None,
              temperature=None, softcap=0.0, alibi=None, bias=None, causal=False, causal_align="bottom-right",
              window=(-1, -1), key_lengths=None, mask=None, prefix_length=0, sink_tokens=0, sinks=None,
              normalization="softmax", sigmoid_bias=None):
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, nq, hq, dq = q.shape
    _, nk, hk, _ = k.shape
    group = hq // hk
    # Query head h reads key/value head h // group.
    Q = q.transpose(0, 2, 1, 3)
    K = np.repeat(k, group, axis=2).transpose(0, 2, 1, 3)
    V = np.repeat(v, group, axis=2).transpose(0, 2, 1, 3)

    def per_head(param, shared_rank):
        param = np.asarray(param, dtype=np.float64)
        return np.broadcast_to(param, (hq,) + param.shape[-shared_rank:]) if param.ndim == shared_rank else param

    if score in ("dot", "scaled_dot"):
        s = Q @ K.transpose(0, 1, 3, 2)
    elif score == "bilinear":
        s = np.einsum("bhid,hde,bhje->bhij", Q, per_head(w, 2), K)
    elif score == "cosine":  # τ[h]·(q·k)/(|q||k|), a zero vector scoring 0
        norms = (np.linalg.norm(Q, axis=-1)[..., :, None] * np.linalg.norm(K, axis=-1)[..., None, :])
        tau = np.ones(hq) if temperature is None else np.broadcast_to(
            np.asarray(temperature, dtype=np.float64), (hq,))
        with np.errstate(invalid="ignore", divide="ignore"):
            s = np.where(norms > 0, tau[None, :, None, None] * (Q @ K.transpose(0, 1, 3, 2)) / norms,
                         0.0)
    elif score == "additive":
        qa = np.einsum("had,bhid->bhia", per_head(wq, 2), Q)
        ka = np.einsum("had,bhjd->bhja", per_head(wk, 2), K)
        s = np.einsum("ha,bhija->bhij", per_head(va, 1),
                      np.tanh(qa[:, :, :, None, :] + ka[:, :, None, :, :]))
    else:
        raise ValueError(score)
    if scale is None:
        scale = 1.0 / np.sqrt(dq) if score == "scaled_dot" else 1.0
    s = s * scale
    if softcap > 0:
        s = softcap * np.tanh(s / softcap)
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    diagonal = i + nk - nq
    if alibi is not None:
        slopes = np.asarray(alibi, dtype=np.float64)
        slopes = np.broadcast_to(slopes, (batch, hq))[:, :, None, None]
        s = s - slopes * np.abs(diagonal - j)
    if bias is not None:
        s = s + np.asarray(bias, dtype=np.float64)

    visible = np.ones((batch, hq, nq, nk), dtype=bool)
    if mask is not None:
        visible &= np.asarray(mask, dtype=bool)
    if causal:
        visible &= (j <= (diagonal if causal_align == "bottom-right" else i)) | (j < prefix_length)
    left, right = window
    if left >= 0:  # sink tokens (StreamingLLM) stay visible past the left edge
        visible &= (j >= diagonal - left) | (j < sink_tokens)
    if right >= 0:
        visible &= j <= diagonal + right
    if key_lengths is not None:
        visible &= j[None, None] < np.asarray(key_lengths)[:, None, None, None]

    if normalization == "sigmoid":  # each weight on its own; LSE = log of the row's total weight
        b = -np.log(nk) if sigmoid_bias is None else sigmoid_bias
        p = np.where(visible, 1.0 / (1.0 + np.exp(-(s + b))), 0.0)
        with np.errstate(divide="ignore"):
            lse = np.log(p.sum(-1))
        return (p @ V).transpose(0, 2, 1, 3), lse, p
    masked = np.where(visible, s, -np.inf)
    if sinks is not None:  # one more column, after the keys: the sink's logit, with no value
        column = np.broadcast_to(np.asarray(sinks, dtype=np.float64)[None, :, None, None],
                                 (batch, hq, nq, 1))
        masked = np.concatenate([masked, column], axis=-1)
        visible = np.concatenate([visible, np.ones((batch, hq, nq, 1), dtype=bool)], axis=-1)
    row_max = masked.max(axis=-1, initial=-np.inf, keepdims=True)
    empty = row_max == -np.inf
    shifted = np.where(visible & ~empty, masked - np.where(empty, 0.0, row_max), -np.inf)
    with np.errstate(divide="ignore"):
        lse = np.where(empty, -np.inf, row_max + np.log(np.exp(shifted).sum(-1, keepdims=True)))
    p = np.where(visible & ~empty, np.exp(masked - np.where(empty, 0.0, lse)), 0.0)
    p = p[..., :nk]  # the sink's column has no value, and is not returned
    out = (p @ V).transpose(0, 2, 1, 3)
    return out, lse[..., 0], p
