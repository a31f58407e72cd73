"""qkv.explain: the four steps of attention on a sentence, as arrays for a notebook."""
from typing import NamedTuple

import numpy as np

from . import _qkv


class Explanation(NamedTuple):
    """The steps of one self-attention call on N words, H heads of Dh features (E = H·Dh).

    Arrays are float64 (in_proj_weight and score_parameters: float32, as the layer keeps them),
    in qkv's layout without the batch: rows first, then heads.
    """
    words: list           #: the N words (the rows' and the keys' labels)
    x: np.ndarray         #: [N, E] the input rows (seeded embeddings; a repeated word, the same row)
    in_proj_weight: np.ndarray  #: [3E, E] Wq, Wk, Wv stacked (PyTorch's packing); no bias
    q: np.ndarray         #: [N, H, Dh] step 1: X·Wqᵀ split into heads
    k: np.ndarray         #: [N, H, Dh] X·Wkᵀ
    v: np.ndarray         #: [N, H, Dh] X·Wvᵀ
    scores: np.ndarray    #: [H, N, N] step 2: scale · score(q_i, k_j), every pair
    masked_scores: np.ndarray  #: [H, N, N] the same with -inf where the causal mask hides j > i
    weights: np.ndarray   #: [H, N, N] step 3: softmax of each row of masked_scores
    output: np.ndarray    #: [N, H, Dh] step 4: O_i = sum_j P_ij V_j
    score: str            #: the score's name
    scale: float          #: what each score was multiplied by
    causal: bool
    score_parameters: dict  #: the score's parameters by the layer's names (e.g. score_weight)
    fast_path_difference: float  #: max |attention_forward (float32) − output|
    fast_path_target: str  #: the SIMD target the fast path ran on


def explain(sentence="the cat sat on the mat", score="scaled_dot", dim=8, heads=1, causal=False,
            seed=1):
    """Attention slowed down: the sentence's words (split at whitespace) get seeded random
    embeddings, a fresh ``qkv.nn.MultiheadAttention``-like layer (PyTorch's initialization from
    ``seed``, no bias) projects them into Q, K and V, and qkv's float64 reference computes the
    scores, the weights and the output; the fast path's output is compared with it
    (``fast_path_difference``). The same numbers as ``qkv explain`` prints.

    Returns an :class:`Explanation`. Raises ``qkv.Error`` for an empty sentence, an unknown score
    or sizes the layer refuses (``heads`` must divide ``dim``).
    """
    words = sentence.split()
    steps = _qkv.explain(words, score, int(dim), int(heads), bool(causal), int(seed))
    return Explanation(**{name: steps[name] for name in Explanation._fields})
