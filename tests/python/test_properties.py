"""Property-based tests (Hypothesis) of qkv.attention against the float64 NumPy contract: any
shape, GQA ratio, score, mask, window and scale, including rows that see no key and logits of
±1e4."""
import numpy as np
from hypothesis import given, settings, strategies as st

import qkv
from contract import attention as contract


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    nq, nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    hk = draw(st.integers(1, 2))
    hq = hk * draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([1, 3, 8, 17]))
    dv = draw(st.sampled_from([1, 4, 8]))
    score = draw(st.sampled_from(["dot", "scaled_dot", "bilinear", "additive"]))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    magnitude = draw(st.sampled_from([1.0, 1.0, 30.0]))
    dk = d + (2 if score in ("bilinear", "additive") else 0)
    q = (rng.standard_normal((b, nq, hq, d)) * magnitude).astype(np.float32)
    k = (rng.standard_normal((b, nk, hk, dk)) * magnitude).astype(np.float32)
    v = rng.standard_normal((b, nk, hk, dv)).astype(np.float32)
    kw = {"score": score}
    if score == "bilinear":
        kw["w"] = rng.standard_normal((d, dk)).astype(np.float32)
    if score == "additive":
        kw["wq"] = rng.standard_normal((hq, 3, d)).astype(np.float32)
        kw["wk"] = rng.standard_normal((hq, 3, dk)).astype(np.float32)
        kw["va"] = rng.standard_normal((hq, 3)).astype(np.float32)
    if draw(st.booleans()):
        kw["causal"] = True
        kw["causal_align"] = draw(st.sampled_from(["bottom-right", "top-left"]))
    if draw(st.booleans()):
        kw["window"] = (draw(st.integers(-1, 5)), draw(st.integers(-1, 5)))
    if draw(st.booleans()):
        kw["mask"] = rng.random((hq, nq, nk)) < draw(st.sampled_from([0.0, 0.3, 0.9]))
    if draw(st.booleans()):
        kw["key_lengths"] = rng.integers(0, nk + 1, size=b).astype(np.int64)
    if draw(st.booleans()):
        kw["scale"] = draw(st.sampled_from([0.01, 0.5, 2.0]))
    return q, k, v, kw


@settings(max_examples=150, deadline=None)
@given(problems())
def test_matches_contract(problem):
    q, k, v, kw = problem
    o, lse, p = qkv.attention(q, k, v, **kw, return_lse=True, return_weights=True)
    want_o, want_lse, want_p = contract(q, k, v, **kw)
    assert not np.isnan(o).any() and not np.isnan(p).any() and not np.isnan(lse).any()
    # float32 scores of size |s| carry an absolute error of about |s|·2^-24 per term, which the
    # softmax turns into a relative error of P: the bound scales with the largest |logit|.
    logits = np.abs(np.where(np.isfinite(want_lse), want_lse, 0)).max() + 1
    assert np.abs(o - want_o).max() <= 2e-6 * logits * (1 + np.abs(want_o).max()) + 1e-5
    assert np.abs(p - want_p).max() <= 2e-6 * logits + 1e-5
    assert np.array_equal(np.isfinite(lse), np.isfinite(want_lse))
    empty = ~np.isfinite(want_lse)  # rows that see no key: O = 0, P = 0
    assert (np.abs(o.transpose(0, 2, 1, 3)[empty]) == 0).all()
    assert (p[empty] == 0).all()


def test_extreme_logits_stay_finite():
    q = np.full((1, 4, 1, 2), 100.0, np.float32)
    k = np.array([[[[100.0, 0.0]], [[-100.0, 0.0]], [[1.0, 0.0]]]], np.float32)
    v = np.arange(3, dtype=np.float32).reshape(1, 3, 1, 1)
    o, lse = qkv.attention(q, k, v, score="dot", return_lse=True)  # logits ±1e4
    assert np.isfinite(o).all() and np.isfinite(lse).all()
    assert np.allclose(o, 0.0) and np.allclose(lse, 1e4)
