"""qkv.explain: every intermediate against NumPy evaluating the four steps from the returned
inputs (x and the layer's parameters), for every score, one head and two, with and without the
causal mask; its output against `qkv attention` on the same Q, K and V; the fast path's
difference within the float32 error floor; and the one-line errors."""
import os
import subprocess

import numpy as np
import pytest

import qkv

SCORES = ["dot", "scaled_dot", "bilinear", "additive", "cosine"]


def numpy_steps(e):
    """The four steps in float64 from e.x, e.in_proj_weight and e.score_parameters."""
    n, heads, dh = e.q.shape
    E = heads * dh
    w = e.in_proj_weight.astype(np.float64)
    q, k, v = ((e.x @ w[p * E:(p + 1) * E].T).reshape(n, heads, dh) for p in range(3))
    p = {name: a.astype(np.float64) for name, a in e.score_parameters.items()}
    scores = np.empty((heads, n, n))
    for h in range(heads):
        qh, kh = q[:, h], k[:, h]
        if e.score in ("dot", "scaled_dot"):
            s = qh @ kh.T
        elif e.score == "bilinear":
            s = qh @ p["score_weight"][h] @ kh.T
        elif e.score == "additive":
            hidden = np.tanh((qh @ p["score_wq"][h].T)[:, None, :] + (kh @ p["score_wk"][h].T)[None])
            s = hidden @ p["score_v"][h]
        else:  # cosine
            norms = np.linalg.norm(qh, axis=1)[:, None] * np.linalg.norm(kh, axis=1)[None]
            s = p["score_temperature"][h] * (qh @ kh.T) / norms
        scores[h] = e.scale * s
    masked = scores.copy()
    if e.causal:
        masked[:, np.triu(np.ones((n, n), bool), 1)] = -np.inf
    weights = np.exp(masked - masked.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    output = np.einsum("hij,jhd->ihd", weights, v)
    return q, k, v, scores, masked, weights, output


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_each_step_equals_numpy(score, heads, causal):
    e = qkv.explain("the cat sat on the mat", score=score, dim=8, heads=heads, causal=causal,
                    seed=3)
    assert e.words == ["the", "cat", "sat", "on", "the", "mat"] and e.score == score
    assert e.x.shape == (6, 8) and e.in_proj_weight.shape == (24, 8)
    np.testing.assert_array_equal(e.x[0], e.x[4])  # a repeated word, the same row
    if score == "scaled_dot":
        assert e.scale == pytest.approx(1 / np.sqrt(8 // heads))
    q, k, v, scores, masked, weights, output = numpy_steps(e)
    # float64 both ways, summed in different orders: a few ulp of the largest terms.
    for name, mine, theirs in [("q", e.q, q), ("k", e.k, k), ("v", e.v, v),
                               ("scores", e.scores, scores), ("weights", e.weights, weights),
                               ("output", e.output, output)]:
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-13, err_msg=name)
    np.testing.assert_array_equal(np.isinf(e.masked_scores), np.isinf(masked))
    finite = np.isfinite(masked)
    np.testing.assert_allclose(e.masked_scores[finite], masked[finite], rtol=0, atol=1e-13)
    np.testing.assert_allclose(e.weights.sum(-1), 1.0, rtol=0, atol=1e-15)
    if causal:
        assert (e.weights[:, np.triu(np.ones((6, 6), bool), 1)] == 0).all()


@pytest.mark.parametrize("score", SCORES)
def test_the_fast_path_difference_is_the_float32_floor_or_less(score):
    """The stated difference is attention_forward's on float32 Q, K, V (recomputed here), and it
    is within 3x the error of the literal float32 evaluation (the FlashAttention rule)."""
    e = qkv.explain(score=score, dim=16, heads=2, causal=True, seed=5)
    n, heads, dh = e.q.shape
    as32 = lambda a: a.astype(np.float32)[None]
    params = {name: a for name, a in e.score_parameters.items()}
    kwargs = {"dot": {}, "scaled_dot": {}, "bilinear": {"w": params.get("score_weight")},
              "additive": {"wq": params.get("score_wq"), "wk": params.get("score_wk"),
                           "va": params.get("score_v")},
              "cosine": {"temperature": params.get("score_temperature")}}[score]
    fast = qkv.attention(as32(e.q), as32(e.k), as32(e.v), score=score, scale=e.scale,
                         causal=True, causal_align="top-left", **kwargs)[0]
    assert np.abs(fast - e.output).max() == pytest.approx(e.fast_path_difference, rel=1e-6,
                                                          abs=1e-12)
    # The literal float32 evaluation's error: the floor.
    q32, k32, v32 = (a.astype(np.float32) for a in (e.q, e.k, e.v))
    literal = np.empty_like(e.output, dtype=np.float32)
    scores32 = (e.masked_scores).astype(np.float32)  # the scores themselves rounded once
    for h in range(heads):
        s = scores32[h]
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        literal[:, h] = p @ v32[:, h]
    floor = max(np.abs(literal - e.output).max(), np.finfo(np.float32).eps)
    assert e.fast_path_difference <= 3 * floor


@pytest.mark.skipif(not os.environ.get("QKV_BIN"), reason="needs the qkv command (QKV_BIN)")
@pytest.mark.parametrize("score,causal", [("scaled_dot", True), ("bilinear", False),
                                          ("additive", True)])
def test_the_output_equals_qkv_attention(tmp_path, score, causal):
    e = qkv.explain("a bird sees the red bird", score=score, dim=8, heads=2, causal=causal,
                    seed=7)
    files = {"q": e.q[None], "k": e.k[None], "v": e.v[None]}
    names = {"score_weight": "w", "score_wq": "wq", "score_wk": "wk", "score_v": "va",
             "score_temperature": "temperature"}
    for name, array in e.score_parameters.items():
        files[names[name]] = array
    args = [os.environ["QKV_BIN"], "attention", "--score", score, "--scale", repr(e.scale),
            "--out", str(tmp_path / "o.npy")]
    for flag, array in files.items():
        np.save(tmp_path / f"{flag}.npy", array)
        args += [f"--{flag}", str(tmp_path / f"{flag}.npy")]
    if causal:
        args += ["--causal", "--causal-align", "top-left"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    out = np.load(tmp_path / "o.npy")[0]
    np.testing.assert_allclose(out, e.output, rtol=0, atol=1e-14)


@pytest.mark.parametrize("kwargs,message", [
    ({"sentence": "   "}, "words: expected at least one word, got none"),
    ({"score": "euclid"}, "score: expected one of"),
    ({"dim": 8, "heads": 3}, "dim, heads: expected dim >= 1 and heads a divisor of it, got 8 and 3"),
    ({"dim": 0}, "dim, heads: expected"),
])
def test_bad_options_raise_one_line_errors(kwargs, message):
    with pytest.raises(qkv.Error, match=message.replace("(", r"\(")) as error:
        qkv.explain(**kwargs)
    assert "\n" not in str(error.value)
